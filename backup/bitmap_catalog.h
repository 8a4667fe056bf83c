#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "backup/status.h"

namespace cbw::backup {

// What QMP sees of one dirty bitmap (query-block's inserted.dirty-bitmaps).
struct BitmapInfo {
  std::string name;
  uint64_t count = 0;  // dirty bytes
  uint64_t granularity = 0;
  bool recording = false;
  bool busy = false;
  bool persistent = false;
  bool inconsistent = false;
};

// One bitmap command (or transaction action), with QEMU's arguments.
struct BitmapAction {
  enum class Kind { kAdd, kRemove, kClear, kEnable, kDisable, kMerge };
  Kind kind = Kind::kAdd;
  std::string node;  // a drive name
  std::string name;  // the bitmap (merge: the target)
  // add:
  std::optional<uint64_t> granularity;
  bool persistent = false;
  bool disabled = false;
  // merge: (node, name) of each source; node empty = `node`.
  std::vector<std::pair<std::string, std::string>> sources;
};
const char* ToString(BitmapAction::Kind kind);  // "block-dirty-bitmap-add", ...

// How a drive-backup uses a bitmap, after do_backup_common's checks.
enum class BitmapMode { kOnSuccess, kNever, kAlways };
const char* ToString(BitmapMode mode);

// The bitmap arguments of a drive-backup as given.
struct BackupBitmapArgs {
  std::string device;
  std::string sync;  // as given: full, top, none, incremental, bitmap
  std::optional<std::string> bitmap;
  std::optional<std::string> bitmap_mode;  // as given
};

// The names and states of every bitmap on every drive, without their bits:
// the state QMP's checks run against. A catalog is a value: the registry
// hands out snapshots, and checking a transaction applies each action to its
// own copy, so a later action sees what an earlier one did ("add b0, then a
// backup with b0") and nothing real changes until every action passed.
//
// Every check follows QEMU 7.2 (blockdev.c do_backup_common,
// block/monitor/bitmap-qmp-cmds.c, block/dirty-bitmap.c): the same order and
// texts, with SPEC 2.2's errnos: ENODEV for no such drive, EBUSY for a
// bitmap in use or a name taken, EINVAL for anything else (a bitmap that
// does not exist is a bad value, as is a bad granularity). Not
// thread-safe (a value).
class BitmapCatalog {
 public:
  struct Drive {
    uint64_t size = 0;
    uint64_t default_granularity = 64 * 1024;
    bool can_persist = false;  // cbwfs has a --state-dir
  };
  struct Meta {
    uint64_t granularity = 0;
    bool enabled = true;  // recording (unless busy: then its successor records)
    bool busy = false;
    bool persistent = false;
    bool inconsistent = false;
  };

  void AddDrive(const std::string& name, Drive drive) { drives_[name] = drive; }
  void AddBitmap(const std::string& drive, const std::string& name, Meta meta) {
    bitmaps_[{drive, name}] = meta;
  }
  const Meta* Find(const std::string& drive, const std::string& name) const;

  // Checks one bitmap command and, when it passes, applies it to this
  // catalog. `grouped`: the transaction's completion-mode is grouped (QEMU
  // refuses bitmap actions then).
  Status Apply(const BitmapAction& action, bool grouped = false);
  // do_backup_common's bitmap checks for a drive-backup; on success marks
  // the bitmap busy here and returns the effective mode (incremental is
  // bitmap + on-success). nullopt mode: no bitmap.
  Result<std::optional<BitmapMode>> UseForBackup(const BackupBitmapArgs& args);

 private:
  Status CheckNode(const std::string& node) const;
  // block_dirty_bitmap_lookup: "Node 'X' not found", "Dirty bitmap 'Y' not found".
  Result<const Meta*> Lookup(const std::string& node, const std::string& name) const;

  std::map<std::string, Drive> drives_;
  std::map<std::pair<std::string, std::string>, Meta> bitmaps_;
};

// QEMU's bitmap checks (bdrv_dirty_bitmap_check): busy, then inconsistent.
Status CheckBitmapUsable(const std::string& name, const BitmapCatalog::Meta& meta, bool busy_check,
                         bool inconsistent_check);

}  // namespace cbw::backup
