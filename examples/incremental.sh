#!/usr/bin/env bash
# cbwfs incremental backups (SPEC 7), start to finish:
#   1. mount a scratch image with a --state-dir (persistent bitmaps live there)
#   2. one transaction: a new persistent dirty bitmap b0 + a full raw backup,
#      both at the same point in time
#   3. three rounds of: change the drive, note a copy of it, back up only the
#      changed clusters into a qcow2 overlay on the previous backup
#      (qemu-img create -f qcow2 -b PREV -F FMT incK.qcow2; mode existing),
#      change it more while the job runs, restore the chain with
#      `qemu-img convert` and cmp it against the noted copy
#      (between rounds 2 and 3 cbwfs is restarted: b0 comes back from disk)
#   4. the raw in-place refresh: an incremental straight into a raw full copy
#      (the restored chain), mode existing, then cmp against the drive
#   5. unmount. Everything is removed on any exit.
#
#   Usage: examples/incremental.sh   (as root; needs qemu-img, jq, cmp)
#   CBWFS_BINARY=path  use that cbwfs instead of building one into build/
#   INCR_MB=N          size of the scratch image in MiB (default 64)
#   INCR_DIR=path      make the scratch folder under path (default $TMPDIR or /tmp)
#   INCR_KEEP=1        keep the scratch folder (the backups) for a look afterwards
set -euo pipefail # every cmp below stops the script on a difference
cd "$(dirname "$0")/.."
size_mb=${INCR_MB:-64}
clusters=$((size_mb * 16)) # 64 KiB clusters, the default bitmap granularity

. examples/lib.sh
examples_binary

work=$(mktemp -d "${INCR_DIR:-${TMPDIR:-/tmp}}/cbwfs-incremental.XXXXXX")
mnt=$work/mnt
cleanup() {
  local rc=$?
  examples_unmount -z 2>/dev/null || true
  if [ "$rc" != 0 ]; then
    echo "FAILED (exit $rc); the daemon's log:" >&2
    cat "$work/cbwfs.log" >&2 2>/dev/null || true
  fi
  if [ "${INCR_KEEP:-0}" = 1 ]; then
    echo "(kept $work)"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$mnt"
cd "$work" # the backups are made here; the chain's backing names are relative

# Writes one command into the control file; on refusal prints the reply
# (QMP's {"error": ...}) and stops. The command goes as one line: each write()
# on control must hold whole commands, and the shell writes line by line.
qmp() {
  local cmd=${1//$'\n'/}
  echo "   > $cmd"
  echo "$cmd" > "$mnt/control" || { echo "   refused: $(cat "$mnt/control")"; exit 1; }
}

# Waits (up to 2 minutes) for job $1 to end; stops unless it succeeded.
wait_job() {
  local rec deadline=$((SECONDS + 120))
  while :; do
    rec=$(cat "$mnt/jobs/$1")
    jq -e 'has("result")' <<<"$rec" >/dev/null && break
    [ "$SECONDS" -lt "$deadline" ] || { echo "job $1 did not end: $rec"; exit 1; }
    sleep 0.05
  done
  echo "   job $1: $(jq -c '{sync, result, len, "cbw-bytes"}' <<<"$rec")"
  [ "$(jq -r .result <<<"$rec")" = success ] || { echo "job $1 failed: $rec"; exit 1; }
}

# query-block's view of b0: name, count (dirty bytes), busy, persistent...
show_bitmap() {
  echo '{"execute":"query-block"}' > "$mnt/control"
  jq -c '.return[] | select(.device == "drive0") | .inserted."dirty-bitmaps"[]' "$mnt/control" |
    sed 's/^/   bitmap: /'
}

# Overwrites $1 random 64 KiB clusters of the drive, and punches a 256 KiB
# hole (an incremental must write those zeroes into its overlay, or the old
# data of the backing file would show through).
change_drive() {
  local i
  for ((i = 0; i < $1; i++)); do
    dd if=/dev/urandom of="$mnt/drive0" bs=64K count=1 conv=notrunc status=none \
      seek=$(((RANDOM * 32768 + RANDOM) % clusters))
  done
  fallocate --punch-hole --keep-size --length $((256 << 10)) \
    --offset $((((RANDOM * 32768 + RANDOM) % (clusters - 4)) << 16)) "$mnt/drive0"
}

mount_cbwfs() {
  echo "   cbwfs --drive drive0=$work/vm.img --state-dir $work/state --log-file $work/cbwfs.log $mnt"
  "$CBWFS" --drive drive0="$work/vm.img" --state-dir "$work/state" --log-file "$work/cbwfs.log" "$mnt"
}

echo "== a ${size_mb} MiB scratch image with random data, mounted"
head -c $((size_mb << 20)) /dev/urandom > vm.img
mount_cbwfs

echo "== the full backup and the bitmap at one point in time (one transaction)"
cp "$mnt/drive0" pit0.img # what the full backup must hold
qmp '{"execute":"transaction","arguments":{"actions":[
 {"type":"block-dirty-bitmap-add","data":{"node":"drive0","name":"b0","persistent":true}},
 {"type":"drive-backup","data":{"device":"drive0","job-id":"full","target":"'"$work"'/full.img","sync":"full"}}]}}'
