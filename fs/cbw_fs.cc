#include "fs/cbw_fs.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <new>
#include <string_view>
#include <utility>
#include <vector>

#include "backup/log.h"
#include "backup/threads.h"
#include "control/metrics.h"
#include "control/render.h"

namespace cbw::fs {
namespace {

constexpr fuse_ino_t kRootIno = NodeTable::kRootIno;
constexpr fuse_ino_t kJobsIno = NodeTable::kJobsIno;
constexpr fuse_ino_t kSnapshotsIno = NodeTable::kSnapshotsIno;
static_assert(NodeTable::kRootIno == FUSE_ROOT_ID);

// Fixed nodes may be cached by the kernel; jobs/ and snapshots/ entries come
// and go, so they are never cached (they appear and vanish at once).
constexpr double kFixedTimeout = 1.0;
constexpr double kDynamicTimeout = 0.0;

// fi->fh of a drive handle opened O_DIRECT (0 for a buffered one).
constexpr uint64_t kDirectDriveHandle = 1;

CbwFs* Self(fuse_req_t req) { return static_cast<CbwFs*>(fuse_req_userdata(req)); }

// Runs an op body so that no exception reaches libfuse. Bodies reply last, so
// a throw means nothing was replied yet.
template <class F>
void Guard(fuse_req_t req, F&& body) {
  try {
    body();
  } catch (const std::bad_alloc&) {
    fuse_reply_err(req, ENOMEM);
  } catch (const std::exception& e) {
    backup::LogStoppedException("FUSE op", e.what());
    fuse_reply_err(req, EIO);
  } catch (...) {
    backup::LogStoppedException("FUSE op", "unknown exception");
    fuse_reply_err(req, EIO);
  }
}

struct timespec FromSeconds(double s) {
  struct timespec ts {};
  ts.tv_sec = static_cast<time_t>(s);
  ts.tv_nsec = static_cast<long>((s - static_cast<double>(ts.tv_sec)) * 1e9);
  return ts;
}

}  // namespace

struct CbwFs::ControlHandle {
  backup::Mutex mu;
  ControlStream stream CBW_GUARDED_BY(mu);
};

struct CbwFs::JobHandle {
  JobHandle(std::string id, std::string snapshot)
      : id(std::move(id)), snapshot(std::move(snapshot)) {}
  const std::string id;
  backup::Mutex mu;
  std::string snapshot CBW_GUARDED_BY(mu);  // the record as of the last read at offset 0
};

// An open of metrics: like a job file, a snapshot taken at each read at
// offset 0, so one read-through is one consistent text.
struct CbwFs::MetricsHandle {
  std::mutex mu;
  std::string snapshot;
};

struct CbwFs::DirHandle {
  std::vector<NodeTable::Entry> entries;
};

CbwFs::CbwFs(backup::JobRegistry* registry, backup::EventBus* bus, control::Dispatcher* dispatcher,
             Config config)
    : registry_(registry),
      dispatcher_(dispatcher),
      config_(config),
      nodes_(registry),
      events_(bus),
      drive_opens_(registry->drives().size(), 0),
      direct_opens_(registry->drives().size(), 0),
      cache_suspect_(registry->drives().size(), false) {
  clock_gettime(CLOCK_REALTIME, &mount_time_);
  if (config_.writeback_cache) {
    drop_pool_ = backup::WorkerPool::Create("cache drop", 1, std::chrono::seconds(2));
  }
}

CbwFs::~CbwFs() { Shutdown(); }

void CbwFs::Shutdown() {
  events_.Shutdown();
  if (drop_pool_) {
    // Its tasks use the session, which goes after this.
    drop_pool_->Stop();
    drop_pool_->WaitIdle(std::chrono::steady_clock::now() + std::chrono::seconds(2));
  }
}

bool CbwFs::Stat(fuse_ino_t ino, struct stat* st) const {
  *st = {};
  st->st_ino = ino;
  st->st_uid = config_.uid;
  st->st_gid = config_.gid;
  st->st_blksize = 4096;
  st->st_atim = st->st_mtim = st->st_ctim = mount_time_;
  NodeTable::Node n = nodes_.Resolve(ino);
  switch (n.kind) {
    case Kind::kNone:
      return false;
    case Kind::kRoot:
      st->st_mode = S_IFDIR | 0755;
      st->st_nlink = 4;
      return true;
    case Kind::kJobsDir:
    case Kind::kSnapshotsDir:
      // Writable by the owner: `rm jobs/<id>`, and so that creating a name
      // in either reaches cbwfs and fails with EROFS, as a read-only tree's
      // would (not with EACCES from the mode bits).
      st->st_mode = S_IFDIR | 0755;
      st->st_nlink = 2;
      return true;
    case Kind::kControl:
      st->st_mode = S_IFREG | 0600;
      st->st_nlink = 1;
      return true;
    case Kind::kEvents:
      st->st_mode = S_IFREG | 0444;
      st->st_nlink = 1;
      return true;
    case Kind::kMetrics:
      st->st_mode = S_IFREG | 0444;
      st->st_nlink = 1;
      // The size now; reads (direct_io) go to the end of the text either way.
      st->st_size = static_cast<off_t>(RenderMetrics().size());
      clock_gettime(CLOCK_REALTIME, &st->st_mtim);
      return true;
    case Kind::kDrive: {
      backup::Drive* d = registry_->drives()[n.drive];
      struct stat src {};
      if (fstat(d->fd(), &src) == 0) {
        st->st_atim = src.st_atim;
        st->st_mtim = src.st_mtim;
        st->st_ctim = src.st_ctim;
      }
      st->st_mode = S_IFREG | (d->readonly() ? 0400 : 0600);
      st->st_nlink = 1;
      st->st_size = static_cast<off_t>(d->size());
      // The fstat above already has the allocation; a device counts as full.
      st->st_blocks = d->is_block_device() ? static_cast<blkcnt_t>(d->size() / 512) : src.st_blocks;
      st->st_blksize = static_cast<blksize_t>(std::min<uint64_t>(config_.cluster_size, 1 << 20));
      return true;
    }
    case Kind::kJob: {
      auto info = registry_->GetJobFile(n.name);
      if (!info) return false;
      st->st_mode = S_IFREG | 0444;
      st->st_nlink = 1;
      st->st_size = static_cast<off_t>(control::RenderJobFile(*info).size());
      st->st_ctim = st->st_atim = FromSeconds(info->started);
      st->st_mtim = FromSeconds(info->finished.value_or(info->started));
      return true;
    }
    case Kind::kView: {
      auto size = registry_->SnapshotSize(n.name);
      if (!size) return false;
      st->st_mode = S_IFREG | 0400;
      st->st_nlink = 1;
      st->st_size = static_cast<off_t>(*size);
      return true;
    }
  }
  return false;
}

std::string CbwFs::RenderMetrics() const {
  std::vector<control::DriveMetrics> drives;
  for (const backup::Drive* d : registry_->drives()) {
    drives.push_back({d->name(), d->size(), d->Stats()});
  }
  return control::RenderMetrics(drives, registry_->JobFiles());
}

void CbwFs::ReplyEntry(fuse_req_t req, fuse_ino_t ino, double timeout) {
  fuse_entry_param e{};
  if (!Stat(ino, &e.attr)) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  e.ino = ino;
  e.attr_timeout = timeout;
  e.entry_timeout = timeout;
  fuse_reply_entry(req, &e);
}

void CbwFs::Init(fuse_conn_info* conn) {
  // Writeback caching acknowledges drive writes before cbwfs sees them, so it
  // is only on when asked for (SPEC 9); the point in time then holds because
  // WriteBackDrives runs before each one. Off, every write reaches cbwfs
  // before write() returns.
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  if (config_.writeback_cache) {
    if (conn->capable & FUSE_CAP_WRITEBACK_CACHE) {
      conn->want |= FUSE_CAP_WRITEBACK_CACHE;
      writeback_ = true;
    } else {
      backup::LogWarn("the kernel offers no FUSE writeback cache: drives run write-through");
    }
  }
  // Every write passes through cbwfs (or, with writeback caching, through
  // the kernel's own cache), so the kernel's cached pages stay true; do not
  // drop them because mtime moved.
  conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
  if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC) conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
  if (conn->capable & FUSE_CAP_SPLICE_WRITE) conn->want |= FUSE_CAP_SPLICE_WRITE;
  if (conn->capable & FUSE_CAP_SPLICE_MOVE) conn->want |= FUSE_CAP_SPLICE_MOVE;
  // Asynchronous direct I/O (a VM's queue) may keep many requests in flight:
  // allow more than the kernel's 12. Requests that must wait for a copy
  // before write leave their worker (Drive's slow path), so a deep queue
  // cannot starve control and jobs/.
  conn->max_background = 64;
  conn->congestion_threshold = 48;
  // Guarded on its own: a failed log line must not keep the waiting parent
  // from hearing that the mount is live.
  if (on_init_) backup::RunGuarded("FUSE init callback", on_init_);
  backup::LogDebug("FUSE init: max_write " + std::to_string(conn->max_write) + ", max_read " +
                   std::to_string(conn->max_read) + ", max_readahead " +
                   std::to_string(conn->max_readahead));
}

