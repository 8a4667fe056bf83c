#!/usr/bin/env bash
# Builds cbwfs (release) and runs the side-by-side benchmark (tests/bench/README.md).
# Not part of CI. Everything after the script name goes to bench.py, e.g.
#   tests/bench/run.sh --libfuse-git /path/to/libfuse.git --phases fio,direct --reps 3
# $LIBFUSE_GIT, when set and no --libfuse-* option is given, is passed as --libfuse-git.
set -euo pipefail
cd "$(dirname "$0")/../.."
extra=(fio qemu-system-common qemu-utils python3 pv e2fsprogs util-linux libnbd-bin nbdkit g++
       pkg-config libfuse3-dev git)
case " $* " in
  *" --ceph "*) extra+=(ceph-mon ceph-osd ceph-mgr ceph-common) ;;
esac
tests/lib/install-deps.sh "${extra[@]}"
cmake -S . -B build-bench -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF >/dev/null
ninja -C build-bench cbwfs >/dev/null
args=("$@")
if [ -n "${LIBFUSE_GIT:-}" ] && [[ " $* " != *" --libfuse-"* ]]; then
  args+=(--libfuse-git "$LIBFUSE_GIT")
fi
exec python3 tests/bench/bench.py --binary "$PWD/build-bench/fs/cbwfs" "${args[@]}"
