#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "backup/event_bus.h"
#include "backup/job_registry.h"
#include "control/dispatcher.h"

namespace cbw::fs {

// The FUSE edge: the node table (root, one file per drive, control, events,
// jobs/, snapshots/) and the low-level operations over it. Each request is
// answered exactly once; every op body runs in a guard that turns bad_alloc
// into ENOMEM and any other exception into EIO, so none reaches libfuse.
//
// Thread model: libfuse's multithreaded loop calls the ops concurrently; the
// object reaches them through fuse_req_userdata (no globals). Per-open state
// (control streams, event queues, job-file snapshots) lives in a handle owned
// by the open (fi->fh) and has its own mutex. Lock order: CbwFs::mu_ (inode
// maps, last reply) -> handle mutex -> (registry / event bus, never while a
// handle mutex is held except EventBus -> EventsHandle in delivery).
//
// Blocking reads of `events` never hold a worker thread: the request is parked
// in its handle and answered when an event arrives, on interrupt (EINTR), on
// release, or at Shutdown (EOF).
class CbwFs {
 public:
  struct Config {
    uid_t uid = 0;  // owner of every node (the mounting user)
    gid_t gid = 0;
    uint64_t cluster_size = 64 * 1024;
  };

  CbwFs(backup::JobRegistry* registry, backup::EventBus* bus, control::Dispatcher* dispatcher,
        Config config);
  ~CbwFs();
  CbwFs(const CbwFs&) = delete;
  CbwFs& operator=(const CbwFs&) = delete;

  static const fuse_lowlevel_ops& Ops();

  // Called once from FUSE init (the mount is live and answering).
  void SetOnInit(std::function<void()> fn) { on_init_ = std::move(fn); }
  // Answers every parked events read with end-of-file; later reads get EOF
  // at once. Call after the session loop has ended.
  void Shutdown();
  // At stop, while the loop still serves: waits until every events reader
  // has read what is queued for it, then ends the stream (EOF) and waits for
  // the readers to close, each wait bounded by `deadline`. So `cat events`
  // sees the jobs' last events and ends cleanly rather than with an error.
  void StopEvents(std::chrono::milliseconds deadline);

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
  void Fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                 fuse_file_info* fi);
  void Lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, fuse_file_info* fi);
  void Poll(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi, fuse_pollhandle* ph);
  void StatFs(fuse_req_t req, fuse_ino_t ino);

  struct EventsHandle;
  // Answers a parked events read with EINTR if it is still parked.
  void AnswerInterrupted(fuse_req_t req);

 private:
  enum class Kind { kNone, kRoot, kControl, kEvents, kJobsDir, kSnapshotsDir, kDrive, kJob, kView };
  struct Node {
    Kind kind = Kind::kNone;
    size_t drive = 0;  // kDrive: index into registry->drives()
    std::string name;  // kJob, kView: the job id
  };
  struct ControlHandle;
  struct JobHandle;
  struct DirHandle;

  Node Resolve(fuse_ino_t ino) const;
  // Fills `st` for ino; false if the node does not exist (now).
  bool Stat(fuse_ino_t ino, struct stat* st) const;
  fuse_ino_t DynamicIno(Kind kind, const std::string& name);
  // Forgets the inode numbers of job files and views that no longer exist,
  // once there are many: ids come and go for the daemon's whole life.
  void PruneDynamicInos();
  void ReplyEntry(fuse_req_t req, fuse_ino_t ino, double timeout);

  backup::JobRegistry* registry_;
  backup::EventBus* bus_;
  control::Dispatcher* dispatcher_;
  Config config_;
  std::function<void()> on_init_;
  struct timespec mount_time_ {};

  mutable std::mutex mu_;
  std::map<std::string, uint64_t> job_inos_;   // jobs/<id> -> serial
  std::map<std::string, uint64_t> view_inos_;  // snapshots/<id> -> serial
  std::map<uint64_t, std::string> ino_names_;  // dynamic ino -> id
  uint64_t next_serial_ = 1;
  std::string last_reply_;  // what a fresh open of control reads
  std::set<EventsHandle*> events_handles_;
  bool shut_down_ = false;
};

}  // namespace cbw::fs
