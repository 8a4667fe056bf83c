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
  while (holds_ > 0) {
    if (!cv_.WaitUntil(&lock, deadline)) return holds_ == 0;
  }
  return true;
}

}  // namespace cbw::backup