void CbwFs::Lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  auto r = nodes_.Lookup(parent, name);
  if (!r.ok()) return (void)fuse_reply_err(req, r.status().code());
  if (*r != 0) {
    Kind k = nodes_.Resolve(*r).kind;
    return ReplyEntry(req, *r, NodeTable::IsDynamic(k) ? kDynamicTimeout : kFixedTimeout);
  }
  // A negative entry with zero timeout: nothing is cached, so a job file that
  // appears a moment later is found.
  fuse_entry_param e{};
  fuse_reply_entry(req, &e);
}

void CbwFs::GetAttr(fuse_req_t req, fuse_ino_t ino) {
  struct stat st {};
  if (!Stat(ino, &st)) return (void)fuse_reply_err(req, ENOENT);
  Kind k = nodes_.Resolve(ino).kind;
  fuse_reply_attr(req, &st, NodeTable::IsDynamic(k) ? kDynamicTimeout : kFixedTimeout);
}

void CbwFs::SetAttr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set) {
  NodeTable::Node n = nodes_.Resolve(ino);
  struct stat st {};
  if (!Stat(ino, &st)) return (void)fuse_reply_err(req, ENOENT);
  if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
    return (void)fuse_reply_err(req, EPERM);
  }
  if (to_set & FUSE_SET_ATTR_SIZE) {
    if (n.kind == Kind::kDrive) {
      // A drive is a fixed-size device: only its own size is a valid "truncate".
      if (static_cast<uint64_t>(attr->st_size) != registry_->drives()[n.drive]->size()) {
        return (void)fuse_reply_err(req, EPERM);
      }
      if (registry_->drives()[n.drive]->readonly()) return (void)fuse_reply_err(req, EROFS);
    } else if (n.kind != Kind::kControl || attr->st_size != 0) {
      return (void)fuse_reply_err(req, EPERM);
    }
  }
  // Times are accepted and ignored (touch works); the source keeps its own.
  fuse_reply_attr(req, &st, kFixedTimeout);
}

