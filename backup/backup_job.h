#pragma once

// Thread model
// ------------
// A BackupJob has a job thread (the state machine), started by Start(),
// which runs the copier (the background copy, backup/copier.h) on a thread of
// its own; and copy-before-write tasks on a small WorkerPool for drive
// writers. Drive writer threads enter the job through its CBW hook
// (BeforeWrite); snapshot readers through ReadSnapshot and SeekSnapshot; verbs
// arrive from control/ threads via the registry.
//
// Dead targets: a read or write on a target that stopped answering may never
// return, and nothing in userspace can take it back. So no wait on target I/O
// is unbounded:
//  - the job thread waits for the copier only until a cancel or an error has
//    been pending for kAbandonGrace (2 s); then it concludes without it
//    (cancelled or failed) and the copier is abandoned: it submits no more
//    I/O, and exits whenever its I/O returns;
//  - a drive writer waits for its CBW copy at most cbw_timeout (30 s by
//    default, like QEMU's cbw-timeout); then on-cbw-error applies:
//    break-snapshot lets the write proceed and fails the job,
//    break-guest-write fails the write with EIO (QEMU says ETIMEDOUT; SPEC
//    promises EIO for a refused write);
//  - snapshot readers are not waited for at all when the job ends.
//
// Buffered copy-before-write (on-cbw-error break-snapshot only): a drive
// write does not wait for the target. The writer reads the point-in-time
// data of the clusters it is about to overwrite into memory (bounded by
// cbw_buffer_bytes per job), the clusters count as preserved at once, and
// the write proceeds; CBW workers store the buffered clusters into the
// target in the background. Views read buffered clusters from memory; the
// job succeeds only once every buffered cluster is stored; a store that
// fails breaks the snapshot (the write it preserved for has long returned,
// which is what break-snapshot allows). When the buffer is full, writers
// wait for room (the CBW timeout applies). break-guest-write keeps the
// synchronous copy: its write must fail if the copy fails.
// Threads that may be stuck (copier, CBW tasks, view reads) hold a shared_ptr
// to the job and to the target, so both outlive them and the last user closes
// the target. A stuck thread touches neither the drive nor the registry once
// the job has concluded (ending_).
//
// Locks: mu_ guards everything mutable in the job: the cluster states (copy
// bitmap and in-flight claims), frozen snapshot reads, counters, the state
// machine and the rate limiter. cv_ is signalled on every change a waiter may
// care about. I/O is never done with mu_ held. Events are queued under mu_
// (outbox_) and published after it is released, in order, under publish_mu_
// (taken with no other lock held). See backup/mutex.h for the global order.
//
// Cluster states: dirty (not yet preserved: the source still holds the data
// of the point in time), copying (claimed by exactly one copier: the
// background copier or one CBW task), done (the target holds it, as data or
// as a hole). Claims go dirty -> copying under mu_, so no cluster is ever
// copied twice at once; a failed copy returns its clusters to dirty. A drive
// write waits until every cluster it touches is done and no frozen snapshot
// read overlaps it, copying the dirty ones first.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "backup/cluster_map.h"
#include "backup/copier.h"
#include "backup/dirty_bitmap.h"
#include "backup/drive.h"
#include "backup/event_bus.h"
#include "backup/job_types.h"
#include "backup/mutex.h"
#include "backup/rate_limiter.h"
#include "backup/source_lease.h"
#include "backup/status.h"
#include "backup/target.h"
#include "backup/txn.h"
#include "backup/worker_pool.h"

namespace cbw::backup {

struct JobParams {
  BackupOptions options;  // job_id already defaulted
  Drive* drive = nullptr;
  std::shared_ptr<Target> target;
  EventBus* bus = nullptr;
  std::shared_ptr<Txn> txn;
  uint64_t cluster_size = 64 * 1024;
  uint64_t chunk_size = 1024 * 1024;  // background copy unit (a multiple of clusters)
  unsigned queue_depth = 8;           // chunks in flight
  // How long a drive write waits for its copy-before-write (see above).
  std::chrono::milliseconds cbw_timeout{30'000};
  // Memory for buffered copy-before-write (see above); 0 turns it off.
  uint64_t cbw_buffer_bytes = 64ull << 20;
  // With a dirty bitmap (SPEC 7): called once when the job ends, before its
  // completion is announced, with the outcome and the byte ranges of the
  // copy set it had not copied.
  std::function<void(bool success, std::vector<std::pair<uint64_t, uint64_t>> not_copied)>
      on_bitmap_end;
};

// One drive-backup job: copy state, CBW hook, background copier, state
// machine, snapshot view. Created by JobRegistry; all public methods are
// thread-safe.
class BackupJob : public std::enable_shared_from_this<BackupJob>, private CopierHost {
 public:
  explicit BackupJob(JobParams params);
  ~BackupJob() override;  // joins the job thread
  BackupJob(const BackupJob&) = delete;
  BackupJob& operator=(const BackupJob&) = delete;

