#include "backup/qcow2_target.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "backup/drive.h"
#include "backup/log.h"
#include "backup/posix_io.h"

namespace cbw::backup {
namespace {

// QEMU's limit on backing chain depth is larger; a chain of backups longer
// than this is more likely a loop.
constexpr int kMaxChain = 64;
constexpr uint32_t kExtEnd = 0;
constexpr uint32_t kExtBackingFormat = 0xe2792aca;
constexpr uint32_t kExtDataFile = 0x44415441;
constexpr uint64_t kIncompatDataFile = 1ull << 2;
// How long qemu-img create may take, and qemu-nbd to start listening.
constexpr auto kQemuImgTimeout = std::chrono::seconds(60);
constexpr auto kStartTimeout = std::chrono::seconds(30);
// How long a clean qemu-nbd takes to exit after the disconnect at most.
constexpr auto kCleanExit = std::chrono::seconds(10);

uint32_t Be32(const unsigned char* p) {
  return static_cast<uint32_t>(p[0]) << 24 | static_cast<uint32_t>(p[1]) << 16 |
         static_cast<uint32_t>(p[2]) << 8 | static_cast<uint32_t>(p[3]);
}
uint64_t Be64(const unsigned char* p) { return static_cast<uint64_t>(Be32(p)) << 32 | Be32(p + 4); }

Status NotQcow2() { return Status::Error(EINVAL, "Image is not in qcow2 format"); }

// QEMU's path_has_protocol: a ':' before any '/' names a protocol.
bool HasProtocol(const std::string& name) {
  size_t p = name.find_first_of(":/");
  return p != std::string::npos && name[p] == ':';
}

std::string DirName(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// Whether `st` (of a file or block device) is a drive's source.
const Drive* SourceOf(const struct stat& st, const std::vector<Drive*>& drives) {
  const bool blk = S_ISBLK(st.st_mode);
  for (const Drive* d : drives) {
    if (d->dev() == (blk ? st.st_rdev : st.st_dev) && d->ino() == (blk ? 0 : st.st_ino)) return d;
  }
  return nullptr;
}

// A child's stderr as one line for a message.
std::string OneLine(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  for (char& c : s) {
    if (c == '\n') c = ' ';
  }
  return s;
}

// The errno whose text a QEMU tool printed, so a failed create keeps the
// errno SPEC 2.2 promises (ENOSPC, EACCES, ...); EIO when none is named.
int ErrnoFromText(const std::string& text) {
  // QEMU's image locking: another process has the image open.
  if (text.find("Failed to get") != std::string::npos && text.find("lock") != std::string::npos) {
    return EBUSY;
  }
  for (int e :
       {ENOSPC, EDQUOT, EACCES, EPERM, EROFS, ENOENT, ENOTDIR, EISDIR, EFBIG, EBUSY, EAGAIN, EIO}) {
    if (text.find(std::strerror(e)) != std::string::npos) return e;
  }
  return EIO;
}

std::string TempBase(const std::string& mountpoint) {
  const char* t = std::getenv("TMPDIR");
  // Socket paths are short (108 bytes), and never inside the mount.
  if (t != nullptr && t[0] == '/' && std::strlen(t) < 64 && !IsPathUnder(t, mountpoint)) return t;
  return "/tmp";
}

}  // namespace

Result<Qcow2Header> ReadQcow2Header(int fd) {
  unsigned char buf[65536];
  Result<size_t> n = PreadFull(fd, buf, sizeof buf, 0);
  if (!n.ok()) return n.status();
  if (*n < 72 || std::memcmp(buf, "QFI\xfb", 4) != 0) return NotQcow2();
  Qcow2Header h;
  h.version = Be32(buf + 4);
  if (h.version != 2 && h.version != 3) return NotQcow2();
  const uint64_t backing_off = Be64(buf + 8);
  const uint32_t backing_len = Be32(buf + 16);
  h.size = Be64(buf + 24);
  h.encrypted = Be32(buf + 32) != 0;
  size_t ext = 72;
  if (h.version == 3) {
    if (*n < 104) return NotQcow2();
    h.external_data_file = (Be64(buf + 72) & kIncompatDataFile) != 0;
    ext = Be32(buf + 100);
  }
  // Header extensions: type, length, data padded to 8 bytes.
  while (ext + 8 <= *n) {
    const uint32_t type = Be32(buf + ext), len = Be32(buf + ext + 4);
    if (type == kExtEnd || ext + 8 + len > *n) break;
    if (type == kExtBackingFormat) {
      h.backing_format.assign(reinterpret_cast<const char*>(buf + ext + 8), len);
    } else if (type == kExtDataFile) {
      h.external_data_file = true;
    }
    ext += 8 + ((len + 7) & ~7u);
  }
  if (backing_off != 0 && backing_len != 0) {
    if (backing_len > 1023) return NotQcow2();  // QEMU's limit
    std::string name(backing_len, '\0');
    Result<size_t> r = PreadFull(fd, name.data(), backing_len, backing_off);
    if (!r.ok()) return r.status();
    if (*r != backing_len) return NotQcow2();
    h.backing_file = std::move(name);
  }
  return h;
}

Result<std::shared_ptr<Qcow2Target>> Qcow2Target::Open(const TargetRequest& req, ResolvedPath where,
                                                       const std::vector<Drive*>& drives) {
  const bool creating = req.mode == TargetMode::kAbsolutePaths;
  std::shared_ptr<Qcow2Target> t(new Qcow2Target());
  t->display_ =
      req.spec[0] == '/' || req.base_dir.empty() ? req.spec : req.base_dir + "/" + req.spec;
  t->spec_ = req.spec;
  t->drive_size_ = req.size;
  t->io_timeout_ = req.io_timeout;
  t->mountpoint_ = req.mountpoint;
  t->path_ = where.path;
  t->name_ = where.name;
  auto open_error = [&](int err) {
    return Status::FromErrno(
        err, (creating ? "Could not create '" : "Could not open '") + req.spec + "'");
  };
  struct stat st = where.st;
  if (!where.exists) {
    if (!creating) return open_error(ENOENT);
    int fd = openat(where.parent.get(), where.name.c_str(),
                    O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, 0644);
    if (fd < 0) return open_error(errno);
    UniqueFd file(fd);
    t->parent_ = std::move(where.parent);
    t->created_file_ = true;
    if (fstat(fd, &st) != 0) {
      Status s = open_error(errno);
      t->Discard();
      return s;
    }
  } else {
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
      return Status::Error(EINVAL,
                           "Target '" + req.spec + "' is not a regular file or block device");
    }
    t->parent_ = std::move(where.parent);
  }
  auto refuse = [&](Status s) -> Result<std::shared_ptr<Qcow2Target>> {
    t->Discard();
    return s;
  };
  if (const Drive* d = SourceOf(st, drives)) {
    return refuse(Status::Error(
        EINVAL, "Target '" + req.spec + "' is the source of drive '" + d->name() + "'"));
  }
  const bool blk = S_ISBLK(st.st_mode);
  t->identity_ = "file:" + std::to_string(blk ? st.st_rdev : st.st_dev) + ":" +
                 std::to_string(blk ? 0 : st.st_ino);
  if (creating) {
    if (!t->created_file_ && faccessat(t->parent_.get(), t->name_.c_str(), W_OK, 0) != 0) {
      return refuse(open_error(errno));
    }
    t->create_ = true;
    t->zeroed_ = true;  // a fresh image without backing reads as zeros
    t->size_ = req.size;
    return t;
  }

