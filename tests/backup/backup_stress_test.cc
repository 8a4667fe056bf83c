// Concurrency stress: writer threads hammer two drives with random,
// overlapping, unaligned writes, punches and zeroings (512 B .. 4 MiB,
// crossing clusters) while a controller starts 1-3 jobs at a time (single
// and transactions) with speed limits, pauses, speed changes and cancels.
// Every successful target must equal its drive at the job's point in time;
// sync=none views are read in full while writers run and must equal it too.
//
// The point-in-time image is taken by briefly holding the writers out
// (a shared_mutex per drive), reading the source, then StartBackups.
//
// CBW_STRESS_SECONDS (default 15) sets the duration.

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <shared_mutex>

#include "tests/backup/test_util.h"

namespace cbw::backup {
namespace {

using testing::RandomBytes;
using testing::ReadAll;
using testing::SameBytes;
using testing::TempDir;
using testing::WaitFor;

constexpr uint64_t kMiB = 1024 * 1024;

struct StressDrive {
  std::string path;
  std::unique_ptr<Drive> drive;
  std::shared_mutex writers;  // shared: a write; exclusive: taking an image
};

struct LiveJob {
  std::string id;
  int drive;
  SyncMode sync;
  std::string target;
  std::string expected;
  bool paused = false;
  bool view_checked = false;
};

double StressSeconds() {
  const char* s = std::getenv("CBW_STRESS_SECONDS");
  return s ? std::atof(s) : 15.0;
}

TEST(StressTest, TargetsEqualTheirPointInTime) {
  TempDir dir;
  const uint64_t sizes[2] = {16 * kMiB + 4097, 24 * kMiB};
  StressDrive drives[2];
  std::vector<Drive*> ptrs;
  for (int i = 0; i < 2; ++i) {
    drives[i].path = dir / ("src" + std::to_string(i) + ".img");
    testing::MakeSparse(drives[i].path, sizes[i]);
    // Data with holes between.
    for (uint64_t off = 0; off < sizes[i]; off += 3 * kMiB) {
      testing::WriteAt(drives[i].path, RandomBytes(kMiB + 777, static_cast<uint32_t>(off + i)),
                       off);
    }
    auto d = Drive::Open(DriveConfig{"d" + std::to_string(i), drives[i].path, false});
    ASSERT_TRUE(d.ok());
    drives[i].drive = std::move(*d);
    ptrs.push_back(drives[i].drive.get());
  }
  EventBus bus;
  RegistryOptions ro;
  ro.base_dir = dir.path();
  JobRegistry reg(ptrs, &bus, ro);

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> writes{0}, written_bytes{0};
  const std::string pool = RandomBytes(8 * kMiB, 99);
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t) {
    writers.emplace_back([&, t] {
      std::mt19937_64 rng(1234 + t);
      while (!stop) {
        int di = static_cast<int>(rng() % 2);
        StressDrive& d = drives[di];
        // Log-uniform lengths from 512 B to 4 MiB, unaligned offsets.
        uint64_t len = static_cast<uint64_t>(512.0 * std::pow(8192.0, (rng() % 10000) / 10000.0));
        uint64_t off = rng() % sizes[di];
        std::shared_lock<std::shared_mutex> lock(d.writers);
        int op = static_cast<int>(rng() % 10);
        if (op < 6) {
          len = std::min<uint64_t>(len, pool.size());
          const char* src = pool.data() + rng() % (pool.size() - len + 1);
          auto r = d.drive->Write(src, len, off);
          ASSERT_TRUE(r.ok()) << r.status().message();
        } else if (op < 8) {
          ASSERT_TRUE(d.drive->PunchHole(off, len).ok());
        } else {
          ASSERT_TRUE(d.drive->ZeroRange(off, len).ok());
        }
        ++writes;
        written_bytes += len;
      }
    });
  }

  std::mt19937_64 rng(42);
  std::vector<LiveJob> live;
  int next_id = 0;
  uint64_t started = 0, succeeded = 0, cancelled = 0, txns = 0, verified_bytes = 0, views = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(StressSeconds());

  auto start_jobs = [&](std::vector<int> dis) {
    std::vector<std::unique_lock<std::shared_mutex>> locks;
    std::sort(dis.begin(), dis.end());
    for (int di : dis) locks.emplace_back(drives[di].writers);
    std::vector<BackupOptions> opts;
    std::vector<LiveJob> jobs;
    for (int di : dis) {
      LiveJob j;
      j.id = "job" + std::to_string(next_id++);
      j.drive = di;
      j.sync = rng() % 4 == 0 ? SyncMode::kNone : SyncMode::kFull;
      j.target = dir / (j.id + ".img");
      j.expected = ReadAll(drives[di].path);
      BackupOptions o;
      o.job_id = j.id;
      o.device = "d" + std::to_string(di);
      o.target = j.target;
      o.sync = j.sync;
      o.speed = rng() % 3 == 0 ? 0 : (4 + rng() % 28) * kMiB;
      opts.push_back(o);
      jobs.push_back(std::move(j));
    }
    Status s = reg.StartBackups(
        opts, dis.size() > 1 && rng() % 2 ? CompletionMode::kGrouped : CompletionMode::kIndividual);
    ASSERT_TRUE(s.ok()) << s.message();
    started += jobs.size();
    txns += dis.size() > 1;
    for (auto& j : jobs) live.push_back(std::move(j));
  };

