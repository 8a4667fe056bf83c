#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "backup/event_bus.h"
#include "backup/job_registry.h"
#include "backup/mutex.h"
#include "backup/worker_pool.h"
#include "control/dispatcher.h"
#include "fs/control_stream.h"
#include "fs/events_file.h"
#include "fs/node_table.h"

namespace cbw::fs {

// The FUSE edge: the low-level operations over the node table (root, one
// file per drive, control, events, jobs/, snapshots/, metrics). Each request is
// answered exactly once; every op body runs in a guard that turns bad_alloc
// into ENOMEM and any other exception into EIO, so none reaches libfuse.
// The tree is fixed: creating, linking or renaming names fails with EROFS in
// jobs/ and snapshots/ (read-only trees but for `rm jobs/<id>`) and with
// EPERM elsewhere.
//
// Open drive files are counted per drive, so that a stop can wait for them
// (SPEC 8 "Stopping"): once BeginStop has run, new opens of drive files are
// refused with ESHUTDOWN and every close is reported to the stopper.
//
// Page cache of drives (issue 14): buffered opens keep the kernel's cached
// pages across opens, unless a direct writer is about. An O_DIRECT open
// drops the drive's cached pages once (each direct write would otherwise
// invalidate cached pages one by one, at a fraction of the direct rate);
// while an O_DIRECT open exists, buffered opens bypass the cache (direct_io),
// so it does not fill up again; the first buffered open after the last direct
// one closed drops the cache once more (a page read while a direct write
// was under way may be stale).
//
// Writeback cache (SPEC 9, Config::writeback_cache): the kernel caches drive
// writes; WriteBackDrives makes it write a drive's dirty pages back into
// cbwfs before a point in time (the registry's before_point_in_time hook).
//
// Thread model: libfuse's multithreaded loop calls the ops concurrently; the
// object reaches them through fuse_req_userdata (no globals). The node table,
// the events file and the last control reply each have their own lock;
// per-open state (a control stream, a job-file snapshot) lives in a handle
// owned by the open (fi->fh) with its own mutex; opens_mu_ guards the drive
// handle counts. Lock order: handle mutex -> engine (the dispatcher's
// commands, a job record) and -> LastReply; the node table's, the events
// file's and opens_mu_ are taken alone (leaves). None is held across a
// reply or a callback.
class CbwFs {
 public:
  struct Config {
    uid_t uid = 0;  // owner of every node (the mounting user)
    gid_t gid = 0;
    uint64_t cluster_size = 64 * 1024;
    bool writeback_cache = false;  // ask for FUSE_CAP_WRITEBACK_CACHE (SPEC 9)
  };

  CbwFs(backup::JobRegistry* registry, backup::EventBus* bus, control::Dispatcher* dispatcher,
        Config config);
  ~CbwFs();
  CbwFs(const CbwFs&) = delete;
  CbwFs& operator=(const CbwFs&) = delete;

  static const fuse_lowlevel_ops& Ops();

  // The session the notifications (WriteBackDrives) go to. Call once, before
  // the loop serves.
  void SetSession(fuse_session* se) { session_.store(se); }
  // In writeback-cache mode, makes the kernel write back the dirty cached
  // pages of `drives` into cbwfs, and returns once they are written (the
  // kernel launders each dirty page and waits for its write, which a FUSE
  // worker serves meanwhile: the caller must not hold a lock those writes
  // need, and enough workers must be free). A no-op without writeback cache.
  // Thread-safe; blocks.
  void WriteBackDrives(const std::vector<backup::Drive*>& drives);
  // Whether the kernel accepted writeback caching (after init).
  bool writeback_cache() const { return writeback_.load(); }

  // Called once from FUSE init (the mount is live and answering).
  void SetOnInit(std::function<void()> fn) { on_init_ = std::move(fn); }
  // Starts the background work (events delivery). Call in the process that
  // serves the mount, after daemonizing and before the session loop.
  void Start() { events_.Start(); }
  // Answers every parked events read with end-of-file (later reads get EOF
  // at once) and stops the background work. Call after the loop has ended.
  void Shutdown();
  // At stop, while the loop still serves: waits until every events reader
  // has read what is queued for it, then ends the stream (EOF) and waits for
  // the readers to close, each wait bounded by `deadline`. So `cat events`
  // sees the jobs' last events and ends cleanly rather than with an error.
  void StopEvents(std::chrono::milliseconds deadline) { events_.StopEvents(deadline); }

