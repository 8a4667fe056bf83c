# Shared by the example scripts (sourced, not run). Sets CBWFS to the cbwfs
# binary (CBWFS_BINARY if given, else installs what is missing and builds one
# into build/), makes a scratch folder $work with a mountpoint $mnt, and
# cleans both up on exit, along with a background $writer_pid if one was set.
#   examples_setup NAME
examples_setup() {
  examples_binary
  work=$(mktemp -d "/tmp/cbwfs-$1.XXXXXX")
  mnt=$work/mnt
  writer_pid=""
  trap examples_cleanup EXIT
  mkdir -p "$mnt"
}

# Sets CBWFS: CBWFS_BINARY if given, else one built into build/ (from the
# repository's top folder).
examples_binary() {
  if [ -n "${CBWFS_BINARY:-}" ]; then
    CBWFS=$CBWFS_BINARY
  else
    tests/lib/install-deps.sh
    echo "== building"
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    ninja -C build cbwfs >/dev/null
    CBWFS=$PWD/build/fs/cbwfs
  fi
}

examples_cleanup() {
  [ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null || true
  fusermount3 -uz "$mnt" 2>/dev/null || true
  rm -rf "$work"
}
