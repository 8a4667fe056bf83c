#include "backup/drive_bitmaps.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "backup/log.h"
#include "backup/posix_io.h"

namespace cbw::backup {
namespace {

// The lease: how far ahead of now it is set, and how close to its end a
// write renews it itself (normally Tick() does, every couple of seconds).
constexpr int64_t kLeaseNs = 10'000'000'000;
constexpr int64_t kLeaseMarginNs = 4'000'000'000;
// Every this many ticks the renewed lease is made durable (fdatasync), so
// after a power loss the lease on disk is still past the last write.
constexpr int kSyncEveryTicks = 4;

int64_t RealNs() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

struct SourceId {
  uint64_t dev = 0, ino = 0;
  int64_t mtime_ns = 0;
  bool ok = false;
};

SourceId StatSource(const Drive* d) {
  SourceId id;
  struct stat st {};
  if (fstat(d->fd(), &st) != 0) return id;
  id.dev = d->dev();
  id.ino = d->ino();
  id.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
  id.ok = true;
  return id;
}

}  // namespace

class DriveBitmaps::Hook : public WriteHook {
 public:
  explicit Hook(DriveBitmaps* b) : b_(b) {}
  Status BeforeWrite(uint64_t off, uint64_t len, bool may_block) override {
    return b_->BeforeWrite(off, len, may_block);
  }

