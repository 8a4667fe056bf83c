#include "backup/drive.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <future>
#include <thread>

#include "backup/log.h"
#include "backup/posix_io.h"
#include "backup/threads.h"
#include "backup/worker_pool.h"

namespace cbw::backup {
namespace {

// QEMU's image locking uses OFD locks on bytes 100.. (permissions taken) and
// 200.. (permissions not shared). Holding a lock over the whole band makes
// QEMU refuse the image while cbwfs has it, and makes cbwfs refuse an image
// QEMU holds.
constexpr off_t kQemuLockStart = 100;
constexpr off_t kQemuLockLen = 200;

Status HeldByCbwfsError(const std::string& path) {
  return Status::Error(EBUSY, "Failed to lock '" + path + "': it is in use by another cbwfs (" +
                                  std::strerror(EBUSY) + ")");
}

// Whether a cbwfs holds `path` (its flock, which only cbwfs takes), for a
// block device whose exclusive open failed: another cbwfs is worth waiting
// for, a mount or mkfs is not.
bool HeldByCbwfs(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
  return fd.valid() && flock(fd.get(), LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
}

// Sets *held_by_cbwfs when the lock that refused is another cbwfs's.
Status LockSource(int fd, const std::string& path, bool readonly, bool* held_by_cbwfs) {
  if (flock(fd, (readonly ? LOCK_SH : LOCK_EX) | LOCK_NB) != 0) {
    int e = errno;
    if (e == EWOULDBLOCK) {
      *held_by_cbwfs = true;
      return HeldByCbwfsError(path);
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

}  // namespace

namespace {
// The slow path's writer threads per drive: a write parked there holds only
// memory (a copy of its data), not a FUSE worker.
constexpr unsigned kSlowWriters = 64;
// How long a dying Drive waits for slow-path writes still in flight (each is
// bounded by the CBW timeout, and jobs are cancelled before drives close).
constexpr auto kDrainTimeout = std::chrono::seconds(35);
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

// RAII for a closed gate on several drives (in address order, so two
// closers of overlapping sets cannot deadlock), reopened in reverse.
class Drive::GateClosure {
 public:
  explicit GateClosure(std::vector<Drive*> drives) : drives_(std::move(drives)) {
    std::sort(drives_.begin(), drives_.end());
    drives_.erase(std::unique(drives_.begin(), drives_.end()), drives_.end());
    for (Drive* d : drives_) d->CloseGate();
  }
  ~GateClosure() {
    for (auto it = drives_.rbegin(); it != drives_.rend(); ++it) (*it)->OpenGate();
  }
  GateClosure(const GateClosure&) = delete;
  GateClosure& operator=(const GateClosure&) = delete;

 private:
  std::vector<Drive*> drives_;
};
namespace {

// Opens, checks and locks the source once; fills *st. Sets *held_by_cbwfs
// when another cbwfs holds it.
Result<UniqueFd> OpenSource(const DriveConfig& config, struct stat* st, bool* held_by_cbwfs) {
  const std::string& path = config.path;
  // Block devices are held exclusively: a write that bypasses cbwfs would
  // not be copied before it lands, and a mount or mkfs would be one.
  struct stat pre {};
  bool block = ::stat(path.c_str(), &pre) == 0 && S_ISBLK(pre.st_mode);
  int flags = (config.readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOCTTY | O_NONBLOCK |
              (block ? O_EXCL : 0);
  UniqueFd fd(::open(path.c_str(), flags));
  if (!fd.valid()) {
    int e = errno;
    if (e == EBUSY && block) {
      if (HeldByCbwfs(path)) {
        *held_by_cbwfs = true;
        return HeldByCbwfsError(path);
      }
      return Status::Error(EBUSY, "Could not open '" + path +
                                      "' exclusively: it is in use (mounted, or held by mkfs, "
                                      "QEMU or another program) (" +
                                      std::strerror(EBUSY) + ")");
    }
    return Status::FromErrno(e, "Could not open '" + path + "'");
  }
  if (fstat(fd.get(), st) != 0) return Status::FromErrno(errno, "Could not stat '" + path + "'");
  if (!S_ISREG(st->st_mode) && !S_ISBLK(st->st_mode)) {
    return Status::Error(EINVAL, "'" + path + "' is not a regular file or block device");
  }
  if (S_ISBLK(st->st_mode) && !block) {
    // Replaced by a device between the stat and the open: not held exclusively.
    return Status::Error(EAGAIN, "'" + path + "' changed while it was opened; try again");
  }
  // O_NONBLOCK only kept a FIFO from blocking the open; drop it.
  int fl = fcntl(fd.get(), F_GETFL);
  if (fl < 0 || fcntl(fd.get(), F_SETFL, fl & ~O_NONBLOCK) != 0) {
    return Status::FromErrno(errno, "Could not open '" + path + "'");
  }
  Status s = LockSource(fd.get(), path, config.readonly, held_by_cbwfs);
  if (!s.ok()) return s;
  return fd;
}

}  // namespace

Result<std::unique_ptr<Drive>> Drive::Open(const DriveConfig& config) {
  // A cbwfs that is still exiting (flushing its sources) holds them for a
  // moment after its mount is gone: a restart right after an unmount waits
  // for it rather than failing.
  const auto deadline = std::chrono::steady_clock::now() + config.lock_wait;
  bool waited = false;
  struct stat st {};
  UniqueFd fd;
  for (;;) {
    bool held_by_cbwfs = false;
    Result<UniqueFd> r = OpenSource(config, &st, &held_by_cbwfs);
    if (r.ok()) {
      fd = std::move(r).value();
      break;
    }
    if (!held_by_cbwfs || std::chrono::steady_clock::now() >= deadline) return r.status();
    if (!waited) {
      auto ms = config.lock_wait.count();
      LogWarn("'" + config.path + "' is in use by another cbwfs (one still stopping?): waiting " +
              "up to " +
              (ms % 1000 == 0 ? std::to_string(ms / 1000) + " s" : std::to_string(ms) + " ms") +
              " for it");
      waited = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (waited) LogInfo("'" + config.path + "' is free now");

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
  // No readahead on the source: cbwfs reads it in the sizes it needs (FUSE
  // reads, copies), and what readahead caches comes in large folios, into
  // which every later small write of the drive costs far more than into a
  // page of its own (4 KiB random writes through the mount: about half the
  // rate after a readahead read of the source; see issue 14's note).
  if (posix_fadvise(d->fd_.get(), 0, 0, POSIX_FADV_RANDOM) != 0) {
    LogDebug("drive '" + config.name + "': posix_fadvise(RANDOM) failed");
  }
  d->lease_ = std::make_shared<SourceLease>(d->fd_.get());
  d->slow_ = WorkerPool::Create("drive '" + config.name + "' writer", kSlowWriters,
                                std::chrono::seconds(10));
  return d;
}

Drive::~Drive() {
  if (slow_ && !slow_->WaitIdle(std::chrono::steady_clock::now() + kDrainTimeout)) {
    LogError("drive '" + name_ + "': writes still in flight at close");
  }
  if (slow_) slow_->Stop();
  if (lease_ && !lease_->Close(std::chrono::steady_clock::now() + kDrainTimeout)) {
    // A copy is still reading the source: its fd stays open (never reused
    // under it); the process is ending anyway.
    LogError("drive '" + name_ + "': a copy still reads the source at close");
    (void)fd_.Release();
  }
  if (fd_.valid() && !readonly_ && fsync(fd_.get()) != 0) {
    LogError("drive '" + name_ + "': fsync of '" + path_ + "' at close: " + std::strerror(errno));
  }
}

void Drive::EnterGate() {
  for (;;) {
    in_flight_.fetch_add(1, std::memory_order_seq_cst);
    if (!closed_.load(std::memory_order_seq_cst)) return;
    // A closer is closing the gate: step back out and wait for it.
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

void Drive::AtPointInTime(std::vector<Drive*> drives, const std::function<void()>& change) {
  GateClosure closed(std::move(drives));
  change();
}

void Drive::InstallHooks(const std::vector<std::pair<Drive*, std::shared_ptr<WriteHook>>>& hooks) {
  std::vector<Drive*> drives;
  for (const auto& [d, h] : hooks) drives.push_back(d);
  AtPointInTime(drives, [&] {
    for (const auto& [d, h] : hooks) d->AddHookWithGateClosed(h);
  });
}

void Drive::AddHookWithGateClosed(std::shared_ptr<WriteHook> hook) {
  hooks_.push_back(std::move(hook));
}

void Drive::RemoveHook(const WriteHook* hook) {
  GateClosure closed({this});
  hooks_.erase(std::remove_if(hooks_.begin(), hooks_.end(),
                              [hook](const auto& h) { return h.get() == hook; }),
               hooks_.end());
}

Result<size_t> Drive::Read(void* buf, size_t len, uint64_t off) const {
  if (off >= size_) return size_t{0};
  len = static_cast<size_t>(std::min<uint64_t>(len, size_ - off));
  Result<size_t> n = PreadFull(fd_.get(), buf, len, off);
  if (!n.ok()) return Status::FromErrno(n.status().code(), "read of '" + path_ + "'");
  // A file that shrank under us reads as zeroes, like a device.
  if (*n < len) std::memset(static_cast<char*>(buf) + *n, 0, len - *n);
  return len;
}

Result<size_t> Drive::Apply(const Op& op, bool may_block) {
  GateGuard guard(this);
  for (const auto& hook : hooks_) {
    Status s = hook->BeforeWrite(op.off, op.len, may_block);
    if (!s.ok()) return s;
  }
  if (Status s = RunSource(op); !s.ok()) return s;
  return op.kind == OpKind::kWrite ? op.len : 0;
}

Status Drive::RunSource(const Op& op) {
  switch (op.kind) {
    case OpKind::kWrite:
      return PwriteFull(fd_.get(), op.data, op.len, op.off, "write to source");
    case OpKind::kPunch:
      return ZeroSource(FALLOC_FL_PUNCH_HOLE, op.off, op.len);
    case OpKind::kZero:
      return ZeroSource(FALLOC_FL_ZERO_RANGE, op.off, op.len);
  }
  return Status::Error(EINVAL, "unknown operation");
}

void Drive::Submit(const Op& in, Done done) {
  Op op = in;
  // Writes are timed from here to completion, whichever path they take.
  const bool timed = op.kind == OpKind::kWrite;
  const uint64_t start = timed ? MonoNs() : 0;
  auto finish = [this, timed, start](Done& done, Result<size_t> r) {
    if (timed) NoteWrite(r, MonoNs() - start);
    done(std::move(r));
  };
  if (readonly_) return finish(done, Status::Error(EROFS, "drive '" + name_ + "' is read-only"));
  if (op.kind == OpKind::kWrite) {
    if (op.len == 0) return finish(done, size_t{0});
    if (op.off >= size_) {
      return finish(done, Status::Error(ENOSPC, "write past the end of drive '" + name_ + "'"));
    }
  } else if (op.off >= size_ || op.len == 0) {
    return done(size_t{0});
  }
  op.len = static_cast<size_t>(std::min<uint64_t>(op.len, size_ - op.off));
  Result<size_t> r = Apply(op, /*may_block=*/false);
  if (r.ok() || r.status().code() != EAGAIN) return finish(done, std::move(r));
  // The slow path: a thread that may wait runs it again from the start.
  std::shared_ptr<std::vector<char>> data;
  if (op.kind == OpKind::kWrite) {
    data = std::make_shared<std::vector<char>>(op.data, op.data + op.len);
    op.data = nullptr;
  }
  slow_->Submit([this, op, data, finish, done = std::move(done)]() mutable {
    if (data) op.data = data->data();
    Result<size_t> r = Status::Error(EIO, "drive write failed");
    RunGuarded("drive write", [&] { r = Apply(op, /*may_block=*/true); });
    finish(done, std::move(r));
  });
}

void Drive::NoteWrite(const Result<size_t>& r, uint64_t ns) {
  writes_.fetch_add(1, std::memory_order_relaxed);
  if (r.ok()) {
    write_bytes_.fetch_add(*r, std::memory_order_relaxed);
  } else {
    write_errors_.fetch_add(1, std::memory_order_relaxed);
  }
  const double seconds = static_cast<double>(ns) * 1e-9;
  size_t b = 0;
  while (b < kWriteLatencyBounds.size() && seconds > kWriteLatencyBounds[b]) ++b;
  latency_buckets_[b].fetch_add(1, std::memory_order_relaxed);
  latency_sum_ns_.fetch_add(ns, std::memory_order_relaxed);
}

void Drive::NoteCbwCopy(uint64_t bytes) {
  cbw_copies_.fetch_add(1, std::memory_order_relaxed);
  cbw_bytes_.fetch_add(bytes, std::memory_order_relaxed);
}

DriveStats Drive::Stats() const {
  DriveStats s;
  s.writes = writes_.load(std::memory_order_relaxed);
  s.write_errors = write_errors_.load(std::memory_order_relaxed);
  s.write_bytes = write_bytes_.load(std::memory_order_relaxed);
  s.cbw_copies = cbw_copies_.load(std::memory_order_relaxed);
  s.cbw_bytes = cbw_bytes_.load(std::memory_order_relaxed);
  for (size_t i = 0; i < latency_buckets_.size(); ++i) {
    s.latency_buckets[i] = latency_buckets_[i].load(std::memory_order_relaxed);
  }
  s.latency_sum_ns = latency_sum_ns_.load(std::memory_order_relaxed);
  return s;
}

namespace {
Result<size_t> SubmitAndWait(Drive* d, const Drive::Op& op) {
  std::promise<Result<size_t>> p;
  auto f = p.get_future();
  d->Submit(op, [&p](Result<size_t> r) { p.set_value(std::move(r)); });
  return f.get();
}
}  // namespace

Result<size_t> Drive::Write(const void* buf, size_t len, uint64_t off) {
  return SubmitAndWait(this, {OpKind::kWrite, static_cast<const char*>(buf), len, off});
}

Status Drive::PunchHole(uint64_t off, uint64_t len) {
  return SubmitAndWait(this, {OpKind::kPunch, nullptr, static_cast<size_t>(len), off}).status();
}

Status Drive::ZeroRange(uint64_t off, uint64_t len) {
  return SubmitAndWait(this, {OpKind::kZero, nullptr, static_cast<size_t>(len), off}).status();
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
      return PwriteZeroes(fd_.get(), off, len, "write to source");
    }
  } else {
    a = b = off + len;
  }
  Status s = PwriteZeroes(fd_.get(), off, a - off, "write to source");
  if (!s.ok()) return s;
  return PwriteZeroes(fd_.get(), b, off + len - b, "write to source");
}

bool Drive::Quiesce(std::chrono::milliseconds timeout) {
  return slow_->WaitIdle(std::chrono::steady_clock::now() + timeout);
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
