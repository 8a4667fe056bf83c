#include "backup/txn.h"

#include "backup/backup_job.h"

namespace cbw::backup {

void Txn::Add(const std::shared_ptr<BackupJob>& job) {
  MutexLock lock(&mu_);
  jobs_.push_back(job);
}

std::vector<std::shared_ptr<BackupJob>> Txn::Peers(const BackupJob* from) const {
  MutexLock lock(&mu_);
  std::vector<std::shared_ptr<BackupJob>> out;
  for (const auto& w : jobs_) {
    if (auto j = w.lock(); j && j.get() != from) out.push_back(std::move(j));
  }
  return out;
}

void Txn::MarkCopied() {
  bool all;
  {
    MutexLock lock(&mu_);
    all = ++copied_ >= jobs_.size();
  }
  if (all) {
    for (auto& j : Peers(nullptr)) j->Kick();
  }
}

bool Txn::AllCopied() const {
  MutexLock lock(&mu_);
  return mode_ == CompletionMode::kIndividual || copied_ >= jobs_.size();
}

void Txn::Abort(const BackupJob* from) {
  if (mode_ != CompletionMode::kGrouped) return;
  for (auto& j : Peers(from)) j->CancelInternal();
}

void Txn::FinalizeAll(const BackupJob* from) {
  if (mode_ != CompletionMode::kGrouped) return;
  for (auto& j : Peers(from)) j->FinalizeInternal();
}

}  // namespace cbw::backup