 private:
  DriveBitmaps* const b_;
};

DriveBitmaps::DriveBitmaps(Drive* drive, std::unique_ptr<BitmapStore> store, Options options)
    : drive_(drive),
      store_(std::move(store)),
      options_(options),
      nregions_((drive->size() + options.region_size - 1) / options.region_size),
      hook_(std::make_shared<Hook>(this)),
      regions_(new std::atomic<uint64_t>[(nregions_ + 63) / 64 + 1]) {
  for (uint64_t i = 0; i < (nregions_ + 63) / 64 + 1; ++i) regions_[i].store(0);
}

DriveBitmaps::~DriveBitmaps() = default;

void DriveBitmaps::Start() {
  if (store_) {
    std::vector<std::string> unreadable;
    std::vector<BitmapRecord> records = store_->LoadBitmaps(&unreadable);
    for (const auto& u : unreadable) LogWarn("bitmaps: skipping " + u);
    std::vector<bool> regions;
    std::string why;
    std::optional<JournalHeader> j = store_->LoadJournal(&regions, &why);
    const SourceId src = StatSource(drive_);
    const bool is_block = drive_->is_block_device();
    if (j &&
        (j->drive_size != drive_->size() || j->source_dev != src.dev || j->source_ino != src.ino)) {
      why = "the source is not the one the journal was written for";
      j.reset();
    }
    if (j && !is_block) {
      if (j->lease_ns == 0 && src.mtime_ns != j->clean_mtime_ns) {
        why = "the source was modified after cbwfs stopped";
        j.reset();
      } else if (j->lease_ns != 0 && src.mtime_ns > j->lease_ns) {
        why = "the source was modified after cbwfs stopped (crashed)";
        j.reset();
      }
    }
    uint64_t top_generation = j ? j->generation : 0;
    MutexLock lock(&mu_);
    for (auto& rec : records) {
      auto e = std::make_shared<Entry>();
      e->name = rec.name;
      e->persistent = true;
      e->enabled = rec.recording;
      // A granularity QEMU would refuse (a damaged file's) is replaced.
      const uint64_t g = DirtyBitmap::ValidGranularity(rec.granularity)
                             ? rec.granularity
                             : options_.default_granularity;
      e->bits = std::make_unique<DirtyBitmap>(drive_->size(), g);
      std::string reason;
      if (rec.inconsistent) {
        reason = "it was recorded inconsistent (or its file is corrupt)";
      } else if (rec.drive_size != drive_->size() || rec.source_dev != src.dev ||
                 rec.source_ino != src.ino) {
        reason = "the source changed (size or inode)";
      } else if (!j) {
        reason = why;
      } else if (rec.generation != j->generation && rec.generation != j->generation + 1) {
        reason = "its file is older than the journal";
      } else if (!e->bits->SetWords(rec.words)) {
        reason = "its file does not match the drive's size";
      }
      if (!reason.empty()) {
        e->inconsistent = true;
        e->enabled = false;
        e->bits->Clear();
        LogWarn("bitmap '" + rec.name + "' of drive '" + drive_->name() +
                "' is inconsistent: " + reason);
      } else if (j->lease_ns != 0 && e->enabled) {
        // After a crash: every region possibly written since the last save.
        uint64_t extra = 0;
        for (uint64_t r = 0; r < regions.size(); ++r) {
          if (!regions[r]) continue;
          e->bits->Set(r * j->region_size, j->region_size);
          extra += j->region_size;
        }
        LogInfo("bitmap '" + rec.name + "' of drive '" + drive_->name() +
                "' recovered after an unclean stop (" + std::to_string(extra) +
                " bytes of journal regions added)");
      }
      top_generation = std::max(top_generation, rec.generation);
      entries_.push_back(std::move(e));
    }
    UpdateJournalFlagLocked();
    lock.Unlock();
    {
      MutexLock s(&save_mu_);
      generation_ = top_generation;
    }
    if (!records.empty() || j) {
      SaveOrLog();
    }
  }
  Drive::AtPointInTime({drive_}, [&] { drive_->AddHookWithGateClosed(hook_); });
}

void DriveBitmaps::UpdateJournalFlagLocked() {
  bool recording = false, journal = false;
  for (const auto& e : entries_) {
    if (e->inconsistent || !e->enabled) continue;
    recording = true;
    if (e->persistent) journal = true;
  }
  any_recording_.store(recording);
  journal_on_.store(journal && store_ != nullptr && !journal_broken_.load());
}

DriveBitmaps::Entry* DriveBitmaps::FindLocked(const std::string& name) {
  for (auto& e : entries_) {
    if (e->name == name) return e.get();
  }
  return nullptr;
}

std::vector<BitmapInfo> DriveBitmaps::List() const {
  MutexLock lock(&mu_);
  std::vector<BitmapInfo> out;
  for (const auto& e : entries_) {
    BitmapInfo i;
    i.name = e->name;
    i.count = e->bits->Count();
    if (e->busy && e->successor) {
      DirtyBitmap both(*e->bits);
      both.Merge(*e->successor);
      i.count = both.Count();
    }
    i.granularity = e->bits->granularity();
    i.recording = e->enabled && !e->inconsistent;
    i.busy = e->busy;
    i.persistent = e->persistent;
    i.inconsistent = e->inconsistent;
    out.push_back(std::move(i));
  }
  return out;
}

void DriveBitmaps::FillCatalog(BitmapCatalog* catalog) const {
  BitmapCatalog::Drive d;
  d.size = drive_->size();
  d.default_granularity = options_.default_granularity;
  d.can_persist = store_ != nullptr;
  catalog->AddDrive(drive_->name(), d);
  MutexLock lock(&mu_);
  for (const auto& e : entries_) {
    BitmapCatalog::Meta m;
    m.granularity = e->bits->granularity();
    m.enabled = e->enabled;
    m.busy = e->busy;
    m.persistent = e->persistent;
    m.inconsistent = e->inconsistent;
    catalog->AddBitmap(drive_->name(), e->name, m);
  }
}

std::unique_ptr<DirtyBitmap> DriveBitmaps::Copy(const std::string& name) const {
  MutexLock lock(&mu_);
  for (const auto& e : entries_) {
    if (e->name != name) continue;
    auto out = std::make_unique<DirtyBitmap>(*e->bits);
    if (e->busy && e->successor) out->Merge(*e->successor);
    return out;
  }
  return nullptr;
}

void DriveBitmaps::Apply(
    const BitmapAction& a,
    const std::function<std::unique_ptr<DirtyBitmap>(const std::string&, const std::string&)>&
        source) {
  using Kind = BitmapAction::Kind;
  // Copies from other drives first: their locks are not ours.
  std::vector<std::unique_ptr<DirtyBitmap>> foreign;
  if (a.kind == Kind::kMerge) {
    for (const auto& [node, name] : a.sources) {
      if (!node.empty() && node != drive_->name()) foreign.push_back(source(node, name));
    }
  }
  MutexLock lock(&mu_);
  switch (a.kind) {
    case Kind::kAdd: {
      auto e = std::make_shared<Entry>();
      e->name = a.name;
      e->bits = std::make_unique<DirtyBitmap>(drive_->size(),
                                              a.granularity.value_or(options_.default_granularity));
      e->enabled = !a.disabled;
      e->persistent = a.persistent;
      entries_.push_back(std::move(e));
      break;
    }
    case Kind::kRemove:
      entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                    [&](const auto& e) { return e->name == a.name; }),
                     entries_.end());
      break;
    case Kind::kClear:
      if (Entry* e = FindLocked(a.name)) e->bits->Clear();
      break;
    case Kind::kEnable:
    case Kind::kDisable:
      if (Entry* e = FindLocked(a.name)) e->enabled = a.kind == Kind::kEnable;
      break;
    case Kind::kMerge: {
      Entry* dst = FindLocked(a.name);
      if (dst == nullptr) break;
      size_t f = 0;
      for (const auto& [node, name] : a.sources) {
        if (!node.empty() && node != drive_->name()) {
          if (f < foreign.size() && foreign[f]) dst->bits->Merge(*foreign[f]);
          ++f;
        } else if (Entry* src = FindLocked(name)) {
          dst->bits->Merge(*src->bits);
        }
      }
      break;
    }
  }
  UpdateJournalFlagLocked();
}

