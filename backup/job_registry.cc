#include "backup/job_registry.h"

#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <set>
#include <thread>

#include "backup/backup_job.h"
#include "backup/job_store.h"
#include "backup/log.h"
#include "backup/target.h"

namespace cbw::backup {

// Records in creation order: first those loaded from the state dir (all
// ended, oldest first), then this run's jobs. A job id names at most one
// record; a new job may take the id of a record that QMP no longer lists (it
// replaces it).
struct JobRegistry::State {
  std::vector<JobInfo> archived;                 // loaded from the state dir; mu_
  std::vector<std::shared_ptr<BackupJob>> jobs;  // mu_
  bool shut_down = false;                        // mu_

  // Persistence; all unset without a state dir.
  std::mutex store_mu;  // serialises every JobStore call
  std::unique_ptr<JobStore> store;
  std::mutex pmu;  // leaf: taken by the bus subscriber
  std::condition_variable pcv;
  std::set<std::string> dirty;  // pmu: ids whose record must be rewritten
  bool pstop = false;           // pmu
  uint64_t token = 0;
  std::thread persister;

  std::vector<JobInfo>::iterator FindArchived(const std::string& id) {
    return std::find_if(archived.begin(), archived.end(),
                        [&](const JobInfo& i) { return i.id == id; });
  }

