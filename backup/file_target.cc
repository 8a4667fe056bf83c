#include "backup/file_target.h"

#include <fcntl.h>
#include <liburing.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>

#include "backup/drive.h"
#include "backup/log.h"
#include "backup/posix_io.h"
#include "backup/uring.h"

namespace cbw::backup {
namespace {

Status OpenError(const TargetRequest& req, bool creating, int err) {
  return Status::FromErrno(err,
                           (creating ? "Could not create '" : "Could not open '") + req.spec + "'");
}

Status NotFileOrDevice(const TargetRequest& req) {
  return Status::Error(EINVAL, "Target '" + req.spec + "' is not a regular file or block device");
}

// The copier's queue on a file target: an io_uring ring of its own. Short
// writes are resubmitted for the rest; zero ranges are done synchronously
// (fallocate is quick, and rare next to data).
class FileQueue : public TargetQueue {
 public:
  FileQueue(FileTarget* target, unsigned depth) : target_(target), depth_(depth) {}
  ~FileQueue() override {
    if (ring_ok_) ExitRing(&ring_);
    if (event_fd_ >= 0) close(event_fd_);
  }

  Status Init() {
    int r = InitRing(depth_ + 2, &ring_);
    ring_ok_ = r == 0;
    if (ring_ok_) {
      // Completions are announced on an eventfd (a counter: level-triggered
      // and never missed), which the copier polls; the ring's own fd is
      // the fallback.
      event_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
      if (event_fd_ >= 0 && io_uring_register_eventfd(&ring_, event_fd_) != 0) {
        close(event_fd_);
        event_fd_ = -1;
      }
    } else {
      // No io_uring (e.g. a seccomp filter): requests run synchronously and
      // an always-readable eventfd says so.
      event_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
      if (event_fd_ < 0) return Status::FromErrno(errno, "eventfd");
      LogWarn("io_uring unavailable (" + std::string(std::strerror(-r)) +
              "); writing the target synchronously");
    }
    return Status::Ok();
  }

  int poll_fd() const override { return event_fd_ >= 0 ? event_fd_ : ring_.ring_fd; }
  unsigned in_flight() const override { return static_cast<unsigned>(reqs_.size()); }

  void SubmitWrite(const char* buf, size_t len, uint64_t off, uint64_t tag) override {
    Req& r = reqs_.emplace_back();
    r.tag = tag;
    r.buf = buf;
    r.len = len;
    r.off = off;
    Issue(r);
  }

  void SubmitZeroes(uint64_t off, uint64_t len, uint64_t tag) override {
    Status s = target_->WriteZeroes(off, len);
    Finish(tag, s.ok() ? 0 : s.code());
  }

  void StartWriteback() override {
    io_uring_sqe* sqe = ring_ok_ ? io_uring_get_sqe(&ring_) : nullptr;
    if (sqe == nullptr) {
      sync_file_range(target_->fd(), 0, 0, SYNC_FILE_RANGE_WRITE);
      return;
    }
    io_uring_prep_sync_file_range(sqe, target_->fd(), 0, 0, SYNC_FILE_RANGE_WRITE);
    io_uring_sqe_set_data64(sqe, kHintTag);
    if (Submit()) ++hints_;
  }

  void Reap(std::vector<TargetCompletion>* out) override {
    if (event_fd_ >= 0) {
      // Reset first: a completion after this read counts again.
      uint64_t v;
      if (read(event_fd_, &v, sizeof v) < 0) { /* nothing pending */
      }
    }
    if (ring_ok_) {
      io_uring_cqe* cqe = nullptr;
      while (io_uring_peek_cqe(&ring_, &cqe) == 0 && cqe != nullptr) {
        uint64_t id = io_uring_cqe_get_data64(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&ring_, cqe);
        if (id == kHintTag) {
          --hints_;  // only a hint: its result does not matter
          continue;
        }
        auto it =
            std::find_if(reqs_.begin(), reqs_.end(), [&](const Req& r) { return r.id == id; });
        if (it == reqs_.end()) continue;
        if (res < 0) {
          Finish(it, -res);
        } else if (res == 0) {
          Finish(it, EIO);
        } else {
          it->pos += static_cast<size_t>(res);
          if (it->pos < it->len) {
            Issue(*it);
          } else {
            Finish(it, 0);
          }
        }
      }
    }
    out->insert(out->end(), done_.begin(), done_.end());
    done_.clear();
  }

