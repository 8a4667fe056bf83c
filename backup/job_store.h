#pragma once

// Thread model: a JobStore is not thread-safe. Its one user, JobRegistry,
// serialises every call under its store mutex (lock order: JobRegistry store
// mutex -> JobRegistry::mu_ -> BackupJob::mu_), so a record is never written
// and removed at once. The codec is shared and immutable.

#include <memory>
#include <string>
#include <vector>

#include "backup/job_record_codec.h"
#include "backup/job_types.h"
#include "backup/status.h"
#include "backup/unique_fd.h"

namespace cbw::backup {

// Job records kept across restarts in a state directory (--state-dir): one
// file per job, `<job-id><suffix>`, whose content and suffix are the codec's
// (the daemon's writes `<id>.json`, the jobs/<id> file of the job).
//
// Writes are durable: the record goes to `.<id>.tmp`, is fsync'd, renamed
// over `<id><suffix>`, and the directory is fsync'd. A crash leaves either
// the old or the new record, and at worst a stale temp file, which Load()
// removes.
class JobStore {
 public:
  // Opens `dir` (absolute), creating it and missing parents with mode 0700.
  // Fails, with a message naming the path and the errno text, when it cannot
  // be created, is not a directory, or a file cannot be created in it; and
  // with EINVAL when `codec` is null.
  static Result<std::unique_ptr<JobStore>> Open(const std::string& dir,
                                                std::shared_ptr<const JobRecordCodec> codec);

  const std::string& dir() const { return dir_; }
  // Where the record of `id` is (or would be).
  std::string PathOf(const std::string& id) const;

  // Writes (replaces) the record of `info.id`, durably.
  Status Save(const JobInfo& info);
  // Deletes the record of `id` (no error if there is none), durably.
  Status Remove(const std::string& id);
  // Every readable record, oldest start first. Corrupt records (the codec
  // refuses them, or one names another job than its file) and foreign files
  // are skipped with a warning and left alone; stale temp files are removed.
  std::vector<JobInfo> Load();

 private:
  JobStore(std::string dir, UniqueFd dir_fd, std::shared_ptr<const JobRecordCodec> codec)
      : dir_(std::move(dir)), dir_fd_(std::move(dir_fd)), codec_(std::move(codec)) {}
  Status SyncDir();
  // The file name of the record of `id`.
  std::string FileName(const std::string& id) const;

  std::string dir_;
  UniqueFd dir_fd_;
  std::shared_ptr<const JobRecordCodec> codec_;
};

}  // namespace cbw::backup
