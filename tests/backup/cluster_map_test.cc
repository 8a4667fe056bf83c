#include "backup/cluster_map.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace cbw::backup {
namespace {

using State = ClusterMap::State;

TEST(ClusterMap, StartsDirtyWithPartialLastWord) {
  ClusterMap m(130);
  EXPECT_EQ(m.dirty_count(), 130u);
  EXPECT_EQ(m.NextDirty(0), 0u);
  EXPECT_EQ(m.NextClean(0), 130u);
  EXPECT_EQ(m.NextDirty(130), 130u);
  EXPECT_EQ(m.Get(129), State::kDirty);
}

TEST(ClusterMap, ClaimFinishAndFailure) {
  ClusterMap m(200);
  auto runs = m.Claim(10, 20);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0], std::make_pair(uint64_t{10}, uint64_t{20}));
  EXPECT_EQ(m.Get(15), State::kCopying);
  EXPECT_TRUE(m.AnyCopying(0, 11));
  EXPECT_FALSE(m.AnyCopying(20, 30));
  // A second claim over the range takes only what is still dirty.
  runs = m.Claim(5, 25);
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_EQ(runs[0], std::make_pair(uint64_t{5}, uint64_t{10}));
  EXPECT_EQ(runs[1], std::make_pair(uint64_t{20}, uint64_t{25}));
  EXPECT_EQ(m.copying_count(), 20u);
  m.Finish(10, 20, true);
  EXPECT_EQ(m.Get(15), State::kDone);
  m.Finish(5, 10, false);  // failed: dirty again
  EXPECT_EQ(m.Get(7), State::kDirty);
  m.Finish(20, 25, true);
  EXPECT_EQ(m.dirty_count(), 200u - 15u);
  EXPECT_EQ(m.copying_count(), 0u);
  EXPECT_EQ(m.NextDirty(10), 25u);
  EXPECT_EQ(m.NextClean(0), 10u);
}

// Random claims and finishes against a plain per-cluster model.
TEST(ClusterMap, MatchesAModel) {
  const uint64_t n = 1000;
  ClusterMap m(n);
  std::vector<State> model(n, State::kDirty);
  std::vector<std::pair<uint64_t, uint64_t>> open;
  std::mt19937_64 rng(7);
  for (int step = 0; step < 20000; ++step) {
    if (open.empty() || rng() % 2) {
      uint64_t a = rng() % n, b = std::min(n, a + 1 + rng() % 150);
      for (auto r : m.Claim(a, b)) {
        for (uint64_t c = r.first; c < r.second; ++c) {
          ASSERT_EQ(model[c], State::kDirty);
          model[c] = State::kCopying;
        }
        open.push_back(r);
      }
    } else {
      size_t i = rng() % open.size();
      bool ok = rng() % 4 != 0;
      m.Finish(open[i].first, open[i].second, ok);
      for (uint64_t c = open[i].first; c < open[i].second; ++c) {
        model[c] = ok ? State::kDone : State::kDirty;
      }
      open.erase(open.begin() + static_cast<long>(i));
    }
    uint64_t probe = rng() % n;
    ASSERT_EQ(m.Get(probe), model[probe]);
    uint64_t nd = probe;
    while (nd < n && model[nd] != State::kDirty) ++nd;
    ASSERT_EQ(m.NextDirty(probe), nd);
  }
  uint64_t dirty = 0;
  for (auto s : model) dirty += s == State::kDirty;
  EXPECT_EQ(m.dirty_count(), dirty);
}

// Runs of done / not-done clusters, against a model, with limits: what views
// and their seeks walk instead of single clusters.
TEST(ClusterMap, RunEndMatchesAModelAndHonoursLimits) {
  const uint64_t n = 1000;
  ClusterMap m(n);
  std::mt19937_64 rng(7);
  std::vector<std::pair<uint64_t, uint64_t>> open;
  for (int i = 0; i < 200; ++i) {
    uint64_t a = rng() % n, b = std::min(n, a + 1 + rng() % 20);
    for (auto r : m.Claim(a, b)) {
      if (rng() % 3 == 0) {
        open.push_back(r);  // stays copying: not done
      } else {
        m.Finish(r.first, r.second, rng() % 5 != 0);
      }
    }
  }
  auto done = [&](uint64_t c) { return m.Get(c) == State::kDone; };
  for (uint64_t from = 0; from < n; ++from) {
    EXPECT_EQ(m.IsDone(from), done(from)) << from;
    uint64_t e = from;
    while (e < n && done(e) == done(from)) ++e;
    ASSERT_EQ(m.RunEnd(from), e) << "from " << from;
    uint64_t limit = from + 1 + from % 7;
    ASSERT_EQ(m.RunEnd(from, limit), std::min(e, limit)) << "from " << from;
  }
  EXPECT_EQ(m.RunEnd(n), n);
  EXPECT_EQ(m.NextDirty(0, 0), 0u);
  EXPECT_EQ(m.NextClean(5, 3), 3u);
}

// A huge map (8 TiB at 64 KiB clusters) answers from word scans: the whole
// map in one RunEnd, and alternating clusters one step each.
TEST(ClusterMap, RunEndOnHugeMapsIsAWordScan) {
  const uint64_t n = (uint64_t{8} << 40) / (64 << 10);
  ClusterMap m(n);
  EXPECT_EQ(m.RunEnd(0), n);
  for (uint64_t c = 0; c < 4096; c += 2) {
    m.Claim(c, c + 1);
    m.Finish(c, c + 1, true);
  }
  EXPECT_EQ(m.RunEnd(0), 1u);
  EXPECT_EQ(m.RunEnd(1), 2u);
  EXPECT_EQ(m.RunEnd(4095), n);
}

}  // namespace
}  // namespace cbw::backup
