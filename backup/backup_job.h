#pragma once

// Thread model and lock order
// ---------------------------
// A BackupJob has a job thread (the state machine), started by Start() and
// joined by Join()/the destructor, which runs the copier (the background copy)
// on a thread of its own; and a small pool of copy-before-write workers that
// do the CBW copies for drive writers. Drive writer threads enter the job
// through its CBW hook (BeforeWrite); snapshot readers through ReadSnapshot
// and SeekSnapshot; verbs arrive from control/ threads via the registry.
//
// Dead targets: a read or write on a target that stopped answering (a hung
// NFS server or FUSE daemon) may never return, and nothing in userspace can
// take it back. So no wait on target I/O is unbounded:
//  - the job thread waits for the copier only until a cancel or an error has
//    been pending for kAbandonGrace (2 s); then it concludes without it
//    (cancelled or failed) and the copier is abandoned: it submits no more
//    I/O, and exits whenever its I/O returns;
//  - a drive writer waits for its CBW copy (done by a worker) at most
//    cbw_timeout (JobParams; 30 s by default, like QEMU's cbw-timeout); then
//    on-cbw-error applies: break-snapshot lets the write proceed and fails
//    the job, break-guest-write fails the write with EIO (QEMU says
//    ETIMEDOUT there; our SPEC promises EIO for a refused write);
//  - snapshot readers are not waited for at all when the job ends.
// Threads that may be stuck (copier, CBW workers) hold a shared_ptr to the
// job, so it outlives them; and the target fd is closed only by whoever
// stops using it last (target_users_), never under an I/O in flight, so its
// number cannot be reused under one. A stuck thread touches neither the
// drive nor the registry once the job has concluded.
//
// One mutex, mu_, guards everything mutable in the job: the cluster states
// (the copy bitmap and in-flight claims in one array), frozen snapshot reads,
// counters, the state machine and the rate limiter. cv_ is notified on every
// change any waiter may care about. I/O is never done with mu_ held.
//
// Lock order: JobRegistry::mu_ -> BackupJob::mu_ -> EventBus::mu_. A job never
// holds its own mu_ while taking another job's (transaction peers are
// cancelled with no lock held) nor while calling Drive::RemoveHook.
//
// Cluster states: kDirty (not yet preserved: the source still holds the data
// of the point in time), kCopying (claimed by exactly one copier: the
// background thread or one CBW writer), kDone (the target holds it, as data or
// as a hole). Claims go kDirty -> kCopying under mu_, so no cluster is ever
// copied twice at once; a failed copy returns its clusters to kDirty. A drive
// write waits until every cluster it touches is kDone and no frozen snapshot
// read overlaps it, copying the dirty ones itself.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "backup/cluster_map.h"
#include "backup/drive.h"
#include "backup/event_bus.h"
#include "backup/job_types.h"
#include "backup/rate_limiter.h"
#include "backup/status.h"
#include "backup/target.h"

namespace cbw::backup {

class BackupJob;

// The jobs started by one StartBackups call. With kGrouped, a failed or
// cancelled job cancels its peers, and jobs leave `waiting` together once all
// have finished copying. Thread-safe.
class Txn {
 public:
  explicit Txn(CompletionMode mode) : mode_(mode) {}
  CompletionMode mode() const { return mode_; }
  void Add(const std::shared_ptr<BackupJob>& job);
  // A job finished copying successfully. Wakes every job once all have.
  void MarkCopied();
  bool AllCopied() const;
  // A job failed or was cancelled: with kGrouped, cancels the others.
  void Abort(const BackupJob* from);
  // job-finalize on one job of a grouped transaction finalizes all.
  void FinalizeAll(const BackupJob* from);