 private:
  static constexpr uint64_t kHintTag = ~uint64_t{0};
  struct Req {
    uint64_t id = 0;  // the ring's user_data
    uint64_t tag = 0;
    const char* buf = nullptr;
    size_t len = 0, pos = 0;
    uint64_t off = 0;
  };

  bool Submit() {
    int r = io_uring_submit(&ring_);
    if (r < 0) {
      LogWarn(std::string("io_uring_submit: ") + std::strerror(-r));
      return false;
    }
    return true;
  }

  void Issue(Req& r) {
    r.id = next_id_++;
    io_uring_sqe* sqe = ring_ok_ ? io_uring_get_sqe(&ring_) : nullptr;
    if (sqe != nullptr) {
      io_uring_prep_write(sqe, target_->fd(), r.buf + r.pos, static_cast<unsigned>(r.len - r.pos),
                          r.off + r.pos);
      io_uring_sqe_set_data64(sqe, r.id);
      if (Submit()) return;
      // The kernel took nothing: fall back to a synchronous write.
    }
    Status s =
        PwriteFull(target_->fd(), r.buf + r.pos, r.len - r.pos, r.off + r.pos, "write to target");
    auto it = std::find_if(reqs_.begin(), reqs_.end(), [&](const Req& q) { return &q == &r; });
    Finish(it, s.ok() ? 0 : s.code());
  }

  void Finish(std::deque<Req>::iterator it, int err) {
    uint64_t tag = it->tag;
    reqs_.erase(it);
    Finish(tag, err);
  }
  void Finish(uint64_t tag, int err) {
    done_.push_back({tag, err});
    if (event_fd_ >= 0) {
      uint64_t one = 1;
      if (write(event_fd_, &one, sizeof one) < 0) { /* the counter cannot overflow here */
      }
    }
  }

  FileTarget* const target_;
  const unsigned depth_;
  io_uring ring_{};
  bool ring_ok_ = false;
  int event_fd_ = -1;
  uint64_t next_id_ = 1;
  unsigned hints_ = 0;
  std::deque<Req> reqs_;
  std::vector<TargetCompletion> done_;
};

}  // namespace

Result<std::shared_ptr<FileTarget>> FileTarget::Open(const TargetRequest& req, ResolvedPath where,
                                                     const std::vector<Drive*>& drives) {
  const bool creating = req.mode == TargetMode::kAbsolutePaths;
  std::shared_ptr<FileTarget> t(new FileTarget());
  t->display_ =
      req.spec[0] == '/' || req.base_dir.empty() ? req.spec : req.base_dir + "/" + req.spec;
  t->path_ = where.path;
  t->name_ = where.name;
  struct stat st = where.st;
  if (!where.exists) {
    if (!creating) return OpenError(req, false, ENOENT);
    int fd = openat(where.parent.get(), where.name.c_str(),
                    O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, 0644);
    if (fd < 0) return OpenError(req, true, errno);
    t->fd_.Reset(fd);
    t->parent_ = std::move(where.parent);
    t->created_ = true;
    if (fstat(fd, &st) != 0) {
      Status s = OpenError(req, true, errno);
      t->Discard();
      return s;
    }
  } else {
    // Never open what is not a file or device (a FIFO would block, a
    // directory cannot be written).
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) return NotFileOrDevice(req);
  }
  auto refuse = [&](Status s) -> Result<std::shared_ptr<FileTarget>> {
    t->Discard();
    return s;
  };
  for (Drive* d : drives) {
    if (d->dev() == (S_ISBLK(st.st_mode) ? st.st_rdev : st.st_dev) &&
        d->ino() == (S_ISBLK(st.st_mode) ? 0 : st.st_ino)) {
      return refuse(Status::Error(
          EINVAL, "Target '" + req.spec + "' is the source of drive '" + d->name() + "'"));
    }
  }
  if (!t->created_) {
    int fd = openat(where.parent.get(), where.name.c_str(),
                    O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) return OpenError(req, false, errno);
    t->fd_.Reset(fd);
    struct stat st2 {};
    if (fstat(fd, &st2) != 0) return OpenError(req, false, errno);
    if (st2.st_dev != st.st_dev || st2.st_ino != st.st_ino) {
      return Status::Error(EAGAIN, "Target '" + req.spec + "' changed while being opened");
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0) {
      return OpenError(req, false, errno);
    }
    st = st2;
  }
  t->is_block_ = S_ISBLK(st.st_mode);
  t->dev_ = t->is_block_ ? st.st_rdev : st.st_dev;
  t->ino_ = t->is_block_ ? 0 : st.st_ino;
  t->identity_ = "file:" + std::to_string(t->dev_) + ":" + std::to_string(t->ino_);
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (t->is_block_ && ioctl(t->fd_.get(), BLKGETSIZE64, &size) != 0) {
    return refuse(OpenError(req, false, errno));
  }
  if ((req.mode == TargetMode::kExisting || t->is_block_) && size < req.size) {
    return refuse(Status::Error(EINVAL, "Target '" + req.spec + "' is smaller than the drive (" +
                                            std::to_string(size) + " < " +
                                            std::to_string(req.size) + " bytes)"));
  }
  if (req.mode == TargetMode::kExisting && !req.format) {
    unsigned char head[512] = {};
    Result<size_t> n = PreadFull(t->fd_.get(), head, sizeof(head), 0);
    if (!n.ok()) return OpenError(req, false, n.status().code());
    if (auto fmt = ProbeImageFormat(head, *n)) {
      return Status::Error(EINVAL, "Target '" + req.spec + "' is a " + *fmt +
                                       " image; refusing to overwrite it as raw "
                                       "(give format 'raw' to force)");
    }
  }
  t->truncate_ = !t->is_block_ && creating;
  t->zeroed_ = t->truncate_;
  t->size_ = t->truncate_ ? req.size : size;
  if (!t->created_) t->parent_ = std::move(where.parent);
  return t;
}