std::unique_ptr<DirtyBitmap> DriveBitmaps::Freeze(const std::string& name) {
  MutexLock lock(&mu_);
  Entry* e = FindLocked(name);
  if (e == nullptr) return nullptr;
  e->busy = true;
  e->successor = std::make_unique<DirtyBitmap>(drive_->size(), e->bits->granularity());
  return std::make_unique<DirtyBitmap>(*e->bits);
}

void DriveBitmaps::EndJob(const std::string& name, BitmapMode mode, bool success,
                          const std::vector<std::pair<uint64_t, uint64_t>>& not_copied) {
  MutexLock lock(&mu_);
  Entry* e = FindLocked(name);
  if (e == nullptr || !e->busy) return;
  // SPEC 7 (QEMU's backup_cleanup_sync_bitmap): on-success adopts the
  // successor on success; always adopts it whatever the outcome and, on
  // failure, keeps what the job had not copied; never (and a failed
  // on-success) merges the successor back into the frozen bits.
  const bool adopt = mode != BitmapMode::kNever && (success || mode == BitmapMode::kAlways);
  if (adopt) {
    e->bits = std::move(e->successor);
    if (!success && mode == BitmapMode::kAlways) {
      for (const auto& [off, len] : not_copied) e->bits->Set(off, len);
    }
  } else {
    e->bits->Merge(*e->successor);
  }
  e->successor.reset();
  e->busy = false;
  UpdateJournalFlagLocked();
}

Status DriveBitmaps::BeforeWrite(uint64_t off, uint64_t len, bool may_block) {
  if (!any_recording_.load(std::memory_order_acquire)) return Status::Ok();
  // Bits first, then the journal: a save that snapshots the bits after this
  // point sees this write in the new journal epoch (see Save).
  for (const auto& e : entries_) {
    if (e->inconsistent || !e->enabled) continue;
    (e->busy && e->successor ? e->successor : e->bits)->Set(off, len);
  }
  if (!journal_on_.load(std::memory_order_acquire)) return Status::Ok();
  // Pairs with the same step in Save: either its snapshot sees the bits set
  // above, or this write sees the new epoch's cleared regions.
  epoch_order_.fetch_add(1, std::memory_order_acq_rel);
  const uint64_t r0 = off / options_.region_size;
  const uint64_t r1 =
      std::min(nregions_, (off + len + options_.region_size - 1) / options_.region_size);
  bool all = true;
  for (uint64_t r = r0; r < r1 && all; ++r) all = RegionMarked(r);
  const bool lease_ok = RealNs() + kLeaseMarginNs < lease_ns_.load(std::memory_order_relaxed);
  if (all && lease_ok) return Status::Ok();
  if (!may_block) return Status::Error(EAGAIN, "journal the region first");
  if (Status s = JournalRegions(off, len); !s.ok()) JournalFailed(s);
  return Status::Ok();
}

bool DriveBitmaps::RegionMarked(uint64_t r) const {
  return (regions_[r / 64].load(std::memory_order_acquire) >> (r % 64)) & 1;
}

JournalHeader DriveBitmaps::HeaderLocked() const {
  JournalHeader h;
  h.region_size = options_.region_size;
  h.drive_size = drive_->size();
  h.generation = journal_generation_;
  h.lease_ns = lease_ns_.load();
  h.source_dev = drive_->dev();
  h.source_ino = drive_->ino();
  return h;
}

Status DriveBitmaps::RenewLeaseLocked(bool sync) {
  lease_ns_.store(RealNs() + kLeaseNs);
  return store_->WriteJournalHeader(HeaderLocked(), sync);
}

