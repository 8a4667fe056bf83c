#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "backup/status.h"
#include "backup/target.h"

namespace cbw::backup {

class Drive;

// What the background copier needs from its job: claims on the job's dirty
// clusters, the rate limit, and what to do when it must stop. BackupJob
// implements it; tests use a fake. Every method is called from the copier's
// thread and takes the job's own lock as needed (none is held by the caller).
class CopierHost {
 public:
  struct Run {
    uint64_t c0 = 0, c1 = 0;  // clusters [c0, c1)
  };
  // Why dispatching must stop; the copier then drains its requests and asks
  // the host how to go on.
  enum class Halt { kNone, kCancel, kError, kPause };

  virtual ~CopierHost() = default;
  virtual Halt halt() = 0;
  // The job concluded without the copier (it was stuck): submit nothing more.
  virtual bool abandoned() = 0;
  // Claims the dirty clusters of the next run to copy: the first dirty
  // cluster at or after *cursor, and the dirty ones right after it, at most
  // max_clusters and not past `end`. Advances *cursor past it. nullopt when
  // no dirty cluster is left in [*cursor, end).
  virtual std::optional<Run> ClaimNext(uint64_t* cursor, uint64_t end, uint64_t max_clusters) = 0;
  // The first dirty cluster at or after `from` (the cluster count if none).
  virtual uint64_t NextDirty(uint64_t from) = 0;
  // Ends a claim: ok (the target holds it: `data` bytes written, `zero`
  // bytes of zeros) or failed (the clusters are dirty again).
  virtual void Finish(const Run& run, bool ok, uint64_t data, uint64_t zero) = 0;
  // The rate limit: bytes to dispatch next, how long to wait first, and the
  // accounting of what was dispatched.
  virtual uint64_t ChunkBytes() = 0;
  virtual uint64_t DelayNs(uint64_t bytes) = 0;
  virtual void Consume(uint64_t bytes) = 0;
  // No cluster is dirty or being copied any more (by anyone).
  virtual bool AllDone() = 0;
  // Waits for a change (a claim ended, a verb, a speed change), at most ns.
  virtual void Wait(uint64_t ns) = 0;
  // With nothing in flight: halt() said kPause (returns once resumed, true;
  // false if cancelled meanwhile), or an I/O error happened (applies the
  // job's error policy: true to retry, false to stop).
  virtual bool OnPause() = 0;
  virtual bool OnIoError(int err, bool is_read) = 0;
};

// The background copy of one job (sync full/top/bitmap): `depth` chunks in
// flight, each read from the source with io_uring and written through the
// target's queue. Where the dirty clusters are scattered (an incremental:
// runs shorter than a chunk), up to `small_depth` more single-cluster
// requests go in flight beside them, as random reads need a deeper queue.
// All-zero clusters are not written (a hole on a zeroed target, write-zeroes
// otherwise); holes that SEEK_DATA finds are claimed and zeroed without
// reading. Short reads are resubmitted. Not thread-safe: one copier thread
// runs it.
class Copier {
 public:
  struct Config {
    uint64_t cluster_size = 64 * 1024;
    uint64_t chunk_size = 1 << 20;  // multiple of cluster_size
    unsigned depth = 8;             // chunk-sized requests
    unsigned small_depth = 24;      // cluster-sized ones, for scattered runs
  };
  enum class Outcome { kSuccess, kFailed, kCancelled };

  Copier(CopierHost* host, Config config, Drive* source, std::shared_ptr<Target> target);
  ~Copier();
  Copier(const Copier&) = delete;
  Copier& operator=(const Copier&) = delete;

  // Copies until every cluster is done and the target is flushed (success),
  // or the host says stop. Claims still held when it returns are released.
  Outcome Run();

 private:
  struct Slot;
  struct PassError {
    int err;
    bool is_read;
  };

  Status Init();
  // Slots [0, BigSlots()) hold a chunk; the small ones follow.
  unsigned BigSlots() const { return std::max(1u, config_.depth); }
  int FreeSlot(bool small_too) const;
  void Dispatch(int slot, uint64_t max_clusters);
  void SubmitRead(int slot);
  void OnRead(int slot, int res);
  void OnTarget(int slot, int err);
  void SlotDone(int slot);
  void SlotFail(int slot, int err, bool is_read);
  void WaitAndReap(uint64_t timeout_ns);
  void ReapTarget();
  void ReleaseAll();

  CopierHost* const host_;
  const Config config_;
  Drive* const source_;
  std::shared_ptr<Target> target_;
  const uint64_t size_;
  const uint64_t nclusters_;
  std::unique_ptr<TargetQueue> queue_;
  struct Ring;
  std::unique_ptr<Ring> ring_;
  std::vector<Slot> slots_;
  unsigned reads_in_flight_ = 0;
  uint64_t cursor_ = 0;
  uint64_t ext_start_ = 0, ext_end_ = 0;  // a known data extent of the source
  std::optional<PassError> error_;
  uint64_t unflushed_ = 0;  // bytes written since writeback was last started
  // The last chunk-sized claim ended at a clean cluster: the dirty clusters
  // are scattered, and the small slots join in.
  bool scattered_ = false;
};

}  // namespace cbw::backup
