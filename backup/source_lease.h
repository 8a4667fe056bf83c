#pragma once

#include <chrono>

#include "backup/mutex.h"

namespace cbw::backup {

// Lets work that may outlive its drive's owner use the drive safely: a
// copy-before-write copy stuck on a dead target finishes whenever the target
// answers, possibly after its job ended and the daemon began closing drives.
// Such work holds the drive's lease for each moment it touches the drive (a
// read of the source, a counter), never across target I/O; closing the drive
// ends the lease: no new hold is granted, and it waits for current holds to
// end before the drive goes. Shared (shared_ptr) by the drive and its jobs, so
// that asking for a hold is safe after the drive is gone.
class SourceLease {
 public:
  // One hold: the drive stays open while it lives (if granted).
  class Hold {
   public:
    explicit Hold(SourceLease* lease) : lease_(lease) {}
    Hold(const Hold&) = delete;
    Hold& operator=(const Hold&) = delete;
    ~Hold() {
      if (lease_) lease_->Release();
    }
    explicit operator bool() const { return lease_ != nullptr; }
    // The source's fd, open while this hold lives (granted holds only).
    int fd() const { return lease_->fd_; }

   private:
    SourceLease* lease_;  // null: refused (the drive is closing)
  };

  explicit SourceLease(int fd) : fd_(fd) {}

  // Granted unless the drive is closing.
  Hold Acquire();
  // Refuses new holds and waits for the current ones to end, at most until
  // `deadline`. true: none is left. Idempotent.
  bool Close(std::chrono::steady_clock::time_point deadline);

 private:
  void Release();

  const int fd_;
  Mutex mu_;
  CondVar cv_;
  int holds_ CBW_GUARDED_BY(mu_) = 0;
  bool closed_ CBW_GUARDED_BY(mu_) = false;
};

}  // namespace cbw::backup
