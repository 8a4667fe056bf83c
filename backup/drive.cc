#include "backup/drive.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace cbw::backup {
namespace {

// QEMU's image locking uses OFD locks on bytes 100.. (permissions taken) and
// 200.. (permissions not shared). Holding a lock over the whole band makes
// QEMU refuse the image while cbwfs has it, and makes cbwfs refuse an image
// QEMU holds.
constexpr off_t kQemuLockStart = 100;
constexpr off_t kQemuLockLen = 200;

Status LockSource(int fd, const std::string& path, bool readonly) {
  if (flock(fd, (readonly ? LOCK_SH : LOCK_EX) | LOCK_NB) != 0) {
    int e = errno;
    if (e == EWOULDBLOCK) {
      return Status::Error(EBUSY, "Failed to lock '" + path + "': it is in use by another cbwfs (" +
                                      std::strerror(EBUSY) + ")");
    }
    return Status::FromErrno(e, "Failed to lock '" + path + "'");
  }
  struct flock fl {};
  fl.l_whence = SEEK_SET;
  fl.l_start = kQemuLockStart;
  fl.l_len = kQemuLockLen;
  // Any other holder of a lock in the band (QEMU, or another cbwfs) conflicts
  // with a write lock: test for that first, then take ours.
  fl.l_type = F_WRLCK;
  if (fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK) {
    return Status::Error(EBUSY, "Failed to get lock on '" + path +
                                    "': is another process (QEMU?) using the image? (" +
                                    std::strerror(EBUSY) + ")");
  }
  fl = {};
  fl.l_whence = SEEK_SET;
  fl.l_start = kQemuLockStart;
  fl.l_len = kQemuLockLen;
  fl.l_type = readonly ? F_RDLCK : F_WRLCK;
  if (fcntl(fd, F_OFD_SETLK, &fl) != 0) {
    int e = errno;
    if (e == EAGAIN || e == EACCES) {
      return Status::Error(EBUSY, "Failed to get lock on '" + path +
                                      "': is another process (QEMU?) using the image? (" +
                                      std::strerror(EBUSY) + ")");
    }
    return Status::FromErrno(e, "Failed to lock '" + path + "'");
  }
  return Status::Ok();
}

Status PwriteAll(int fd, const char* buf, size_t len, uint64_t off) {
  while (len > 0) {
    ssize_t n = pwrite(fd, buf, len, static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "write");
    }
    if (n == 0) return Status::Error(EIO, "write: wrote nothing");
    buf += n;
    len -= static_cast<size_t>(n);
    off += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status WriteZeroes(int fd, uint64_t off, uint64_t len) {
  static const std::vector<char> kZeros(1 << 20, 0);
  while (len > 0) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(len, kZeros.size()));
    Status s = PwriteAll(fd, kZeros.data(), n, off);
    if (!s.ok()) return s;
    off += n;
    len -= n;
  }
  return Status::Ok();
}

}  // namespace

// RAII for one writer's stay inside the gate.
class Drive::GateGuard {
 public:
  explicit GateGuard(Drive* d) : d_(d) { d_->EnterGate(); }
  ~GateGuard() { d_->LeaveGate(); }
  GateGuard(const GateGuard&) = delete;
  GateGuard& operator=(const GateGuard&) = delete;

 private:
  Drive* d_;
};

