#pragma once

#include <cstdint>
#include <vector>

namespace cbw::backup {

// Per-cluster copy state of one job, in one bit per cluster plus a short list
// of in-flight claims, so a job costs 2 MiB of memory per TiB of drive at the
// default 64 KiB clusters.
//
// A cluster is dirty (the source still holds its point-in-time data and no
// one is copying it), copying (claimed by exactly one copier: the background
// thread or a CBW writer), or done (the target holds it). Claims are few at
// any time (the copier's queue depth plus one per concurrent drive writer),
// so the in-flight list is a plain vector.
//
// Not thread-safe: the owning job guards it with its mutex.
class ClusterMap {
 public:
  enum class State { kDirty, kCopying, kDone };

  // All `n` clusters start dirty.
  explicit ClusterMap(uint64_t n);

  uint64_t size() const { return n_; }
  uint64_t dirty_count() const { return dirty_count_; }
  uint64_t copying_count() const { return copying_count_; }
  State Get(uint64_t c) const;
  bool IsDirty(uint64_t c) const { return (bits_[c / 64] >> (c % 64)) & 1; }
  // The first dirty cluster in [from, limit), or limit if none (limit is
  // clipped to size()). Scans a word of 64 clusters per step.
  uint64_t NextDirty(uint64_t from, uint64_t limit = UINT64_MAX) const;
  // The first cluster in [from, limit) that is not dirty, or limit.
  uint64_t NextClean(uint64_t from, uint64_t limit = UINT64_MAX) const;
  // Whether any cluster in [c0, c1) is being copied.
  bool AnyCopying(uint64_t c0, uint64_t c1) const;
  // Done: neither dirty nor being copied (the target holds it).
  bool IsDone(uint64_t c) const { return !IsDirty(c) && !AnyCopying(c, c + 1); }
  // The end of the run of clusters from `from` that are all done or all not
  // done (like `from`), at most `limit`. For views and their seeks: the cost
  // is a word scan, never a walk per cluster.
  uint64_t RunEnd(uint64_t from, uint64_t limit = UINT64_MAX) const;

  // The copy set (sync=bitmap): the clusters the background copy must copy;
  // the others still need their copy before write (so views stay exact) but
  // do not count as the job's work. Default: every cluster. `set` holds one
  // bit per cluster (64 per word).
  void RestrictCopySet(std::vector<uint64_t> set);
  bool restricted() const { return !set_.empty(); }
  bool InCopySet(uint64_t c) const { return set_.empty() || ((set_[c / 64] >> (c % 64)) & 1); }
  // Clusters of the copy set in [c0, c1).
  uint64_t CopySetCount(uint64_t c0, uint64_t c1) const;
  // The first cluster in [from, limit) that is dirty and in the copy set /
  // that is not (limit if none).
  uint64_t NextCopyable(uint64_t from, uint64_t limit = UINT64_MAX) const;
  uint64_t NextUncopyable(uint64_t from, uint64_t limit = UINT64_MAX) const;

  // Claims every dirty cluster in [c0, c1) for copying; returns the claimed
  // runs [first, second) in ascending order.
  std::vector<std::pair<uint64_t, uint64_t>> Claim(uint64_t c0, uint64_t c1);
  // Ends the claim of exactly the run [c0, c1): done if `ok`, else dirty again.
  void Finish(uint64_t c0, uint64_t c1, bool ok);

 private:
  void SetDirty(uint64_t c0, uint64_t c1, bool dirty);

  uint64_t n_;
  uint64_t NextWith(uint64_t from, uint64_t limit, bool copyable) const;

  std::vector<uint64_t> bits_;  // 1 = dirty
  std::vector<uint64_t> set_;   // 1 = in the copy set; empty: all
  std::vector<std::pair<uint64_t, uint64_t>> copying_;
  uint64_t dirty_count_;
  uint64_t copying_count_ = 0;
};

}  // namespace cbw::backup