void CbwFs::Open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  NodeTable::Node n = nodes_.Resolve(ino);
  int acc = fi->flags & O_ACCMODE;
  switch (n.kind) {
    case Kind::kDrive: {
      backup::Drive* d = registry_->drives()[n.drive];
      if (acc != O_RDONLY && d->readonly()) return (void)fuse_reply_err(req, EROFS);
      const bool direct = (fi->flags & O_DIRECT) != 0;
      bool stopping;
      bool keep_cache = true, bypass_cache = false;
      {
        backup::MutexLock lock(&opens_mu_);
        stopping = stopping_;
        if (!stopping) {
          ++drive_opens_[n.drive];
          if (direct) {
            // Drop what buffered readers cached, once: a direct write over a
            // cached page costs an invalidation each (94k -> 15k IOPS).
            ++direct_opens_[n.drive];
            cache_suspect_[n.drive] = true;
            keep_cache = false;
          } else if (direct_opens_[n.drive] > 0) {
            // A direct writer is about: do not fill the cache it would have
            // to invalidate page by page.
            keep_cache = false;
            bypass_cache = true;
          } else if (cache_suspect_[n.drive]) {
            // The direct writers are gone; a page read while one of their
            // writes was under way may be stale: drop the cache once.
            cache_suspect_[n.drive] = false;
            keep_cache = false;
          }
        }
      }
      if (stopping) {
        // A stop waits for the drive's users to close; no new ones start.
        backup::LogInfo("refused to open drive '" + d->name() + "': cbwfs is stopping");
        return (void)fuse_reply_err(req, ESHUTDOWN);
      }
      // O_TRUNC is ignored, as for a block device. Reads use the page cache
      // (every write passes through cbwfs, so it stays true) but for the
      // direct writer policy in the class comment. Without keep_cache the
      // kernel drops (and, with writeback caching, first writes back) the
      // drive's cached pages at this open.
      fi->keep_cache = keep_cache ? 1 : 0;
      fi->direct_io = bypass_cache ? 1 : 0;
      fi->fh = direct ? kDirectDriveHandle : 0;
      break;
    }
    case Kind::kControl: {
      fi->direct_io = 1;
      fi->fh = reinterpret_cast<uint64_t>(new ControlHandle());
      break;
    }
    case Kind::kEvents: {
      if (acc != O_RDONLY) return (void)fuse_reply_err(req, EACCES);
      fi->direct_io = 1;
      fi->nonseekable = 1;
      fi->fh = reinterpret_cast<uint64_t>(events_.Open());
      break;
    }
    case Kind::kMetrics: {
      if (acc != O_RDONLY) return (void)fuse_reply_err(req, EACCES);
      fi->direct_io = 1;
      fi->fh = reinterpret_cast<uint64_t>(new MetricsHandle());
      break;
    }
    case Kind::kJob: {
      if (acc != O_RDONLY) return (void)fuse_reply_err(req, EACCES);
      auto info = registry_->GetJobFile(n.name);
      if (!info) return (void)fuse_reply_err(req, ENOENT);
      std::string snapshot = control::RenderJobFile(*info);
      fi->direct_io = 1;
      fi->fh = reinterpret_cast<uint64_t>(new JobHandle(n.name, std::move(snapshot)));
      break;
    }
    case Kind::kView: {
      if (acc != O_RDONLY) return (void)fuse_reply_err(req, EACCES);
      if (!registry_->SnapshotSize(n.name)) return (void)fuse_reply_err(req, ENOENT);
      fi->direct_io = 1;
      fi->fh = reinterpret_cast<uint64_t>(new JobHandle(n.name, {}));
      break;
    }
    case Kind::kRoot:
    case Kind::kJobsDir:
    case Kind::kSnapshotsDir:
      return (void)fuse_reply_err(req, EISDIR);
    case Kind::kNone:
      return (void)fuse_reply_err(req, ENOENT);
  }
  if (fuse_reply_open(req, fi) == -ENOENT) {
    // The opener was interrupted; there will be no release for this open.
    Release(nullptr, ino, fi);
  }
}

