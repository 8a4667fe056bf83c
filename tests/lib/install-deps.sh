#!/usr/bin/env bash
# Installs the Debian packages cbwfs needs to build, test and demo, if missing.
# Usage: tests/lib/install-deps.sh [extra-package ...]   (run as root, or with sudo available)
set -euo pipefail
pkgs=(build-essential cmake ninja-build pkg-config libfuse3-dev fuse3 liburing-dev
      nlohmann-json3-dev libboost-program-options-dev libgtest-dev googletest jq
      clang libclang-rt-14-dev qemu-utils locales e2fsprogs libsystemd-dev python3
      python3-prometheus-client groff-base man-db libnbd-dev libnbd-bin nbdkit
      # Ceph RBD targets: the client libraries, and a single-node cluster
      # for the tests (tests/lib/ceph.sh)
      librbd-dev librados-dev ceph-mon ceph-osd ceph-mgr ceph-common "$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# FUSE needs its device node; load the module if a fresh machine lacks it.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
