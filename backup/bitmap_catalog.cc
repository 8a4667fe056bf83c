#include "backup/bitmap_catalog.h"

#include <cerrno>

#include "backup/dirty_bitmap.h"

namespace cbw::backup {

const char* ToString(BitmapAction::Kind kind) {
  switch (kind) {
    case BitmapAction::Kind::kAdd:
      return "block-dirty-bitmap-add";
    case BitmapAction::Kind::kRemove:
      return "block-dirty-bitmap-remove";
    case BitmapAction::Kind::kClear:
      return "block-dirty-bitmap-clear";
    case BitmapAction::Kind::kEnable:
      return "block-dirty-bitmap-enable";
    case BitmapAction::Kind::kDisable:
      return "block-dirty-bitmap-disable";
    case BitmapAction::Kind::kMerge:
      return "block-dirty-bitmap-merge";
  }
  return "block-dirty-bitmap-add";
}

const char* ToString(BitmapMode mode) {
  switch (mode) {
    case BitmapMode::kOnSuccess:
      return "on-success";
    case BitmapMode::kNever:
      return "never";
    case BitmapMode::kAlways:
      return "always";
  }
  return "on-success";
}

Status CheckBitmapUsable(const std::string& name, const BitmapCatalog::Meta& meta, bool busy_check,
                         bool inconsistent_check) {
  if (busy_check && meta.busy) {
    return Status::Error(
        EBUSY, "Bitmap '" + name + "' is currently in use by another operation and cannot be used");
  }
  if (inconsistent_check && meta.inconsistent) {
    return Status::Error(EINVAL, "Bitmap '" + name + "' is inconsistent and cannot be used");
  }
  return Status::Ok();
}

const BitmapCatalog::Meta* BitmapCatalog::Find(const std::string& drive,
                                               const std::string& name) const {
  auto it = bitmaps_.find({drive, name});
  return it == bitmaps_.end() ? nullptr : &it->second;
}

Status BitmapCatalog::CheckNode(const std::string& node) const {
  if (drives_.count(node)) return Status::Ok();
  return Status::Error(ENODEV, "Cannot find device='" + node + "' nor node-name='" + node + "'");
}

Result<const BitmapCatalog::Meta*> BitmapCatalog::Lookup(const std::string& node,
                                                         const std::string& name) const {
  if (!drives_.count(node)) return Status::Error(ENODEV, "Node '" + node + "' not found");
  const Meta* m = Find(node, name);
  if (m == nullptr) return Status::Error(EINVAL, "Dirty bitmap '" + name + "' not found");
  return m;
}

Status BitmapCatalog::Apply(const BitmapAction& a, bool grouped) {
  if (grouped) {
    return Status::Error(EINVAL, std::string("Action '") + ToString(a.kind) +
                                     "' does not support Transaction property "
                                     "completion-mode = grouped");
  }
  using Kind = BitmapAction::Kind;
  switch (a.kind) {
    case Kind::kAdd: {
      if (a.name.empty()) return Status::Error(EINVAL, "Bitmap name cannot be empty");
      if (Status s = CheckNode(a.node); !s.ok()) return s;
      const Drive& d = drives_.at(a.node);
      uint64_t g = d.default_granularity;
      if (a.granularity) {
        g = *a.granularity;
        if (!DirtyBitmap::ValidGranularity(g)) {
          return Status::Error(EINVAL, "Granularity must be power of 2 and at least 512");
        }
      }
      if (a.persistent && !d.can_persist) {
        return Status::Error(EINVAL, "Can't store persistent bitmaps to " + a.node +
                                         " (cbwfs was started without --state-dir)");
      }
      if (a.name.size() > 1023) return Status::Error(EINVAL, "Bitmap name is too long");
      if (Find(a.node, a.name)) {
        return Status::Error(EBUSY, "Bitmap already exists: " + a.name);
      }
      Meta m;
      m.granularity = g;
      m.enabled = !a.disabled;
      m.persistent = a.persistent;
      bitmaps_[{a.node, a.name}] = m;
      return Status::Ok();
    }
    case Kind::kRemove: {
      auto m = Lookup(a.node, a.name);
      if (!m.ok()) return m.status();
      if (Status s = CheckBitmapUsable(a.name, **m, true, false); !s.ok()) return s;
      bitmaps_.erase({a.node, a.name});
      return Status::Ok();
    }
    case Kind::kClear:
    case Kind::kEnable:
    case Kind::kDisable: {
      auto m = Lookup(a.node, a.name);
      if (!m.ok()) return m.status();
      if (Status s = CheckBitmapUsable(a.name, **m, true, true); !s.ok()) return s;
      Meta& meta = bitmaps_[{a.node, a.name}];
      if (a.kind == Kind::kEnable) meta.enabled = true;
      if (a.kind == Kind::kDisable) meta.enabled = false;
      return Status::Ok();
    }
    case Kind::kMerge: {
      auto dst = Lookup(a.node, a.name);
      if (!dst.ok()) return dst.status();
      for (const auto& [node, name] : a.sources) {
        if (node.empty()) {
          if (!Find(a.node, name))
            return Status::Error(EINVAL, "Dirty bitmap '" + name + "' not found");
        } else {
          auto src = Lookup(node, name);
          if (!src.ok()) return src.status();
          if (drives_.at(node).size != drives_.at(a.node).size) {
            return Status::Error(EINVAL, "Bitmaps are incompatible and can't be merged");
          }
        }
        const Meta* src = Find(node.empty() ? a.node : node, name);
        if (Status s = CheckBitmapUsable(name, *src, true, true); !s.ok()) return s;
      }
      if (Status s = CheckBitmapUsable(a.name, **dst, true, true); !s.ok()) return s;
      return Status::Ok();
    }
  }
  return Status::Error(EINVAL, "unknown bitmap action");
}

Result<std::optional<BitmapMode>> BitmapCatalog::UseForBackup(const BackupBitmapArgs& a) {
  const bool needs = a.sync == "incremental" || a.sync == "bitmap";
  if (needs && !a.bitmap) {
    return Status::Error(EINVAL, "must provide a valid bitmap name for '" + a.sync + "' sync mode");
  }
  std::optional<std::string> mode = a.bitmap_mode;
  std::string sync = a.sync;
  if (sync == "incremental") {
    if (mode && *mode != "on-success") {
      return Status::Error(
          EINVAL, "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
    }
    mode = "on-success";
    sync = "bitmap";
  }
  if (a.bitmap) {
    const Meta* m = Find(a.device, *a.bitmap);
    if (m == nullptr) {
      return Status::Error(EINVAL, "Bitmap '" + *a.bitmap + "' could not be found");
    }
    if (!mode)
      return Status::Error(EINVAL, "Bitmap sync mode must be given when providing a bitmap");
    if (Status s = CheckBitmapUsable(*a.bitmap, *m, true, true); !s.ok()) return s;
    if (sync == "none") {
      return Status::Error(EINVAL, "sync mode 'none' does not produce meaningful bitmap outputs");
    }
    if (*mode == "never" && sync != "bitmap") {
      return Status::Error(EINVAL,
                           "Bitmap sync mode 'never' has no meaningful effect when "
                           "combined with sync mode '" +
                               sync + "'");
    }
    bitmaps_[{a.device, *a.bitmap}].busy = true;
    if (*mode == "never") return std::optional<BitmapMode>(BitmapMode::kNever);
    if (*mode == "always") return std::optional<BitmapMode>(BitmapMode::kAlways);
    return std::optional<BitmapMode>(BitmapMode::kOnSuccess);
  }
  if (mode) return Status::Error(EINVAL, "Cannot specify bitmap sync mode without a bitmap");
  return std::optional<BitmapMode>();
}

}  // namespace cbw::backup
