#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "backup/job_registry.h"
#include "backup/mutex.h"
#include "backup/status.h"

namespace cbw::fs {

// The tree's inode numbers and names (SPEC 2): fixed numbers for the root,
// control, events, jobs/, snapshots/, metrics and each drive; numbers handed out on
// demand for jobs/<id> and snapshots/<id>, which come and go for the
// daemon's whole life. Once there are many, the numbers of ids that no longer
// exist are forgotten (a later lookup of the same id gets a new number; the
// kernel's stale inode then answers ENOENT, as the file is gone).
//
// Inode numbers are FUSE's (fuse_ino_t, root 1) but this class needs no FUSE.
//
// Thread safety: thread-safe. mu_ guards the dynamic numbers only and is
// never held across a registry call. Ownership: borrows the registry.
class NodeTable {
 public:
  using Ino = uint64_t;
  static constexpr Ino kRootIno = 1;
  static constexpr Ino kControlIno = 2;
  static constexpr Ino kEventsIno = 3;
  static constexpr Ino kJobsIno = 4;
  static constexpr Ino kSnapshotsIno = 5;
  static constexpr Ino kMetricsIno = 6;
  // Drive i is kFirstDriveIno + i.
  static constexpr Ino kFirstDriveIno = 16;
  static constexpr Ino DriveIno(size_t drive) { return kFirstDriveIno + drive; }

  enum class Kind {
    kNone,
    kRoot,
    kControl,
    kEvents,
    kJobsDir,
    kSnapshotsDir,
    kMetrics,
    kDrive,
    kJob,
    kView
  };
  struct Node {
    Kind kind = Kind::kNone;
    size_t drive = 0;  // kDrive: index into registry->drives()
    std::string name;  // kJob, kView: the job id
  };
  struct Entry {
    std::string name;
    Ino ino;
    mode_t type;  // S_IFREG or S_IFDIR
  };

  explicit NodeTable(backup::JobRegistry* registry);

  // What `ino` is; kNone for a number that is unknown (or forgotten).
  Node Resolve(Ino ino) const;
  // The child `name` of directory `parent`: its number, 0 when there is no
  // such name (now), ENOTDIR when `parent` is not a directory.
  backup::Result<Ino> Lookup(Ino parent, std::string_view name);
  // The children of directory `dir` (no "." or ".."); ENOENT for an unknown
  // number, ENOTDIR for a file.
  backup::Result<std::vector<Entry>> List(Ino dir);
  // jobs/ and snapshots/ entries: never cached by the kernel.
  static bool IsDynamic(Kind kind) { return kind == Kind::kJob || kind == Kind::kView; }

 private:
  Ino DynamicIno(Kind kind, const std::string& id) CBW_EXCLUDES(mu_);
  void PruneDynamicInos() CBW_EXCLUDES(mu_);

  backup::JobRegistry* registry_;

  mutable backup::Mutex mu_;
  std::map<std::string, uint64_t> job_serials_ CBW_GUARDED_BY(mu_);   // jobs/<id> -> serial
  std::map<std::string, uint64_t> view_serials_ CBW_GUARDED_BY(mu_);  // snapshots/<id> -> serial
  std::map<Ino, std::string> dynamic_ids_ CBW_GUARDED_BY(mu_);        // dynamic ino -> id
  uint64_t next_serial_ CBW_GUARDED_BY(mu_) = 1;
};

}  // namespace cbw::fs
