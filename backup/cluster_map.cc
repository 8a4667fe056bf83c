#include "backup/cluster_map.h"

#include <algorithm>

namespace cbw::backup {

ClusterMap::ClusterMap(uint64_t n) : n_(n), bits_((n + 63) / 64, ~uint64_t{0}), dirty_count_(n) {
  if (n % 64) bits_.back() = (uint64_t{1} << (n % 64)) - 1;
}

ClusterMap::State ClusterMap::Get(uint64_t c) const {
  if (IsDirty(c)) return State::kDirty;
  return AnyCopying(c, c + 1) ? State::kCopying : State::kDone;
}

uint64_t ClusterMap::NextDirty(uint64_t from, uint64_t limit) const {
  limit = std::min(limit, n_);
  if (from >= limit) return limit;
  uint64_t w = from / 64;
  uint64_t word = bits_[w] & (~uint64_t{0} << (from % 64));
  for (;;) {
    if (word) return std::min(limit, w * 64 + static_cast<uint64_t>(__builtin_ctzll(word)));
    if (++w >= bits_.size() || w * 64 >= limit) return limit;
    word = bits_[w];
  }
}

uint64_t ClusterMap::NextClean(uint64_t from, uint64_t limit) const {
  limit = std::min(limit, n_);
  if (from >= limit) return limit;
  uint64_t w = from / 64;
  uint64_t word = ~bits_[w] & (~uint64_t{0} << (from % 64));
  for (;;) {
    if (word) return std::min(limit, w * 64 + static_cast<uint64_t>(__builtin_ctzll(word)));
    if (++w >= bits_.size() || w * 64 >= limit) return limit;
    word = ~bits_[w];
  }
}

uint64_t ClusterMap::RunEnd(uint64_t from, uint64_t limit) const {
  limit = std::min(limit, n_);
  if (from >= limit) return limit;
  if (IsDone(from)) {
    // Done clusters end at the next dirty one or the next claim.
    uint64_t end = NextDirty(from, limit);
    for (const auto& [a, b] : copying_) {
      if (a > from && a < end) end = a;
    }
    return end;
  }
  // Not done: dirty clusters and claims, in any mix.
  uint64_t c = from;
  for (;;) {
    c = NextClean(c, limit);
    if (c >= limit) return limit;
    bool claimed = false;
    for (const auto& [a, b] : copying_) {
      if (a <= c && c < b) {
        c = b;
        claimed = true;
        break;
      }
    }
    if (!claimed) return c;
  }
}

void ClusterMap::RestrictCopySet(std::vector<uint64_t> set) {
  set.resize(bits_.size(), 0);
  if (n_ % 64 && !set.empty()) set.back() &= (uint64_t{1} << (n_ % 64)) - 1;
  set_ = std::move(set);
}

uint64_t ClusterMap::CopySetCount(uint64_t c0, uint64_t c1) const {
  c1 = std::min(c1, n_);
  if (c0 >= c1) return 0;
  if (set_.empty()) return c1 - c0;
  uint64_t n = 0;
  for (uint64_t c = c0; c < c1;) {
    uint64_t w = c / 64, lo = c % 64, hi = std::min<uint64_t>(64, lo + (c1 - c));
    uint64_t mask = (hi == 64 ? ~uint64_t{0} : ((uint64_t{1} << hi) - 1)) & (~uint64_t{0} << lo);
    n += static_cast<uint64_t>(__builtin_popcountll(set_[w] & mask));
    c += hi - lo;
  }
  return n;
}

uint64_t ClusterMap::NextWith(uint64_t from, uint64_t limit, bool copyable) const {
  limit = std::min(limit, n_);
  if (from >= limit) return limit;
  auto word = [&](uint64_t w) {
    uint64_t v = bits_[w] & (set_.empty() ? ~uint64_t{0} : set_[w]);
    return copyable ? v : ~v;
  };
  uint64_t w = from / 64;
  uint64_t v = word(w) & (~uint64_t{0} << (from % 64));
  for (;;) {
    if (v) return std::min(limit, w * 64 + static_cast<uint64_t>(__builtin_ctzll(v)));
    if (++w >= bits_.size() || w * 64 >= limit) return limit;
    v = word(w);
  }
}

uint64_t ClusterMap::NextCopyable(uint64_t from, uint64_t limit) const {
  return NextWith(from, limit, true);
}

uint64_t ClusterMap::NextUncopyable(uint64_t from, uint64_t limit) const {
  return NextWith(from, limit, false);
}

bool ClusterMap::AnyCopying(uint64_t c0, uint64_t c1) const {
  for (const auto& [a, b] : copying_) {
    if (a < c1 && c0 < b) return true;
  }
  return false;
}

void ClusterMap::SetDirty(uint64_t c0, uint64_t c1, bool dirty) {
  for (uint64_t c = c0; c < c1;) {
    uint64_t w = c / 64, lo = c % 64;
    uint64_t hi = std::min<uint64_t>(64, lo + (c1 - c));
    uint64_t mask = (hi == 64 ? ~uint64_t{0} : ((uint64_t{1} << hi) - 1)) & (~uint64_t{0} << lo);
    if (dirty) {
      bits_[w] |= mask;
    } else {
      bits_[w] &= ~mask;
    }
    c += hi - lo;
  }
}

std::vector<std::pair<uint64_t, uint64_t>> ClusterMap::Claim(uint64_t c0, uint64_t c1) {
  std::vector<std::pair<uint64_t, uint64_t>> runs;
  c1 = std::min(c1, n_);
  for (uint64_t a = NextDirty(c0); a < c1; a = NextDirty(a)) {
    uint64_t b = std::min(c1, NextClean(a));
    SetDirty(a, b, false);
    copying_.emplace_back(a, b);
    runs.emplace_back(a, b);
    dirty_count_ -= b - a;
    copying_count_ += b - a;
    a = b;
  }
  return runs;
}

void ClusterMap::Finish(uint64_t c0, uint64_t c1, bool ok) {
  auto it = std::find(copying_.begin(), copying_.end(), std::make_pair(c0, c1));
  if (it == copying_.end()) return;  // not a claim: nothing to end
  copying_.erase(it);
  copying_count_ -= c1 - c0;
  if (!ok) {
    SetDirty(c0, c1, true);
    dirty_count_ += c1 - c0;
  }
}

}  // namespace cbw::backup