Result<std::unique_ptr<Drive>> Drive::Open(const DriveConfig& config) {
  int flags = (config.readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
  UniqueFd fd(::open(config.path.c_str(), flags));
  if (!fd.valid()) return Status::FromErrno(errno, "Could not open '" + config.path + "'");
  struct stat st {};
  if (fstat(fd.get(), &st) != 0)
    return Status::FromErrno(errno, "Could not stat '" + config.path + "'");
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    return Status::Error(EINVAL, "'" + config.path + "' is not a regular file or block device");
  }
  // O_NONBLOCK only kept a FIFO from blocking the open; drop it.
  fcntl(fd.get(), F_SETFL, fcntl(fd.get(), F_GETFL) & ~O_NONBLOCK);
  Status s = LockSource(fd.get(), config.path, config.readonly);
  if (!s.ok()) return s;

  std::unique_ptr<Drive> d(new Drive());
  d->name_ = config.name;
  d->path_ = config.path;
  d->readonly_ = config.readonly;
  d->is_block_ = S_ISBLK(st.st_mode);
  d->dev_ = st.st_dev;
  d->ino_ = st.st_ino;
  if (d->is_block_) {
    uint64_t bytes = 0;
    if (ioctl(fd.get(), BLKGETSIZE64, &bytes) != 0) {
      return Status::FromErrno(errno, "Could not get the size of '" + config.path + "'");
    }
    d->size_ = bytes;
    int lbs = 0;
    if (ioctl(fd.get(), BLKSSZGET, &lbs) == 0 && lbs > 0) d->align_ = static_cast<uint64_t>(lbs);
    // For block devices the identity that matters is the device itself.
    d->dev_ = st.st_rdev;
    d->ino_ = 0;
  } else {
    d->size_ = static_cast<uint64_t>(st.st_size);
  }
  d->fd_ = std::move(fd);
  return d;
}

Drive::~Drive() {
  if (fd_.valid() && !readonly_) fsync(fd_.get());
}

void Drive::EnterGate() {
  for (;;) {
    in_flight_.fetch_add(1, std::memory_order_seq_cst);
    if (!closed_.load(std::memory_order_seq_cst)) return;
    // An installer is closing the gate: step back out and wait for it.
    LeaveGate();
    std::unique_lock lock(gate_mu_);
    gate_cv_.wait(lock, [this] { return !closed_.load(std::memory_order_seq_cst); });
  }
}

void Drive::LeaveGate() {
  if (in_flight_.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
      closed_.load(std::memory_order_seq_cst)) {
    std::lock_guard lock(gate_mu_);
    gate_cv_.notify_all();
  }
}

void Drive::CloseGate() {
  install_mu_.lock();
  closed_.store(true, std::memory_order_seq_cst);
  std::unique_lock lock(gate_mu_);
  gate_cv_.wait(lock, [this] { return in_flight_.load(std::memory_order_seq_cst) == 0; });
}

void Drive::OpenGate() {
  {
    std::lock_guard lock(gate_mu_);
    closed_.store(false, std::memory_order_seq_cst);
  }
  gate_cv_.notify_all();
  install_mu_.unlock();
}

void Drive::InstallHooks(const std::vector<std::pair<Drive*, std::shared_ptr<WriteHook>>>& hooks) {
  std::vector<Drive*> drives;
  for (const auto& [d, h] : hooks) drives.push_back(d);
  std::sort(drives.begin(), drives.end());
  drives.erase(std::unique(drives.begin(), drives.end()), drives.end());
  for (Drive* d : drives) d->CloseGate();
  for (const auto& [d, h] : hooks) d->hooks_.push_back(h);
  for (auto it = drives.rbegin(); it != drives.rend(); ++it) (*it)->OpenGate();
}

void Drive::RemoveHook(const WriteHook* hook) {
  CloseGate();
  hooks_.erase(std::remove_if(hooks_.begin(), hooks_.end(),
                              [hook](const auto& h) { return h.get() == hook; }),
               hooks_.end());
  OpenGate();
}

template <class Op>
Status Drive::RunHooksThen(uint64_t off, uint64_t len, Op op) {
  GateGuard guard(this);
  for (const auto& hook : hooks_) {
    Status s = hook->BeforeWrite(off, len);
    if (!s.ok()) return s;
  }
  return op();
}