  std::shared_ptr<BackupJob> Find(const std::string& id) const {
    for (const auto& j : jobs) {
      if (j->id() == id) return j;
    }
    return nullptr;
  }
  std::shared_ptr<BackupJob> FindListed(const std::string& id) const {
    auto j = Find(id);
    return j && j->listed() ? j : nullptr;
  }
};

namespace {

bool ValidJobId(const std::string& id) {
  if (id.empty() || id.size() > 64) return false;
  if (!std::isalpha(static_cast<unsigned char>(id[0]))) return false;
  for (char ch : id) {
    auto c = static_cast<unsigned char>(ch);
    if (!(std::isalnum(c) || c == '-' || c == '.' || c == '_')) return false;
  }
  return true;
}

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
  State& st = *r->state_;
  std::vector<JobInfo> loaded = store->Load();
  for (JobInfo& i : loaded) {
    i.listed = false;  // QMP jobs do not survive a restart, as in QEMU
    i.busy = false;
    i.paused = false;
    if (i.status == JobStatus::kConcluded || i.status == JobStatus::kNull) {
      if (i.result != JobResult::kNone) continue;
    }
    // Torn: the daemon stopped before this job concluded. Whatever its
    // target holds, it is not a backup.
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
  st.archived = std::move(loaded);
  st.store = std::move(store);
  st.token = bus->Subscribe([&st](const Event& e) {
    if (e.type != EventType::kJobStatusChange) return;
    std::lock_guard<std::mutex> lock(st.pmu);
    st.dirty.insert(e.job_id);
    st.pcv.notify_one();
  });
  // The persister thread starts with the first job (StartBackups), not here:
  // cbwfs forks to detach after opening the registry, and a thread started
  // now would not exist in the daemon.
  return r;
}

void JobRegistry::PersistLoop() {
  State& st = *state_;
  std::unique_lock<std::mutex> lock(st.pmu);
  for (;;) {
    st.pcv.wait(lock, [&] { return st.pstop || !st.dirty.empty(); });
    if (st.dirty.empty()) return;  // stopped and drained
    std::set<std::string> ids;
    ids.swap(st.dirty);
    lock.unlock();
    for (const auto& id : ids) Persist(id);
    lock.lock();
  }
}

// Writes the current record of job `id`, if it is still one of ours. The
// lookup and the write happen under the store mutex, so a record removed
// meanwhile (rm jobs/<id>, pruning) is never written back.
void JobRegistry::Persist(const std::string& id) {
  State& st = *state_;
  std::lock_guard<std::mutex> slock(st.store_mu);
  if (!st.store) return;
  std::shared_ptr<BackupJob> job;
  {
    std::lock_guard<std::mutex> lock(mu_);
    job = st.Find(id);
  }
  if (!job) return;
  if (Status s = st.store->Save(job->Info()); !s.ok()) LogWarn("state dir: " + s.message());
}

// Deletes the persisted records of `ids`, which the caller has already
// dropped from the registry (so Persist no longer finds them).
void JobRegistry::DropRecords(const std::vector<std::string>& ids) {
  State& st = *state_;
  if (ids.empty()) return;
  std::lock_guard<std::mutex> slock(st.store_mu);
  if (!st.store) return;
  for (const auto& id : ids) {
    if (Status s = st.store->Remove(id); !s.ok()) LogWarn("state dir: " + s.message());
  }
}

JobRegistry::JobRegistry(std::vector<Drive*> drives, EventBus* bus, RegistryOptions options)
    : drives_(std::move(drives)),
      bus_(bus),
      options_(std::move(options)),
      state_(std::make_unique<State>()) {}

JobRegistry::~JobRegistry() { Shutdown(); }

Drive* JobRegistry::FindDrive(const std::string& name) const {
  for (Drive* d : drives_) {
    if (d->name() == name) return d;
  }
  return nullptr;
}

Status JobRegistry::StartBackups(const std::vector<BackupOptions>& jobs, CompletionMode mode) {
  std::unique_lock<std::mutex> lock(mu_);
  if (state_->shut_down) return Status::Error(ESHUTDOWN, "Shutting down");
  if (jobs.empty()) return Status::Error(EINVAL, "No backup to start");
  if (state_->store && !state_->persister.joinable()) {
    state_->persister = std::thread(&JobRegistry::PersistLoop, this);
  }

  struct Prepared {
    BackupOptions options;
    Drive* drive;
    OpenedTarget target;
  };
  std::vector<Prepared> prepared;
  // A refused command leaves nothing behind: files created here are removed.
  auto refuse = [&](Status s) {
    for (auto& p : prepared) DiscardTarget(p.target);
    return s;
  };
  std::set<std::string> ids;
  for (const BackupOptions& in : jobs) {
    BackupOptions o = in;
    if (o.job_id.empty()) o.job_id = o.device;
    Drive* drive = FindDrive(o.device);
    if (drive == nullptr) {
      return refuse(Status::Error(
          ENODEV, "Cannot find device='" + o.device + "' nor node-name='" + o.device + "'"));
    }
    if (!ValidJobId(o.job_id)) {
      return refuse(Status::Error(EINVAL, "Invalid job ID '" + o.job_id + "'"));
    }
    if (state_->FindListed(o.job_id) || !ids.insert(o.job_id).second) {
      return refuse(Status::Error(EBUSY, "Job ID '" + o.job_id + "' already in use"));
    }
    TargetRequest req;
    req.raw_path = o.target;
    req.base_dir = options_.base_dir;
    req.mountpoint = options_.mountpoint;
    req.mode = o.mode;
    req.format_given = o.format_given;
    req.size = drive->size();
    auto busy = [&](dev_t dev, ino_t ino) -> std::optional<std::string> {
      for (const auto& j : state_->jobs) {
        if (j->live() && j->target_dev() == dev && j->target_ino() == ino) return j->id();
      }
      for (const auto& p : prepared) {
        if (p.target.dev == dev && p.target.ino == ino) return p.options.job_id;
      }
      return std::nullopt;
    };
    Result<OpenedTarget> t = OpenTarget(req, drives_, busy);
    if (!t.ok()) return refuse(t.status());
    prepared.push_back({std::move(o), drive, std::move(*t)});
  }
  // Everything is validated: only now is any existing target changed.
  for (auto& p : prepared) {
    if (Status s = PrepareTarget(p.target, p.options.mode, p.drive->size()); !s.ok()) {
      return refuse(s);
    }
  }

  // Ended records whose ids are taken again are replaced.
  std::vector<std::shared_ptr<BackupJob>> replaced;
  std::vector<std::string> dropped;  // persisted records to delete
  for (auto it = state_->archived.begin(); it != state_->archived.end();) {
    it = ids.count(it->id) ? state_->archived.erase(it) : it + 1;
  }
  for (auto it = state_->jobs.begin(); it != state_->jobs.end();) {
    if (ids.count((*it)->id())) {
      replaced.push_back(*it);
      it = state_->jobs.erase(it);
    } else {
      ++it;
    }
  }

  auto txn = std::make_shared<Txn>(mode);
  std::vector<std::shared_ptr<BackupJob>> started;
  std::vector<std::pair<Drive*, std::shared_ptr<WriteHook>>> hooks;
  for (auto& p : prepared) {
    JobParams params;
    params.options = p.options;
    params.drive = p.drive;
    params.target = std::move(p.target);
    params.bus = bus_;
    params.txn = txn;
    params.cluster_size = options_.cluster_size;
    params.cbw_timeout = std::chrono::milliseconds(options_.cbw_timeout_ms);
    auto job = std::make_shared<BackupJob>(std::move(params));
    txn->Add(job);
    state_->jobs.push_back(job);
    job->Announce();
    hooks.emplace_back(p.drive, job->hook());
    started.push_back(std::move(job));
  }
  // The point in time of every job of the transaction.
  Drive::InstallHooks(hooks);
  for (auto& job : started) {
    job->Start();
    LogInfo("job '" + job->id() + "' started: drive '" + job->drive()->name() + "' -> '" +
            job->target_path() + "'");
  }

  // Keep at most max_ended_jobs ended records (oldest go first: loaded ones,
  // then this run's); records QMP still lists (auto-dismiss off, not yet
  // dismissed) are kept.
  size_t ended = state_->archived.size();
  for (const auto& j : state_->jobs) ended += j->ended() && !j->listed();
  while (ended > options_.max_ended_jobs && !state_->archived.empty()) {
    dropped.push_back(state_->archived.front().id);
    state_->archived.erase(state_->archived.begin());
    --ended;
  }
  for (auto it = state_->jobs.begin();
       ended > options_.max_ended_jobs && it != state_->jobs.end();) {
    if ((*it)->ended() && !(*it)->listed()) {
      dropped.push_back((*it)->id());
      replaced.push_back(*it);
      it = state_->jobs.erase(it);
      --ended;
    } else {
      ++it;
    }
  }
  lock.unlock();
  DropRecords(dropped);
  // A started job has its record on disk before drive-backup returns, so a
  // crash right after cannot lose it (later changes go via the persister).
  for (auto& job : started) Persist(job->id());
  for (auto& j : replaced) j->Join();
  return Status::Ok();
}

namespace {

// The listed job `id`, looked up under the registry lock. Verbs then run
// without that lock: they take the job's own. (A template so that it can
// take the registry's private State without naming it.)
template <class State>
std::shared_ptr<BackupJob> ListedJob(std::mutex& mu, const State& state, const std::string& id) {
  std::lock_guard<std::mutex> lock(mu);
  return state.FindListed(id);
}

}  // namespace

Status JobRegistry::Cancel(const std::string& id, bool force) {
  auto job = ListedJob(mu_, *state_, id);
  return job ? job->Cancel(force) : JobNotFound();
}
Status JobRegistry::Pause(const std::string& id) {
  auto job = ListedJob(mu_, *state_, id);
  return job ? job->Pause() : JobNotFound();
}
Status JobRegistry::Resume(const std::string& id) {
  auto job = ListedJob(mu_, *state_, id);
  return job ? job->Resume() : JobNotFound();
}
Status JobRegistry::SetSpeed(const std::string& id, int64_t speed) {
  auto job = ListedJob(mu_, *state_, id);
  return job ? job->SetSpeed(speed) : JobNotFound();
}
Status JobRegistry::Complete(const std::string& id) {
  auto job = ListedJob(mu_, *state_, id);
  return job ? job->Complete() : JobNotFound();
}
Status JobRegistry::Finalize(const std::string& id) {
  auto job = ListedJob(mu_, *state_, id);
  return job ? job->Finalize() : JobNotFound();
}
Status JobRegistry::Dismiss(const std::string& id) {
  auto job = ListedJob(mu_, *state_, id);
  return job ? job->Dismiss() : JobNotFound();
}

std::vector<JobInfo> JobRegistry::ListJobs() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<JobInfo> out;
  for (const auto& j : state_->jobs) {
    JobInfo i = j->Info();
    if (i.listed) out.push_back(std::move(i));
  }
  return out;
}

std::vector<JobInfo> JobRegistry::JobFiles() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<JobInfo> out = state_->archived;
  for (const auto& j : state_->jobs) out.push_back(j->Info());
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
    std::lock_guard<std::mutex> lock(mu_);
    job = state_->Find(id);
    if (!job) {
      auto it = state_->FindArchived(id);
      if (it == state_->archived.end()) return JobNotFound();
      state_->archived.erase(it);
    } else {
      if (!job->ended()) {
        return Status::Error(EBUSY, "Job '" + id + "' has not ended yet");
      }
      if (job->listed()) {
        if (Status s = job->Dismiss(); !s.ok()) return s;
      }
      state_->jobs.erase(std::find(state_->jobs.begin(), state_->jobs.end(), job));
    }
  }
  DropRecords({id});
  if (job) job->Join();
  return Status::Ok();
}