  // A drive file with open handles, and how many.
  struct OpenDrive {
    std::string name;
    uint64_t handles = 0;
  };
  // The drive files open now, in drive order.
  std::vector<OpenDrive> OpenDrives() const CBW_EXCLUDES(opens_mu_);
  // The daemon is stopping: from now on opens of drive files fail with
  // ESHUTDOWN, and `on_close` runs after each close of a drive handle (on the
  // FUSE thread that handled it, with no lock held). Returns the drive files
  // open at this instant (no close of those is missed). Call once.
  std::vector<OpenDrive> BeginStop(std::function<void()> on_close) CBW_EXCLUDES(opens_mu_);

  // Op bodies (public for the C trampolines in cbw_fs.cc).
  void Init(fuse_conn_info* conn);
  void Lookup(fuse_req_t req, fuse_ino_t parent, const char* name);
  void GetAttr(fuse_req_t req, fuse_ino_t ino);
  void SetAttr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set);
  void Open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  void Read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi);
  void Write(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off,
             fuse_file_info* fi);
  void Release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  void Fsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info* fi);
  void OpenDir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  void ReadDir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi);
  void ReleaseDir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  void Unlink(fuse_req_t req, fuse_ino_t parent, const char* name);
  void Rmdir(fuse_req_t req, fuse_ino_t parent, const char* name);
  // create, mknod, mkdir, symlink, link: a new name in `parent`.
  void NewName(fuse_req_t req, fuse_ino_t parent);
  void Rename(fuse_req_t req, fuse_ino_t parent, fuse_ino_t newparent);
  void Fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                 fuse_file_info* fi);
  void Lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, fuse_file_info* fi);
  void Poll(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi, fuse_pollhandle* ph);
  void StatFs(fuse_req_t req, fuse_ino_t ino);

 private:
  using Kind = NodeTable::Kind;
  struct ControlHandle;
  struct JobHandle;
  struct MetricsHandle;
  struct DirHandle;

  // The metrics file's text now (drives' counters, jobs' records).
  std::string RenderMetrics() const;
  // Fills `st` for ino; false if the node does not exist (now).
  bool Stat(fuse_ino_t ino, struct stat* st) const;
  void ReplyEntry(fuse_req_t req, fuse_ino_t ino, double timeout);
  // The errno for changing names in directory `parent`.
  int NameChangeError(fuse_ino_t parent) const;
  std::vector<OpenDrive> OpenDrivesLocked() const CBW_REQUIRES(opens_mu_);
  // A drive handle closed (its release, or an open whose reply failed);
  // `direct`: it was opened O_DIRECT.
  void DriveClosed(size_t drive, bool direct) CBW_EXCLUDES(opens_mu_);

  backup::JobRegistry* registry_;
  control::Dispatcher* dispatcher_;
  Config config_;
  std::function<void()> on_init_;
  struct timespec mount_time_ {};

  NodeTable nodes_;
  EventsFile events_;
  LastReply last_reply_;  // what a fresh open of control reads

  mutable backup::Mutex opens_mu_;
  std::vector<uint64_t> drive_opens_ CBW_GUARDED_BY(opens_mu_);  // by drive index
  // Of those, opened O_DIRECT.
  std::vector<uint64_t> direct_opens_ CBW_GUARDED_BY(opens_mu_);
  // A direct open was seen and no buffered open has dropped the cache since
  // the last one closed: the drive's cached pages may be stale.
  std::vector<bool> cache_suspect_ CBW_GUARDED_BY(opens_mu_);
  bool stopping_ CBW_GUARDED_BY(opens_mu_) = false;
  std::function<void()> on_drive_close_ CBW_GUARDED_BY(opens_mu_);

  std::atomic<fuse_session*> session_{nullptr};
  std::atomic<bool> writeback_{false};  // the kernel caches writes (set at init)
  // Drops the cached pages of refused write-backs (a notification may not be
  // sent from the thread that answers the write). Null without writeback.
  std::shared_ptr<backup::WorkerPool> drop_pool_;
};

}  // namespace cbw::fs
