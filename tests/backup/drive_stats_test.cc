// Drive's counters for MOUNTPOINT/metrics: writes, bytes, errors, latency on
// the fast and the slow path, and CBW copies noted by jobs.

#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <numeric>
#include <thread>

#include "backup/drive.h"
#include "tests/backup/test_util.h"

namespace cbw::backup {
namespace {

using testing::TempDir;

constexpr uint64_t kMiB = 1024 * 1024;

uint64_t BucketTotal(const DriveStats& s) {
  return std::accumulate(s.latency_buckets.begin(), s.latency_buckets.end(), uint64_t{0});
}

// Sends every write to the slow path and holds it there for `hold`.
class SlowHook : public WriteHook {
 public:
  explicit SlowHook(std::chrono::milliseconds hold) : hold_(hold) {}
  Status BeforeWrite(uint64_t, uint64_t, bool may_block) override {
    if (!may_block) return Status::Error(EAGAIN, "slow");
    std::this_thread::sleep_for(hold_);
    return Status::Ok();
  }

 private:
  std::chrono::milliseconds hold_;
};

TEST(DriveStatsTest, WritesBytesAndErrorsAreCounted) {
  TempDir dir;
  testing::MakeSparse(dir / "a.img", kMiB);
  auto d = Drive::Open({"drive0", dir / "a.img", false});
  ASSERT_TRUE(d.ok()) << d.status().message();
  Drive& drive = **d;
  EXPECT_EQ(drive.Stats().writes, 0u);

  std::string data(4096, 'x');
  ASSERT_TRUE(drive.Write(data.data(), data.size(), 0).ok());
  ASSERT_TRUE(drive.Write(data.data(), 100, 8192).ok());
  // Cut short at the end: the bytes written count, not the bytes asked.
  ASSERT_EQ(*drive.Write(data.data(), data.size(), kMiB - 1000), 1000u);
  // Refused past the end: an error.
  EXPECT_FALSE(drive.Write(data.data(), data.size(), kMiB).ok());
  // Punches and zeroings are not write() requests.
  ASSERT_TRUE(drive.PunchHole(0, 4096).ok());
  ASSERT_TRUE(drive.ZeroRange(0, 4096).ok());

  DriveStats s = drive.Stats();
  EXPECT_EQ(s.writes, 4u);
  EXPECT_EQ(s.write_errors, 1u);
  EXPECT_EQ(s.write_bytes, 4096u + 100u + 1000u);
  EXPECT_EQ(BucketTotal(s), 4u);
  EXPECT_GT(s.latency_sum_ns, 0u);
  EXPECT_EQ(s.cbw_copies, 0u);
}

TEST(DriveStatsTest, SlowPathLatencyIsMeasuredToCompletion) {
  TempDir dir;
  testing::MakeSparse(dir / "a.img", kMiB);
  auto d = Drive::Open({"drive0", dir / "a.img", false});
  ASSERT_TRUE(d.ok()) << d.status().message();
  Drive& drive = **d;
  Drive::InstallHooks({{&drive, std::make_shared<SlowHook>(std::chrono::milliseconds(60))}});
  std::string data(4096, 'y');
  ASSERT_TRUE(drive.Write(data.data(), data.size(), 0).ok());
  DriveStats s = drive.Stats();
  EXPECT_EQ(s.writes, 1u);
  EXPECT_EQ(s.write_bytes, 4096u);
  // The write waited in the hook for 60 ms on a writer thread: it lands in
  // a bucket above 50 ms, not in the fast path's.
  size_t above = 0;
  while (kWriteLatencyBounds[above] < 0.05) ++above;
  uint64_t slow = 0;
  for (size_t i = above + 1; i < s.latency_buckets.size(); ++i) slow += s.latency_buckets[i];
  EXPECT_EQ(slow, 1u);
  EXPECT_GE(s.latency_sum_ns, 60'000'000u);
}

TEST(DriveStatsTest, CbwCopiesAreCountedAsNoted) {
  TempDir dir;
  testing::MakeSparse(dir / "a.img", kMiB);
  auto d = Drive::Open({"drive0", dir / "a.img", false});
  ASSERT_TRUE(d.ok()) << d.status().message();
  (*d)->NoteCbwCopy(65536);
  (*d)->NoteCbwCopy(131072);
  DriveStats s = (*d)->Stats();
  EXPECT_EQ(s.cbw_copies, 2u);
  EXPECT_EQ(s.cbw_bytes, 196608u);
  EXPECT_EQ(s.writes, 0u);
}

}  // namespace
}  // namespace cbw::backup
