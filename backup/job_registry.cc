#include "backup/job_registry.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <set>

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
    // Bitmaps live beside the records: an unusable place ends the start too.
    for (Drive* d : drives) {
      if (auto b = BitmapStore::Open(options.state_dir, d->name()); !b.ok()) return b.status();
    }
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
    : drives_(std::move(drives)), bus_(bus), options_(std::move(options)) {
  DriveBitmaps::Options bo;
  bo.default_granularity = options_.cluster_size;
  bo.region_size = options_.bitmap_region_size;
  for (Drive* d : drives_) {
    std::unique_ptr<BitmapStore> store;
    if (!options_.state_dir.empty()) {
      auto s = BitmapStore::Open(options_.state_dir, d->name());
      if (s.ok()) {
        store = std::move(*s);
      } else {
        LogError("bitmaps of drive '" + d->name() + "' cannot persist: " + s.status().message());
      }
    }
    bitmaps_.push_back(std::make_unique<DriveBitmaps>(d, std::move(store), bo));
    bitmaps_.back()->Start();
  }
}

JobRegistry::~JobRegistry() { Shutdown(); }

void JobRegistry::StartBackgroundThreads() {
  if (!ticker_.joinable() && !options_.state_dir.empty()) {
    ticker_ = std::thread([this] { RunGuarded("bitmap leases", [&] { TickLoop(); }); });
    MutexLock lock(&pmu_);
    ticking_ = true;
  }
  {
    MutexLock lock(&store_mu_);
    if (!store_) return;
  }
  if (persister_.joinable()) return;
  persister_ = std::thread([this] { RunGuarded("record persister", [&] { PersistLoop(); }); });
}

void JobRegistry::TickLoop() {
  constexpr auto kTick = std::chrono::seconds(2);
  MutexLock lock(&pmu_);
  auto next_tick = std::chrono::steady_clock::now() + kTick;
  for (;;) {
    while (!pstop_ && save_soon_.empty()) {
      if (!tick_cv_.WaitUntil(&lock, next_tick)) break;
    }
    // Saves asked for are done even when stopping: they are what is on disk.
    std::set<DriveBitmaps*> saves;
    saves.swap(save_soon_);
    const bool stop = pstop_;
    lock.Unlock();
    for (DriveBitmaps* b : saves) {
      b->SaveOrLog();
    }
    // (Once pstop_ is set, SaveBitmapsSoon saves on its caller's thread.)
    if (stop) return;
    if (std::chrono::steady_clock::now() >= next_tick) {
      for (auto& b : bitmaps_) b->Tick();
      next_tick = std::chrono::steady_clock::now() + kTick;
    }
    lock.Relock();
  }
}

void JobRegistry::SaveBitmapsSoon(DriveBitmaps* b) {
  {
    MutexLock lock(&pmu_);
    if (ticking_ && !pstop_) {
      save_soon_.insert(b);
      tick_cv_.Signal();
      return;
    }
  }
  b->SaveOrLog();
}

std::vector<BitmapInfo> JobRegistry::Bitmaps(const std::string& drive) const {
  for (const auto& b : bitmaps_) {
    if (b->drive()->name() == drive) return b->List();
  }
  return {};
}

BitmapCatalog JobRegistry::Catalog() const {
  BitmapCatalog c;
  for (const auto& b : bitmaps_) b->FillCatalog(&c);
  return c;
}

std::unique_ptr<DirtyBitmap> JobRegistry::BitmapCopy(const std::string& drive,
                                                     const std::string& name) const {
  for (const auto& b : bitmaps_) {
    if (b->drive()->name() == drive) return b->Copy(name);
  }
  return nullptr;
}

void JobRegistry::SaveBitmapsAtStop() {
  for (auto& b : bitmaps_) {
    if (Status s = b->Save(true); !s.ok()) LogError("bitmaps: " + s.message());
  }
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
  std::vector<TxnAction> actions;
  for (const auto& o : jobs) actions.push_back({o, std::nullopt});
  return Transaction(actions, mode);
}

