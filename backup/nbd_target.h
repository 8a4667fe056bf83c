#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "backup/mutex.h"
#include "backup/status.h"
#include "backup/target.h"
#include "backup/unique_fd.h"

struct nbd_handle;

namespace cbw::backup {

// An NBD target as QEMU and libnbd spell it: nbd://HOST[:PORT]/EXPORT or
// nbd+unix:///EXPORT?socket=PATH (percent-decoded).
struct NbdUri {
  bool unix_socket = false;
  std::string host;         // TCP; an IPv6 address without its brackets
  std::string port;         // TCP; "10809" when not given
  std::string socket;       // Unix: the socket path
  std::string export_name;  // without the leading '/'
};

// True for specs that name an NBD server rather than a path ("nbd:",
// "nbd+unix:", "nbds:", ...).
bool IsNbdSpec(std::string_view spec);
// Parses an NBD URI. Refuses (EINVAL, QEMU's "No valid URL specified")
// anything but the two forms above: other schemes (TLS, vsock), legacy
// "nbd:host:port" names, unknown query parameters, a socket on TCP.
Result<NbdUri> ParseNbdUri(const std::string& spec);
// The normalized URI (lower-case host, explicit port, encoded export).
std::string NbdUriString(const NbdUri& uri);

// Tunables of one NBD connection.
struct NbdOptions {
  // A server with requests outstanding that answers nothing (no reply, no
  // socket progress) for this long is dead: every request fails ETIMEDOUT.
  std::chrono::milliseconds timeout{30'000};
  // NBD commands in flight on the connection; more wait in a queue.
  unsigned max_in_flight = 16;
};

// A backup target on an NBD server, through libnbd (SPEC 6). Also the
// transport of qcow2 targets (a qemu-nbd child on a private socket).
//
// Thread model: one libnbd handle per target, driven by a dedicated event
// loop thread that alone calls libnbd once connected: it polls the handle's
// socket (nbd_aio_get_fd / nbd_aio_get_direction / nbd_aio_notify_*) and a
// wake eventfd, issues queued commands with nbd_aio_* (at most
// max_in_flight at once), and runs their completion callbacks. Callers of
// the synchronous methods (CBW copies, snapshot reads, the final flush; any
// thread) queue a request and wait for its completion; the copier's
// TargetQueue gets its completions in a list and a signalled eventfd
// (poll_fd). A single writer thread means no lock is ever held across a
// libnbd call, and completion callbacks (which run under libnbd's handle
// lock) only take this target's leaf mutex.
//
// Requests are split at the server's maximum block size (32 MiB when it
// advertises none) and aligned to its minimum; an unaligned head or tail is
// read, patched and written back (read-modify-write), one block at a time
// per block. Zero ranges use NBD write-zeroes (a zero buffer when the
// server cannot), never trim; an NBD target is never zeroed(): the export
// may hold older data.
//
// Every wait is bounded: a request outstanding on a server that gives no
// sign of life for options.timeout kills the connection (so libnbd
// completes every command in flight with an error), and from then on every
// request fails at once. Close() does the same after a short grace, so
// users stuck on a dead server are released. The connection is never
// re-established: writes the server acknowledged but did not flush may have
// been lost with it.
//
// Ownership: shared (see Target); the destructor closes and joins the loop.
class NbdTarget : public Target, public std::enable_shared_from_this<NbdTarget> {
 public:
  // Opens an nbd:// or nbd+unix:// target: refuses a format other than raw,
  // a malformed URI, a socket path under the mount (resolved without
  // entering it), an unreachable server (QEMU's "Failed to connect to
  // '...': <strerror>"), a read-only export and one smaller than the drive,
  // before anything is written.
  static Result<std::shared_ptr<NbdTarget>> Open(const TargetRequest& req);
  // Connects to a Unix socket cbwfs owns (qemu-nbd's private socket) with
  // the same checks; `display` and `identity` are the caller's.
  static Result<std::shared_ptr<NbdTarget>> OpenPrivate(const std::string& socket_path,
                                                        const std::string& display,
                                                        const std::string& identity,
                                                        uint64_t min_size, NbdOptions options);
  ~NbdTarget() override;

  // What the server advertised (after defaults), for tests and logs.
  uint64_t min_block() const { return min_block_; }
  uint64_t max_request() const { return max_request_; }
  bool can_zero() const { return can_zero_; }
  // True once the connection failed (timeout, server gone, closed).
  bool dead() const CBW_EXCLUDES(mu_);