  const std::string& id() const { return id_; }
  Drive* drive() const { return drive_; }
  const std::string& target_identity() const { return target_identity_; }
  const std::string& target_display() const { return target_display_; }

  // The hook to install on the drive (once, by the registry).
  std::shared_ptr<WriteHook> hook() const { return hook_; }
  // Emits `created`. Called before the hooks are installed.
  void Announce() CBW_EXCLUDES(mu_);
  // created -> running, and starts the job thread. Called after the hooks
  // are installed (the point in time).
  void Start() CBW_EXCLUDES(mu_);
  // sync=bitmap: only the clusters `frozen` marks are the job's to copy
  // (len counts them). Called at the point in time, before Start.
  void SetCopySet(const DirtyBitmap& frozen) CBW_EXCLUDES(mu_);

  // QMP verbs; messages and errnos as documented on JobRegistry.
  Status Cancel(bool force) CBW_EXCLUDES(mu_);
  Status Pause() CBW_EXCLUDES(mu_);
  Status Resume() CBW_EXCLUDES(mu_);
  Status SetSpeed(int64_t speed) CBW_EXCLUDES(mu_);
  Status Complete() CBW_EXCLUDES(mu_);
  Status Finalize() CBW_EXCLUDES(mu_);
  Status Dismiss() CBW_EXCLUDES(mu_);

  // Cancel without verb checks (shutdown, grouped transactions); no-op for a
  // job that is already ending.
  void CancelInternal() CBW_EXCLUDES(mu_);
  void FinalizeInternal() CBW_EXCLUDES(mu_);
  // Wakes the job's threads to re-check their conditions.
  void Kick() CBW_EXCLUDES(mu_);

  JobInfo Info() const CBW_EXCLUDES(mu_);
  bool listed() const CBW_EXCLUDES(mu_);
  bool ended() const CBW_EXCLUDES(mu_);  // concluded or null
  // Not yet concluded: its target is busy and its view exists.
  bool live() const { return !ended(); }

  // Snapshot view (SPEC 5).
  uint64_t size() const { return size_; }
  bool view_available() const CBW_EXCLUDES(mu_);
  Result<size_t> ReadSnapshot(void* buf, size_t len, uint64_t off) CBW_EXCLUDES(mu_);
  Result<uint64_t> SeekSnapshot(uint64_t off, int whence) CBW_EXCLUDES(mu_);

  // Waits for the job thread to exit (it does after `concluded`).
  void Join();
  // Waits until the job thread has finished its work (concluded, and about
  // to exit), or `deadline`. True if it has.
  bool WaitFinished(std::chrono::steady_clock::time_point deadline) CBW_EXCLUDES(mu_);

  // The copy-before-write step for [offset, offset+length) (the hook).
  Status BeforeWrite(uint64_t offset, uint64_t length, bool may_block) CBW_EXCLUDES(mu_);

 private:
  class Hook;
  struct CbwTask;
  enum class Outcome { kSuccess, kFailed, kCancelled };
  using Run = CopierHost::Run;

