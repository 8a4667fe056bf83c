#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "backup/target.h"

namespace cbw::backup {

// A target spelled as QEMU spells an RBD image (SPEC 6):
//   rbd:POOL/[NAMESPACE/]IMAGE[:conf=PATH][:id=USER][:KEY=VALUE...]
// A backslash escapes the next character (for ':', '/', '@', '=' in names).
// Besides conf and id, QEMU hands every KEY=VALUE to librados; cbwfs accepts
// only the few that say where the cluster is and how to log in (mon_host,
// keyring, auth_supported, auth_client_required): cbwfs relies on its own
// timeouts and on librbd's cache being off, and options that name files
// (log_file, admin_socket, ...) could lead into the mount, where the daemon
// would call into itself. A key (secret) in the name would show in jobs/
// files, so `key=` is refused too: use a keyring. `@SNAP` (a read-only
// snapshot) cannot be a target.
struct RbdSpec {
  std::string pool;
  std::string ns;  // empty: the default namespace
  std::string image;
  std::optional<std::string> conf;  // conf=PATH
  std::optional<std::string> id;    // id=USER (without "client.")
  // The accepted librados options, names normalised to underscores.
  std::vector<std::pair<std::string, std::string>> options;
};

// True for a spec that names an RBD image ("rbd:..."): such a target never
// names a local path.
bool IsRbdSpec(const std::string& spec);

// Parses and checks an RBD spec; EINVAL with a message naming the problem.
Result<RbdSpec> ParseRbdSpec(const std::string& spec);

// How an RBD target talks to its cluster.
struct RbdTuning {
  // A cluster that does not answer for this long is a target error
  // (ETIMEDOUT): each target request ends within it (see RbdTarget), and
  // librados gets it as rados_osd_op_timeout, rados_mon_op_timeout and
  // client_mount_timeout, which bound connecting, opening and the
  // background close. 30 s, as SPEC 6 says; tests shorten it.
  std::chrono::seconds timeout{30};
};

// A Ceph RBD image as a backup target, through librbd and librados (their C
// API). Each target has its own cluster connection (rados_t), as QEMU's rbd
// driver does, with librbd's cache off (writes complete when the OSDs hold
// them, so their errors reach the job; flush is then cheap but still done
// before success). Write-zeroes is rbd write_zeroes (reads back as zeros;
// never skipped, never a discard), so an image cbwfs did not just create is
// never zeroed().
//
// Created (at the drive's size) only by Prepare(), when missing under mode
// absolute-paths; Discard() removes an image it created. An existing image
// must be at least the drive's size and is never resized.
//
// Errors carry librbd's errno, except that a pool over its quota (EDQUOT)
// reports ENOSPC, so on-target-error=enospc applies to it. A full pool or
// cluster answers at once (librados's "full try"), rather than holding
// writes until there is room.
//
// Timeouts: every request, synchronous or queued, ends within the timeout,
// with ETIMEDOUT if librbd has not answered by then. (librados's own op
// timeouts are set too, but librbd queues an image's requests behind one
// exclusive-lock acquisition, so on a dead cluster its Nth request would
// fail only after N timeouts.) A request that timed out stays in librbd until
// it fails there; the queue counts it against its depth meanwhile, and at
// most 64 synchronous ones may be outstanding (then calls fail at once), so
// a dead cluster accumulates a bounded number of them.
//
// Thread safety: as Target (librbd allows I/O on one image from many
// threads). The copier's queue submits with rbd_aio_* and at most `depth`
// requests in flight; librbd runs the completion callbacks on its own
// threads, which only record the result and signal an eventfd (the queue's
// poll_fd).
//
// Ownership and closing: the connection (image, io context, cluster) lives
// until the target and every queue opened on it are gone. It is then closed
// in the background (rbd_close, then rados_shutdown: always, also on every
// error path), because closing may wait for a cluster that stopped
// answering (releasing the image's exclusive lock), and the thread that lets
// go of a target (e.g. the job thread when a job concludes) must not wait
// for that. WaitClosed() waits for those background closes; at exit the
// process waits for them too (an atexit handler, so before librados's own
// static destructors run), at most 75 s: on a dead cluster each request
// still inside librbd fails only after the timeout.
class RbdTarget : public Target {
 public:
  // Connects to the cluster, opens the pool (and namespace) and the image,
  // or notes that it must be created (mode absolute-paths, image missing).
  // Refuses format qcow2, a malformed spec, a conf (or keyring) file under
  // the mountpoint, and an image smaller than the drive. Texts follow
  // QEMU's rbd driver ("error connecting", "error opening pool P", "error
  // reading header from I", each with the errno text). Blocks on the network
  // (at most about tuning.timeout per step): no engine lock may be held.
  static Result<std::shared_ptr<RbdTarget>> Open(const TargetRequest& req,
                                                 const RbdTuning& tuning = {});
  ~RbdTarget() override;

  Status Prepare() override;
  void Discard() override;
  Status Write(const char* buf, size_t len, uint64_t off) override;
  Status WriteZeroes(uint64_t off, uint64_t len) override;
  Status Read(char* buf, size_t len, uint64_t off) override;
  Status Flush() override;
  Result<std::unique_ptr<TargetQueue>> OpenQueue(unsigned depth) override;
  // Marks the target closed: I/O from here on fails (EIO). Never blocks;
  // the connection closes once the last user lets go.
  Status Close() override;

  // Waits until every connection handed to the background closer is closed,
  // or the timeout passes; true if none is left.
  static bool WaitClosed(std::chrono::milliseconds timeout);

  struct Conn;  // the librados/librbd handles (rbd_target.cc)

 private:
  enum class Call { kWrite, kZero, kRead, kFlush };

  RbdTarget() = default;
  Status Usable() const;
  // One request, waited for at most the timeout (see rbd_target.cc).
  Status Sync(Call kind, uint64_t off, uint64_t len, const char* wbuf, char* rbuf);

  RbdSpec spec_;
  std::string spec_text_;
  std::shared_ptr<Conn> conn_;
  uint64_t create_size_ = 0;  // > 0: Prepare() creates the image
  bool created_ = false;      // Prepare() created it: Discard() removes it
};

}  // namespace cbw::backup