FileTarget::~FileTarget() = default;

Status FileTarget::Prepare() {
  if (!truncate_) return Status::Ok();
  if (ftruncate(fd_.get(), 0) != 0 || ftruncate(fd_.get(), static_cast<off_t>(size_)) != 0) {
    return Status::FromErrno(errno, "Could not truncate '" + display_ + "'");
  }
  return Status::Ok();
}

void FileTarget::Discard() {
  fd_.Reset();
  if (created_) {
    unlinkat(parent_.get(), name_.c_str(), 0);
    created_ = false;
  }
}

Status FileTarget::Write(const char* buf, size_t len, uint64_t off) {
  return PwriteFull(fd_.get(), buf, len, off, "write to target");
}

Status FileTarget::WriteZeroes(uint64_t off, uint64_t len) {
  int mode = is_block_ ? (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
                       : (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
  if (fallocate(fd_.get(), mode, static_cast<off_t>(off), static_cast<off_t>(len)) == 0) {
    return Status::Ok();
  }
  if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL) {
    return Status::FromErrno(errno, "zero target");
  }
  return PwriteZeroes(fd_.get(), off, len, "write to target");
}

Status FileTarget::Read(char* buf, size_t len, uint64_t off) {
  Result<size_t> n = PreadFull(fd_.get(), buf, len, off);
  if (!n.ok()) return Status::FromErrno(n.status().code(), "read from target");
  if (*n < len) std::memset(buf + *n, 0, len - *n);
  return Status::Ok();
}

Result<uint64_t> FileTarget::Seek(uint64_t off, int whence) {
  off_t r = lseek(fd_.get(), static_cast<off_t>(off), whence);
  if (r < 0) return Status::FromErrno(errno, "seek in target");
  return static_cast<uint64_t>(r);
}

Status FileTarget::Flush() {
  if (fsync(fd_.get()) != 0) return Status::FromErrno(errno, "fsync of target");
  return Status::Ok();
}

Result<std::unique_ptr<TargetQueue>> FileTarget::OpenQueue(unsigned depth) {
  auto q = std::make_unique<FileQueue>(this, depth);
  if (Status s = q->Init(); !s.ok()) return s;
  return std::unique_ptr<TargetQueue>(std::move(q));
}

}  // namespace cbw::backup
