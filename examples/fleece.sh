#!/usr/bin/env bash
# cbwfs image fleecing: mounts a demo image, keeps a writer overwriting it,
# starts a sync=none job on a sparse scratch file, copies snapshots/<id> with
# `cp --sparse=always` while the writer runs, cancels the job, and verifies the
# copy against the drive's checksum at the job's start. Prints scratch space
# used vs data overwritten. Exits non-zero on a mismatch.
#   Usage: examples/fleece.sh   (as root)
#   CBWFS_BINARY=path  use that cbwfs instead of building one into build/
#   FLEECE_MB=N        size of the demo image in MiB (default 256)
set -euo pipefail
cd "$(dirname "$0")/.."
size_mb=${FLEECE_MB:-256}

. examples/lib.sh
examples_setup fleece

echo "== making a ${size_mb} MiB demo image: random data in every other 4 MiB, holes between"
truncate -s $((size_mb << 20)) "$work/vm.img"
for ((i = 0; i < size_mb / 4; i += 2)); do
  head -c $((4 << 20)) /dev/urandom |
    dd of="$work/vm.img" bs=4M seek=$i conv=notrunc status=none iflag=fullblock
done

echo "== mounting: cbwfs --drive drive0=$work/vm.img $mnt"
"$CBWFS" --drive drive0="$work/vm.img" "$mnt"
ls -l "$mnt"

# A writer that keeps overwriting random 64 KiB blocks of the live drive. It
# pauses while $work/hold exists, so the script can take the checksum of the
# drive at the instant the job starts.
blocks=$((size_mb * 16))
writer() {
  while :; do
    if [ -e "$work/hold" ]; then : > "$work/held"; sleep 0.01; continue; fi
    rm -f "$work/held"
    dd if=/dev/urandom of="$mnt/drive0" bs=64K count=1 seek=$(((RANDOM * 32768 + RANDOM) % blocks)) \
       conv=notrunc status=none 2>/dev/null || true
    echo >> "$work/writes"   # one line per write
  done
}
writer & writer_pid=$!
while [ ! -s "$work/writes" ]; do sleep 0.05; done

echo "== pausing the writer to note the drive's checksum at the point in time"
: > "$work/hold"; while [ ! -e "$work/held" ]; do sleep 0.01; done
expected=$(sha256sum < "$mnt/drive0" | cut -d' ' -f1)
writes_before=$(wc -l < "$work/writes")
echo "   drive0 now: $expected"

echo "== starting a sync=none job on a sparse scratch file (the fleecing target)"
truncate -s $((size_mb << 20)) "$work/scratch.img"
cmd='{"execute":"drive-backup","arguments":{"device":"drive0","job-id":"fleece0","target":"'"$work/scratch.img"'","mode":"existing","sync":"none"}}'
echo "   echo '$cmd' > $mnt/control"
echo "$cmd" > "$mnt/control" || { cat "$mnt/control"; exit 1; }
rm -f "$work/hold"   # the writer goes on overwriting the drive

echo "== copying $mnt/snapshots/fleece0 with cp --sparse=always while the writer runs"
ls -l "$mnt/snapshots"
cp --sparse=always "$mnt/snapshots/fleece0" "$work/copy.img"
kill "$writer_pid"; wait "$writer_pid" 2>/dev/null || true; writer_pid=""
writes=$(( $(wc -l < "$work/writes") - writes_before ))
rec=$(cat "$mnt/jobs/fleece0")
jq '{status, "cbw-bytes", sync, target}' <<<"$rec"
cbw=$(jq '."cbw-bytes"' <<<"$rec")
scratch_used=$(( $(stat -c %b "$work/scratch.img") * 512 ))
copy_used=$(( $(stat -c %b "$work/copy.img") * 512 ))

echo "== cancelling the job (its view disappears)"
echo '{"execute":"job-cancel","arguments":{"id":"fleece0"}}' > "$mnt/control"
while [ -e "$mnt/snapshots/fleece0" ]; do sleep 0.01; done
jq -c '{status, result}' "$mnt/jobs/fleece0"

echo "== space"
printf '   writer: %d writes of 64 KiB while the job ran (%d bytes)\n' "$writes" $((writes << 16))
printf '   old data preserved by CBW (cbw-bytes): %d bytes\n' "$cbw"
printf '   scratch file allocated:                %d bytes (of %d apparent)\n' \
  "$scratch_used" $((size_mb << 20))
printf '   copy allocated (holes kept):           %d bytes\n' "$copy_used"

echo "== verifying"
actual=$(sha256sum < "$work/copy.img" | cut -d' ' -f1)
now=$(sha256sum < "$mnt/drive0" | cut -d' ' -f1)
echo "   copy.img:             $actual"
echo "   drive0 at job start:  $expected"
echo "   drive0 now:           $now"
[ "$actual" = "$expected" ] || { echo "MISMATCH: the copy is not the point-in-time image"; exit 1; }
[ "$scratch_used" -le $((cbw + (1 << 20))) ] || { echo "scratch file is not sparse"; exit 1; }
echo "   OK: the copy equals the drive as it was when the job started"

examples_unmount
echo "fleecing finished"