void CbwFs::Read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  NodeTable::Node n = nodes_.Resolve(ino);
  switch (n.kind) {
    case Kind::kDrive: {
      backup::Drive* d = registry_->drives()[n.drive];
      uint64_t uoff = static_cast<uint64_t>(off);
      if (uoff >= d->size()) return (void)fuse_reply_buf(req, nullptr, 0);
      size = static_cast<size_t>(std::min<uint64_t>(size, d->size() - uoff));
      // Zero-copy: libfuse splices straight from the source fd when it can.
      fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
      buf.buf[0].flags = static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
      buf.buf[0].fd = d->fd();
      buf.buf[0].pos = off;
      fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
      return;
    }
    case Kind::kControl: {
      auto* h = reinterpret_cast<ControlHandle*>(fi->fh);
      backup::Result<std::string> data = std::string();
      {
        // Copied out under the lock: once the reply is sent, the opener may
        // close and the release (on another worker) frees h.
        backup::MutexLock lock(&h->mu);
        data = h->stream.Read(static_cast<uint64_t>(off), size, last_reply_);
      }
      if (!data.ok()) return (void)fuse_reply_err(req, data.status().code());
      fuse_reply_buf(req, data->data(), data->size());
      return;
    }
    case Kind::kEvents:
      events_.Read(req, reinterpret_cast<EventsFile::Reader*>(fi->fh), size,
                   (fi->flags & O_NONBLOCK) != 0);
      return;
    case Kind::kJob: {
      auto* h = reinterpret_cast<JobHandle*>(fi->fh);
      std::string data;
      {
        backup::MutexLock lock(&h->mu);
        if (off == 0) {
          if (auto info = registry_->GetJobFile(h->id)) h->snapshot = control::RenderJobFile(*info);
        }
        if (static_cast<uint64_t>(off) < h->snapshot.size()) data = h->snapshot.substr(off, size);
      }
      fuse_reply_buf(req, data.data(), data.size());
      return;
    }
    case Kind::kMetrics: {
      auto* h = reinterpret_cast<MetricsHandle*>(fi->fh);
      std::string data;
      {
        std::lock_guard lock(h->mu);
        if (off == 0) h->snapshot = RenderMetrics();
        if (static_cast<uint64_t>(off) < h->snapshot.size()) data = h->snapshot.substr(off, size);
      }
      fuse_reply_buf(req, data.data(), data.size());
      return;
    }
    case Kind::kView: {
      auto* h = reinterpret_cast<JobHandle*>(fi->fh);
      std::vector<char> buf(size);
      auto r = registry_->ReadSnapshot(h->id, buf.data(), size, static_cast<uint64_t>(off));
      if (!r.ok()) {
        // An ended view reads as EIO for readers that still have it open.
        int e = r.status().code();
        return (void)fuse_reply_err(req, e == ENOENT ? EIO : e);
      }
      fuse_reply_buf(req, buf.data(), *r);
      return;
    }
    default:
      fuse_reply_err(req, EISDIR);
  }
}