wait_job full
cmp full.img pit0.img
echo "   OK: full.img equals the drive at its point in time"
show_bitmap

prev=full.img prev_fmt=raw
for k in 1 2 3; do
  echo "== round $k: change the drive, then an incremental into inc$k.qcow2 (backing: $prev)"
  change_drive 40
  show_bitmap # count: the bytes inc$k will copy
  cp "$mnt/drive0" "pit$k.img"
  qemu-img create -q -f qcow2 -b "$prev" -F "$prev_fmt" "inc$k.qcow2"
  qmp '{"execute":"drive-backup","arguments":{"device":"drive0","job-id":"inc'$k'","target":"'"$work/inc$k.qcow2"'","mode":"existing","sync":"incremental","bitmap":"b0"}}'
  change_drive 10 # during the job: not in inc$k (the bitmap's successor records them for inc$((k + 1)))
  wait_job "inc$k"
  echo "   restore: qemu-img convert -O raw inc$k.qcow2 restored$k.img"
  qemu-img convert -O raw "inc$k.qcow2" "restored$k.img"
  cmp "restored$k.img" "pit$k.img"
  echo "   OK: the chain up to inc$k equals the drive at inc$k's point in time"
  qemu-img check -q "inc$k.qcow2"
  du -h --apparent-size "inc$k.qcow2" | sed 's/^/   overlay size: /'
  prev=inc$k.qcow2 prev_fmt=qcow2
  if [ "$k" = 2 ]; then
    echo "== restarting cbwfs: b0 is saved in $work/state and comes back with its bits"
    examples_unmount # a clean stop saves the bitmaps
    mount_cbwfs
    show_bitmap
  fi
  rm "pit$k.img"
done
rm -f restored1.img restored2.img
echo "== the chain"
qemu-img info --backing-chain inc3.qcow2 | grep -E '^(image|file format|backing file):' | sed 's/^/   /'

echo "== the raw in-place refresh: restored3.img is a full raw copy as of inc3; an"
echo "   incremental into it (mode existing) makes it the drive as of now"
change_drive 20
cp "$mnt/drive0" pit4.img
qmp '{"execute":"drive-backup","arguments":{"device":"drive0","job-id":"refresh","target":"'"$work"'/restored3.img","mode":"existing","sync":"incremental","bitmap":"b0"}}'
wait_job refresh
cmp restored3.img pit4.img
echo "   OK: the refreshed copy equals the drive at the refresh's point in time"
show_bitmap

echo "== unmounting"
examples_unmount
echo "incremental example finished: OK"
