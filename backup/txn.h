#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "backup/job_types.h"
#include "backup/mutex.h"

namespace cbw::backup {

class BackupJob;

// The jobs started by one StartBackups call (a QMP transaction). With
// kGrouped, a failed or cancelled job cancels its peers, jobs leave `waiting`
// together once all have finished copying, and finalizing one finalizes all.
// Thread-safe; its lock is taken with no job lock held.
class Txn {
 public:
  explicit Txn(CompletionMode mode) : mode_(mode) {}
  CompletionMode mode() const { return mode_; }
  void Add(const std::shared_ptr<BackupJob>& job) CBW_EXCLUDES(mu_);
  // A job finished copying successfully. Wakes every job once all have.
  void MarkCopied() CBW_EXCLUDES(mu_);
  bool AllCopied() const CBW_EXCLUDES(mu_);
  // A job failed or was cancelled: with kGrouped, cancels the others.
  void Abort(const BackupJob* from) CBW_EXCLUDES(mu_);
  // job-finalize on one job of a grouped transaction finalizes all.
  void FinalizeAll(const BackupJob* from) CBW_EXCLUDES(mu_);

 private:
  std::vector<std::shared_ptr<BackupJob>> Peers(const BackupJob* from) const CBW_EXCLUDES(mu_);

  const CompletionMode mode_;
  mutable Mutex mu_;
  std::vector<std::weak_ptr<BackupJob>> jobs_ CBW_GUARDED_BY(mu_);
  size_t copied_ CBW_GUARDED_BY(mu_) = 0;
};

}  // namespace cbw::backup
