#include "backup/job_registry.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>

#include "backup/backup_job.h"
#include "backup/ids.h"
#include "backup/job_store.h"
#include "backup/log.h"
#include "backup/target.h"
#include "backup/threads.h"

namespace cbw::backup {
namespace {

Status JobNotFound() { return Status::Error(ESRCH, "Job not found"); }

double FileTime(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return 0;
  return static_cast<double>(st.st_mtim.tv_sec) + static_cast<double>(st.st_mtim.tv_nsec) / 1e9;
}

}  // namespace

Result<std::unique_ptr<JobRegistry>> JobRegistry::Open(std::vector<Drive*> drives, EventBus* bus,
                                                       RegistryOptions options) {
  std::unique_ptr<JobStore> store;
  if (!options.state_dir.empty()) {
    auto s = JobStore::Open(options.state_dir, options.record_codec);
    if (!s.ok()) return s.status();
    store = std::move(*s);
  }
  auto r = std::make_unique<JobRegistry>(std::move(drives), bus, std::move(options));
  if (!store) return r;
  std::vector<JobInfo> loaded = store->Load();
  for (JobInfo& i : loaded) {
    i.listed = false;  // QMP jobs do not survive a restart, as in QEMU
    i.busy = false;
    i.paused = false;
    if (i.status == JobStatus::kConcluded || i.status == JobStatus::kNull) {
      if (i.result != JobResult::kNone) continue;
    }
    // Torn: the daemon stopped before this job concluded. Whatever its
    // target holds, it is not a backup. Its last saved offset stays.
    i.status = JobStatus::kConcluded;
    i.result = JobResult::kFailed;
    i.error = "daemon stopped";
    i.eta_seconds.reset();
    i.bytes_per_second = 0;
    if (!i.finished) {
      double t = FileTime(store->PathOf(i.id));
      i.finished = std::max(t, i.started);
    }
    if (Status s = store->Save(i); !s.ok()) LogWarn("state dir: " + s.message());
  }
  // The newest max_ended_jobs are kept; older records go, files and all.
  std::stable_sort(loaded.begin(), loaded.end(), [](const JobInfo& a, const JobInfo& b) {
    return a.finished.value_or(a.started) < b.finished.value_or(b.started);
  });
  while (loaded.size() > r->options_.max_ended_jobs) {
    if (Status s = store->Remove(loaded.front().id); !s.ok()) LogWarn("state dir: " + s.message());
    loaded.erase(loaded.begin());
  }
  std::stable_sort(loaded.begin(), loaded.end(),
                   [](const JobInfo& a, const JobInfo& b) { return a.started < b.started; });
  if (!loaded.empty()) {
    LogInfo("state dir '" + store->dir() + "': " + std::to_string(loaded.size()) +
            " job record(s) loaded");
  }
  {
    MutexLock lock(&r->mu_);
    r->archived_ = std::move(loaded);
  }
  {
    MutexLock lock(&r->store_mu_);
    r->store_ = std::move(store);
  }
  JobRegistry* self = r.get();
  r->token_ = bus->Subscribe([self](const Event& e) {
    if (e.type != EventType::kJobStatusChange) return;
    MutexLock lock(&self->pmu_);
    self->pdirty_.insert(e.job_id);
    self->pcv_.Signal();
  });
  return r;
}

JobRegistry::JobRegistry(std::vector<Drive*> drives, EventBus* bus, RegistryOptions options)
    : drives_(std::move(drives)), bus_(bus), options_(std::move(options)) {}

JobRegistry::~JobRegistry() { Shutdown(); }

void JobRegistry::StartPersister() {
  {
    MutexLock lock(&store_mu_);
    if (!store_) return;
  }
  if (persister_.joinable()) return;
  persister_ = std::thread([this] { RunGuarded("record persister", [&] { PersistLoop(); }); });
}

void JobRegistry::PersistLoop() {
  MutexLock lock(&pmu_);
  for (;;) {
    if (pdirty_.empty() && !pstop_) {
      pcv_.WaitFor(&lock, std::chrono::milliseconds(options_.progress_save_ms));
    }
    if (pdirty_.empty() && pstop_) return;  // stopped and drained
    std::set<std::string> ids;
    ids.swap(pdirty_);
    lock.Unlock();
    if (ids.empty()) {
      // A progress tick: running jobs keep a recent offset on disk.
      std::vector<std::string> running;
      {
        MutexLock l(&mu_);
        for (const auto& j : jobs_) {
          if (j->live()) running.push_back(j->id());
        }
      }
      ids.insert(running.begin(), running.end());
    }
    for (const auto& id : ids) Persist(id);
    lock.Relock();
  }
}

// Writes the current record of job `id`, if it is still one of ours. The
// lookup and the write happen under store_mu_, so a record removed meanwhile
// (rm jobs/<id>, pruning) is never written back.
void JobRegistry::Persist(const std::string& id) {
  MutexLock slock(&store_mu_);
  if (!store_) return;
  std::shared_ptr<BackupJob> job;
  {
    MutexLock lock(&mu_);
    job = Find(id);
  }
  if (!job) return;
  if (Status s = store_->Save(job->Info()); !s.ok()) LogWarn("state dir: " + s.message());
}

// Deletes the persisted records of `ids`, which the caller has already
// dropped from the registry (so Persist no longer finds them).
void JobRegistry::DropRecords(const std::vector<std::string>& ids) {
  if (ids.empty()) return;
  MutexLock slock(&store_mu_);
  if (!store_) return;
  for (const auto& id : ids) {
    if (Status s = store_->Remove(id); !s.ok()) LogWarn("state dir: " + s.message());
  }
}

Drive* JobRegistry::FindDrive(const std::string& name) const {
  for (Drive* d : drives_) {
    if (d->name() == name) return d;
  }
  return nullptr;
}

std::shared_ptr<BackupJob> JobRegistry::Find(const std::string& id) const {
  for (const auto& j : jobs_) {
    if (j->id() == id) return j;
  }
  return nullptr;
}

std::shared_ptr<BackupJob> JobRegistry::FindListed(const std::string& id) const {
  auto j = Find(id);
  return j && j->listed() ? j : nullptr;
}

std::shared_ptr<BackupJob> JobRegistry::ListedJob(const std::string& id) const {
  MutexLock lock(&mu_);
  return FindListed(id);
}

Status JobRegistry::StartBackups(const std::vector<BackupOptions>& jobs, CompletionMode mode) {
  if (jobs.empty()) return Status::Error(EINVAL, "No backup to start");

  struct Prepared {
    BackupOptions options;
    Drive* drive = nullptr;
    std::shared_ptr<Target> target;
  };
  std::vector<Prepared> prepared;
  std::vector<std::string> ids;
  bool ids_reserved = false;
  std::vector<std::string> targets_reserved;
  // A refused command leaves nothing behind: reservations are released and
  // targets it created are removed.
  auto refuse = [&](Status s) CBW_EXCLUDES(mu_) {
    for (auto& p : prepared) {
      if (p.target) p.target->Discard();
    }
    MutexLock lock(&mu_);
    if (ids_reserved) {
      for (const auto& id : ids) reserved_ids_.erase(id);
    }
    for (const auto& t : targets_reserved) reserved_targets_.erase(t);
    return s;
  };

  // 1. Under the lock, only lookups: drives, ids (reserved until the end).
  {
    MutexLock lock(&mu_);
    if (shut_down_) return Status::Error(ESHUTDOWN, "Shutting down");
    std::set<std::string> seen;
    for (const BackupOptions& in : jobs) {
      Prepared p;
      p.options = in;
      if (p.options.job_id.empty()) p.options.job_id = p.options.device;
      p.drive = FindDrive(p.options.device);
      if (p.drive == nullptr) {
        return Status::Error(ENODEV, "Cannot find device='" + p.options.device +
                                         "' nor node-name='" + p.options.device + "'");
      }
      const std::string& id = p.options.job_id;
      if (!IsValidId(id)) return Status::Error(EINVAL, "Invalid job ID '" + id + "'");
      if (FindListed(id) || reserved_ids_.count(id) || !seen.insert(id).second) {
        return Status::Error(EBUSY, "Job ID '" + id + "' already in use");
      }
      ids.push_back(id);
      prepared.push_back(std::move(p));
    }
    reserved_ids_.insert(ids.begin(), ids.end());
    ids_reserved = true;
  }

  // 2. Without any lock: open the targets (filesystem I/O on user paths).
  for (auto& p : prepared) {
    TargetRequest req;
    req.spec = p.options.target;
    req.base_dir = options_.base_dir;
    req.mountpoint = options_.mountpoint;
    req.mount_dev = mount_dev_.load();
    req.mode = p.options.mode;
    req.format = p.options.format;
    req.size = p.drive->size();
    req.io_timeout = std::chrono::milliseconds(options_.target_timeout_ms);
    Result<std::shared_ptr<Target>> t = OpenTarget(req, drives_);
    if (!t.ok()) return refuse(t.status());
    p.target = std::move(*t);
  }

  // 3. Under the lock: no target may be another live (or starting) job's.
  {
    MutexLock lock(&mu_);
    for (auto& p : prepared) {
      const std::string& key = p.target->identity();
      std::optional<std::string> user;
      for (const auto& j : jobs_) {
        if (j->live() && j->target_identity() == key) user = j->id();
      }
      if (!user && reserved_targets_.count(key)) user = "(starting)";
      for (const auto& q : prepared) {
        if (&q != &p && q.target && q.target->identity() == key) user = q.options.job_id;
      }
      if (user) {
        lock.Unlock();
        return refuse(Status::Error(
            EBUSY, "Target '" + p.options.target + "' is in use by job '" + *user + "'"));
      }
    }
    for (auto& p : prepared) {
      reserved_targets_.insert(p.target->identity());
      targets_reserved.push_back(p.target->identity());
    }
  }

  // 4. Everything is validated: only now is any existing target changed.
  for (auto& p : prepared) {
    if (Status s = p.target->Prepare(); !s.ok()) return refuse(s);
  }

  // 5. The jobs, announced; then the point in time of every job of the
  // transaction, with no registry lock held (it waits for writes in flight).
  auto txn = std::make_shared<Txn>(mode);
  std::vector<std::shared_ptr<BackupJob>> started;
  std::vector<std::pair<Drive*, std::shared_ptr<WriteHook>>> hooks;
  for (auto& p : prepared) {
    JobParams params;
    params.options = p.options;
    params.drive = p.drive;
    params.target = p.target;
    params.bus = bus_;
    params.txn = txn;
    params.cluster_size = options_.cluster_size;
    params.cbw_timeout = std::chrono::milliseconds(options_.cbw_timeout_ms);
    auto job = std::make_shared<BackupJob>(std::move(params));
    txn->Add(job);
    hooks.emplace_back(p.drive, job->hook());
    started.push_back(std::move(job));
  }
  for (auto& job : started) job->Announce();
  if (options_.before_point_in_time) {
    std::vector<Drive*> drives;
    for (const auto& p : prepared) drives.push_back(p.drive);
    options_.before_point_in_time(drives);
  }
  Drive::InstallHooks(hooks);

  // 6. Listed; ended records with the same ids are replaced.
  std::vector<std::shared_ptr<BackupJob>> replaced;
  std::vector<std::string> dropped;
  {
    MutexLock lock(&mu_);
    for (auto it = archived_.begin(); it != archived_.end();) {
      bool taken = std::find(ids.begin(), ids.end(), it->id) != ids.end();
      it = taken ? archived_.erase(it) : it + 1;
    }
    for (auto it = jobs_.begin(); it != jobs_.end();) {
      if (std::find(ids.begin(), ids.end(), (*it)->id()) != ids.end()) {
        replaced.push_back(*it);
        it = jobs_.erase(it);
      } else {
        ++it;
      }
    }
    for (auto& job : started) jobs_.push_back(job);
    for (const auto& id : ids) reserved_ids_.erase(id);
    for (const auto& t : targets_reserved) reserved_targets_.erase(t);
    auto pruned = PruneLocked(&dropped);
    replaced.insert(replaced.end(), pruned.begin(), pruned.end());
  }
  for (auto& job : started) {
    job->Start();
    LogInfo("job '" + job->id() + "' started: drive '" + job->drive()->name() + "' -> '" +
            job->target_display() + "'");
  }
  DropRecords(dropped);
  // A started job has its record on disk before drive-backup returns, so a
  // crash right after cannot lose it (later changes go via the persister).
  for (auto& job : started) Persist(job->id());
  for (auto& j : replaced) j->Join();
  return Status::Ok();
}

std::vector<std::shared_ptr<BackupJob>> JobRegistry::PruneLocked(
    std::vector<std::string>* dropped) {
  // Keep at most max_ended_jobs ended records (oldest go first: loaded ones,
  // then this run's); records QMP still lists (auto-dismiss off, not yet
  // dismissed) are kept.
  std::vector<std::shared_ptr<BackupJob>> gone;
  size_t ended = archived_.size();
  for (const auto& j : jobs_) ended += j->ended() && !j->listed();
  while (ended > options_.max_ended_jobs && !archived_.empty()) {
    dropped->push_back(archived_.front().id);
    archived_.erase(archived_.begin());
    --ended;
  }
  for (auto it = jobs_.begin(); ended > options_.max_ended_jobs && it != jobs_.end();) {
    if ((*it)->ended() && !(*it)->listed()) {
      dropped->push_back((*it)->id());
      gone.push_back(*it);
      it = jobs_.erase(it);
      --ended;
    } else {
      ++it;
    }
  }
  return gone;
}

Status JobRegistry::Cancel(const std::string& id, bool force) {
  auto job = ListedJob(id);
  return job ? job->Cancel(force) : JobNotFound();
}
Status JobRegistry::Pause(const std::string& id) {
  auto job = ListedJob(id);
  return job ? job->Pause() : JobNotFound();
}
Status JobRegistry::Resume(const std::string& id) {
  auto job = ListedJob(id);
  return job ? job->Resume() : JobNotFound();
}
Status JobRegistry::SetSpeed(const std::string& id, int64_t speed) {
  auto job = ListedJob(id);
  return job ? job->SetSpeed(speed) : JobNotFound();
}
Status JobRegistry::Complete(const std::string& id) {
  auto job = ListedJob(id);
  return job ? job->Complete() : JobNotFound();
}
Status JobRegistry::Finalize(const std::string& id) {
  auto job = ListedJob(id);
  return job ? job->Finalize() : JobNotFound();
}
Status JobRegistry::Dismiss(const std::string& id) {
  auto job = ListedJob(id);
  return job ? job->Dismiss() : JobNotFound();
}

std::vector<JobInfo> JobRegistry::ListJobs() const {
  std::vector<std::shared_ptr<BackupJob>> jobs;
  {
    MutexLock lock(&mu_);
    jobs = jobs_;
  }
  std::vector<JobInfo> out;
  for (const auto& j : jobs) {
    JobInfo i = j->Info();
    if (i.listed) out.push_back(std::move(i));
  }
  return out;
}

std::vector<JobInfo> JobRegistry::JobFiles() const {
  std::vector<JobInfo> out;
  std::vector<std::shared_ptr<BackupJob>> jobs;
  {
    MutexLock lock(&mu_);
    out = archived_;
    jobs = jobs_;
  }
  for (const auto& j : jobs) out.push_back(j->Info());
  // Live jobs may have ended since the last start: show only the newest
  // max_ended_jobs unlisted ended records.
  size_t ended = 0;
  for (const auto& i : out) ended += i.finished.has_value() && !i.listed;
  for (auto it = out.begin(); ended > options_.max_ended_jobs && it != out.end();) {
    if (it->finished.has_value() && !it->listed) {
      it = out.erase(it);
      --ended;
    } else {
      ++it;
    }
  }
  return out;
}

std::optional<JobInfo> JobRegistry::GetJobFile(const std::string& id) const {
  for (auto& i : JobFiles()) {
    if (i.id == id) return i;
  }
  return std::nullopt;
}

Status JobRegistry::RemoveJobFile(const std::string& id) {
  std::shared_ptr<BackupJob> job;
  {
    MutexLock lock(&mu_);
    job = Find(id);
    if (!job) {
      auto it = std::find_if(archived_.begin(), archived_.end(),
                             [&](const JobInfo& i) { return i.id == id; });
      if (it == archived_.end()) return JobNotFound();
      archived_.erase(it);
    } else {
      if (!job->ended()) return Status::Error(EBUSY, "Job '" + id + "' has not ended yet");
      if (job->listed()) {
        if (Status s = job->Dismiss(); !s.ok()) return s;
      }
      jobs_.erase(std::find(jobs_.begin(), jobs_.end(), job));
    }
  }
  DropRecords({id});
  if (job) job->Join();
  return Status::Ok();
}

std::vector<std::string> JobRegistry::SnapshotIds() const {
  std::vector<std::shared_ptr<BackupJob>> jobs;
  {
    MutexLock lock(&mu_);
    jobs = jobs_;
  }
  std::vector<std::string> out;
  for (const auto& j : jobs) {
    if (j->view_available()) out.push_back(j->id());
  }
  return out;
}

std::optional<uint64_t> JobRegistry::SnapshotSize(const std::string& id) const {
  std::shared_ptr<BackupJob> j;
  {
    MutexLock lock(&mu_);
    j = Find(id);
  }
  if (!j || !j->view_available()) return std::nullopt;
  return j->size();
}

Result<size_t> JobRegistry::ReadSnapshot(const std::string& id, void* buf, size_t len,
                                         uint64_t off) const {
  std::shared_ptr<BackupJob> j;
  {
    MutexLock lock(&mu_);
    j = Find(id);
  }
  if (!j) return Status::Error(ENOENT, "No snapshot view '" + id + "'");
  return j->ReadSnapshot(buf, len, off);
}

Result<uint64_t> JobRegistry::SeekSnapshot(const std::string& id, uint64_t off, int whence) const {
  std::shared_ptr<BackupJob> j;
  {
    MutexLock lock(&mu_);
    j = Find(id);
  }
  if (!j) return Status::Error(ENOENT, "No snapshot view '" + id + "'");
  return j->SeekSnapshot(off, whence);
}

void JobRegistry::Shutdown() {
  std::vector<std::shared_ptr<BackupJob>> jobs;
  {
    MutexLock lock(&mu_);
    shut_down_ = true;
    jobs = jobs_;
  }
  for (auto& j : jobs) j->CancelInternal();
  // Bounded: a job concludes without its copier once that is stuck on a
  // dead target; a job thread that still has not finished by the deadline is
  // left running (it holds its own reference) rather than hang the daemon.
  auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.shutdown_timeout_ms);
  for (auto& j : jobs) {
    if (j->WaitFinished(deadline)) {
      j->Join();
    } else {
      LogError("job '" + j->id() + "' did not stop in time; leaving it behind");
    }
  }
  if (token_ != 0) {
    bus_->Unsubscribe(token_);
    token_ = 0;
    // The final records (cancelled, ...) are on disk before we return.
    for (auto& j : jobs) Persist(j->id());
  }
  if (persister_.joinable()) {
    {
      MutexLock lock(&pmu_);
      pstop_ = true;
      pcv_.Signal();
    }
    persister_.join();
  }
}

}  // namespace cbw::backup
