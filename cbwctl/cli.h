#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cbwctl/outcome.h"

namespace cbw::ctl {

// cbwctl's command line, parsed and checked: pure functions, thread-safe.
// Options may come before or after the command word; `--` ends options.

enum class Verb { kHelp, kVersion, kBackup, kStatus, kWait, kCancel, kBitmap };
enum class BitmapOp { kAdd, kRemove, kClear };

// `backup DRIVE TARGET [...]`: each optional field is sent only when given,
// so the daemon's own defaults apply otherwise.
struct BackupArgs {
  std::string drive;
  std::string target;  // as typed; see ResolveTarget
  std::string sync;    // always set: --sync, else "incremental" with --bitmap, else "full"
  std::optional<uint64_t> speed;
  std::optional<std::string> bitmap;
  std::optional<std::string> bitmap_mode;
  std::optional<std::string> job_id;
  std::optional<std::string> format;
  std::optional<std::string> mode;
  bool wait = false;

  // The id the job will have: --job-id, else the drive name (SPEC 2.3).
  const std::string& JobId() const { return job_id ? *job_id : drive; }
};

// `bitmap add|remove|clear DRIVE NAME` (granularity, persistent and disabled
// only with add).
struct BitmapArgs {
  BitmapOp op = BitmapOp::kAdd;
  std::string drive;
  std::string name;
  std::optional<uint64_t> granularity;
  bool persistent = false;
  bool disabled = false;
};

struct Invocation {
  Verb verb = Verb::kHelp;
  std::optional<std::string> mountpoint;  // -m, --mount
  bool json = false;                      // status --json
  bool quiet = false;                     // -q: no progress output while waiting
  BackupArgs backup;
  BitmapArgs bitmap;
  std::string job;  // status (empty: every job), wait, cancel
};

// Parses the arguments after argv[0]. A usage error carries kExitUsage and a
// message naming the bad word.
Result<Invocation> ParseArgs(const std::vector<std::string>& args);

// A byte count with an optional binary suffix: "1048576", "512K", "100M",
// "1.5G", "2T" (K = 1024; "KiB"/"KB" spellings and lower case accepted).
// Fails on anything else, negatives, and values of 2^63 or more.
std::optional<uint64_t> ParseSize(std::string_view text);

// The target as the daemon must see it: a local path is made absolute
// against `cwd` (the daemon resolves relative paths against its own working
// directory, which the user neither knows nor means); URIs (nbd://,
// nbd+unix://, rbd:) and absolute paths are unchanged.
std::string ResolveTarget(const std::string& target, const std::string& cwd);

// The --help text.
std::string HelpText();

}  // namespace cbw::ctl
