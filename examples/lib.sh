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
  examples_unmount -z 2>/dev/null || true
  rm -rf "$work"
}

# Unmounts $mnt (fusermount3 -u, plus $1 if given: -z for lazy) and waits (up
# to a minute) until the daemon has let go of $work/vm.img. fusermount3 returns
# at once; the daemon goes on flushing the drive and saving its state (bitmaps,
# job records) until it exits, and it holds the image's lock until then.
# Removing $work or starting another cbwfs before that races with it.
examples_unmount() {
  fusermount3 -u ${1:-} "$mnt" || return
  flock -w 60 "$work/vm.img" true
}
