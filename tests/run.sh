#!/usr/bin/env bash
# Installs what is missing, configures and builds cbwfs from scratch, and runs
# the whole test suite with ctest.
#   tests/run.sh           the suite (unit + end-to-end through real FUSE mounts, and label
#                          `ceph`: RBD targets against a single-node Ceph cluster that the test
#                          binary starts and stops itself, tests/lib/ceph.sh)
#   tests/run.sh --asan    the same, built with AddressSanitizer + UBSan (`ceph` included:
#                          librbd calls back on its own threads, and requests that time out
#                          outlive their callers, which is what ASan checks)
#   tests/run.sh --tsan    the unit tests (engine concurrency, stress, control), built with
#                          ThreadSanitizer (not `ceph`: librados/librbd are not instrumented,
#                          and TSan cannot see all of their synchronisation)
#   tests/run.sh --fuzz    the libFuzzer targets (clang), for a bounded time
# BUILD_DIR overrides the build folder (default: build-test[-asan|-tsan|-fuzz]).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
tests/lib/install-deps.sh

cmake_args=(-G Ninja -DCBW_WERROR=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo)
ctest_args=(--output-on-failure --timeout 900 -j2)
suffix=""
case "$mode" in
  "") ;;
  --asan) suffix=-asan; cmake_args+=(-DCBW_SANITIZE=ON) ;;
  --tsan) suffix=-tsan; cmake_args+=(-DCBW_TSAN=ON); ctest_args+=(-L unit) ;;
  --fuzz) suffix=-fuzz; cmake_args+=(-DCBW_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++); ctest_args+=(-L fuzz) ;;
  *) echo "usage: tests/run.sh [--asan|--tsan|--fuzz]" >&2; exit 2 ;;
esac
build=${BUILD_DIR:-build-test$suffix}
rm -rf "$build"
cmake -S . -B "$build" "${cmake_args[@]}" >/dev/null
# Each variant builds what it runs: TSan the `unit` label's binaries; fuzz
# the fuzz targets and the programs (the whole product tree, so that clang's
# -Wthread-safety checks every lock annotation).
case "$mode" in
  --tsan) ninja -C "$build" unit_tests ;;
  --fuzz) ninja -C "$build" control_fuzz cbwfs cbwctl ;;
  *) ninja -C "$build" ;;
esac
export CBW_TEST_MODE=${mode#--}
ctest --test-dir "$build" "${ctest_args[@]}"
