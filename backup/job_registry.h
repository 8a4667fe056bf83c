#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "backup/drive.h"
#include "backup/event_bus.h"
#include "backup/job_record_codec.h"
#include "backup/job_types.h"
#include "backup/status.h"

namespace cbw::backup {

class BackupJob;

struct RegistryOptions {
  uint64_t cluster_size = 64 * 1024;
  // The mountpoint (absolute, canonical): targets under it are refused by
  // path, before any stat/open that would re-enter cbwfs.
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
  // How long Shutdown() waits for cancelled jobs to conclude.
  uint32_t shutdown_timeout_ms = 10'000;
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
// Thread safety: every method is thread-safe. Lock order: store mutex ->
// registry mu_ -> job mutex -> EventBus -> subscriber locks (the persister's
// queue lock is one). Drive write paths never take the registry lock.
//
// Persistence (Open with a state dir): a bus subscriber queues the id of
// every job whose status changes; a persister thread writes that job's
// record (JobStore) under the store mutex, so status changes never wait for
// an fsync and records are not rewritten on progress ticks. Records found at
// Open are shown read-only (jobs/ files, never listed to QMP) until removed
// or replaced; one that was not concluded when its daemon stopped comes back
// concluded, result failed, error "daemon stopped".
//
// Ownership: the registry owns its jobs; drives and the bus are borrowed and
// must outlive it. The destructor calls Shutdown(). A job whose copier or
// copy-before-write worker is stuck in target I/O keeps itself alive until
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

  // Starts one job per element at one common point in time: all are validated
  // and their targets prepared first; if any fails, none starts, nothing is
  // left behind, and the first error is returned. On success the point in
  // time is fixed before this returns. With kGrouped, a failure or cancel of
  // one job cancels the others.
  Status StartBackups(const std::vector<BackupOptions>& jobs,
                      CompletionMode mode = CompletionMode::kIndividual);

  // QMP verbs. `force` is accepted for block-job-cancel; backup cancels are
  // always hard, but a user-paused job without force is refused as QEMU does
  // ("The block job for device 'X' is currently paused").
  Status Cancel(const std::string& id, bool force = true);
  Status Pause(const std::string& id);
  Status Resume(const std::string& id);
  Status SetSpeed(const std::string& id, int64_t speed);
  Status Complete(const std::string& id);  // always refused for backup
  Status Finalize(const std::string& id);
  Status Dismiss(const std::string& id);

  // Jobs QMP lists (not yet dismissed), in creation order.
  std::vector<JobInfo> ListJobs() const;
  // Every job with a jobs/ file (live and ended, at most max_ended_jobs
  // ended ones), in creation order; and one of them by id.
  std::vector<JobInfo> JobFiles() const;
  std::optional<JobInfo> GetJobFile(const std::string& id) const;
  // `rm jobs/<id>`: dismisses a concluded job and drops its file (and its
  // persisted record). ESRCH if unknown; EBUSY while the job is live (not
  // yet concluded).
  Status RemoveJobFile(const std::string& id);

  // Snapshot views (SPEC 5): the ids of live jobs, and reads/seeks of the
  // drive as it was at a job's point in time. ENOENT for an unknown/ended
  // view; EIO once its snapshot broke or its job ended under an open reader.
  std::vector<std::string> SnapshotIds() const;
  std::optional<uint64_t> SnapshotSize(const std::string& id) const;
  Result<size_t> ReadSnapshot(const std::string& id, void* buf, size_t len, uint64_t off) const;
  Result<uint64_t> SeekSnapshot(const std::string& id, uint64_t off, int whence) const;

  // Cancels every live job and waits, at most options.shutdown_timeout_ms,
  // for all of them to conclude (events are emitted, records say so, and are
  // written to the state dir). A job stuck on a dead target concludes
  // without its copier (see BackupJob). Idempotent.
  void Shutdown();

 private:
  void Persist(const std::string& id);
  void PersistLoop();
  void DropRecords(const std::vector<std::string>& ids);

  std::vector<Drive*> drives_;
  EventBus* bus_;
  RegistryOptions options_;
  mutable std::mutex mu_;
  // Engine state (jobs, ended records, ...) lives behind this; its layout is
  // the engine's business.
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace cbw::backup
