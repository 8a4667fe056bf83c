#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "backup/bitmap_catalog.h"
#include "backup/drive.h"
#include "backup/drive_bitmaps.h"
#include "backup/event_bus.h"
#include "backup/job_record_codec.h"
#include "backup/job_types.h"
#include "backup/mutex.h"
#include "backup/status.h"

namespace cbw::backup {

class BackupJob;
class JobStore;

// One action of a transaction (or a single command): a drive-backup or a
// dirty-bitmap command.
struct TxnAction {
  std::optional<BackupOptions> backup;
  std::optional<BitmapAction> bitmap;
};

struct RegistryOptions {
  uint64_t cluster_size = 64 * 1024;
  // The mountpoint (absolute, canonical): targets under it are refused by
  // path and by device (SetMountDevice), before anything inside is looked up.
  std::string mountpoint;
  // Relative targets are resolved against this directory (the daemon's cwd
  // at start; the daemon itself later runs in "/").
  std::string base_dir;
  // Where job records are persisted across restarts (empty: nowhere). Only
  // JobRegistry::Open uses it; the plain constructor keeps records in memory.
  std::string state_dir;
  // The format of those records; required with a state dir (the daemon
  // passes control/'s, which writes jobs/<id> files).
  std::shared_ptr<const JobRecordCodec> record_codec;
  // How many ended jobs keep their jobs/ file.
  size_t max_ended_jobs = 256;
  // How long a drive write waits for its copy-before-write before
  // on-cbw-error applies (a target that stopped answering). Internal, not a
  // QMP argument; see BackupJob.
  uint32_t cbw_timeout_ms = 30'000;
  // Memory per job for buffered copy-before-write under break-snapshot (see
  // BackupJob); 0: every CBW copy is synchronous.
  uint64_t cbw_buffer_bytes = 64ull << 20;
  // How long a remote target (NBD, qcow2 via qemu-nbd) may leave requests
  // unanswered before they fail as target errors (SPEC 6: 30 s).
  uint32_t target_timeout_ms = 30'000;
  // How long Shutdown() waits for cancelled jobs to conclude.
  uint32_t shutdown_timeout_ms = 10'000;
  // How often a running job's record is rewritten with its progress, so a
  // killed daemon's record shows the last known offset.
  uint32_t progress_save_ms = 5'000;
  // Journal region of persistent bitmaps (see DriveBitmaps).
  uint64_t bitmap_region_size = 64ull << 20;
  // Called, with no lock held, just before a command fixes a point in time
  // on these drives (fs/ writes back the kernel's cached dirty pages of a
  // drive in writeback-cache mode, SPEC 9). Null: nothing to do.
  std::function<void(const std::vector<Drive*>&)> before_point_in_time;
};

// The set of drives and jobs: starts backups, routes job verbs, keeps the
// records behind jobs/ and the views behind snapshots/.
//
// Errors are Status values whose errno follows SPEC 2.2's table and whose
// message is QEMU's text where QEMU has the same error:
//   ENODEV  "Cannot find device='X' nor node-name='X'"
//   ESRCH   no such job (control/ words it per command family)
//   EBUSY   "Job ID 'X' already in use", "Job 'X' in state 'S' cannot accept
//           command verb 'V'", target busy, ...
//   EINVAL  bad target (under the mountpoint, a source, not a file/device,
//           too small, other image format), "Invalid job ID 'X'"
//   other   the errno of creating/opening the target, message
//           "Could not open '<path>': <strerror>" / "Could not create ..."
//
// Thread safety: every method is thread-safe. mu_ guards only the registry's
// own lists and is never held across filesystem I/O or a wait for drive
// writes: StartBackups reserves ids under it, opens and prepares targets
// without it, and installs hooks (the point in time) without it, so a target
// path that reaches into the mount, a hung target or a slow install cannot
// stall lookups of jobs/ or verbs. Lock order: store_mu_ -> mu_ -> job locks
// (backup/mutex.h). Drive write paths never take the registry's locks.
//
// Persistence (Open with a state dir): a bus subscriber queues the id of
// every job whose status changes; the persister thread (StartPersister)
// writes that job's record (JobStore) under store_mu_, so status changes
// never wait for an fsync; it also rewrites running jobs' records every
// progress_save_ms. Records found at Open are shown read-only (jobs/ files,
// never listed to QMP) until removed or replaced; one that was not concluded
// when its daemon stopped comes back concluded, result failed, error "daemon
// stopped", with its last saved offset.
//
// Ownership: the registry owns its jobs; drives and the bus are borrowed and
// must outlive it. The destructor calls Shutdown(). A job whose copier or
// copy-before-write task is stuck in target I/O keeps itself alive until
// that I/O returns (see BackupJob); it no longer uses the drive by then.
class JobRegistry {
 public:
  JobRegistry(std::vector<Drive*> drives, EventBus* bus, RegistryOptions options);
  // A registry that persists job records in options.state_dir (when not
  // empty): creates the directory if missing (0700), loads the records in it
  // (corrupt or foreign files are skipped with a warning). Fails with a
  // message naming the path and the errno text when the directory is
  // unusable.
  static Result<std::unique_ptr<JobRegistry>> Open(std::vector<Drive*> drives, EventBus* bus,
                                                   RegistryOptions options);
  ~JobRegistry();
  JobRegistry(const JobRegistry&) = delete;
  JobRegistry& operator=(const JobRegistry&) = delete;

