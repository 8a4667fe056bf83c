#pragma once

// Mutexes with Clang thread-safety annotations, and the project's one lock
// order.
//
// Every mutex-protected field is marked CBW_GUARDED_BY(its mutex) and every
// function that expects a lock held CBW_REQUIRES(it); the clang build checks
// them with -Wthread-safety (the fuzz variant of tests/run.sh builds the whole
// tree with clang and -Werror). GCC ignores the annotations.
//
// Lock order (a thread holding one of these may only take those below it):
//   1. JobRegistry::store_mu_      (serialises JobStore writes)
//   2. JobRegistry::mu_            (jobs, records, reservations)
//   3. BackupJob::mu_              (state machine of one job)
//   4. CopyState::mu_              (clusters, claims, frozen reads of one job)
//   5. Txn::mu_, WorkerPool::mu_, RateLimiter owners' locks
//   6. EventBus::mu_               (subscriber list; callbacks run under it)
//   7. subscriber locks (the events file's queue, the persister's queue)
//   8. Drive gate / install locks, SourceLease::mu_, Log's line lock (leaves)
// No lock is ever held across I/O on a user-given path or a target, and no
// job lock is held while events are published (jobs queue them and publish
// after unlocking, see BackupJob).

#include <chrono>
#include <condition_variable>
#include <mutex>

#if defined(__clang__)
#define CBW_TSA(x) __attribute__((x))
#else
#define CBW_TSA(x)
#endif

#define CBW_CAPABILITY(x) CBW_TSA(capability(x))
#define CBW_SCOPED_CAPABILITY CBW_TSA(scoped_lockable)
#define CBW_GUARDED_BY(x) CBW_TSA(guarded_by(x))
#define CBW_PT_GUARDED_BY(x) CBW_TSA(pt_guarded_by(x))
#define CBW_REQUIRES(...) CBW_TSA(requires_capability(__VA_ARGS__))
#define CBW_EXCLUDES(...) CBW_TSA(locks_excluded(__VA_ARGS__))
#define CBW_ACQUIRE(...) CBW_TSA(acquire_capability(__VA_ARGS__))
#define CBW_RELEASE(...) CBW_TSA(release_capability(__VA_ARGS__))
#define CBW_NO_TSA CBW_TSA(no_thread_safety_analysis)

namespace cbw::backup {

// A std::mutex the analysis knows about.
class CBW_CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;
  void Lock() CBW_ACQUIRE() { mu_.lock(); }
  void Unlock() CBW_RELEASE() { mu_.unlock(); }
  // For std::lock_guard-like use by generic code (BasicLockable).
  void lock() CBW_ACQUIRE() { mu_.lock(); }
  void unlock() CBW_RELEASE() { mu_.unlock(); }

 private:
  friend class CondVar;
  std::mutex mu_;
};

// Holds a Mutex for its scope; may be released and retaken inside it.
class CBW_SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex* mu) CBW_ACQUIRE(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() CBW_RELEASE() {
    if (held_) mu_->Unlock();
  }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;
  // Temporarily releases the mutex (e.g. around I/O); Relock retakes it.
  void Unlock() CBW_RELEASE() {
    held_ = false;
    mu_->Unlock();
  }
  void Relock() CBW_ACQUIRE() {
    mu_->Lock();
    held_ = true;
  }

 private:
  friend class CondVar;
  Mutex* const mu_;
  bool held_ = true;
};

// A condition variable bound to one Mutex. Waits take the held MutexLock.
class CondVar {
 public:
  CondVar() = default;
  CondVar(const CondVar&) = delete;
  CondVar& operator=(const CondVar&) = delete;
  void Signal() { cv_.notify_one(); }
  void SignalAll() { cv_.notify_all(); }
  void Wait(MutexLock* lock) {
    std::unique_lock<std::mutex> lk(lock->mu_->mu_, std::adopt_lock);
    cv_.wait(lk);
    lk.release();
  }
  // Returns false on timeout.
  template <class Clock, class Duration>
  bool WaitUntil(MutexLock* lock, std::chrono::time_point<Clock, Duration> deadline) {
    std::unique_lock<std::mutex> lk(lock->mu_->mu_, std::adopt_lock);
    bool ok = cv_.wait_until(lk, deadline) == std::cv_status::no_timeout;
    lk.release();
    return ok;
  }
  template <class Rep, class Period>
  bool WaitFor(MutexLock* lock, std::chrono::duration<Rep, Period> d) {
    return WaitUntil(lock, std::chrono::steady_clock::now() + d);
  }
  // Waits until pred() (evaluated with the lock held) or the deadline; returns pred().
  template <class Clock, class Duration, class Pred>
  bool WaitUntil(MutexLock* lock, std::chrono::time_point<Clock, Duration> deadline, Pred pred) {
    while (!pred()) {
      if (!WaitUntil(lock, deadline)) return pred();
    }
    return true;
  }
  template <class Pred>
  void Wait(MutexLock* lock, Pred pred) {
    while (!pred()) Wait(lock);
  }

 private:
  std::condition_variable cv_;
};

}  // namespace cbw::backup
