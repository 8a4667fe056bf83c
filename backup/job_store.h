#pragma once

// Thread model: a JobStore is not thread-safe. Its one user, JobRegistry,
// serialises every call under its store mutex (lock order: JobRegistry store
// mutex -> JobRegistry::mu_ -> BackupJob::mu_), so a record is never written
// and removed at once.

#include <memory>
#include <string>
#include <vector>

#include "backup/job_types.h"
#include "backup/status.h"
#include "backup/unique_fd.h"

namespace cbw::backup {

// Job records kept across restarts in a state directory (--state-dir): one
// file per job, `<job-id>.job`, in a line-based text format:
//
//   cbwfs-job 1
//   id=job0
//   target=/backups/a\nb.img
//   ...
//   end
//
// The first line names the format and its version; then one `key=value` per
// line (keys are SPEC 4's JobInfo field names plus `listed`); values escape
// `\` as `\\`, newline as `\n`, CR as `\r`, tab as `\t` and any other control
// byte as `\xHH`; optional fields (error, eta-seconds, finished) are absent
// when unset; the last line is `end`, so a record cut short is recognisably
// incomplete. Unknown keys are ignored (newer versions may add some).
//
// Writes are durable: the record goes to `.<id>.tmp`, is fsync'd, renamed
// over `<id>.job`, and the directory is fsync'd. A crash leaves either the old
// or the new record, and at worst a stale temp file, which Load() removes.
class JobStore {
 public:
  // Opens `dir` (absolute), creating it and missing parents with mode 0700.
  // Fails, with a message naming the path and the errno text, when it cannot
  // be created, is not a directory, or a file cannot be created in it.
  static Result<std::unique_ptr<JobStore>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }

  // Writes (replaces) the record of `info.id`, durably.
  Status Save(const JobInfo& info);
  // Deletes the record of `id` (no error if there is none), durably.
  Status Remove(const std::string& id);
  // Every readable record, oldest start first. Corrupt records and foreign
  // files are skipped with a warning (and left alone); stale temp files are
  // removed.
  std::vector<JobInfo> Load();

  // The text of one record, and back. Parse fails (EINVAL, with the reason)
  // on a wrong header, a missing `end`, a malformed line or value, or a
  // missing required key (id, drive, status, result, started).
  static std::string Format(const JobInfo& info);
  static Result<JobInfo> Parse(const std::string& text);

 private:
  JobStore(std::string dir, UniqueFd dir_fd) : dir_(std::move(dir)), dir_fd_(std::move(dir_fd)) {}
  Status SyncDir();

  std::string dir_;
  UniqueFd dir_fd_;
};

}  // namespace cbw::backup
