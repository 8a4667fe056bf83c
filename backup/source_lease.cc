#include "backup/source_lease.h"

namespace cbw::backup {

SourceLease::Hold SourceLease::Acquire() {
  MutexLock lock(&mu_);
  if (closed_) return Hold(nullptr);
  ++holds_;
  return Hold(this);
}

void SourceLease::Release() {
  MutexLock lock(&mu_);
  if (--holds_ == 0) cv_.SignalAll();
}

bool SourceLease::Close(std::chrono::steady_clock::time_point deadline) {
  MutexLock lock(&mu_);
  closed_ = true;
  return cv_.WaitUntil(&lock, deadline, [&]() CBW_REQUIRES(mu_) { return holds_ == 0; });
}

}  // namespace cbw::backup