  const std::vector<Drive*>& drives() const { return drives_; }
  Drive* FindDrive(const std::string& name) const;

  // The st_dev of the cbwfs mount, once mounted: targets on it are refused.
  void SetMountDevice(dev_t dev) { mount_dev_.store(dev); }
  // Starts the background threads: the record persister (with a state dir)
  // and the renewal of persistent bitmaps' leases. Call once the process
  // runs as it will (after daemonizing: a thread started before a fork does
  // not exist in the child).
  void StartBackgroundThreads() CBW_EXCLUDES(mu_, pmu_);

  // Starts one job per element at one common point in time: all are validated
  // and their targets prepared first; if any fails, none starts, nothing is
  // left behind, and the first error is returned. On success the point in
  // time is fixed before this returns. With kGrouped, a failure or cancel of
  // one job cancels the others.
  Status StartBackups(const std::vector<BackupOptions>& jobs,
                      CompletionMode mode = CompletionMode::kIndividual) CBW_EXCLUDES(mu_);
  // A QMP transaction (or one command): drive-backups and dirty-bitmap
  // commands checked in order (QEMU's texts; the first failure refuses all),
  // then applied at one common point in time: all or nothing.
  Status Transaction(const std::vector<TxnAction>& actions,
                     CompletionMode mode = CompletionMode::kIndividual) CBW_EXCLUDES(mu_);

  // Dirty bitmaps (SPEC 7): what query-block shows per drive, and the state
  // the checks of a command run against (a snapshot; see BitmapCatalog).
  std::vector<BitmapInfo> Bitmaps(const std::string& drive) const;
  BitmapCatalog Catalog() const;
  // A copy of a bitmap's bits (tests); null if there is none.
  std::unique_ptr<DirtyBitmap> BitmapCopy(const std::string& drive, const std::string& name) const;
  // At a clean stop, after the last write (the mount is gone and the drives
  // flushed): saves every persistent bitmap with the source's final state.
  void SaveBitmapsAtStop();

  // QMP verbs. `force` is accepted for block-job-cancel; backup cancels are
  // always hard, but a user-paused job without force is refused as QEMU does
  // ("The block job for device 'X' is currently paused").
  Status Cancel(const std::string& id, bool force = true) CBW_EXCLUDES(mu_);
  Status Pause(const std::string& id) CBW_EXCLUDES(mu_);
  Status Resume(const std::string& id) CBW_EXCLUDES(mu_);
  Status SetSpeed(const std::string& id, int64_t speed) CBW_EXCLUDES(mu_);
  Status Complete(const std::string& id) CBW_EXCLUDES(mu_);  // always refused for backup
  Status Finalize(const std::string& id) CBW_EXCLUDES(mu_);
  Status Dismiss(const std::string& id) CBW_EXCLUDES(mu_);

  // Jobs QMP lists (not yet dismissed), in creation order.
  std::vector<JobInfo> ListJobs() const CBW_EXCLUDES(mu_);
  // Every job with a jobs/ file (live and ended, at most max_ended_jobs
  // ended ones), in creation order; and one of them by id.
  std::vector<JobInfo> JobFiles() const CBW_EXCLUDES(mu_);
  std::optional<JobInfo> GetJobFile(const std::string& id) const CBW_EXCLUDES(mu_);
  // `rm jobs/<id>`: dismisses a concluded job and drops its file (and its
  // persisted record). ESRCH if unknown; EBUSY while the job is live (not
  // yet concluded).
  Status RemoveJobFile(const std::string& id) CBW_EXCLUDES(mu_);

