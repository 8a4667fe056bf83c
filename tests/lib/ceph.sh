#!/usr/bin/env bash
# A throw-away single-node Ceph cluster for the tests: one mon, one osd on
# memstore (data in memory), one mgr; auth off; on 127.0.0.1 only; no systemd.
#
#   tests/lib/ceph.sh start DIR [OWNER_PID]
#                                 creates DIR, starts the daemons, creates the
#                                 pool `rbd` and waits until it serves I/O; the
#                                 last line of its output is
#                                 CEPH_CONF=DIR/ceph.conf. With OWNER_PID, a
#                                 watchdog stops the cluster once that process
#                                 is gone (a crashed or killed test binary
#                                 leaves no daemons behind)
#   tests/lib/ceph.sh stop DIR    stops the daemons recorded in DIR/run/*.pid
#                                 (only those: never by name), SIGKILL after 5 s
#
# Needs ceph-mon ceph-osd ceph-mgr ceph-common (tests/lib/install-deps.sh).
# CEPH_MEMSTORE_BYTES sets the osd's capacity (default 1 GiB; data is kept in
# memory, so tests keep their images small).
# The mon listens on a free port (CEPH_MON_PORT overrides), so several
# clusters (parallel test binaries, a developer's own) can run side by side.
# On failure `start` stops what it started and prints the daemons' last log
# lines. Roughly 10-20 s on a 2-core machine.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [[ -z "$cmd" || -z "$dir" ]]; then
  echo "usage: $0 start|stop DIR" >&2
  exit 2
fi

# Whether $1 runs (a zombie does not: daemons are re-parented to an init
# that may be slow to reap them, or never does in some containers).
running() {
  local st
  st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ -n "$st" && "$st" != Z* ]]
}

stop() {
  local kind f pid i
  # OSDs and the mgr first, while the mon can still hear that they leave.
  for kind in osd mgr mon; do
    for f in "$dir"/run/"$kind".*.pid; do
      [[ -e "$f" ]] || continue
      pid=$(cat "$f" 2>/dev/null) || continue
      if [[ -n "$pid" ]]; then
        # The mgr's Python modules take seconds to stop, and a throw-away
        # cluster keeps nothing: SIGKILL at once. A SIGSTOPped daemon (tests
        # do that) needs SIGCONT to act on SIGTERM.
        [[ "$kind" == mgr ]] && kill -KILL "$pid" 2>/dev/null
        kill -TERM "$pid" 2>/dev/null && kill -CONT "$pid" 2>/dev/null
        for ((i = 0; i < 50; i++)); do
          running "$pid" || break
          sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
      fi
      rm -f "$f"
    done
  done
  if [[ -e "$dir/watchdog.pid" ]]; then
    pid=$(cat "$dir/watchdog.pid" 2>/dev/null) || true
    rm -f "$dir/watchdog.pid"
    [[ -n "$pid" && "$pid" != "${WATCHDOG_SELF:-}" ]] && kill "$pid" 2>/dev/null || true
  fi
}

if [[ "$cmd" == stop ]]; then
  stop
  exit 0
fi
[[ "$cmd" == start ]] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
owner=${3:-}

t0=$(date +%s%N)
step() { echo "$(( ($(date +%s%N) - t0) / 1000000 )) ms: $*"; }
fail() {
  echo "ceph.sh: $*" >&2
  for l in "$dir"/log/*.log "$dir"/log/*.out; do
    [[ -e "$l" ]] && { echo "--- $l" >&2; tail -n 20 "$l" >&2; }
  done
  stop
  exit 1
}
# Polls `$@` every 0.2 s for up to $wait_s seconds.
wait_for() {
  local what=$1 i
  shift
  for ((i = 0; i < wait_s * 5; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  fail "timed out waiting for $what"
}

free_port() {
  local p i
  for ((i = 0; i < 100; i++)); do
    p=$((20000 + RANDOM % 30000))
    ss -Htln "sport = :$p" 2>/dev/null | grep -q . || { echo "$p"; return; }
  done
  echo "ceph.sh: no free port" >&2
  return 1
}

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
[[ -d "$dir/run" ]] && stop
rm -rf "${dir:?}"/{mon,osd,mgr,run,log,ceph.conf,monmap}
mkdir -p "$dir"/{mon,osd,mgr,run,log}
port=${CEPH_MON_PORT:-$(free_port)}
fsid=$(cat /proc/sys/kernel/random/uuid)
conf=$dir/ceph.conf
export CEPH_CONF=$conf
cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
run dir = $dir/run
log file = $dir/log/\$name.log
# No crash reports or core files of ours in the system's folders.
crash dir = $dir/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon data avail crit = 0
# Pool usage reaches the mon within about a second, and the mon checks
# pool quotas each second (its tick), so a full pool is flagged promptly.
mgr stats period = 1
osd mon report interval = 1
mon tick interval = 1
# Monitor map updates go out at once rather than batched each second.
paxos propose interval = 0.05
paxos min wait = 0.01
osd mon report interval = 1
[client]
# Clients (the tests' rbd/ceph commands, cbwfs) share one log and open no
# admin sockets, which would collide between processes.
admin socket =
log file = $dir/log/client.log
[mon.a]
mon data = $dir/mon
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
[mgr.x]
mgr data = $dir/mgr
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
[osd.0]
osd data = $dir/osd
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
osd objectstore = memstore
memstore device bytes = ${CEPH_MEMSTORE_BYTES:-1073741824}
osd max object name len = 460
osd max object namespace len = 64
CONF

monmaptool --create --clobber --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" \
  >/dev/null || fail "monmaptool"
ceph-mon --id a --mkfs --monmap "$dir/monmap" --keyring /dev/null >"$dir/log/mon-mkfs.out" 2>&1 ||
  fail "ceph-mon --mkfs"
ceph-mon --id a >"$dir/log/mon.out" 2>&1 || fail "ceph-mon"
step "mon on 127.0.0.1:$port"
wait_s=30
ceph --connect-timeout 20 osd create >/dev/null 2>&1 || fail "ceph osd create"
ceph-osd --id 0 --mkfs >"$dir/log/osd-mkfs.out" 2>&1 || fail "ceph-osd --mkfs"
ceph-osd --id 0 >"$dir/log/osd.out" 2>&1 || fail "ceph-osd"
ceph-mgr --id x >"$dir/log/mgr.out" 2>&1 || fail "ceph-mgr"
step "osd, mgr started"
wait_for "osd up" bash -c "ceph osd stat 2>/dev/null | grep -q '1 up'"
step "osd up"
ceph osd pool create rbd 8 8 >/dev/null 2>&1 || fail "pool create"
# `rbd pool init` writes to the pool, so the OSD serves it once this returns.
# Not waited for: the mgr (its Python modules take seconds to load), which
# only pool statistics and so pool quotas need; tests that use those wait
# for their effect.
rbd pool init rbd >/dev/null 2>&1 || fail "rbd pool init"
step "pool rbd ready"
if [[ -n "$owner" ]]; then
  setsid bash -c 'while ps -o stat= -p "$1" | grep -qv "^Z"; do sleep 1; done
                 WATCHDOG_SELF=$$ exec "$2" stop "$3"' \
    watchdog "$owner" "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" "$dir" \
    </dev/null >/dev/null 2>&1 &
  echo $! >"$dir/watchdog.pid"
fi
echo "CEPH_CONF=$conf"