void CbwFs::Write(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off,
                  fuse_file_info* fi) {
  NodeTable::Node n = nodes_.Resolve(ino);
  if (n.kind == Kind::kDrive) {
    // Answered here, or later from a drive writer thread when a hook must
    // wait (a copy-before-write): no FUSE worker waits on a target.
    const bool cached = writeback_.load();
    registry_->drives()[n.drive]->Submit(
        {backup::Drive::OpKind::kWrite, buf, size, static_cast<uint64_t>(off)},
        [this, req, ino, size, off, cached](backup::Result<size_t> r) {
          if (r.ok()) return (void)fuse_reply_write(req, *r);
          fuse_reply_err(req, r.status().code());
          // A refused write-back (break-guest-write) leaves the page clean in
          // the kernel's cache with data the drive does not hold: drop it, so
          // readers see the drive. Not from here: the kernel handles the
          // notification only once this reply has ended the page's write-back.
          if (cached) {
            drop_pool_->Submit([this, ino, size, off] {
              if (fuse_session* se = session_.load()) {
                fuse_lowlevel_notify_inval_inode(se, ino, off, static_cast<off_t>(size));
              }
            });
          }
        });
    return;
  }
  if (n.kind != Kind::kControl) return (void)fuse_reply_err(req, EBADF);
  // Only the mounting user (or root) drives jobs, even with allow_other.
  const fuse_ctx* ctx = fuse_req_ctx(req);
  if (ctx->uid != 0 && ctx->uid != config_.uid) return (void)fuse_reply_err(req, EACCES);

  auto* h = reinterpret_cast<ControlHandle*>(fi->fh);
  int err = 0;
  {
    // The commands of one open run in write order. The lock ends before the
    // reply: once the write returns, the opener may close and the release
    // (on another worker) frees h.
    backup::MutexLock lock(&h->mu);
    control::WriteOutcome out = dispatcher_->Execute(std::string_view(buf, size));
    h->stream.Record(out.responses.empty() && out.error ? out.last_reply : out.responses,
                     out.error == 0 ? size : 0);
    if (!out.last_reply.empty()) last_reply_.Set(out.last_reply);
    err = out.error;
  }
  if (err) return (void)fuse_reply_err(req, err);
  fuse_reply_write(req, size);
}

void CbwFs::Release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  NodeTable::Node n = nodes_.Resolve(ino);
  switch (n.kind) {
    case Kind::kDrive:
      DriveClosed(n.drive, fi->fh == kDirectDriveHandle);
      break;
    case Kind::kControl:
      delete reinterpret_cast<ControlHandle*>(fi->fh);
      break;
    case Kind::kEvents:
      events_.Release(reinterpret_cast<EventsFile::Reader*>(fi->fh));
      break;
    case Kind::kJob:
    case Kind::kView:
      delete reinterpret_cast<JobHandle*>(fi->fh);
      break;
    case Kind::kMetrics:
      delete reinterpret_cast<MetricsHandle*>(fi->fh);
      break;
    default:
      break;
  }
  if (req) fuse_reply_err(req, 0);
}

void CbwFs::Fsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info* fi) {
  NodeTable::Node n = nodes_.Resolve(ino);
  if (n.kind != Kind::kDrive) return (void)fuse_reply_err(req, 0);
  backup::Status s = registry_->drives()[n.drive]->Flush(datasync != 0);
  fuse_reply_err(req, s.ok() ? 0 : s.code());
}

void CbwFs::OpenDir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  auto children = nodes_.List(ino);
  if (!children.ok()) return (void)fuse_reply_err(req, children.status().code());
  auto dh = std::make_unique<DirHandle>();
  dh->entries.push_back({".", ino, S_IFDIR});
  dh->entries.push_back({"..", kRootIno, S_IFDIR});
  for (auto& e : *children) dh->entries.push_back(std::move(e));
  fi->fh = reinterpret_cast<uint64_t>(dh.get());
  if (fuse_reply_open(req, fi) == 0) dh.release();
}