Result<size_t> Drive::Read(void* buf, size_t len, uint64_t off) const {
  if (off >= size_) return size_t{0};
  len = static_cast<size_t>(std::min<uint64_t>(len, size_ - off));
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd_.get(), static_cast<char*>(buf) + done, len - done,
                      static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "read of '" + path_ + "'");
    }
    if (n == 0) {  // the file shrank under us: read as zeroes, like a device
      std::memset(static_cast<char*>(buf) + done, 0, len - done);
      break;
    }
    done += static_cast<size_t>(n);
  }
  return len;
}

Result<size_t> Drive::Write(const void* buf, size_t len, uint64_t off) {
  if (readonly_) return Status::Error(EROFS, "drive '" + name_ + "' is read-only");
  if (len == 0) return size_t{0};
  if (off >= size_) return Status::Error(ENOSPC, "write past the end of drive '" + name_ + "'");
  len = static_cast<size_t>(std::min<uint64_t>(len, size_ - off));
  Status s = RunHooksThen(
      off, len, [&] { return PwriteAll(fd_.get(), static_cast<const char*>(buf), len, off); });
  if (!s.ok()) return s;
  return len;
}

Status Drive::ZeroSource(int mode, uint64_t off, uint64_t len) {
  uint64_t a = (off + align_ - 1) / align_ * align_;
  uint64_t b = (off + len) / align_ * align_;
  if (a < b) {
    int r = fallocate(fd_.get(), mode | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(a),
                      static_cast<off_t>(b - a));
    // tmpfs and others lack ZERO_RANGE: a punched hole reads as zeroes too.
    if (r != 0 && errno == EOPNOTSUPP && mode == FALLOC_FL_ZERO_RANGE) {
      r = fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(a),
                    static_cast<off_t>(b - a));
    }
    if (r != 0) {
      if (errno != EOPNOTSUPP) return Status::FromErrno(errno, "fallocate");
      // Same contents, no hole.
      return WriteZeroes(fd_.get(), off, len);
    }
  } else {
    a = b = off + len;
  }
  Status s = WriteZeroes(fd_.get(), off, a - off);
  if (!s.ok()) return s;
  return WriteZeroes(fd_.get(), b, off + len - b);
}

Status Drive::PunchHole(uint64_t off, uint64_t len) {
  if (readonly_) return Status::Error(EROFS, "drive '" + name_ + "' is read-only");
  if (off >= size_ || len == 0) return Status::Ok();
  len = std::min<uint64_t>(len, size_ - off);
  return RunHooksThen(off, len, [&] { return ZeroSource(FALLOC_FL_PUNCH_HOLE, off, len); });
}

Status Drive::ZeroRange(uint64_t off, uint64_t len) {
  if (readonly_) return Status::Error(EROFS, "drive '" + name_ + "' is read-only");
  if (off >= size_ || len == 0) return Status::Ok();
  len = std::min<uint64_t>(len, size_ - off);
  return RunHooksThen(off, len, [&] { return ZeroSource(FALLOC_FL_ZERO_RANGE, off, len); });
}

Status Drive::Flush(bool datasync) {
  int r = datasync ? fdatasync(fd_.get()) : fsync(fd_.get());
  if (r != 0) return Status::FromErrno(errno, "fsync of '" + path_ + "'");
  return Status::Ok();
}

Result<uint64_t> Drive::Seek(uint64_t off, int whence) const {
  if (off >= size_) return Status::Error(ENXIO, "seek past the end");
  off_t r = lseek(fd_.get(), static_cast<off_t>(off), whence);
  if (r < 0) {
    // Past the last data of a file shorter on disk than the drive: all hole.
    if (errno == ENXIO && whence == SEEK_HOLE) return off;
    return Status::FromErrno(errno, "seek");
  }
  return std::min<uint64_t>(static_cast<uint64_t>(r), size_);
}

uint64_t Drive::AllocatedBytes() const {
  struct stat st {};
  if (fstat(fd_.get(), &st) != 0) return 0;
  if (is_block_) return size_;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

}  // namespace cbw::backup