// One action of a transaction on its way to the point in time.
struct JobRegistry::Planned {
  TxnAction action;
  Drive* drive = nullptr;           // backup
  std::optional<BitmapMode> mode;   // backup with a bitmap
  std::shared_ptr<Target> target;   // backup
  std::shared_ptr<BackupJob> job;   // backup, once created
  DriveBitmaps* bitmaps = nullptr;  // the drive's (backup and bitmap actions)
};

namespace {

BackupBitmapArgs BitmapArgs(const BackupOptions& o) {
  return {o.device, ToString(o.sync), o.bitmap, o.bitmap_mode};
}

// Runs the catalog's checks of every action in order (a backup's bitmap
// use, a bitmap command), as QEMU prepares a transaction's actions.
template <class Plan>
Status CheckBitmaps(BitmapCatalog* catalog, std::vector<Plan>& plan, bool grouped) {
  for (auto& p : plan) {
    if (p.action.bitmap) {
      if (Status s = catalog->Apply(*p.action.bitmap, grouped); !s.ok()) return s;
    } else {
      auto mode = catalog->UseForBackup(BitmapArgs(*p.action.backup));
      if (!mode.ok()) return mode.status();
      p.mode = *mode;
    }
  }
  return Status::Ok();
}

}  // namespace

Status JobRegistry::Transaction(const std::vector<TxnAction>& actions, CompletionMode mode) {
  if (actions.empty()) return Status::Ok();
  const bool grouped = mode == CompletionMode::kGrouped;
  std::vector<Planned> plan;
  std::vector<std::string> ids;
  bool ids_reserved = false;
  std::vector<std::string> targets_reserved;
  // A refused command leaves nothing behind: reservations are released and
  // targets it created are removed.
  auto refuse = [&](Status s) CBW_EXCLUDES(mu_) {
    for (auto& p : plan) {
      if (p.target) p.target->Discard();
    }
    MutexLock lock(&mu_);
    if (ids_reserved) {
      for (const auto& id : ids) reserved_ids_.erase(id);
    }
    for (const auto& t : targets_reserved) reserved_targets_.erase(t);
    return s;
  };
  auto bitmaps_of = [&](const std::string& name) -> DriveBitmaps* {
    for (auto& b : bitmaps_) {
      if (b->drive()->name() == name) return b.get();
    }
    return nullptr;
  };

  // 1. Under the lock, only lookups and checks in action order: drives, ids
  // (reserved until the end), bitmaps (against a catalog that each action
  // updates, so "add b0, then back up with b0" works).
  {
    MutexLock lock(&mu_);
    if (shut_down_) return Status::Error(ESHUTDOWN, "Shutting down");
    BitmapCatalog catalog = Catalog();
    std::set<std::string> seen;
    for (const TxnAction& a : actions) {
      Planned p;
      p.action = a;
      if (a.bitmap) {
        if (Status s = catalog.Apply(*a.bitmap, grouped); !s.ok()) return s;
        p.bitmaps = bitmaps_of(a.bitmap->node);
        plan.push_back(std::move(p));
        continue;
      }
      BackupOptions& o = *p.action.backup;
      if (o.job_id.empty()) o.job_id = o.device;
      p.drive = FindDrive(o.device);
      if (p.drive == nullptr) {
        return Status::Error(
            ENODEV, "Cannot find device='" + o.device + "' nor node-name='" + o.device + "'");
      }
      p.bitmaps = bitmaps_of(o.device);
      auto bm = catalog.UseForBackup(BitmapArgs(o));
      if (!bm.ok()) return bm.status();
      p.mode = *bm;
      const std::string& id = o.job_id;
      if (!IsValidId(id)) return Status::Error(EINVAL, "Invalid job ID '" + id + "'");
      if (FindListed(id) || reserved_ids_.count(id) || !seen.insert(id).second) {
        return Status::Error(EBUSY, "Job ID '" + id + "' already in use");
      }
      ids.push_back(id);
      plan.push_back(std::move(p));
    }
    reserved_ids_.insert(ids.begin(), ids.end());
    ids_reserved = true;
  }

  // 2. Without any lock: open the targets (filesystem I/O on user paths).
  for (auto& p : plan) {
    if (!p.action.backup) continue;
    const BackupOptions& o = *p.action.backup;
    TargetRequest req;
    req.spec = o.target;
    req.base_dir = options_.base_dir;
    req.mountpoint = options_.mountpoint;
    req.mount_dev = mount_dev_.load();
    req.mode = o.mode;
    req.format = o.format;
    req.size = p.drive->size();
    req.io_timeout = std::chrono::milliseconds(options_.target_timeout_ms);
    Result<std::shared_ptr<Target>> t = OpenTarget(req, drives_);
    if (!t.ok()) return refuse(t.status());
    p.target = std::move(*t);
  }

  // 3. Under the lock: no target may be another live (or starting) job's.
  {
    MutexLock lock(&mu_);
    for (auto& p : plan) {
      if (!p.target) continue;
      const std::string& key = p.target->identity();
      std::optional<std::string> user;
      for (const auto& j : jobs_) {
        if (j->live() && j->target_identity() == key) user = j->id();
      }
      if (!user && reserved_targets_.count(key)) user = "(starting)";
      for (const auto& q : plan) {
        if (&q != &p && q.target && q.target->identity() == key) user = q.action.backup->job_id;
      }
      if (user) {
        lock.Unlock();
        return refuse(Status::Error(
            EBUSY, "Target '" + p.action.backup->target + "' is in use by job '" + *user + "'"));
      }
    }
    for (auto& p : plan) {
      if (!p.target) continue;
      reserved_targets_.insert(p.target->identity());
      targets_reserved.push_back(p.target->identity());
    }
  }

  // 4. Everything is validated: only now is any existing target changed.
  for (auto& p : plan) {
    if (!p.target) continue;
    if (Status s = p.target->Prepare(); !s.ok()) return refuse(s);
  }

  // 5. The jobs (not yet announced or started).
  auto txn = std::make_shared<Txn>(mode);
  std::vector<std::shared_ptr<BackupJob>> started;
  for (auto& p : plan) {
    if (!p.action.backup) continue;
    JobParams params;
    params.options = *p.action.backup;
    params.drive = p.drive;
    params.target = p.target;
    params.bus = bus_;
    params.txn = txn;
    params.cluster_size = options_.cluster_size;
    params.cbw_timeout = std::chrono::milliseconds(options_.cbw_timeout_ms);
    params.cbw_buffer_bytes = options_.cbw_buffer_bytes;
    if (p.mode) {
      DriveBitmaps* db = p.bitmaps;
      const std::string name = *params.options.bitmap;
      const BitmapMode bm = *p.mode;
      params.on_bitmap_end = [this, db, name, bm](
                                 bool ok, std::vector<std::pair<uint64_t, uint64_t>> not_copied) {
        Drive::AtPointInTime({db->drive()}, [&] { db->EndJob(name, bm, ok, not_copied); });
        SaveBitmapsSoon(db);
      };
    }
    p.job = std::make_shared<BackupJob>(std::move(params));
    txn->Add(p.job);
    started.push_back(p.job);
  }

  // 6. The point in time of every action, with no registry lock held (it
  // waits for writes in flight).
  // A bitmap command has one too: a write that returned before `disable`
  // belongs in the bitmap, one that returned before `add` or `clear` not.
  if (options_.before_point_in_time) {
    std::vector<Drive*> drives;
    for (const auto& p : plan) {
      Drive* d = p.drive ? p.drive : p.bitmaps ? p.bitmaps->drive() : nullptr;
      if (d && std::find(drives.begin(), drives.end(), d) == drives.end()) drives.push_back(d);
    }
    if (!drives.empty()) options_.before_point_in_time(drives);
  }
  if (Status s = ApplyAtPointInTime(plan, grouped); !s.ok()) return refuse(s);
  for (auto& job : started) job->Announce();

  // 7. Listed; ended records with the same ids are replaced.
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
  // 8. Bitmaps on disk: removed ones go, the others are saved as they are
  // now (a frozen one with its successor).
  // Bitmap commands are on disk before the reply; a job's freeze only
  // soon (until then the crash journal covers its changes, and a job that
  // was running at a crash merges its bits back anyway).
  std::set<DriveBitmaps*> to_save, to_save_soon;
  for (const auto& p : plan) {
    if (!p.bitmaps || !p.bitmaps->can_persist()) continue;
    if (p.action.bitmap && p.action.bitmap->kind == BitmapAction::Kind::kRemove) {
      if (Status s = p.bitmaps->Forget(p.action.bitmap->name); !s.ok()) {
        LogError("bitmaps: " + s.message());
      }
    }
    if (p.action.bitmap) {
      to_save.insert(p.bitmaps);
    } else if (p.mode) {
      to_save_soon.insert(p.bitmaps);
    }
  }
  for (DriveBitmaps* b : to_save) {
    b->SaveOrLog();
  }
  for (DriveBitmaps* b : to_save_soon) {
    if (!to_save.count(b)) SaveBitmapsSoon(b);
  }
  for (const auto& p : plan) {
    if (p.action.bitmap) {
      LogInfo(std::string(ToString(p.action.bitmap->kind)) + ": drive '" + p.action.bitmap->node +
              "', bitmap '" + p.action.bitmap->name + "'");
    }
  }
  DropRecords(dropped);
  // A started job has its record on disk before drive-backup returns, so a
  // crash right after cannot lose it (later changes go via the persister).
  for (auto& job : started) Persist(job->id());
  for (auto& j : replaced) j->Join();
  return Status::Ok();
}

