#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <string>

#include "backup/status.h"
#include "backup/unique_fd.h"

namespace cbw::backup {

// A target path resolved one component at a time, never entering the mount.
struct ResolvedPath {
  UniqueFd parent;      // O_PATH fd of the directory that holds `name`
  std::string name;     // the final component
  std::string path;     // absolute, with symlinks resolved (for messages, logs)
  bool exists = false;  // `name` exists in `parent` (not followed: not a symlink)
  struct stat st = {};  // its type, device and inode when it exists
};

// Resolves `raw` (relative to `base_dir` unless absolute) the way
// libfuse's passthrough_hp looks names up: a component at a time with
// openat(O_PATH | O_NOFOLLOW), following symlinks by hand (at most 40), and
// statx(AT_STATX_DONT_SYNC) of each component, which asks no FUSE daemon
// for attributes. A component on the device `mount_dev` (the cbwfs mount;
// 0 if unknown) or at or under `mountpoint` by path is refused with EINVAL
// before anything inside it is looked up, so the daemon can never call into
// itself here. Other errors carry the errno of the failing call.
//
// The final component is not followed if it is a symlink's target that does
// not exist (the caller may create it). Thread-safe; blocks only on the file
// systems it walks (never call it holding an engine lock).
Result<ResolvedPath> ResolvePath(const std::string& raw, const std::string& base_dir,
                                 const std::string& mountpoint, dev_t mount_dev);

// Whether `path` is `dir` or below it (both absolute, canonical).
bool IsPathUnder(const std::string& path, const std::string& dir);

}  // namespace cbw::backup