  // --- helpers, mu_ held ---
  void TransitionLocked(JobStatus to) CBW_REQUIRES(mu_);
  void PublishLocked(Event e) CBW_REQUIRES(mu_);
  // Waits on cv_ once, after publishing queued events (which counts as a
  // wake-up: callers re-check their condition in a loop). mu_ is held again
  // on return. (Unchecked by the analysis: it drops `lock` for the flush.)
  void WaitLocked(MutexLock* lock) CBW_REQUIRES(mu_) CBW_NO_TSA;
  bool WaitUntilLocked(MutexLock* lock, std::chrono::steady_clock::time_point deadline)
      CBW_REQUIRES(mu_) CBW_NO_TSA;
  Status VerbCheckLocked(JobVerb verb) const CBW_REQUIRES(mu_);
  uint64_t ClusterBytes(uint64_t c0, uint64_t c1) const;
  void FinishClaimLocked(const Run& run, bool ok, uint64_t data_bytes, uint64_t zero_bytes,
                         bool cbw) CBW_REQUIRES(mu_);
  void SetErrorLocked(int err, std::string message) CBW_REQUIRES(mu_);
  void SampleRateLocked() CBW_REQUIRES(mu_);
  bool FrozenOverlapsLocked(uint64_t c0, uint64_t c1) const CBW_REQUIRES(mu_);
  // on-cbw-error for a CBW that failed or did not finish in time.
  Status CbwFailedLocked(const Status& why) CBW_REQUIRES(mu_);
  // Publishes the queued events, in order.
  void FlushEvents() CBW_EXCLUDES(mu_);

  // --- CopierHost (the copier's thread) ---
  Halt halt() override CBW_EXCLUDES(mu_);
  bool abandoned() override { return ending_.load(); }
  std::optional<Run> ClaimNext(uint64_t* cursor, uint64_t end, uint64_t max_clusters) override
      CBW_EXCLUDES(mu_);
  uint64_t NextDirty(uint64_t from) override CBW_EXCLUDES(mu_);
  void Finish(const Run& run, bool ok, uint64_t data, uint64_t zero) override CBW_EXCLUDES(mu_);
  uint64_t ChunkBytes() override CBW_EXCLUDES(mu_);
  uint64_t DelayNs(uint64_t bytes) override CBW_EXCLUDES(mu_);
  void Consume(uint64_t bytes) override CBW_EXCLUDES(mu_);
  bool AllDone() override CBW_EXCLUDES(mu_);
  void Wait(uint64_t ns) override CBW_EXCLUDES(mu_);
  bool OnPause() override CBW_EXCLUDES(mu_);
  bool OnIoError(int err, bool is_read) override CBW_EXCLUDES(mu_);

  // --- job thread ---
  void RunJob();
  // Waits while the job is user-paused (running <-> paused). Returns false
  // if cancelled meanwhile.
  bool PausePointLocked(MutexLock* lock) CBW_REQUIRES(mu_);
  bool HandleIoErrorLocked(MutexLock* lock, int err, bool is_read) CBW_REQUIRES(mu_);
  Outcome RunNone() CBW_EXCLUDES(mu_);
  Outcome RunCopier() CBW_EXCLUDES(mu_);
  Outcome Complete(Outcome copied) CBW_EXCLUDES(mu_);
  void Conclude(Outcome outcome) CBW_EXCLUDES(mu_);

  // --- copy-before-write tasks ---
  void RunCbwTask(const std::shared_ptr<CbwTask>& task) CBW_EXCLUDES(mu_);
  // Copies [off, off+len) from the source to `target` (zeros as holes or
  // write-zeroes); no lock held.
  Status CopySync(Target* target, uint64_t off, uint64_t len, uint64_t* zero_bytes);
  // Writes `n` bytes of point-in-time data at `off` to `target`, cluster by
  // cluster (all-zero clusters as holes or write-zeroes); no lock held.
  Status WriteOut(Target* target, const char* buf, size_t n, uint64_t off, uint64_t* zero_bytes);
  // Bytes of the dirty clusters in [c0, c1).
  uint64_t DirtyBytesLocked(uint64_t c0, uint64_t c1) const CBW_REQUIRES(mu_);
  // Buffered CBW: claims the dirty clusters of [c0, c1) (`need` bytes, room
  // already checked), reads them from the source with mu_ released, and
  // hands them to the store. Returns what on-cbw-error says if the read fails.
  Status BufferDirtyLocked(MutexLock* lock, uint64_t c0, uint64_t c1, uint64_t need)
      CBW_REQUIRES(mu_) CBW_NO_TSA;
  // Stores the buffered run starting at cluster c0 into the target (a CBW
  // worker).
  void StoreBuffered(uint64_t c0) CBW_EXCLUDES(mu_);