void CbwFs::ReadDir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  auto* dh = reinterpret_cast<DirHandle*>(fi->fh);
  std::vector<char> buf(size);
  size_t used = 0;
  for (size_t i = static_cast<size_t>(off); i < dh->entries.size(); ++i) {
    const auto& e = dh->entries[i];
    struct stat st {};
    st.st_ino = e.ino;
    st.st_mode = e.type;
    size_t need = fuse_add_direntry(req, buf.data() + used, size - used, e.name.c_str(), &st,
                                    static_cast<off_t>(i + 1));
    if (need > size - used) break;
    used += need;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void CbwFs::ReleaseDir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  delete reinterpret_cast<DirHandle*>(fi->fh);
  fuse_reply_err(req, 0);
}

void CbwFs::Unlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  if (parent != kJobsIno) return (void)fuse_reply_err(req, NameChangeError(parent));
  backup::Status s = registry_->RemoveJobFile(name);
  if (s.ok()) return (void)fuse_reply_err(req, 0);
  fuse_reply_err(req, s.code() == ESRCH ? ENOENT : s.code());
}

std::vector<CbwFs::OpenDrive> CbwFs::OpenDrivesLocked() const {
  std::vector<OpenDrive> open;
  const auto& drives = registry_->drives();
  for (size_t i = 0; i < drive_opens_.size(); ++i) {
    if (drive_opens_[i] > 0) open.push_back({drives[i]->name(), drive_opens_[i]});
  }
  return open;
}

std::vector<CbwFs::OpenDrive> CbwFs::OpenDrives() const {
  backup::MutexLock lock(&opens_mu_);
  return OpenDrivesLocked();
}

std::vector<CbwFs::OpenDrive> CbwFs::BeginStop(std::function<void()> on_close) {
  backup::MutexLock lock(&opens_mu_);
  stopping_ = true;
  on_drive_close_ = std::move(on_close);
  return OpenDrivesLocked();
}

void CbwFs::DriveClosed(size_t drive, bool direct) {
  std::function<void()> on_close;
  {
    backup::MutexLock lock(&opens_mu_);
    // Opens refused while stopping were never counted, and have no release.
    if (drive_opens_[drive] > 0) --drive_opens_[drive];
    if (direct && direct_opens_[drive] > 0) --direct_opens_[drive];
    on_close = on_drive_close_;
  }
  if (on_close) backup::RunGuarded("drive close callback", on_close);
}

void CbwFs::WriteBackDrives(const std::vector<backup::Drive*>& drives) {
  fuse_session* se = session_.load();
  if (!writeback_.load() || !se) return;
  const auto& all = registry_->drives();
  std::vector<size_t> done;
  for (backup::Drive* d : drives) {
    size_t i = static_cast<size_t>(std::find(all.begin(), all.end(), d) - all.begin());
    if (i == all.size() || std::find(done.begin(), done.end(), i) != done.end()) continue;
    done.push_back(i);
    const backup::DriveStats before = d->Stats();
    const auto start = std::chrono::steady_clock::now();
    // Invalidating the whole range launders every dirty page: the kernel
    // sends its write to cbwfs and waits for the reply before dropping the
    // page, and waits for pages already under write-back (on this kernel
    // FUSE write-back holds the page itself, no temporary copy). So when this
    // returns, every write() that returned before is on the drive. -ENOENT:
    // the kernel has no inode for the drive, so nothing cached either.
    int r = fuse_lowlevel_notify_inval_inode(se, NodeTable::DriveIno(i), 0, 0);
    if (r != 0 && r != -ENOENT) {
      backup::LogError("writing back the cached pages of drive '" + d->name() +
                       "': " + std::strerror(-r));
      continue;
    }
    const backup::DriveStats after = d->Stats();
    backup::LogDebug("drive '" + d->name() + "': cached pages written back (" +
                     std::to_string(after.writes - before.writes) + " writes, " +
                     std::to_string(after.write_bytes - before.write_bytes) + " bytes, " +
                     std::to_string(std::chrono::duration_cast<std::chrono::microseconds>(
                                        std::chrono::steady_clock::now() - start)
                                        .count()) +
                     " us)");
  }
}

int CbwFs::NameChangeError(fuse_ino_t parent) const {
  return parent == kJobsIno || parent == kSnapshotsIno ? EROFS : EPERM;
}

void CbwFs::Rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) {
  fuse_reply_err(req, NameChangeError(parent));
}