  // An existing image: its header and its whole backing chain, checked here.
  UniqueFd fd(openat(t->parent_.get(), t->name_.c_str(),
                     O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
  if (!fd.valid()) return open_error(errno);
  struct stat st2 {};
  if (fstat(fd.get(), &st2) != 0) return open_error(errno);
  if (st2.st_dev != st.st_dev || st2.st_ino != st.st_ino) {
    return Status::Error(EAGAIN, "Target '" + req.spec + "' changed while being opened");
  }
  if (faccessat(t->parent_.get(), t->name_.c_str(), W_OK, 0) != 0) return open_error(errno);
  Result<Qcow2Header> top = ReadQcow2Header(fd.get());
  if (!top.ok()) {
    if (top.status().code() == EINVAL) return top.status();
    return open_error(top.status().code());
  }
  auto unsupported = [&](const std::string& what) {
    return Status::Error(EINVAL, "Target '" + req.spec + "': " + what + " is not supported");
  };
  if (top->encrypted) return unsupported("an encrypted qcow2 image");
  if (top->external_data_file) return unsupported("a qcow2 image with an external data file");
  if (top->size < req.size) {
    return Status::Error(EINVAL, "Target '" + req.spec + "' is smaller than the drive (" +
                                     std::to_string(top->size) + " < " + std::to_string(req.size) +
                                     " bytes)");
  }
  // The backing chain, the way QEMU will resolve it: a relative name is
  // relative to the directory of the name that led to it.
  Qcow2Header h = *top;
  std::string base = DirName(t->path_);
  for (int depth = 0; !h.backing_file.empty(); ++depth) {
    if (depth >= kMaxChain) return unsupported("a backing chain this long");
    const std::string& b = h.backing_file;
    if (b.rfind("json:", 0) == 0 || HasProtocol(b)) {
      return unsupported("backing file '" + b + "' (not a local file)");
    }
    const std::string full = b[0] == '/' ? b : base + "/" + b;
    Result<ResolvedPath> bw = ResolvePath(full, "", req.mountpoint, req.mount_dev);
    if (!bw.ok()) {
      if (bw.status().code() == EINVAL) {
        return Status::Error(EINVAL, "Target '" + req.spec + "' has backing file '" + b +
                                         "' under the mountpoint '" + req.mountpoint + "'");
      }
      return Status::FromErrno(bw.status().code(), "Could not open backing file '" + full + "'");
    }
    if (!bw->exists) return Status::FromErrno(ENOENT, "Could not open backing file '" + full + "'");
    if (!S_ISREG(bw->st.st_mode) && !S_ISBLK(bw->st.st_mode)) {
      return unsupported("backing file '" + b + "' (not a regular file or block device)");
    }
    if (const Drive* d = SourceOf(bw->st, drives)) {
      return Status::Error(EINVAL, "Target '" + req.spec + "' has backing file '" + b +
                                       "', which is the source of drive '" + d->name() + "'");
    }
    UniqueFd bfd(openat(bw->parent.get(), bw->name.c_str(),
                        O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
    if (!bfd.valid()) {
      return Status::FromErrno(errno, "Could not open backing file '" + full + "'");
    }
    t->chain_.push_back(bw->path);
    unsigned char head[512] = {};
    Result<size_t> n = PreadFull(bfd.get(), head, sizeof head, 0);
    if (!n.ok()) return Status::FromErrno(n.status().code(), "Could not read '" + full + "'");
    std::optional<std::string> probed = ProbeImageFormat(head, *n);
    const std::string fmt = !h.backing_format.empty() ? h.backing_format : probed.value_or("raw");
    if (fmt == "raw") break;
    if (fmt != "qcow2") {
      return unsupported("backing file '" + b + "' in format '" + fmt + "'");
    }
    Result<Qcow2Header> next = ReadQcow2Header(bfd.get());
    if (!next.ok()) {
      return Status::Error(EINVAL, "Backing file '" + full + "': " + next.status().message());
    }
    if (next->encrypted || next->external_data_file) {
      return unsupported("backing file '" + b + "' (encrypted or with an external data file)");
    }
    h = std::move(*next);
    base = DirName(full);
  }
  t->zeroed_ = false;  // may hold older data, or read through a backing file
  t->size_ = top->size;
  return t;
}

Qcow2Target::~Qcow2Target() {
  if (!closed_) Close();
  RemovePrivateDir();
}

Status Qcow2Target::Prepare() {
  const std::string base = TempBase(mountpoint_);
  std::string tmpl = base + "/cbwfs-qemu-nbd.XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) {
    return Status::FromErrno(errno, "Could not create a directory in '" + base + "'");
  }
  dir_ = tmpl;
  if (create_) {
    auto c =
        RunChild({"qemu-img", "create", "-q", "-f", "qcow2", path_, std::to_string(drive_size_)},
                 kQemuImgTimeout);
    if (!c.ok())
      return Status::Error(c.status().code(),
                           "Could not create '" + spec_ + "': " + c.status().message());
    const int st = *(*c)->wait_status();
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
      const std::string err = OneLine((*c)->Stderr());
      return Status::Error(ErrnoFromText(err), "Could not create '" + spec_ + "': qemu-img " +
                                                   (*c)->DescribeStatus() +
                                                   (err.empty() ? "" : ": " + err));
    }
    // qemu-img rewrites the file in place; make sure it is still the one
    // that was checked.
    struct stat now {};
    if (fstatat(parent_.get(), name_.c_str(), &now, AT_SYMLINK_NOFOLLOW) != 0) {
      return Status::FromErrno(errno, "Could not open '" + spec_ + "'");
    }
    const bool blk = S_ISBLK(now.st_mode);
    if (identity_ != "file:" + std::to_string(blk ? now.st_rdev : now.st_dev) + ":" +
                         std::to_string(blk ? 0 : now.st_ino)) {
      return Status::Error(EAGAIN, "Target '" + spec_ + "' changed while being created");
    }
  }
  return StartServer();
}

Status Qcow2Target::StartServer() {
  const std::string sock = dir_ + "/nbd.sock";
  auto c = ChildProcess::Start({"qemu-nbd", "--format=qcow2", "--socket=" + sock,
                                "--cache=writeback", "--discard=unmap", "--", path_});
  if (!c.ok())
    return Status::Error(c.status().code(),
                         "Could not start qemu-nbd for '" + spec_ + "': " + c.status().message());
  qemu_nbd_ = std::move(*c);
  NbdOptions options;
  options.timeout = io_timeout_;
  const auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
  auto pause = std::chrono::milliseconds(1);
  auto died = [&] {
    const std::string err = OneLine(qemu_nbd_->Stderr());
    return Status::Error(ErrnoFromText(err), "Could not open '" + spec_ + "': qemu-nbd " +
                                                 qemu_nbd_->DescribeStatus() +
                                                 (err.empty() ? "" : ": " + err));
  };
  for (;;) {
    if (qemu_nbd_->exited()) return died();
    struct stat st {};
    if (lstat(sock.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
      // Only a refused connect is retried: an accepted one is qemu-nbd's
      // one client, and it exits when that client goes.
      auto t = NbdTarget::OpenPrivate(sock, display_, identity_, drive_size_, options);
      if (t.ok()) {
        nbd_ = std::move(*t);
        size_ = nbd_->size();
        LogInfo("qcow2 target '" + display_ + "': qemu-nbd pid " +
                std::to_string(qemu_nbd_->pid()) +
                (chain_.empty() ? "" : ", backing '" + chain_.front() + "'"));
        return Status::Ok();
      }
      if (t.status().code() != ECONNREFUSED) {
        // qemu-nbd listens before it opens the image: a connection it drops
        // is usually the image refusing to open (locked, unreadable), which
        // its exit status and message say better.
        if (qemu_nbd_->WaitUntil(std::chrono::steady_clock::now() + std::chrono::seconds(2))) {
          Status s = died();
          qemu_nbd_.reset();
          return s;
        }
        StopServer(std::chrono::milliseconds(0));
        return t.status();
      }
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      StopServer(std::chrono::milliseconds(0));
      return Status::Error(
          ETIMEDOUT, "Could not open '" + spec_ + "': qemu-nbd did not start listening in time");
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(20));
  }
}

Status Qcow2Target::StopServer(std::chrono::milliseconds wait) {
  if (!qemu_nbd_) return Status::Ok();
  const auto now = std::chrono::steady_clock::now();
  bool forced = false;
  if (!qemu_nbd_->WaitUntil(now + wait)) {
    forced = true;
    if (wait.count() > 0) {
      LogWarn("qcow2 target '" + display_ + "': qemu-nbd did not exit after the disconnect");
    }
    qemu_nbd_->Signal(SIGTERM);
    if (!qemu_nbd_->WaitUntil(std::chrono::steady_clock::now() + std::chrono::seconds(2))) {
      qemu_nbd_->Signal(SIGKILL);
      qemu_nbd_->WaitUntil(std::chrono::steady_clock::now() + std::chrono::seconds(5));
    }
  }
  const int st = qemu_nbd_->wait_status().value_or(-1);
  Status s;
  if (forced || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    const std::string err = OneLine(qemu_nbd_->Stderr());
    s = Status::Error(
        EIO, "qemu-nbd " + std::string(forced ? "had to be stopped" : qemu_nbd_->DescribeStatus()) +
                 (err.empty() ? "" : ": " + err));
  }
  qemu_nbd_.reset();
  return s;
}

void Qcow2Target::RemovePrivateDir() {
  if (dir_.empty()) return;
  unlink((dir_ + "/nbd.sock").c_str());
  rmdir(dir_.c_str());
  dir_.clear();
}

void Qcow2Target::Discard() {
  if (nbd_) nbd_->Close();
  StopServer(std::chrono::seconds(2));
  RemovePrivateDir();
  if (created_file_) {
    unlinkat(parent_.get(), name_.c_str(), 0);
    created_file_ = false;
  }
  closed_ = true;
}

Status Qcow2Target::Close() {
  if (closed_) return close_status_;
  closed_ = true;
  // A connection that is still healthy ends with a disconnect, on which
  // qemu-nbd flushes the image and exits 0; a dead one leaves nothing to
  // save, so qemu-nbd is stopped at once.
  const bool healthy = nbd_ && !nbd_->dead();
  if (nbd_) nbd_->Close();
  Status s =
      StopServer(healthy ? std::chrono::milliseconds(kCleanExit) : std::chrono::milliseconds(0));
  if (!s.ok()) {
    close_status_ = Status::Error(s.code(), "qcow2 target '" + display_ + "': " + s.message());
    LogWarn(close_status_.message());
  }
  RemovePrivateDir();
  return close_status_;
}

Status Qcow2Target::Write(const char* buf, size_t len, uint64_t off) {
  if (!nbd_) return Status::Error(EIO, "qcow2 target not prepared");
  return nbd_->Write(buf, len, off);
}

Status Qcow2Target::WriteZeroes(uint64_t off, uint64_t len) {
  if (!nbd_) return Status::Error(EIO, "qcow2 target not prepared");
  return nbd_->WriteZeroes(off, len);
}

Status Qcow2Target::Read(char* buf, size_t len, uint64_t off) {
  if (!nbd_) return Status::Error(EIO, "qcow2 target not prepared");
  return nbd_->Read(buf, len, off);
}

Status Qcow2Target::Flush() {
  if (!nbd_) return Status::Error(EIO, "qcow2 target not prepared");
  return nbd_->Flush();
}

Result<std::unique_ptr<TargetQueue>> Qcow2Target::OpenQueue(unsigned depth) {
  if (!nbd_) return Status::Error(EIO, "qcow2 target not prepared");
  return nbd_->OpenQueue(depth);
}

}  // namespace cbw::backup