  Status Write(const char* buf, size_t len, uint64_t off) override;
  Status WriteZeroes(uint64_t off, uint64_t len) override;
  Status Read(char* buf, size_t len, uint64_t off) override;
  Status Flush() override;
  Result<std::unique_ptr<TargetQueue>> OpenQueue(unsigned depth) override;
  // Waits up to a short grace for requests in flight, then disconnects
  // (NBD_CMD_DISC, so a non-persistent server such as qemu-nbd exits) or,
  // if requests are still outstanding or the server is dead, drops the
  // connection so they fail. Returns once the loop has ended. Idempotent.
  Status Close() override CBW_EXCLUDES(mu_);

  // --- used by the queue and the loop (not part of the Target contract) ---
  enum class Kind { kRead, kWrite, kZero, kFlush };
  struct Op;
  // Queues `len` bytes at `off` (aligned, or min_block 1) as one operation;
  // `done(err)` runs once, on the loop thread or at once on refusal.
  void SubmitAligned(Kind kind, char* buf, uint64_t off, uint64_t len,
                     std::function<void(int)> done) CBW_EXCLUDES(mu_);
  bool Aligned(uint64_t off, uint64_t len) const {
    return off % min_block_ == 0 && (len % min_block_ == 0 || off + len == size_);
  }

 private:
  struct Part;
  NbdTarget() = default;

  static Result<std::shared_ptr<NbdTarget>> Connect(const NbdUri& uri,
                                                    const std::string& connect_path,
                                                    const std::string& spec, uint64_t min_size,
                                                    NbdOptions options);
  Status RunSync(Kind kind, char* buf, uint64_t off, uint64_t len) CBW_EXCLUDES(mu_);
  // Read-modify-write of the unaligned part [off, off+len) of one block:
  // `src` null writes zeros.
  Status PatchBlock(const char* src, uint64_t off, uint64_t len) CBW_EXCLUDES(mu_, rmw_mu_);
  // Runs an unaligned write/zero as aligned middle plus patched edges.
  Status WriteUnaligned(const char* buf, uint64_t off, uint64_t len) CBW_EXCLUDES(mu_);

  // --- loop thread ---
  void Loop() CBW_EXCLUDES(mu_);
  void LoopBody() CBW_EXCLUDES(mu_);
  void Issue(Part* p) CBW_EXCLUDES(mu_);
  static int OnComplete(void* user_data, int* error);
  // Ends one part (issued or only queued); runs its operation's callback
  // when it was the last. A part no longer known (already ended) is ignored.
  void CompletePart(Part* p, int err, bool issued) CBW_EXCLUDES(mu_);
  // Marks the connection dead with `err` (first reason wins), fails the
  // queued parts, and (loop thread) drops the socket so libnbd fails those
  // in flight.
  void Kill(int err, const std::string& why) CBW_EXCLUDES(mu_);
  void Wake();

  nbd_handle* h_ = nullptr;
  NbdOptions options_;
  uint64_t min_block_ = 1;
  uint64_t max_request_ = 32 << 20;
  uint64_t max_zero_ = 32 << 20;
  bool can_zero_ = false;
  bool can_flush_ = false;
  int fd_ = -1;    // the connection's socket (libnbd's; valid until h_ is closed)
  UniqueFd wake_;  // eventfd: queued work, close
  std::thread loop_;

  mutable Mutex mu_;  // a leaf: held only briefly, never across a libnbd call
  CondVar cv_;        // in-flight count changed, loop ended
  std::deque<Part*> pending_ CBW_GUARDED_BY(mu_);  // queued, not yet issued (FIFO)
  std::set<Part*> issued_ CBW_GUARDED_BY(mu_);     // handed to libnbd, not yet completed
  int dead_err_ CBW_GUARDED_BY(mu_) = 0;
  std::string dead_why_ CBW_GUARDED_BY(mu_);
  bool closing_ CBW_GUARDED_BY(mu_) = false;     // no new requests
  bool disconnect_ CBW_GUARDED_BY(mu_) = false;  // the loop should end the connection
  bool loop_done_ CBW_GUARDED_BY(mu_) = false;
  bool closed_ = false;  // Close() ran (Close is not called concurrently)
  Mutex close_mu_;       // serialises Close()

  // Read-modify-write blocks in progress (block index).
  Mutex rmw_mu_;
  CondVar rmw_cv_;
  std::set<uint64_t> rmw_blocks_ CBW_GUARDED_BY(rmw_mu_);
};

}  // namespace cbw::backup