  // Snapshot views (SPEC 5): the ids of live jobs, and reads/seeks of the
  // drive as it was at a job's point in time. ENOENT for an unknown/ended
  // view; EIO once its snapshot broke or its job ended under an open reader.
  std::vector<std::string> SnapshotIds() const CBW_EXCLUDES(mu_);
  std::optional<uint64_t> SnapshotSize(const std::string& id) const CBW_EXCLUDES(mu_);
  Result<size_t> ReadSnapshot(const std::string& id, void* buf, size_t len, uint64_t off) const
      CBW_EXCLUDES(mu_);
  Result<uint64_t> SeekSnapshot(const std::string& id, uint64_t off, int whence) const
      CBW_EXCLUDES(mu_);

  // Cancels every live job and waits, at most options.shutdown_timeout_ms,
  // for all of them to conclude (events are emitted, records say so, and are
  // written to the state dir). A job stuck on a dead target concludes
  // without its copier (see BackupJob). Idempotent.
  void Shutdown() CBW_EXCLUDES(mu_, pmu_);
  // After Shutdown: whether a job did not conclude in time and was left
  // running. Its thread still uses the drives, the event bus and this
  // registry, so the process must end without destroying them.
  bool LeftJobsBehind() const CBW_EXCLUDES(mu_);

 private:
  std::shared_ptr<BackupJob> Find(const std::string& id) const CBW_REQUIRES(mu_);
  std::shared_ptr<BackupJob> FindListed(const std::string& id) const CBW_REQUIRES(mu_);
  std::shared_ptr<BackupJob> ListedJob(const std::string& id) const CBW_EXCLUDES(mu_);
  void Persist(const std::string& id) CBW_EXCLUDES(mu_, store_mu_);
  void PersistLoop() CBW_EXCLUDES(mu_, pmu_);
  void DropRecords(const std::vector<std::string>& ids) CBW_EXCLUDES(store_mu_);
  // Keeps at most max_ended_jobs ended records; returns the jobs dropped
  // (to join outside the lock) and appends their ids to *dropped.
  std::vector<std::shared_ptr<BackupJob>> PruneLocked(std::vector<std::string>* dropped)
      CBW_REQUIRES(mu_);

  // The transaction's point in time: re-checks every action against the
  // bitmaps as they are now (gate closed) and, if all pass, applies them.
  struct Planned;
  Status ApplyAtPointInTime(std::vector<Planned>& plan, bool grouped);
  void TickLoop() CBW_EXCLUDES(pmu_);
  // Saves a drive's bitmaps on the ticker thread, promptly but off the
  // caller's path (a job's start and end); synchronously without a ticker.
  // Safe to defer: until the save, the crash journal covers every change.
  void SaveBitmapsSoon(DriveBitmaps* b) CBW_EXCLUDES(pmu_);

  const std::vector<Drive*> drives_;
  // One per drive, same order; their hooks are installed at construction.
  std::vector<std::unique_ptr<DriveBitmaps>> bitmaps_;
  EventBus* const bus_;
  const RegistryOptions options_;
  std::atomic<dev_t> mount_dev_{0};

  mutable Mutex mu_;
  // Records in creation order: first those loaded from the state dir (all
  // ended, oldest first), then this run's jobs. A job id names at most one
  // record; a new job may take the id of a record that QMP no longer lists
  // (it replaces it).
  std::vector<JobInfo> archived_ CBW_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<BackupJob>> jobs_ CBW_GUARDED_BY(mu_);
  // Ids and targets of jobs being started (between validation and install).
  std::set<std::string> reserved_ids_ CBW_GUARDED_BY(mu_);
  std::set<std::string> reserved_targets_ CBW_GUARDED_BY(mu_);
  bool shut_down_ CBW_GUARDED_BY(mu_) = false;
  bool left_behind_ CBW_GUARDED_BY(mu_) = false;

  // Persistence; unset without a state dir.
  Mutex store_mu_;  // serialises every JobStore call
  std::unique_ptr<JobStore> store_ CBW_PT_GUARDED_BY(store_mu_);
  Mutex pmu_;  // the persister's queue; a leaf, taken by the bus subscriber
  CondVar pcv_;
  std::set<std::string> pdirty_ CBW_GUARDED_BY(pmu_);  // ids whose record must be rewritten
  bool pstop_ CBW_GUARDED_BY(pmu_) = false;
  uint64_t token_ = 0;
  std::thread persister_;
  std::thread ticker_;  // bitmap leases and deferred saves; stops with pstop_
  CondVar tick_cv_;     // with pmu_
  bool ticking_ CBW_GUARDED_BY(pmu_) = false;  // the ticker runs (until pstop_)
  std::set<DriveBitmaps*> save_soon_ CBW_GUARDED_BY(pmu_);
};

}  // namespace cbw::backup
