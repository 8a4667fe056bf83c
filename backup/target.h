#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "backup/drive.h"
#include "backup/job_types.h"
#include "backup/status.h"
#include "backup/unique_fd.h"

namespace cbw::backup {

// A validated, opened backup target. Owns the fd. If `created` is set, the
// file did not exist before and Discard() removes it again.
struct OpenedTarget {
  std::string path;     // resolved, absolute (symlinks followed)
  std::string display;  // as the user gave it, for messages and JobInfo
  UniqueFd fd;
  dev_t dev = 0;
  ino_t ino = 0;
  bool is_block = false;
  bool created = false;
  // True when the target reads as all zeros before the job writes anything
  // (a regular file we truncate): zero ranges then need no punching.
  bool fresh = false;
};

struct TargetRequest {
  std::string raw_path;    // as given
  std::string base_dir;    // for relative paths
  std::string mountpoint;  // refused by path, before any stat/open
  TargetMode mode = TargetMode::kAbsolutePaths;
  bool format_given = false;
  uint64_t size = 0;  // the drive's size
};

// Returns the name of the live job using (dev, ino) as its target, if any.
using TargetBusyFn = std::function<std::optional<std::string>(dev_t, ino_t)>;

// Validates and opens a target without changing anything on disk except
// creating a missing file (mode absolute-paths). Checks, in this order: the
// path (resolved symlink by symlink, parents with realpath) is not under the
// mountpoint; the file type; not a drive's source (dev/ino); not busy; size;
// for mode=existing without a format, no foreign image magic.
Result<OpenedTarget> OpenTarget(const TargetRequest& req, const std::vector<Drive*>& drives,
                                const TargetBusyFn& busy);

// Makes a regular-file target of mode absolute-paths all-hole and exactly
// `size` bytes (truncate to 0, then to size). Other targets are left alone.
Status PrepareTarget(OpenedTarget& target, TargetMode mode, uint64_t size);

// Undoes OpenTarget for a refused transaction: closes the fd and unlinks the
// file if OpenTarget created it.
void DiscardTarget(OpenedTarget& target);

// The name of a foreign image format recognised in `head` (the first bytes
// of a file), or nullopt for none.
std::optional<std::string> ProbeImageFormat(const unsigned char* head, size_t len);

}  // namespace cbw::backup
