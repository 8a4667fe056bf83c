#!/usr/bin/env bash
# Builds cbwfs (release) and runs the side-by-side benchmark against
# qemu-storage-daemon and the native file. Not part of CI.
#   tests/bench/run.sh [--size-mib 1024] [--runtime 10] [--reps 3] [--out bench-results.json]
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/lib/install-deps.sh fio qemu-system-common python3 pv
cmake -S . -B build-bench -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF >/dev/null
ninja -C build-bench cbwfs >/dev/null
exec python3 tests/bench/bench.py --binary "$PWD/build-bench/fs/cbwfs" "$@"