  const std::string id_;
  const BackupOptions options_;
  Drive* const drive_;
  // Held by CBW copies (which may outlive the job) while they touch drive_.
  const std::shared_ptr<SourceLease> drive_lease_;
  const std::string target_identity_;
  const std::string target_display_;
  EventBus* const bus_;
  const std::shared_ptr<Txn> txn_;
  const uint64_t cluster_size_;
  const uint64_t chunk_size_;
  const unsigned queue_depth_;
  const uint64_t size_;
  const uint64_t nclusters_;
  const std::chrono::milliseconds cbw_timeout_;
  const uint64_t cbw_buffer_bytes_;
  const bool buffering_;  // buffered CBW (break-snapshot and a buffer)
  const std::shared_ptr<WriteHook> hook_;
  const std::shared_ptr<WorkerPool> cbw_pool_;
  const std::function<void(bool, std::vector<std::pair<uint64_t, uint64_t>>)> on_bitmap_end_;
  const double started_;
  std::thread thread_;
  std::mutex join_mu_;
  // Set when the job concludes: threads still running (stuck ones) must not
  // start new I/O nor touch the drive. Read without mu_ on I/O paths.
  std::atomic<bool> ending_{false};

  Mutex publish_mu_;  // serialises FlushEvents; taken with no other lock held
  mutable Mutex mu_;
  CondVar cv_;
  std::shared_ptr<Target> target_ CBW_GUARDED_BY(mu_);  // reset once concluded
  std::vector<Event> outbox_ CBW_GUARDED_BY(mu_);
  ClusterMap clusters_ CBW_GUARDED_BY(mu_);
  std::vector<Run> frozen_reads_ CBW_GUARDED_BY(mu_);
  // Buffered CBW: runs preserved in memory, done in clusters_ but not yet in
  // the target, by first cluster. Shared with the store task and views.
  struct Buffered {
    uint64_t c1;
    // The clusters' data starts at data->data() + data_off; null: all zero
    // (stored as a hole or write-zeroes, a hole to seeks, no memory kept).
    std::shared_ptr<const std::vector<char>> data;
    size_t data_off = 0;
  };
  std::map<uint64_t, Buffered> buffered_ CBW_GUARDED_BY(mu_);
  uint64_t buffer_used_ CBW_GUARDED_BY(mu_) = 0;  // bytes buffered or being read
  // Buffered runs that never reached the target (a failed store, or the job
  // ended first): not copied, for the bitmap's fate.
  std::vector<Run> lost_ CBW_GUARDED_BY(mu_);
  bool copier_running_ CBW_GUARDED_BY(mu_) = false;
  bool thread_started_ CBW_GUARDED_BY(mu_) = false;
  bool run_finished_ CBW_GUARDED_BY(mu_) = false;
  std::optional<Copier::Outcome> copy_outcome_ CBW_GUARDED_BY(mu_);
  JobStatus status_ CBW_GUARDED_BY(mu_) = JobStatus::kCreated;
  bool listed_ CBW_GUARDED_BY(mu_) = true;
  bool user_paused_ CBW_GUARDED_BY(mu_) = false;
  bool cancel_requested_ CBW_GUARDED_BY(mu_) = false;
  bool finalize_requested_ CBW_GUARDED_BY(mu_) = false;
  bool stopping_ CBW_GUARDED_BY(mu_) = false;  // ending: no more CBW, views read EIO
  bool broken_ CBW_GUARDED_BY(mu_) = false;    // break-snapshot: the point in time is lost
  IoStatus io_status_ CBW_GUARDED_BY(mu_) = IoStatus::kOk;
  std::optional<std::string> error_ CBW_GUARDED_BY(mu_);  // first error, sticky
  uint64_t speed_ CBW_GUARDED_BY(mu_);
  RateLimiter limiter_ CBW_GUARDED_BY(mu_);
  uint64_t len_ CBW_GUARDED_BY(mu_);  // bytes of the copy set
  uint64_t offset_ CBW_GUARDED_BY(mu_) = 0;
  uint64_t cbw_bytes_ CBW_GUARDED_BY(mu_) = 0;
  uint64_t skipped_bytes_ CBW_GUARDED_BY(mu_) = 0;
  bool busy_ CBW_GUARDED_BY(mu_) = false;
  std::optional<double> finished_ CBW_GUARDED_BY(mu_);
  JobResult result_ CBW_GUARDED_BY(mu_) = JobResult::kNone;
  // (monotonic seconds, offset), for the measured rate and the ETA.
  std::deque<std::pair<double, uint64_t>> rate_samples_ CBW_GUARDED_BY(mu_);
};

}  // namespace cbw::backup
