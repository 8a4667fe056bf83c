// RateLimiter: the token bucket, driven with synthetic clocks.

#include "backup/rate_limiter.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/fs.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>

#include "backup/target.h"
#include "tests/backup/test_util.h"

namespace cbw::backup {
namespace {

using testing::EventRecorder;
using testing::Fixture;
using testing::RandomBytes;
using testing::ReadAll;
using testing::WaitFor;

constexpr uint64_t kMiB = 1024 * 1024;

TEST(RateLimiterTest, UnlimitedNeverWaits) {
  RateLimiter rl(0, kMiB, 65536, 0);
  for (int i = 0; i < 100; ++i) {
    EXPECT_EQ(rl.DelayNs(kMiB, 0), 0u);
    rl.Consume(kMiB, 0);
  }
}

// Simulated clock: dispatch chunks as fast as allowed for 10 s, then check
// every 2 s window holds within 10% of the rate.

TEST(RateLimiterTest, HoldsRateOverAnyTwoSeconds) {
  for (uint64_t speed : {uint64_t{64 * 1024}, 1 * kMiB, 10 * kMiB, 100 * kMiB}) {
    RateLimiter rl(speed, kMiB, 65536, 0);
    uint64_t chunk = rl.ChunkBytes();
    EXPECT_EQ(chunk, std::clamp<uint64_t>(speed / 10 / 65536 * 65536, 65536, kMiB));
    std::vector<std::pair<uint64_t, uint64_t>> sends;  // (t, bytes)
    uint64_t t = 0;
    while (t < 10'000'000'000ull) {
      uint64_t d = rl.DelayNs(chunk, t);
      if (d > 0) {
        t += d;
        continue;
      }
      rl.Consume(chunk, t);
      sends.emplace_back(t, chunk);
    }
    for (uint64_t w = 0; w + 2'000'000'000ull <= 10'000'000'000ull; w += 100'000'000ull) {
      uint64_t bytes = 0;
      for (auto [ts, b] : sends) {
        if (ts >= w && ts < w + 2'000'000'000ull) bytes += b;
      }
      double limit = 2.0 * static_cast<double>(speed);
      EXPECT_LE(static_cast<double>(bytes), std::max(limit * 1.1, limit + chunk))
          << "speed " << speed << " window at " << w;
      if (w >= 1'000'000'000ull) {
        EXPECT_GE(static_cast<double>(bytes), limit * 0.9);
      }
    }
  }
}

TEST(RateLimiterTest, LoweringSpeedTakesEffectAtOnce) {
  RateLimiter rl(100 * kMiB, kMiB, 65536, 0);
  rl.SetSpeed(kMiB, 1'000'000'000ull);
  rl.Consume(kMiB, 1'000'000'000ull);
  EXPECT_GT(rl.DelayNs(kMiB, 1'000'000'000ull), 500'000'000ull);
  rl.SetSpeed(0, 1'000'000'000ull);
  EXPECT_EQ(rl.DelayNs(kMiB, 1'000'000'000ull), 0u);
}

}  // namespace
}  // namespace cbw::backup
