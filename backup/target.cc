#include "backup/target.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace cbw::backup {
namespace {

bool IsUnder(const std::string& path, const std::string& mountpoint) {
  if (mountpoint.empty()) return false;
  if (mountpoint == "/") return true;
  if (path == mountpoint) return true;
  return path.size() > mountpoint.size() && path.compare(0, mountpoint.size(), mountpoint) == 0 &&
         path[mountpoint.size()] == '/';
}

Status OpenError(const TargetRequest& req, bool creating, int err) {
  return Status::FromErrno(
      err, (creating ? "Could not create '" : "Could not open '") + req.raw_path + "'");
}

Status NotFileOrDevice(const TargetRequest& req) {
  return Status::Error(EINVAL,
                       "Target '" + req.raw_path + "' is not a regular file or block device");
}

// Resolves the target path without ever stat()ing or opening anything that
// could be inside the mountpoint: only parent directories that realpath()
// proves to be outside it are entered, and symlinks are followed by hand.
// Returns the absolute path of the final (non-symlink or missing) name.
Result<std::string> ResolveTargetPath(const TargetRequest& req) {
  bool creating = req.mode == TargetMode::kAbsolutePaths;
  std::string p = req.raw_path;
  if (p.empty()) return Status::Error(EINVAL, "Target path is empty");
  if (p[0] != '/') p = (req.base_dir.empty() ? std::string(".") : req.base_dir) + "/" + p;
  for (int hop = 0; hop < 40; ++hop) {
    size_t slash = p.find_last_of('/');
    std::string dir = slash == 0 ? "/" : p.substr(0, slash);
    std::string base = p.substr(slash + 1);
    if (base.empty() || base == "." || base == "..") return NotFileOrDevice(req);
    // Refuse by text first, so a literal path into the mount is never
    // looked up at all; realpath() then catches parents that reach the mount
    // through symlinks or "..".
    if (IsUnder(dir, req.mountpoint)) {
      return Status::Error(
          EINVAL, "Target '" + req.raw_path + "' is under the mountpoint '" + req.mountpoint + "'");
    }
    char buf[PATH_MAX];
    if (realpath(dir.c_str(), buf) == nullptr) return OpenError(req, creating, errno);
    std::string rdir = buf;
    std::string full = (rdir == "/" ? "" : rdir) + "/" + base;
    if (IsUnder(rdir, req.mountpoint) || IsUnder(full, req.mountpoint)) {
      return Status::Error(
          EINVAL, "Target '" + req.raw_path + "' is under the mountpoint '" + req.mountpoint + "'");
    }
    struct stat st {};
    if (lstat(full.c_str(), &st) != 0) {
      if (errno == ENOENT) return full;
      return OpenError(req, creating, errno);
    }
    if (!S_ISLNK(st.st_mode)) return full;
    ssize_t n = readlink(full.c_str(), buf, sizeof(buf) - 1);
    if (n < 0) return OpenError(req, creating, errno);
    buf[n] = '\0';
    p = buf[0] == '/' ? std::string(buf) : rdir + "/" + buf;
  }
  return OpenError(req, creating, ELOOP);
}

}  // namespace

std::optional<std::string> ProbeImageFormat(const unsigned char* head, size_t len) {
  auto starts = [&](const char* magic, size_t n) {
    return len >= n && std::memcmp(head, magic, n) == 0;
  };
  if (starts("QFI\xfb", 4)) return "qcow2";
  if (starts("KDMV", 4) || starts("# Disk DescriptorFile", 21)) return "vmdk";
  if (starts("vhdxfile", 8)) return "vhdx";
  if (starts("QED\0", 4)) return "qed";
  if (len >= 0x44) {
    uint32_t sig = static_cast<uint32_t>(head[0x40]) | static_cast<uint32_t>(head[0x41]) << 8 |
                   static_cast<uint32_t>(head[0x42]) << 16 |
                   static_cast<uint32_t>(head[0x43]) << 24;
    if (sig == 0xbeda107f) return "vdi";
  }
  return std::nullopt;
}

