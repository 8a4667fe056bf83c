#include "fs/node_table.h"

#include <sys/stat.h>

#include <cerrno>
#include <set>

namespace cbw::fs {
namespace {

constexpr NodeTable::Ino kJobInoBase = NodeTable::Ino{1} << 40;
constexpr NodeTable::Ino kViewInoBase = NodeTable::Ino{2} << 40;

// Past this many job/view inode numbers, those of vanished ids are forgotten.
constexpr size_t kPruneInodesAbove = 1024;

}  // namespace

NodeTable::NodeTable(backup::JobRegistry* registry) : registry_(registry) {}

NodeTable::Node NodeTable::Resolve(Ino ino) const {
  Node n;
  switch (ino) {
    case kRootIno:
      n.kind = Kind::kRoot;
      return n;
    case kControlIno:
      n.kind = Kind::kControl;
      return n;
    case kEventsIno:
      n.kind = Kind::kEvents;
      return n;
    case kJobsIno:
      n.kind = Kind::kJobsDir;
      return n;
    case kSnapshotsIno:
      n.kind = Kind::kSnapshotsDir;
      return n;
    case kMetricsIno:
      n.kind = Kind::kMetrics;
      return n;
    default:
      break;
  }
  if (ino >= kFirstDriveIno && ino < kFirstDriveIno + registry_->drives().size()) {
    n.kind = Kind::kDrive;
    n.drive = ino - kFirstDriveIno;
    return n;
  }
  if (ino >= kJobInoBase) {
    backup::MutexLock lock(&mu_);
    auto it = dynamic_ids_.find(ino);
    if (it != dynamic_ids_.end()) {
      n.kind = ino >= kViewInoBase ? Kind::kView : Kind::kJob;
      n.name = it->second;
    }
  }
  return n;
}

backup::Result<NodeTable::Ino> NodeTable::Lookup(Ino parent, std::string_view name) {
  switch (parent) {
    case kRootIno: {
      if (name == "control") return kControlIno;
      if (name == "events") return kEventsIno;
      if (name == "jobs") return kJobsIno;
      if (name == "snapshots") return kSnapshotsIno;
      if (name == "metrics") return kMetricsIno;
      const auto& drives = registry_->drives();
      for (size_t i = 0; i < drives.size(); ++i) {
        if (drives[i]->name() == name) return kFirstDriveIno + i;
      }
      return Ino{0};
    }
    case kJobsIno: {
      std::string id(name);
      return registry_->GetJobFile(id) ? DynamicIno(Kind::kJob, id) : Ino{0};
    }
    case kSnapshotsIno: {
      std::string id(name);
      return registry_->SnapshotSize(id) ? DynamicIno(Kind::kView, id) : Ino{0};
    }
    default:
      return backup::Status::Error(ENOTDIR, "not a directory");
  }
}

backup::Result<std::vector<NodeTable::Entry>> NodeTable::List(Ino dir) {
  std::vector<Entry> out;
  switch (Resolve(dir).kind) {
    case Kind::kRoot: {
      const auto& drives = registry_->drives();
      for (size_t i = 0; i < drives.size(); ++i) {
        out.push_back({drives[i]->name(), kFirstDriveIno + i, S_IFREG});
      }
      out.push_back({"control", kControlIno, S_IFREG});
      out.push_back({"events", kEventsIno, S_IFREG});
      out.push_back({"jobs", kJobsIno, S_IFDIR});
      out.push_back({"snapshots", kSnapshotsIno, S_IFDIR});
      out.push_back({"metrics", kMetricsIno, S_IFREG});
      return out;
    }
    case Kind::kJobsDir:
      for (const auto& info : registry_->JobFiles()) {
        out.push_back({info.id, DynamicIno(Kind::kJob, info.id), S_IFREG});
      }
      return out;
    case Kind::kSnapshotsDir:
      for (const auto& id : registry_->SnapshotIds()) {
        out.push_back({id, DynamicIno(Kind::kView, id), S_IFREG});
      }
      return out;
    case Kind::kNone:
      return backup::Status::Error(ENOENT, "no such node");
    default:
      return backup::Status::Error(ENOTDIR, "not a directory");
  }
}

void NodeTable::PruneDynamicInos() {
  {
    backup::MutexLock lock(&mu_);
    if (dynamic_ids_.size() < kPruneInodesAbove) return;
  }
  // The live ids are fetched before taking mu_: no registry call under it.
  std::set<std::string> jobs, views;
  for (const auto& info : registry_->JobFiles()) jobs.insert(info.id);
  for (const auto& id : registry_->SnapshotIds()) views.insert(id);
  backup::MutexLock lock(&mu_);
  for (auto it = dynamic_ids_.begin(); it != dynamic_ids_.end();) {
    bool view = it->first >= kViewInoBase;
    const auto& live = view ? views : jobs;
    if (live.count(it->second)) {
      ++it;
      continue;
    }
    (view ? view_serials_ : job_serials_).erase(it->second);
    it = dynamic_ids_.erase(it);
  }
}

NodeTable::Ino NodeTable::DynamicIno(Kind kind, const std::string& id) {
  PruneDynamicInos();
  backup::MutexLock lock(&mu_);
  auto& serials = kind == Kind::kJob ? job_serials_ : view_serials_;
  auto [it, inserted] = serials.emplace(id, 0);
  if (inserted) it->second = next_serial_++;
  Ino ino = (kind == Kind::kJob ? kJobInoBase : kViewInoBase) + it->second;
  dynamic_ids_[ino] = id;
  return ino;
}

}  // namespace cbw::fs
