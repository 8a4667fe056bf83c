#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backup/drive.h"
#include "backup/log.h"
#include "backup/status.h"

namespace cbw::fs {

// The parsed command line (SPEC section 1).
struct Options {
  std::vector<backup::DriveConfig> drives;
  std::string mountpoint;
  bool foreground = false;
  std::vector<std::string> mount_options;  // -o, split at commas (cbwfs's own taken out)
  // -o writeback_cache (SPEC 9): the kernel caches drive writes; cbwfs writes
  // them back before each point in time. Not passed on to FUSE's parser.
  bool writeback_cache = false;
  uint64_t cluster_size = 64 * 1024;
  uint64_t cbw_buffer_bytes = 64ull << 20;  // --cbw-buffer
  std::string state_dir;
  std::string qmp_path;     // --qmp: "" = no QMP socket
  std::string log_file;     // --log-file: "" = default sinks, "-" = stderr
  std::string config_file;  // --config, as given
  backup::LogLevel log_level = backup::LogLevel::kInfo;
  bool help = false;
  bool version = false;
};

// Parses argv and, with --config FILE, the file's `option = value` lines (the
// long options without dashes, `mountpoint = PATH` for the MOUNTPOINT; `#`
// starts a comment). An option given on the command line replaces the
// file's values for it (repeatable ones included). On a usage error
// (command line or file) returns EINVAL with a message naming the bad option
// or value (the caller prints it and exits 2); a config file that cannot be
// read returns its errno with a message naming it (exit 1). Touches no file
// but the config file.
backup::Result<Options> ParseOptions(int argc, char** argv);
// The --help text.
std::string UsageText();
// "64K", "1M", "65536" -> bytes; false if malformed.
bool ParseSize(const std::string& text, uint64_t* bytes);

}  // namespace cbw::fs
