// WorkerPool: threads on demand up to a cap, queued tasks, guarded bodies.

#include "backup/worker_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <future>
#include <stdexcept>
#include <thread>

#include "backup/threads.h"
#include "tests/backup/test_util.h"

namespace cbw::backup {
namespace {

TEST(WorkerPoolTest, RunsEverythingWithAtMostTheCapInParallel) {
  auto pool = WorkerPool::Create("test", 3, std::chrono::seconds(1));
  std::atomic<int> running{0}, peak{0}, done{0};
  for (int i = 0; i < 30; ++i) {
    pool->Submit([&] {
      int now = ++running;
      int p = peak.load();
      while (now > p && !peak.compare_exchange_weak(p, now)) {
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      --running;
      ++done;
    });
  }
  ASSERT_TRUE(pool->WaitIdle(std::chrono::steady_clock::now() + std::chrono::seconds(20)));
  EXPECT_EQ(done.load(), 30);
  EXPECT_LE(peak.load(), 3);
  EXPECT_GE(peak.load(), 2);
}

TEST(WorkerPoolTest, AThrowingTaskDoesNotTakeTheWorkerOrTheProcessDown) {
  auto pool = WorkerPool::Create("test", 1, std::chrono::seconds(1));
  pool->Submit([] { throw std::runtime_error("boom"); });
  pool->Submit([] { throw std::bad_alloc(); });
  std::promise<void> ran;
  pool->Submit([&] { ran.set_value(); });
  EXPECT_EQ(ran.get_future().wait_for(std::chrono::seconds(10)), std::future_status::ready);
}

TEST(WorkerPoolTest, StopDropsQueuedTasksAndTheBusyOneFinishes) {
  auto pool = WorkerPool::Create("test", 1, std::chrono::seconds(1));
  std::promise<void> entered, release;
  auto go = release.get_future().share();
  std::atomic<int> ran{0};
  pool->Submit([&] {
    entered.set_value();
    go.wait();
    ++ran;
  });
  entered.get_future().wait();
  pool->Submit([&] { ++ran; });
  pool->Stop();
  release.set_value();
  ASSERT_TRUE(pool->WaitIdle(std::chrono::steady_clock::now() + std::chrono::seconds(10)));
  EXPECT_EQ(ran.load(), 1);
  pool->Submit([&] { ++ran; });  // after Stop: dropped
  EXPECT_EQ(ran.load(), 1);
}

TEST(RunGuardedTest, CatchesEverythingAndReports) {
  std::string what;
  RunGuarded(
      "t", [] { throw std::runtime_error("nope"); }, [&](const std::string& w) { what = w; });
  EXPECT_EQ(what, "nope");
  RunGuarded(
      "t", [] { throw 42; }, [&](const std::string& w) { what = w; });
  EXPECT_EQ(what, "unknown exception");
}

}  // namespace
}  // namespace cbw::backup