 private:
  std::vector<std::shared_ptr<BackupJob>> Peers(const BackupJob* from) const;
  const CompletionMode mode_;
  mutable std::mutex mu_;
  std::vector<std::weak_ptr<BackupJob>> jobs_;
  size_t copied_ = 0;
};

struct JobParams {
  BackupOptions options;  // job_id already defaulted
  Drive* drive = nullptr;
  OpenedTarget target;
  EventBus* bus = nullptr;
  std::shared_ptr<Txn> txn;
  uint64_t cluster_size = 64 * 1024;
  uint64_t chunk_size = 1024 * 1024;  // background copy unit (a multiple of clusters)
  unsigned queue_depth = 8;           // parallel chunk copies in flight
  // How long a drive write waits for its copy-before-write (see above).
  std::chrono::milliseconds cbw_timeout{30'000};
};

// One drive-backup job: copy state, CBW hook, background copier (io_uring),
// state machine. Created by JobRegistry; all public methods thread-safe.
class BackupJob : public std::enable_shared_from_this<BackupJob> {
 public:
  explicit BackupJob(JobParams params);
  ~BackupJob();  // joins the copier thread
  BackupJob(const BackupJob&) = delete;
  BackupJob& operator=(const BackupJob&) = delete;

  const std::string& id() const { return id_; }
  Drive* drive() const { return drive_; }
  dev_t target_dev() const { return target_.dev; }
  ino_t target_ino() const { return target_.ino; }
  const std::string& target_path() const { return target_.path; }

  // The hook to install on the drive (once, by the registry).
  std::shared_ptr<WriteHook> hook() const { return hook_; }
  // Emits `created`. Called before the hooks are installed.
  void Announce();
  // created -> running, and starts the copier thread. Called after the hooks
  // are installed (the point in time).
  void Start();

  // QMP verbs; messages and errnos as documented on JobRegistry.
  Status Cancel(bool force);
  Status Pause();
  Status Resume();
  Status SetSpeed(int64_t speed);
  Status Complete();
  Status Finalize();
  Status Dismiss();

  // Cancel without verb checks (shutdown, grouped transactions); no-op for a
  // job that is already ending.
  void CancelInternal();
  void FinalizeInternal();
  // Wakes the copier thread to re-check its conditions.
  void Kick();

  JobInfo Info() const;
  bool listed() const;
  // Not yet concluded: its target is busy and its view exists.
  bool live() const;
  bool ended() const;  // concluded or null
  double finished_time() const;

  // The copy-before-write step for [offset, offset+length) (the hook).
  Status BeforeWrite(uint64_t offset, uint64_t length);

  // Snapshot view (SPEC 5).
  uint64_t size() const { return size_; }
  bool view_available() const;
  Result<size_t> ReadSnapshot(void* buf, size_t len, uint64_t off);
  Result<uint64_t> SeekSnapshot(uint64_t off, int whence);

  // Waits for the job thread to exit (it does after `concluded`).
  void Join();
  // Waits until the job thread has finished its work (concluded, and about
  // to exit), or `deadline`. True if it has.
  bool WaitFinished(std::chrono::steady_clock::time_point deadline);

 private:
  class Hook;
  class Copier;
  friend class Copier;
  struct ClusterRun {
    uint64_t c0, c1;
  };

  // --- helpers, mu_ held ---
  void TransitionLocked(JobStatus to);
  Status VerbCheckLocked(JobVerb verb) const;
  uint64_t ClusterBytes(uint64_t c0, uint64_t c1) const;
  std::vector<ClusterRun> ClaimDirtyLocked(uint64_t c0, uint64_t c1);
  void FinishClaimLocked(uint64_t c0, uint64_t c1, bool ok, uint64_t data_bytes,
                         uint64_t zero_bytes, bool cbw);
  void SetErrorLocked(int err, std::string message);
  void SampleRateLocked();
  bool FrozenOverlapsLocked(uint64_t c0, uint64_t c1) const;
  void PublishLocked(Event e);