void CbwFs::NewName(fuse_req_t req, fuse_ino_t parent) {
  fuse_reply_err(req, NameChangeError(parent));
}

void CbwFs::Rename(fuse_req_t req, fuse_ino_t parent, fuse_ino_t newparent) {
  int e = NameChangeError(parent);
  fuse_reply_err(req, e == EROFS ? e : NameChangeError(newparent));
}

void CbwFs::Fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                      fuse_file_info* fi) {
  NodeTable::Node n = nodes_.Resolve(ino);
  if (n.kind != Kind::kDrive) return (void)fuse_reply_err(req, EOPNOTSUPP);
  backup::Drive* d = registry_->drives()[n.drive];
  if (d->readonly()) return (void)fuse_reply_err(req, EROFS);
  if (off < 0 || len <= 0) return (void)fuse_reply_err(req, EINVAL);
  uint64_t uoff = static_cast<uint64_t>(off), ulen = static_cast<uint64_t>(len);
  backup::Drive::OpKind kind;
  if (mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)) {
    kind = backup::Drive::OpKind::kPunch;
  } else if ((mode & ~FALLOC_FL_KEEP_SIZE) == FALLOC_FL_ZERO_RANGE) {
    // Without KEEP_SIZE a zeroing may not reach past the end of the device.
    if (!(mode & FALLOC_FL_KEEP_SIZE) && uoff + ulen > d->size()) {
      return (void)fuse_reply_err(req, ENOSPC);
    }
    kind = backup::Drive::OpKind::kZero;
  } else {
    return (void)fuse_reply_err(req, EOPNOTSUPP);
  }
  d->Submit({kind, nullptr, static_cast<size_t>(ulen), uoff}, [req](backup::Result<size_t> r) {
    fuse_reply_err(req, r.ok() ? 0 : r.status().code());
  });
}

void CbwFs::Lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, fuse_file_info* fi) {
  if (whence != SEEK_DATA && whence != SEEK_HOLE) return (void)fuse_reply_err(req, EINVAL);
  if (off < 0) return (void)fuse_reply_err(req, ENXIO);
  NodeTable::Node n = nodes_.Resolve(ino);
  backup::Result<uint64_t> r = backup::Status::Error(EINVAL, "");
  if (n.kind == Kind::kDrive) {
    r = registry_->drives()[n.drive]->Seek(static_cast<uint64_t>(off), whence);
  } else if (n.kind == Kind::kView) {
    r = registry_->SeekSnapshot(n.name, static_cast<uint64_t>(off), whence);
  }
  if (!r.ok()) return (void)fuse_reply_err(req, r.status().code());
  fuse_reply_lseek(req, static_cast<off_t>(*r));
}

void CbwFs::Poll(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi, fuse_pollhandle* ph) {
  if (nodes_.Resolve(ino).kind != Kind::kEvents) {
    if (ph) fuse_pollhandle_destroy(ph);
    return (void)fuse_reply_poll(req, POLLIN | POLLOUT);
  }
  events_.Poll(req, reinterpret_cast<EventsFile::Reader*>(fi->fh), ph);
}

void CbwFs::StatFs(fuse_req_t req, fuse_ino_t ino) {
  struct statvfs sv {};
  uint64_t total = 0;
  for (backup::Drive* d : registry_->drives()) total += d->size();
  sv.f_bsize = sv.f_frsize = 4096;
  sv.f_blocks = total / 4096;
  sv.f_namemax = 255;
  fuse_reply_statfs(req, &sv);
}

