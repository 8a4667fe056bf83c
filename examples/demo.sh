#!/usr/bin/env bash
# cbwfs demo: installs what is missing, builds, makes an image (256 MiB), mounts
# it, starts a full backup while a writer keeps overwriting the drive, shows
# progress, verifies the target against the drive's checksum at the point in
# time, and unmounts.        Usage: examples/demo.sh   (as root)
#   CBWFS_BINARY=path  use that cbwfs instead of building one into build/
#   DEMO_MB=N          size of the demo image in MiB (default 256)
set -euo pipefail
cd "$(dirname "$0")/.."
size_mb=${DEMO_MB:-256}

. examples/lib.sh
examples_setup demo

echo "== making a ${size_mb} MiB image with random data"
head -c $((size_mb << 20)) /dev/urandom > "$work/vm.img"

echo "== mounting: cbwfs --drive drive0=$work/vm.img $mnt"
"$CBWFS" --drive drive0="$work/vm.img" "$mnt"
ls -l "$mnt"

# A writer that keeps overwriting random 64 KiB blocks of the live drive.
# It pauses while $work/hold exists, so the demo can take the checksum of the
# drive at the instant the backup starts.
writer() {
  local n=0
  while :; do
    if [ -e "$work/hold" ]; then : > "$work/held"; sleep 0.01; continue; fi
    rm -f "$work/held"
    dd if=/dev/urandom of="$mnt/drive0" bs=64K count=1 seek=$((RANDOM % (size_mb * 16))) \
       conv=notrunc status=none
    n=$((n + 1)); echo "$n" > "$work/writes"
  done
}
writer & writer_pid=$!
sleep 1

echo "== pausing the writer for a moment to note the drive's checksum at the point in time"
: > "$work/hold"; while [ ! -e "$work/held" ]; do sleep 0.01; done
expected=$(sha256sum < "$mnt/drive0" | cut -d' ' -f1)
echo "   drive0 now: $expected"
echo '== starting the backup (rate limited to 64 MiB/s so there is time to watch)'
cmd='{"execute":"drive-backup","arguments":{"device":"drive0","target":"'"$work/backup.img"'","sync":"full","speed":67108864}}'
echo "   echo '$cmd' > $mnt/control"
echo "$cmd" > "$mnt/control"
rm -f "$work/hold"   # the writer goes on overwriting the drive during the backup

echo "== progress (cat $mnt/jobs/drive0 | jq)"
while :; do
  rec=$(cat "$mnt/jobs/drive0")
  status=$(jq -r .status <<<"$rec")
  printf '   %-10s %5.1f%%  cbw-bytes=%s writes-so-far=%s\n' "$status" \
    "$(jq '100 * .offset / (if .len == 0 then 1 else .len end)' <<<"$rec")" \
    "$(jq -r '."cbw-bytes"' <<<"$rec")" "$(cat "$work/writes" 2>/dev/null || echo 0)"
  [ "$status" = concluded ] || [ "$status" = null ] && break
  jq -e '.result' <<<"$rec" >/dev/null 2>&1 && break
  sleep 0.5
done
kill "$writer_pid"; wait "$writer_pid" 2>/dev/null || true; writer_pid=""
jq . "$mnt/jobs/drive0"
[ "$(jq -r .result "$mnt/jobs/drive0")" = success ] || { echo "backup did not succeed"; exit 1; }

echo "== verifying"
actual=$(sha256sum < "$work/backup.img" | cut -d' ' -f1)
now=$(sha256sum < "$mnt/drive0" | cut -d' ' -f1)
echo "   backup.img:            $actual"
echo "   drive0 at backup start: $expected"
echo "   drive0 now:            $now  (the writer changed it meanwhile)"
[ "$actual" = "$expected" ] || { echo "MISMATCH: the backup is not the point-in-time image"; exit 1; }
echo "   OK: the backup equals the drive as it was when the backup started"

echo "== unmounting"
examples_unmount
echo "demo finished"