  while (std::chrono::steady_clock::now() < deadline) {
    if (live.size() < 3 && rng() % 3 == 0) {
      if (rng() % 3 == 0) {
        start_jobs({0, 1});
      } else {
        start_jobs({static_cast<int>(rng() % 2)});
      }
      if (::testing::Test::HasFatalFailure()) break;
    }
    for (auto& j : live) {
      int action = static_cast<int>(rng() % 40);
      if (action == 0 && !j.paused) {
        j.paused = reg.Pause(j.id).ok();
      } else if (action == 1 && j.paused) {
        j.paused = !reg.Resume(j.id).ok() && j.paused;
      } else if (action == 2) {
        (void)reg.SetSpeed(j.id, static_cast<int64_t>(rng() % 2 ? 0 : (2 + rng() % 30) * kMiB));
      } else if (action == 3 && j.sync == SyncMode::kFull) {
        (void)reg.Cancel(j.id);
      } else if (j.sync == SyncMode::kNone && (action == 4 || j.view_checked)) {
        if (!j.view_checked) {
          // The whole view, read in pieces while the writers keep writing.
          std::string view(j.expected.size(), '\0');
          for (uint64_t off = 0; off < view.size(); off += 3 * kMiB + 1) {
            size_t n = static_cast<size_t>(std::min<uint64_t>(3 * kMiB + 1, view.size() - off));
            auto r = reg.ReadSnapshot(j.id, view.data() + off, n, off);
            ASSERT_TRUE(r.ok()) << r.status().message();
            ASSERT_EQ(*r, n);
          }
          EXPECT_TRUE(SameBytes(view, j.expected)) << j.id << " view";
          verified_bytes += view.size();
          ++views;
          j.view_checked = true;
        }
        (void)reg.Cancel(j.id);
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    // Collect ended jobs.
    for (auto it = live.begin(); it != live.end();) {
      auto info = reg.GetJobFile(it->id);
      ASSERT_TRUE(info.has_value());
      if (info->result == JobResult::kNone) {
        ++it;
        continue;
      }
      if (info->result == JobResult::kSuccess) {
        ++succeeded;
        EXPECT_TRUE(SameBytes(ReadAll(it->target), it->expected)) << it->id;
        verified_bytes += it->expected.size();
      } else {
        EXPECT_EQ(info->result, JobResult::kCancelled)
            << it->id << ": " << info->error.value_or("");
        ++cancelled;
      }
      unlink(it->target.c_str());
      it = live.erase(it);
    }
  }
  // Let the remaining full jobs finish unthrottled; cancel fleecing ones.
  for (auto& j : live) {
    if (j.paused) (void)reg.Resume(j.id);
    (void)reg.SetSpeed(j.id, 0);
    if (j.sync == SyncMode::kNone) (void)reg.Cancel(j.id);
  }
  EXPECT_TRUE(WaitFor(
      [&] {
        for (auto& j : live) {
          if (reg.GetJobFile(j.id)->result == JobResult::kNone) return false;
        }
        return true;
      },
      120));
  for (auto& j : live) {
    auto info = reg.GetJobFile(j.id);
    if (info->result == JobResult::kSuccess) {
      ++succeeded;
      EXPECT_TRUE(SameBytes(ReadAll(j.target), j.expected)) << j.id;
      verified_bytes += j.expected.size();
    } else {
      EXPECT_EQ(info->result, JobResult::kCancelled) << j.id;
      ++cancelled;
    }
  }
  stop = true;
  for (auto& w : writers) w.join();
  std::printf(
      "stress: %.0f s, %llu drive ops (%llu MiB), %llu jobs (%llu in transactions of 2), "
      "%llu succeeded, %llu cancelled, %llu views read, %llu MiB verified\n",
      StressSeconds(), static_cast<unsigned long long>(writes.load()),
      static_cast<unsigned long long>(written_bytes.load() / kMiB),
      static_cast<unsigned long long>(started), static_cast<unsigned long long>(txns),
      static_cast<unsigned long long>(succeeded), static_cast<unsigned long long>(cancelled),
      static_cast<unsigned long long>(views),
      static_cast<unsigned long long>(verified_bytes / kMiB));
  EXPECT_GT(succeeded, 0u);
}

}  // namespace
}  // namespace cbw::backup