  // --- job thread ---
  void Run();
  // --- copy-before-write workers ---
  struct CbwTask {
    uint64_t c0 = 0, c1 = 0;
    bool started = false, done = false;
    Status result;
  };
  void CbwWorker();
  // Starts a worker if none is idle for the queued tasks. mu_ held.
  void SpawnCbwWorkerLocked();
  // on-cbw-error for a CBW that did not finish in time. mu_ held.
  Status CbwTimeoutLocked(const std::vector<std::shared_ptr<CbwTask>>& mine);
  // One user of target_.fd less; returns the fd to close (without mu_) when
  // the job has concluded and this was the last user. mu_ held.
  UniqueFd ReleaseTargetLocked();

  // --- copier thread ---
  // Waits while the job is user-paused (running <-> paused). Returns false
  // if cancelled meanwhile. mu_ held via `lock`.
  bool PausePointLocked(std::unique_lock<std::mutex>& lock);
  enum class Outcome { kSuccess, kFailed, kCancelled };
  Outcome RunNone();
  Outcome RunFull();
  Outcome Complete(Outcome copied);
  void Conclude(Outcome outcome);
  // Applies on-source/target-error. Returns true to retry, false when the job
  // must fail (the error is recorded) or was cancelled.
  bool HandleIoError(std::unique_lock<std::mutex>& lock, int err, bool is_read);

  // --- I/O without mu_ ---
  Status CopySync(uint64_t off, uint64_t len, uint64_t* zero_bytes);
  Status ZeroTarget(uint64_t off, uint64_t len);

  const std::string id_;
  const BackupOptions options_;
  Drive* const drive_;
  OpenedTarget target_;
  EventBus* const bus_;
  const std::shared_ptr<Txn> txn_;
  const uint64_t cluster_size_;
  const uint64_t chunk_size_;
  const unsigned queue_depth_;
  const uint64_t size_;
  const uint64_t nclusters_;
  const std::chrono::milliseconds cbw_timeout_;
  std::shared_ptr<WriteHook> hook_;
  std::thread thread_;
  std::mutex join_mu_;
  // Set when the job concludes: threads still running (stuck ones) must not
  // start new I/O nor touch the drive. Read without mu_ on I/O loops.
  std::atomic<bool> ending_{false};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  ClusterMap clusters_;
  std::vector<ClusterRun> frozen_reads_;
  // Threads using target_.fd right now: the copier, busy CBW workers and
  // snapshot readers. Once target_orphaned_ (concluded), the last one closes.
  unsigned target_users_ = 0;
  bool target_orphaned_ = false;
  bool copier_running_ = false;
  bool thread_started_ = false;
  bool run_finished_ = false;        // the job thread is done (WaitFinished)
  std::optional<int> copy_outcome_;  // Outcome of the copier, once returned
  std::deque<std::shared_ptr<CbwTask>> cbw_queue_;
  std::condition_variable cbw_cv_;  // workers wait here for tasks
  unsigned cbw_threads_ = 0, cbw_idle_ = 0;
  JobStatus status_ = JobStatus::kCreated;
  bool listed_ = true;
  bool user_paused_ = false;
  bool cancel_requested_ = false;
  bool finalize_requested_ = false;
  bool stopping_ = false;  // the job is ending: no more CBW, views read EIO
  bool broken_ = false;    // break-snapshot: the point in time is lost
  IoStatus io_status_ = IoStatus::kOk;
  std::optional<std::string> error_;  // first error, sticky
  int error_code_ = 0;
  uint64_t speed_;
  RateLimiter limiter_;
  uint64_t offset_ = 0;
  uint64_t cbw_bytes_ = 0;
  uint64_t skipped_bytes_ = 0;
  bool busy_ = false;
  double started_ = 0;
  std::optional<double> finished_;
  JobResult result_ = JobResult::kNone;
  std::deque<std::pair<double, uint64_t>> rate_samples_;  // (monotonic s, offset)
};

}  // namespace cbw::backup
