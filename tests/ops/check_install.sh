#!/usr/bin/env bash
# `cmake --install` puts both programs, the man pages, the systemd unit and the
# example configuration where they belong, with --prefix and with DESTDIR;
# the unit names the installed cbwfs and passes systemd-analyze verify; the
# installed cbwfs reads the example configuration.
# Usage: check_install.sh BUILD_DIR
set -euo pipefail
build=$1
tmp=$(mktemp -d "${TMPDIR:-/tmp}/cbwfs-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail=0
need() { [ -e "$1" ] || { echo "FAIL: not installed: $1" >&2; fail=1; }; }

cmake --install "$build" --prefix "$tmp/p" >"$tmp/install.log"
p=$tmp/p
for f in bin/cbwfs bin/cbwctl share/man/man1/cbwfs.1 share/man/man1/cbwctl.1 \
         lib/systemd/system/cbwfs@.service share/doc/cbwfs/example.conf; do
  need "$p/$f"
done
[ -x "$p/bin/cbwfs" ] && [ -x "$p/bin/cbwctl" ] || { echo "FAIL: programs not executable" >&2; fail=1; }
unit=$p/lib/systemd/system/cbwfs@.service
want="ExecStart=$p/bin/cbwfs -f --config /etc/cbwfs/%i.conf"
grep -qxF "$want" "$unit" || { echo "FAIL: $unit lacks '$want':" >&2; cat "$unit" >&2; fail=1; }
for line in Type=notify NotifyAccess=main KillMode=mixed TimeoutStopSec=infinity; do
  grep -qx "$line" "$unit" || { echo "FAIL: $unit lacks $line" >&2; fail=1; }
done
"$p/bin/cbwfs" --version | grep -q '^cbwfs ' || { echo "FAIL: installed cbwfs does not run" >&2; fail=1; }
"$p/bin/cbwctl" --version >/dev/null || { echo "FAIL: installed cbwctl does not run" >&2; fail=1; }

if command -v systemd-analyze >/dev/null; then
  # A template is verified through an instance of it.
  mkdir -p "$tmp/units"
  cp "$unit" "$tmp/units/cbwfs@check.service"
  if ! out=$(cd "$tmp/units" && systemd-analyze verify --man=no ./cbwfs@check.service 2>&1); then
    echo "FAIL: systemd-analyze verify:" >&2; echo "$out" >&2; fail=1
  elif grep -qi 'cbwfs@check.service:' <<<"$out"; then
    echo "FAIL: systemd-analyze verify complains:" >&2; echo "$out" >&2; fail=1
  fi
else
  echo "note: systemd-analyze not installed, unit not verified"
fi

# The example configuration parses: cbwfs gets as far as checking its
# mountpoint or drive (exit 1 naming it), not a usage error (2).
set +e
out=$("$p/bin/cbwfs" --config "$p/share/doc/cbwfs/example.conf" 2>&1); rc=$?
set -e
if [ "$rc" != 1 ] || ! grep -qE "/run/cbwfs/vm|/var/lib/images/vm.img" <<<"$out"; then
  echo "FAIL: example.conf: exit $rc: $out" >&2; fail=1
fi

# DESTDIR: files under it, the unit still names the real prefix.
DESTDIR=$tmp/dest cmake --install "$build" --prefix /opt/cbwfs >"$tmp/install2.log"
need "$tmp/dest/opt/cbwfs/bin/cbwfs"
need "$tmp/dest/opt/cbwfs/share/man/man1/cbwctl.1"
grep -qxF "ExecStart=/opt/cbwfs/bin/cbwfs -f --config /etc/cbwfs/%i.conf" \
  "$tmp/dest/opt/cbwfs/lib/systemd/system/cbwfs@.service" ||
  { echo "FAIL: DESTDIR install: unit does not name /opt/cbwfs/bin/cbwfs" >&2; fail=1; }

[ $fail = 0 ] && echo "install layout ok"
exit $fail
