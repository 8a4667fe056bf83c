#include "backup/target.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>

#include "backup/file_target.h"
#include "backup/nbd_target.h"
#include "backup/posix_io.h"
#include "backup/qcow2_target.h"
#include "backup/target_path.h"
#ifdef CBW_HAVE_RBD
#include "backup/rbd_target.h"
#endif

namespace cbw::backup {

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

Result<std::shared_ptr<Target>> OpenTarget(const TargetRequest& req,
                                           const std::vector<Drive*>& drives) {
  if (IsNbdSpec(req.spec)) {
    auto t = NbdTarget::Open(req);
    if (!t.ok()) return t.status();
    return std::shared_ptr<Target>(std::move(*t));
  }
  // QEMU's protocol prefix: "rbd:" names a Ceph image, never a local path.
  if (req.spec.rfind("rbd:", 0) == 0) {
#ifdef CBW_HAVE_RBD
    auto t = RbdTarget::Open(req);
    if (!t.ok()) return t.status();
    return std::shared_ptr<Target>(std::move(*t));
#else
    return Status::Error(
        EINVAL, "Target '" + req.spec + "': RBD targets are not supported by this build of cbwfs");
#endif
  }
  const bool creating = req.mode == TargetMode::kAbsolutePaths;
  Result<ResolvedPath> where = ResolvePath(req.spec, req.base_dir, req.mountpoint, req.mount_dev);
  if (!where.ok()) {
    const Status& s = where.status();
    if (s.code() == EINVAL) return s;  // refused (under the mount, empty)
    if (s.code() == EISDIR) {
      return Status::Error(EINVAL,
                           "Target '" + req.spec + "' is not a regular file or block device");
    }
    return Status::FromErrno(
        s.code(), (creating ? "Could not create '" : "Could not open '") + req.spec + "'");
  }
  // qcow2: as asked, or found by its magic in an existing image given no
  // format (never overwritten as raw).
  bool qcow2 = req.format && *req.format == "qcow2";
  if (!req.format && req.mode == TargetMode::kExisting && where->exists &&
      (S_ISREG(where->st.st_mode) || S_ISBLK(where->st.st_mode))) {
    int fd = openat(where->parent.get(), where->name.c_str(),
                    O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd >= 0) {
      unsigned char head[512] = {};
      Result<size_t> n = PreadFull(fd, head, sizeof head, 0);
      close(fd);
      qcow2 = n.ok() && ProbeImageFormat(head, *n) == std::optional<std::string>("qcow2");
    }
  }
  if (qcow2) {
    auto t = Qcow2Target::Open(req, std::move(*where), drives);
    if (!t.ok()) return t.status();
    return std::shared_ptr<Target>(std::move(*t));
  }
  auto t = FileTarget::Open(req, std::move(*where), drives);
  if (!t.ok()) return t.status();
  return std::shared_ptr<Target>(std::move(*t));
}

}  // namespace cbw::backup
