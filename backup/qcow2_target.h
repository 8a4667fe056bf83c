#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backup/child_process.h"
#include "backup/nbd_target.h"
#include "backup/status.h"
#include "backup/target.h"
#include "backup/target_path.h"
#include "backup/unique_fd.h"

namespace cbw::backup {

// What cbwfs reads of a qcow2 header: enough to check the image and walk its
// backing chain before QEMU opens anything. cbwfs never writes qcow2
// structures; qemu-img and qemu-nbd do.
struct Qcow2Header {
  uint32_t version = 0;
  uint64_t size = 0;                // virtual size
  std::string backing_file;         // as stored (may be relative)
  std::string backing_format;       // the header extension, if any
  bool external_data_file = false;  // refused: its path could lead anywhere
  bool encrypted = false;           // refused: needs secrets
};
// Parses the header at the start of `fd`; EINVAL "Image is not in qcow2
// format" (QEMU's text) for anything else.
Result<Qcow2Header> ReadQcow2Header(int fd);

// A qcow2 image as a backup target (SPEC 6): written by a qemu-nbd child that
// cbwfs starts per job on a private Unix socket, through an NbdTarget.
//
// Open (validation only): the path is resolved without entering the mount;
// a drive's source is refused; with mode existing the image must be a
// qcow2 at least the drive's size, and its backing chain is walked here,
// header by header, every file resolved the same way (so no file of the
// chain under the mount is ever opened, by cbwfs or by QEMU) and compared
// by device and inode with the drives' sources. Backing files must be local
// raw or qcow2 images (no json:/protocol names, no external data files).
// With mode absolute-paths a missing file is created empty (to hold its
// inode, as for raw targets) and the image is made by `qemu-img create -f
// qcow2 PATH SIZE` in Prepare.
//
// Prepare starts `qemu-nbd --format=qcow2 --socket=DIR/nbd.sock
// --cache=writeback` (DIR a fresh 0700 directory; one client, not
// --persistent) and connects. Close disconnects, which makes qemu-nbd flush
// and exit; it must exit with status 0 in time, else Close fails (and with
// it a job that would have succeeded). qemu-nbd never outlives cbwfs (see
// ChildProcess).
//
// zeroed() only for a freshly created image (no backing): an existing
// image, with or without a backing chain, gets zero ranges as write-zeroes,
// so nothing reads through to older data.
//
// Thread safety: Open/Prepare/Discard/Close run on the registry's or the
// job's thread (one at a time); the I/O methods go to the NbdTarget, which
// is set in Prepare before any job can use the target, and are safe from
// any thread as Target says.
class Qcow2Target : public Target {
 public:
  static Result<std::shared_ptr<Qcow2Target>> Open(const TargetRequest& req, ResolvedPath where,
                                                   const std::vector<Drive*>& drives);
  ~Qcow2Target() override;

  // The qemu-nbd child (tests); -1 when none runs.
  pid_t qemu_nbd_pid() const { return qemu_nbd_ ? qemu_nbd_->pid() : -1; }
  // The backing chain found at Open (resolved paths), top first.
  const std::vector<std::string>& backing_chain() const { return chain_; }

  Status Prepare() override;
  void Discard() override;
  Status Write(const char* buf, size_t len, uint64_t off) override;
  Status WriteZeroes(uint64_t off, uint64_t len) override;
  Status Read(char* buf, size_t len, uint64_t off) override;
  Status Flush() override;
  Result<std::unique_ptr<TargetQueue>> OpenQueue(unsigned depth) override;
  Status Close() override;

 private:
  Qcow2Target() = default;
  Status StartServer();
  // Stops qemu-nbd: waits up to `wait` for it to exit on its own, then
  // SIGTERM, then SIGKILL. Returns its exit as a Status (OK for status 0).
  Status StopServer(std::chrono::milliseconds wait);
  void RemovePrivateDir();

  std::string spec_;
  uint64_t drive_size_ = 0;
  std::chrono::milliseconds io_timeout_{30'000};
  std::string mountpoint_;
  UniqueFd parent_;  // the directory holding the image
  std::string name_;
  std::string path_;           // resolved, absolute: what qemu-img and qemu-nbd get
  bool create_ = false;        // Prepare runs qemu-img create
  bool created_file_ = false;  // Open created the (empty) file: Discard removes it
  std::vector<std::string> chain_;
  std::string dir_;  // the private socket directory
  std::unique_ptr<ChildProcess> qemu_nbd_;
  std::shared_ptr<NbdTarget> nbd_;
  bool closed_ = false;
  Status close_status_;
};

}  // namespace cbw::backup