std::vector<std::string> JobRegistry::SnapshotIds() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  for (const auto& j : state_->jobs) {
    if (j->view_available()) out.push_back(j->id());
  }
  return out;
}

std::optional<uint64_t> JobRegistry::SnapshotSize(const std::string& id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto j = state_->Find(id);
  if (!j || !j->view_available()) return std::nullopt;
  return j->size();
}

Result<size_t> JobRegistry::ReadSnapshot(const std::string& id, void* buf, size_t len,
                                         uint64_t off) const {
  std::shared_ptr<BackupJob> j;
  {
    std::lock_guard<std::mutex> lock(mu_);
    j = state_->Find(id);
  }
  if (!j) return Status::Error(ENOENT, "No snapshot view '" + id + "'");
  return j->ReadSnapshot(buf, len, off);
}

Result<uint64_t> JobRegistry::SeekSnapshot(const std::string& id, uint64_t off, int whence) const {
  std::shared_ptr<BackupJob> j;
  {
    std::lock_guard<std::mutex> lock(mu_);
    j = state_->Find(id);
  }
  if (!j) return Status::Error(ENOENT, "No snapshot view '" + id + "'");
  return j->SeekSnapshot(off, whence);
}

void JobRegistry::Shutdown() {
  std::vector<std::shared_ptr<BackupJob>> jobs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    state_->shut_down = true;
    jobs = state_->jobs;
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
  State& st = *state_;
  if (st.store && st.token != 0) {
    bus_->Unsubscribe(st.token);
    st.token = 0;
    // The final records (cancelled, ...) are on disk before we return.
    for (auto& j : jobs) Persist(j->id());
  }
  if (st.persister.joinable()) {
    {
      std::lock_guard<std::mutex> lock(st.pmu);
      st.pstop = true;
      st.pcv.notify_one();
    }
    st.persister.join();
  }
}

}  // namespace cbw::backup