Result<OpenedTarget> OpenTarget(const TargetRequest& req, const std::vector<Drive*>& drives,
                                const TargetBusyFn& busy) {
  Result<std::string> resolved = ResolveTargetPath(req);
  if (!resolved.ok()) return resolved.status();
  OpenedTarget t;
  t.path = *resolved;
  // Absolute (the daemon's cwd is "/" later) but with the user's own names.
  t.display = req.raw_path[0] == '/' || req.base_dir.empty() ? req.raw_path
                                                             : req.base_dir + "/" + req.raw_path;

  struct stat st {};
  bool exists = stat(t.path.c_str(), &st) == 0;
  if (!exists && errno != ENOENT) return OpenError(req, false, errno);
  if (!exists) {
    if (req.mode == TargetMode::kExisting) return OpenError(req, false, ENOENT);
    int fd = open(t.path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY, 0644);
    if (fd < 0) return OpenError(req, true, errno);
    t.fd.Reset(fd);
    t.created = true;
    if (fstat(fd, &st) != 0) {
      Status s = OpenError(req, true, errno);
      DiscardTarget(t);
      return s;
    }
  }
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) return NotFileOrDevice(req);
  for (Drive* d : drives) {
    if (d->dev() == st.st_dev && d->ino() == st.st_ino) {
      if (t.created) DiscardTarget(t);
      return Status::Error(
          EINVAL, "Target '" + req.raw_path + "' is the source of drive '" + d->name() + "'");
    }
  }
  if (busy) {
    if (auto job = busy(st.st_dev, st.st_ino)) {
      if (t.created) DiscardTarget(t);
      return Status::Error(EBUSY, "Target '" + req.raw_path + "' is in use by job '" + *job + "'");
    }
  }
  if (!t.created) {
    int fd = open(t.path.c_str(), O_RDWR | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) return OpenError(req, false, errno);
    t.fd.Reset(fd);
    struct stat st2 {};
    if (fstat(fd, &st2) != 0) return OpenError(req, false, errno);
    if (st2.st_dev != st.st_dev || st2.st_ino != st.st_ino) {
      return Status::Error(EAGAIN, "Target '" + req.raw_path + "' changed while being opened");
    }
  }
  t.dev = st.st_dev;
  t.ino = st.st_ino;
  t.is_block = S_ISBLK(st.st_mode);

  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (t.is_block) {
    if (ioctl(t.fd.get(), BLKGETSIZE64, &size) != 0) return OpenError(req, false, errno);
  }
  if ((req.mode == TargetMode::kExisting || t.is_block) && size < req.size) {
    return Status::Error(EINVAL, "Target '" + req.raw_path + "' is smaller than the drive (" +
                                     std::to_string(size) + " < " + std::to_string(req.size) +
                                     " bytes)");
  }
  if (req.mode == TargetMode::kExisting && !req.format_given) {
    unsigned char head[512] = {};
    ssize_t n = pread(t.fd.get(), head, sizeof(head), 0);
    if (n < 0) return OpenError(req, false, errno);
    if (auto fmt = ProbeImageFormat(head, static_cast<size_t>(n))) {
      return Status::Error(EINVAL, "Target '" + req.raw_path + "' is a " + *fmt +
                                       " image; refusing to overwrite it as raw "
                                       "(give format 'raw' to force)");
    }
  }
  t.fresh = !t.is_block && req.mode == TargetMode::kAbsolutePaths;
  return t;
}

Status PrepareTarget(OpenedTarget& target, TargetMode mode, uint64_t size) {
  if (target.is_block || mode != TargetMode::kAbsolutePaths) return Status::Ok();
  if (ftruncate(target.fd.get(), 0) != 0 ||
      ftruncate(target.fd.get(), static_cast<off_t>(size)) != 0) {
    return Status::FromErrno(errno, "Could not truncate '" + target.display + "'");
  }
  return Status::Ok();
}

void DiscardTarget(OpenedTarget& target) {
  target.fd.Reset();
  if (target.created) {
    unlink(target.path.c_str());
    target.created = false;
  }
}

}  // namespace cbw::backup
