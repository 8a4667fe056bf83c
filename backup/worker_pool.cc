#include "backup/worker_pool.h"

#include <thread>
#include <utility>

#include "backup/log.h"
#include "backup/threads.h"

namespace cbw::backup {

std::shared_ptr<WorkerPool> WorkerPool::Create(std::string name, unsigned max_threads,
                                               std::chrono::milliseconds idle_timeout) {
  return std::shared_ptr<WorkerPool>(
      new WorkerPool(std::move(name), std::max(1u, max_threads), idle_timeout));
}

WorkerPool::~WorkerPool() = default;

void WorkerPool::Submit(std::function<void()> task) {
  bool spawn = false;
  {
    MutexLock lock(&mu_);
    if (stopped_) return;
    queue_.push_back(std::move(task));
    if (idle_ < queue_.size() && threads_ < max_threads_) {
      ++threads_;
      spawn = true;
    }
    cv_.Signal();
  }
  if (!spawn) return;
  try {
    // The worker holds the pool: it may outlive every other owner while stuck.
    std::thread([self = shared_from_this()] { self->Work(); }).detach();
  } catch (...) {
    MutexLock lock(&mu_);
    --threads_;  // the task stays queued for a running worker (or the next Submit)
    LogError(name_ + ": could not start a worker thread");
  }
}

void WorkerPool::Stop() {
  std::deque<std::function<void()>> dropped;
  {
    MutexLock lock(&mu_);
    stopped_ = true;
    dropped.swap(queue_);
    cv_.SignalAll();
    idle_cv_.SignalAll();
  }
  // Destroyed here, without the lock: their captures may do anything.
}

bool WorkerPool::WaitIdle(std::chrono::steady_clock::time_point deadline) {
  MutexLock lock(&mu_);
  while (!queue_.empty() || running_ > 0) {
    if (!idle_cv_.WaitUntil(&lock, deadline)) return queue_.empty() && running_ == 0;
  }
  return true;
}

void WorkerPool::Work() {
  RunGuarded(name_.c_str(), [&] {
    MutexLock lock(&mu_);
    for (;;) {
      while (queue_.empty() && !stopped_) {
        ++idle_;
        bool woken = cv_.WaitFor(&lock, idle_timeout_);
        --idle_;
        if (!woken && queue_.empty()) break;
      }
      if (queue_.empty()) break;  // idle for long, or stopped
      std::function<void()> task = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
      lock.Unlock();
      RunGuarded(name_.c_str(), task);
      task = nullptr;  // its captures go before the next wait
      lock.Relock();
      --running_;
      idle_cv_.SignalAll();
    }
    --threads_;
  });
}

}  // namespace cbw::backup