Status DriveBitmaps::JournalRegions(uint64_t off, uint64_t len) {
  MutexLock lock(&journal_mu_);
  if (journal_broken_.load()) return Status::Ok();
  const uint64_t r0 = off / options_.region_size;
  const uint64_t r1 =
      std::min(nregions_, (off + len + options_.region_size - 1) / options_.region_size);
  std::vector<uint64_t> todo;
  for (uint64_t r = r0; r < r1; ++r) {
    if (!RegionMarked(r)) todo.push_back(r);
  }
  if (RealNs() + kLeaseMarginNs >= lease_ns_.load()) {
    // The header first: a write past the lease would look foreign later.
    if (Status s = RenewLeaseLocked(todo.empty()); !s.ok()) return s;
  }
  if (todo.empty()) return Status::Ok();
  if (Status s = store_->MarkRegions(todo); !s.ok()) return s;
  for (uint64_t r : todo) regions_[r / 64].fetch_or(uint64_t{1} << (r % 64));
  return Status::Ok();
}

void DriveBitmaps::JournalFailed(const Status& why) {
  if (journal_broken_.exchange(true)) return;
  LogError("bitmaps of drive '" + drive_->name() + "': cannot record changes durably (" +
           why.message() +
           "); its persistent bitmaps would not survive a crash and are now inconsistent");
  {
    MutexLock lock(&journal_mu_);
    // A missing journal makes them inconsistent at the next start.
    unlinkat(AT_FDCWD, (store_->dir() + "/journal").c_str(), 0);
  }
  MutexLock lock(&mu_);
  for (auto& e : entries_) {
    if (e->persistent) {
      e->inconsistent = true;
      e->enabled = false;
    }
  }
  UpdateJournalFlagLocked();
}

void DriveBitmaps::Tick() {
  if (!journal_on_.load()) return;
  MutexLock lock(&journal_mu_);
  if (journal_broken_.load()) return;
  const bool sync = ++ticks_ % kSyncEveryTicks == 0;
  if (Status s = RenewLeaseLocked(sync); !s.ok()) {
    lock.Unlock();
    JournalFailed(s);
  }
}

void DriveBitmaps::SaveOrLog() {
  if (Status s = Save(false); !s.ok()) LogError("bitmaps: " + s.message());
}

Status DriveBitmaps::Save(bool clean) {
  if (!store_) return Status::Ok();
  MutexLock saving(&save_mu_);
  const uint64_t gen = ++generation_;
  // 1. A new journal epoch: writes from now on record their regions again
  // (the file keeps the old ones until step 3 replaces it).
  {
    MutexLock lock(&journal_mu_);
    for (uint64_t i = 0; i < (nregions_ + 63) / 64 + 1; ++i) regions_[i].store(0);
  }
  epoch_order_.fetch_add(1, std::memory_order_acq_rel);  // see BeforeWrite
  // 2. Every persistent bitmap, as it is now (a busy one with its successor).
  std::vector<BitmapRecord> records;
  {
    MutexLock lock(&mu_);
    for (const auto& e : entries_) {
      if (!e->persistent) continue;
      BitmapRecord r;
      r.name = e->name;
      r.recording = e->enabled;
      r.inconsistent = e->inconsistent;
      r.granularity = e->bits->granularity();
      r.drive_size = drive_->size();
      r.generation = gen;
      r.source_dev = drive_->dev();
      r.source_ino = drive_->ino();
      DirtyBitmap both(*e->bits);
      if (e->busy && e->successor) both.Merge(*e->successor);
      r.words = both.Words();
      records.push_back(std::move(r));
    }
  }
  Status first;
  for (const auto& r : records) {
    if (Status s = store_->SaveBitmap(r); !s.ok() && first.ok()) first = s;
  }
  // A bitmap file that could not be written keeps the old journal, which
  // still covers everything since the previous save.
  if (!first.ok()) return first;
  // 3. The journal of the new epoch.
  MutexLock lock(&journal_mu_);
  journal_generation_ = gen;
  std::vector<bool> regions(nregions_);
  for (uint64_t r = 0; r < nregions_; ++r) regions[r] = RegionMarked(r);
  JournalHeader h;
  if (clean) {
    const SourceId src = StatSource(drive_);
    lease_ns_.store(0);
    h = HeaderLocked();
    h.clean_mtime_ns = src.mtime_ns;
  } else {
    lease_ns_.store(RealNs() + kLeaseNs);
    h = HeaderLocked();
  }
  return store_->WriteJournal(h, regions);
}

Status DriveBitmaps::Forget(const std::string& name) {
  if (!store_) return Status::Ok();
  MutexLock saving(&save_mu_);
  return store_->RemoveBitmap(name);
}

}  // namespace cbw::backup