namespace {

// C trampolines: each op reaches its CbwFs through fuse_req_userdata.
const fuse_lowlevel_ops kOps = [] {
  fuse_lowlevel_ops o{};
  o.init = [](void* ud, fuse_conn_info* c) {
    backup::RunGuarded("FUSE init", [&] { static_cast<CbwFs*>(ud)->Init(c); });
  };
  o.lookup = [](fuse_req_t r, fuse_ino_t p, const char* n) {
    Guard(r, [&] { Self(r)->Lookup(r, p, n); });
  };
  o.forget = [](fuse_req_t r, fuse_ino_t, uint64_t) { fuse_reply_none(r); };
  o.forget_multi = [](fuse_req_t r, size_t, fuse_forget_data*) { fuse_reply_none(r); };
  o.getattr = [](fuse_req_t r, fuse_ino_t i, fuse_file_info*) {
    Guard(r, [&] { Self(r)->GetAttr(r, i); });
  };
  o.setattr = [](fuse_req_t r, fuse_ino_t i, struct stat* a, int s, fuse_file_info*) {
    Guard(r, [&] { Self(r)->SetAttr(r, i, a, s); });
  };
  o.open = [](fuse_req_t r, fuse_ino_t i, fuse_file_info* f) {
    Guard(r, [&] { Self(r)->Open(r, i, f); });
  };
  o.read = [](fuse_req_t r, fuse_ino_t i, size_t s, off_t off, fuse_file_info* f) {
    Guard(r, [&] { Self(r)->Read(r, i, s, off, f); });
  };
  o.write = [](fuse_req_t r, fuse_ino_t i, const char* b, size_t s, off_t off, fuse_file_info* f) {
    Guard(r, [&] { Self(r)->Write(r, i, b, s, off, f); });
  };
  o.flush = [](fuse_req_t r, fuse_ino_t, fuse_file_info*) { fuse_reply_err(r, 0); };
  o.release = [](fuse_req_t r, fuse_ino_t i, fuse_file_info* f) {
    Guard(r, [&] { Self(r)->Release(r, i, f); });
  };
  o.fsync = [](fuse_req_t r, fuse_ino_t i, int d, fuse_file_info* f) {
    Guard(r, [&] { Self(r)->Fsync(r, i, d, f); });
  };
  o.opendir = [](fuse_req_t r, fuse_ino_t i, fuse_file_info* f) {
    Guard(r, [&] { Self(r)->OpenDir(r, i, f); });
  };
  o.readdir = [](fuse_req_t r, fuse_ino_t i, size_t s, off_t off, fuse_file_info* f) {
    Guard(r, [&] { Self(r)->ReadDir(r, i, s, off, f); });
  };
  o.releasedir = [](fuse_req_t r, fuse_ino_t i, fuse_file_info* f) {
    Guard(r, [&] { Self(r)->ReleaseDir(r, i, f); });
  };
  o.fsyncdir = [](fuse_req_t r, fuse_ino_t, int, fuse_file_info*) { fuse_reply_err(r, 0); };
  o.unlink = [](fuse_req_t r, fuse_ino_t p, const char* n) {
    Guard(r, [&] { Self(r)->Unlink(r, p, n); });
  };
  o.rmdir = [](fuse_req_t r, fuse_ino_t p, const char* n) {
    Guard(r, [&] { Self(r)->Rmdir(r, p, n); });
  };
  o.create = [](fuse_req_t r, fuse_ino_t p, const char*, mode_t, fuse_file_info*) {
    Guard(r, [&] { Self(r)->NewName(r, p); });
  };
  o.mknod = [](fuse_req_t r, fuse_ino_t p, const char*, mode_t, dev_t) {
    Guard(r, [&] { Self(r)->NewName(r, p); });
  };
  o.mkdir = [](fuse_req_t r, fuse_ino_t p, const char*, mode_t) {
    Guard(r, [&] { Self(r)->NewName(r, p); });
  };
  o.symlink = [](fuse_req_t r, const char*, fuse_ino_t p, const char*) {
    Guard(r, [&] { Self(r)->NewName(r, p); });
  };
  o.link = [](fuse_req_t r, fuse_ino_t, fuse_ino_t p, const char*) {
    Guard(r, [&] { Self(r)->NewName(r, p); });
  };
  o.rename = [](fuse_req_t r, fuse_ino_t p, const char*, fuse_ino_t np, const char*, unsigned) {
    Guard(r, [&] { Self(r)->Rename(r, p, np); });
  };
  o.fallocate = [](fuse_req_t r, fuse_ino_t i, int m, off_t off, off_t len, fuse_file_info* f) {
    Guard(r, [&] { Self(r)->Fallocate(r, i, m, off, len, f); });
  };
  o.lseek = [](fuse_req_t r, fuse_ino_t i, off_t off, int w, fuse_file_info* f) {
    Guard(r, [&] { Self(r)->Lseek(r, i, off, w, f); });
  };
  o.poll = [](fuse_req_t r, fuse_ino_t i, fuse_file_info* f, fuse_pollhandle* ph) {
    Guard(r, [&] { Self(r)->Poll(r, i, f, ph); });
  };
  o.statfs = [](fuse_req_t r, fuse_ino_t i) { Guard(r, [&] { Self(r)->StatFs(r, i); }); };
  return o;
}();

}  // namespace

const fuse_lowlevel_ops& CbwFs::Ops() { return kOps; }

}  // namespace cbw::fs