Status JobRegistry::ApplyAtPointInTime(std::vector<Planned>& plan, bool grouped) {
  std::vector<Drive*> drives;
  for (const auto& p : plan) {
    if (p.drive) drives.push_back(p.drive);
    if (p.bitmaps) drives.push_back(p.bitmaps->drive());
    if (p.action.bitmap) {
      for (const auto& [node, name] : p.action.bitmap->sources) {
        if (Drive* d = FindDrive(node)) drives.push_back(d);
      }
    }
  }
  Status result;
  Drive::AtPointInTime(drives, [&] {
    // The bitmaps may have changed since the checks (another command): run
    // them again on what is there now, with every drive held still.
    BitmapCatalog catalog = Catalog();
    if (Status s = CheckBitmaps(&catalog, plan, grouped); !s.ok()) {
      result = s;
      return;
    }
    auto source = [this](const std::string& node, const std::string& name) {
      return BitmapCopy(node, name);
    };
    for (auto& p : plan) {
      if (p.action.bitmap) {
        p.bitmaps->Apply(*p.action.bitmap, source);
        continue;
      }
      if (p.mode) {
        std::unique_ptr<DirtyBitmap> frozen = p.bitmaps->Freeze(*p.action.backup->bitmap);
        const SyncMode sync = p.action.backup->sync;
        if (frozen && (sync == SyncMode::kBitmap || sync == SyncMode::kIncremental)) {
          p.job->SetCopySet(*frozen);
        }
      }
      p.drive->AddHookWithGateClosed(p.job->hook());
    }
  });
  return result;
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

bool JobRegistry::LeftJobsBehind() const {
  MutexLock lock(&mu_);
  return left_behind_;
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
      MutexLock lock(&mu_);
      left_behind_ = true;
    }
  }
  if (token_ != 0) {
    bus_->Unsubscribe(token_);
    token_ = 0;
    // The final records (cancelled, ...) are on disk before we return.
    for (auto& j : jobs) Persist(j->id());
  }
  {
    MutexLock lock(&pmu_);
    pstop_ = true;
    pcv_.Signal();
    tick_cv_.Signal();
  }
  if (persister_.joinable()) persister_.join();
  if (ticker_.joinable()) ticker_.join();
}

}  // namespace cbw::backup
