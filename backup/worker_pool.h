#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>

#include "backup/mutex.h"

namespace cbw::backup {

// A pool of threads for work that may block for long (copy-before-write
// copies into a target that may stop answering, drive writes waiting for
// them). Threads start on demand up to a cap and leave after being idle for a
// while; tasks beyond the cap wait in a queue. A thread stuck in a task stays
// stuck (nothing in userspace can take back a read or write in flight), so
// tasks hold what they use (shared_ptr) and the pool outlives its threads.
//
// Thread-safe. Every task body runs under RunGuarded: an exception in one is
// logged and the worker carries on.
class WorkerPool : public std::enable_shared_from_this<WorkerPool> {
 public:
  static std::shared_ptr<WorkerPool> Create(std::string name, unsigned max_threads,
                                            std::chrono::milliseconds idle_timeout);
  ~WorkerPool();

  // Queues `task`; starts a worker if none is idle and the cap allows.
  // After Stop(), tasks are dropped (destroyed unrun).
  void Submit(std::function<void()> task) CBW_EXCLUDES(mu_);
  // Drops queued tasks and lets idle workers go; busy ones finish their
  // task first. Does not wait for them.
  void Stop() CBW_EXCLUDES(mu_);
  // Waits until no task is queued or running, or the deadline; true if idle.
  bool WaitIdle(std::chrono::steady_clock::time_point deadline) CBW_EXCLUDES(mu_);

 private:
  WorkerPool(std::string name, unsigned max_threads, std::chrono::milliseconds idle_timeout)
      : name_(std::move(name)), max_threads_(max_threads), idle_timeout_(idle_timeout) {}
  void Work() CBW_EXCLUDES(mu_);

  const std::string name_;
  const unsigned max_threads_;
  const std::chrono::milliseconds idle_timeout_;
  Mutex mu_;
  CondVar cv_;       // tasks queued, or stopping
  CondVar idle_cv_;  // a task ended
  std::deque<std::function<void()>> queue_ CBW_GUARDED_BY(mu_);
  unsigned threads_ CBW_GUARDED_BY(mu_) = 0;
  unsigned idle_ CBW_GUARDED_BY(mu_) = 0;
  unsigned running_ CBW_GUARDED_BY(mu_) = 0;
  bool stopped_ CBW_GUARDED_BY(mu_) = false;
};

}  // namespace cbw::backup
