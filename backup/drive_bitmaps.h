#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backup/bitmap_catalog.h"
#include "backup/bitmap_store.h"
#include "backup/dirty_bitmap.h"
#include "backup/drive.h"
#include "backup/mutex.h"
#include "backup/status.h"

namespace cbw::backup {

// The dirty bitmaps of one drive (SPEC 7): one more write hook on the drive
// that marks every write in each recording bitmap (or, while a job holds it
// frozen, in its successor), QEMU's operations on them, and their
// persistence with crash-safe tracking.
//
// Thread model. The list of bitmaps and each bitmap's state change only with
// the drive's write gate closed (inside Drive::AtPointInTime), so the hook,
// run by writers inside the gate, reads them without a lock; bits are set
// with atomic or-ing. mu_ also guards the list for readers outside the gate
// (queries, saves). journal_mu_ serialises the journal file; save_mu_
// serialises saves. Lock order: save_mu_ -> mu_ -> journal_mu_ (all below
// the registry's and jobs' locks, backup/mutex.h).
//
// Crash safety (persistent bitmaps, with a store): before the first write
// into a region (region_size bytes) since the last save reaches the source,
// the region is recorded in the journal and fdatasync'd (on the drive's slow
// path: the hook asks for it with EAGAIN). A save writes every persistent
// bitmap, then starts a new journal epoch. After a crash, Load ORs the
// journal's regions into the saved bits: a superset of the real changes. The
// journal also holds a lease: the daemon never writes the source past it
// without renewing it first, so a source modified after the lease was
// changed while cbwfs was not running. Where the record cannot be trusted
// (files missing or corrupt, the source of another size or inode, or
// modified after the lease / since the clean stop) the bitmap is loaded
// inconsistent.
class DriveBitmaps {
 public:
  struct Options {
    uint64_t default_granularity = 64 * 1024;
    uint64_t region_size = 64ull << 20;  // journal granularity
  };
  // `store` may be null (no --state-dir: no persistent bitmaps).
  DriveBitmaps(Drive* drive, std::unique_ptr<BitmapStore> store, Options options);
  ~DriveBitmaps();
  DriveBitmaps(const DriveBitmaps&) = delete;
  DriveBitmaps& operator=(const DriveBitmaps&) = delete;

  Drive* drive() const { return drive_; }
  bool can_persist() const { return store_ != nullptr; }
  uint64_t default_granularity() const { return options_.default_granularity; }
  // Loads the persisted bitmaps and installs the hook. Once, before the
  // drive serves writes.
  void Start() CBW_EXCLUDES(mu_, save_mu_, journal_mu_);

  std::vector<BitmapInfo> List() const CBW_EXCLUDES(mu_);
  void FillCatalog(BitmapCatalog* catalog) const CBW_EXCLUDES(mu_);
  // A copy of a bitmap's bits (tests, merges across drives); null if none.
  std::unique_ptr<DirtyBitmap> Copy(const std::string& name) const CBW_EXCLUDES(mu_);

  // Applies an action the catalog accepted. Only inside
  // Drive::AtPointInTime for this drive (and, for merges from other drives,
  // theirs: `source` returns a copy of another drive's bitmap).
  void Apply(const BitmapAction& action,
             const std::function<std::unique_ptr<DirtyBitmap>(const std::string& node,
                                                              const std::string& name)>& source)
      CBW_EXCLUDES(mu_);
  // A job's point in time (inside AtPointInTime): the bitmap becomes busy,
  // a successor records new writes, and a copy of the frozen bits returns.
  std::unique_ptr<DirtyBitmap> Freeze(const std::string& name) CBW_EXCLUDES(mu_);
  // The job ended (inside AtPointInTime): adopts the successor or merges
  // back per SPEC 7's table. `not_copied`: byte ranges the job had still to
  // copy (used by mode always on failure).
  void EndJob(const std::string& name, BitmapMode mode, bool success,
              const std::vector<std::pair<uint64_t, uint64_t>>& not_copied) CBW_EXCLUDES(mu_);

  // Writes every persistent bitmap and starts a new journal epoch. `clean`:
  // the last save before exit (no write follows; the source's mtime is
  // recorded instead of a lease).
  Status Save(bool clean) CBW_EXCLUDES(mu_, save_mu_, journal_mu_);
  // Save(false), logging a failure (the caller has no one to tell).
  void SaveOrLog() CBW_EXCLUDES(mu_, save_mu_, journal_mu_);
  // Renews the lease (called every couple of seconds).
  void Tick() CBW_EXCLUDES(journal_mu_);
  // Removes a persistent bitmap's file (after a remove action committed).
  Status Forget(const std::string& name);

 private:
  class Hook;
  struct Entry {
    std::string name;
    std::unique_ptr<DirtyBitmap> bits;
    std::unique_ptr<DirtyBitmap> successor;  // while busy
    bool enabled = true;                     // the successor's, while busy
    bool busy = false;
    bool persistent = false;
    bool inconsistent = false;
  };

  Status BeforeWrite(uint64_t off, uint64_t len, bool may_block) CBW_EXCLUDES(journal_mu_);
  Entry* FindLocked(const std::string& name) CBW_REQUIRES(mu_);
  void UpdateJournalFlagLocked() CBW_REQUIRES(mu_);
  // Records the regions of [off, off+len) not yet in this epoch, durably.
  Status JournalRegions(uint64_t off, uint64_t len) CBW_EXCLUDES(journal_mu_);
  bool RegionMarked(uint64_t r) const;
  Status RenewLeaseLocked(bool sync) CBW_REQUIRES(journal_mu_);
  JournalHeader HeaderLocked() const CBW_REQUIRES(journal_mu_);
  // The journal cannot be written: the bitmaps can no longer be trusted
  // after a crash; say so on disk (as far as possible) and in memory.
  void JournalFailed(const Status& why) CBW_EXCLUDES(journal_mu_);

  Drive* const drive_;
  const std::unique_ptr<BitmapStore> store_;
  const Options options_;
  const uint64_t nregions_;
  std::shared_ptr<WriteHook> hook_;

  mutable Mutex mu_;
  // Changed only with the drive's gate closed (and mu_ held); read by the
  // hook inside the gate without mu_.
  std::vector<std::shared_ptr<Entry>> entries_;
  std::atomic<bool> any_recording_{false};
  std::atomic<bool> journal_on_{false};  // a persistent bitmap records
  // Orders a write's bits against a save's new journal epoch: both sides
  // do a read-modify-write of it in between (see BeforeWrite and Save).
  // Any two RMWs of one atomic are ordered, and the later one sees all the
  // earlier one's side did before it (a fence would do, but TSan cannot
  // follow fences).
  std::atomic<uint64_t> epoch_order_{0};

  Mutex save_mu_;
  uint64_t generation_ CBW_GUARDED_BY(save_mu_) = 0;

  Mutex journal_mu_;
  // This epoch's recorded regions (set only once durable).
  std::unique_ptr<std::atomic<uint64_t>[]> regions_;
  std::atomic<int64_t> lease_ns_{0};
  uint64_t journal_generation_ CBW_GUARDED_BY(journal_mu_) = 0;
  int ticks_ CBW_GUARDED_BY(journal_mu_) = 0;
  std::atomic<bool> journal_broken_{false};
};

}  // namespace cbw::backup
