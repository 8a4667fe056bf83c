#pragma once

#include <sys/types.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "backup/source_lease.h"
#include "backup/status.h"
#include "backup/unique_fd.h"

namespace cbw::backup {

class WorkerPool;

// An observer of a drive's write path. Each live backup job installs one (its
// copy-before-write state); dirty bitmaps are another.
//
// Thread safety: BeforeWrite is called concurrently from many writer threads,
// for overlapping or disjoint ranges; implementations synchronise themselves.
class WriteHook {
 public:
  virtual ~WriteHook() = default;
  // Called before a write, punch or zeroing of [offset, offset + length)
  // reaches the source, while the hook is installed. Returning an error fails
  // the drive operation with that errno and the source is left untouched (this
  // is how on-cbw-error=break-guest-write refuses a write).
  //
  // With may_block false (the fast path, on a FUSE worker thread) a hook that
  // would have to wait (for a copy to the target, a copy in flight, a
  // snapshot read) returns EAGAIN instead; the operation is then run again
  // from the start with may_block true on a thread that may wait. So hooks
  // must be idempotent: running a prefix of them twice is harmless.
  virtual Status BeforeWrite(uint64_t offset, uint64_t length, bool may_block) = 0;
};

// Write latency histogram bounds (seconds, Prometheus `le` values), from a
// page-cache hit to the 30 s copy-before-write timeout. A write slower than
// the last bound counts only in the +Inf bucket.
inline constexpr std::array<double, 18> kWriteLatencyBounds = {
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3,
    10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,  5.0,    30.0};

// A drive's counters since it was opened (for MOUNTPOINT/metrics). Writes are
// write() requests (not punches or zeroings), counted when they complete.
struct DriveStats {
  uint64_t writes = 0;        // completed, successful or not
  uint64_t write_errors = 0;  // of those, failed
  uint64_t write_bytes = 0;   // bytes written by the successful ones
  uint64_t cbw_copies = 0;    // copy-before-write copies made by jobs
  uint64_t cbw_bytes = 0;     // bytes those copies preserved (zero runs included)
  // Writes by latency, from Submit to completion (fast and slow path alike):
  // latency_buckets[i] counts those at most kWriteLatencyBounds[i] and above
  // the previous bound; the last element those above every bound.
  std::array<uint64_t, kWriteLatencyBounds.size() + 1> latency_buckets{};
  uint64_t latency_sum_ns = 0;
};

struct DriveConfig {
  std::string name;  // as shown under the mountpoint
  std::string path;  // source: regular file or block device
  bool readonly = false;
  // How long Open waits for another cbwfs to let go of the source (one that
  // is still exiting); 0: refuse at once.
  std::chrono::milliseconds lock_wait{0};
};

// One source image behind the CBW interposer. Every write-like operation goes
// through Write/PunchHole/ZeroRange (or their asynchronous Submit form), which
// run the installed hooks first.
//
// Thread model: all methods are safe to call concurrently. The hook list is
// guarded by a write gate (not a mutex on the hot path): a writer enters the
// gate, runs hooks and writes the source, then leaves; InstallHooks and
// RemoveHook close the gate, wait for writers inside to drain, change the list
// and reopen it. So a hook sees every write that starts after its install
// returned, and none that returned before: that instant is a job's point in
// time. Lock order: the gate's mutexes are leaves (hooks never run with them
// held).
//
// Slow path: Submit runs an operation on the caller's thread with hooks that
// may not block; if one would, the operation (with a copy of its data) moves
// to the drive's pool of writer threads, which may wait (at most the CBW
// timeout), and its completion runs there. So a FUSE worker never waits on a
// target, and a deep guest queue cannot take every worker.
//
// Ownership: the Drive owns the source fd and its locks (released on close).
// The destructor waits (bounded) for slow-path operations in flight.
class Drive {
 public:
  // Opens and locks the source: O_RDWR (O_RDONLY if readonly), refused unless
  // a regular file or block device; takes an exclusive OFD lock (compatible
  // with QEMU's image locking bytes) and flock, so a second cbwfs or a QEMU
  // using the image is refused with EBUSY and a message naming the path. A
  // block device is opened with O_EXCL, so other exclusive openers (mount,
  // mkfs, QEMU) are refused while it is held, and one already held so is
  // refused here. When the holder is another cbwfs, Open retries for up to
  // `config.lock_wait`, logging once that it waits.
  static Result<std::unique_ptr<Drive>> Open(const DriveConfig& config);
  ~Drive();

  const std::string& name() const { return name_; }
  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }
  bool readonly() const { return readonly_; }
  dev_t dev() const { return dev_; }
  ino_t ino() const { return ino_; }
  bool is_block_device() const { return is_block_; }
  // The source fd, for readers (pread is thread-safe). Never write through it:
  // writes must use the methods below so hooks run.
  int fd() const { return fd_.get(); }
  // Work that may outlive the drive's owner (CBW copies stuck on a target)
  // holds this lease while it touches the drive; closing waits for it.
  const std::shared_ptr<SourceLease>& lease() const { return lease_; }

  // Reads up to len bytes at off; short at the end of the drive, 0 past it.
  Result<size_t> Read(void* buf, size_t len, uint64_t off) const;

  // The write-like operations.
  enum class OpKind { kWrite, kPunch, kZero };
  struct Op {
    OpKind kind = OpKind::kWrite;
    const char* data = nullptr;  // kWrite only; valid until Submit returns
    size_t len = 0;
    uint64_t off = 0;
  };
  // Called once with the bytes done (kWrite) or 0, or the error.
  using Done = std::function<void(Result<size_t>)>;
  // Runs `op` through the hooks, then on the source. `done` runs on this
  // thread (fast path) or later on a drive writer thread (slow path).
  // Writes: EROFS on a read-only drive, ENOSPC when off >= size, cut short at
  // the end. Punches and zeroings are clipped to the drive; block devices
  // take unaligned edges as written zeros.
  void Submit(const Op& op, Done done);
  // The blocking forms (tests, tools): Submit and wait.
  Result<size_t> Write(const void* buf, size_t len, uint64_t off);
  Status PunchHole(uint64_t off, uint64_t len);
  Status ZeroRange(uint64_t off, uint64_t len);
  // fdatasync (datasync) or fsync of the source.
  Status Flush(bool datasync);
  // Waits (at most `timeout`) until no operation is still on the slow path;
  // true if none is. For the end of a stop: then nothing writes any more.
  bool Quiesce(std::chrono::milliseconds timeout);
  // lseek(SEEK_DATA / SEEK_HOLE) on the source; ENXIO past the data.
  Result<uint64_t> Seek(uint64_t off, int whence) const;
  // Used bytes of the source (st_blocks * 512), for query-block.
  uint64_t AllocatedBytes() const;

  // The counters, each read atomically (the set is not one instant).
  DriveStats Stats() const;
  // A job made a copy-before-write copy of `bytes` of this drive.
  void NoteCbwCopy(uint64_t bytes);

  // Runs `change` on several drives at one common instant: closes the gates
  // of all of them (in address order), waits for in-flight writes, runs it,
  // reopens. Writes that returned before this call are visible to whatever
  // `change` sets up; writes that start after it see its effect. `change`
  // must not write to these drives.
  static void AtPointInTime(std::vector<Drive*> drives, const std::function<void()>& change);
  // Adds hooks at one instant (AtPointInTime + AddHookWithGateClosed).
  static void InstallHooks(const std::vector<std::pair<Drive*, std::shared_ptr<WriteHook>>>& hooks);
  // Adds a hook; only inside AtPointInTime's `change` for this drive.
  void AddHookWithGateClosed(std::shared_ptr<WriteHook> hook);
  // Removes a hook; returns once no write is still running it.
  void RemoveHook(const WriteHook* hook);

 private:
  Drive() = default;
  class GateGuard;
  class GateClosure;
  void CloseGate();
  void OpenGate();
  void EnterGate();
  void LeaveGate();
  // Runs the hooks and then `op` on the source, inside the gate. EAGAIN
  // from a hook when !may_block means "retry on the slow path".
  Result<size_t> Apply(const Op& op, bool may_block);
  Status RunSource(const Op& op);
  // Counts one completed write() that took `ns` nanoseconds.
  void NoteWrite(const Result<size_t>& r, uint64_t ns);
  // fallocate(mode) of [off, off+len) on the source. Block devices take only
  // whole logical blocks: the unaligned edges are written as zeroes. Falls
  // back to writing zeroes where the filesystem does not support `mode`.
  Status ZeroSource(int mode, uint64_t off, uint64_t len);

  std::string name_;
  std::string path_;
  bool readonly_ = false;
  bool is_block_ = false;
  uint64_t size_ = 0;
  uint64_t align_ = 1;  // logical block size of a block device, else 1
  dev_t dev_ = 0;
  ino_t ino_ = 0;
  UniqueFd fd_;
  std::shared_ptr<SourceLease> lease_;  // set with fd_
  std::shared_ptr<WorkerPool> slow_;    // the slow path's writer threads

  // Write gate (see the class comment).
  std::atomic<int> in_flight_{0};
  std::atomic<bool> closed_{false};
  std::mutex gate_mu_;  // only for waiting; protects nothing else
  std::condition_variable gate_cv_;
  std::mutex install_mu_;                          // serialises gate closers
  std::vector<std::shared_ptr<WriteHook>> hooks_;  // changed only with the gate closed

  // Counters (relaxed atomics: statistics, no ordering with the data).
  std::atomic<uint64_t> writes_{0};
  std::atomic<uint64_t> write_errors_{0};
  std::atomic<uint64_t> write_bytes_{0};
  std::atomic<uint64_t> cbw_copies_{0};
  std::atomic<uint64_t> cbw_bytes_{0};
  std::array<std::atomic<uint64_t>, kWriteLatencyBounds.size() + 1> latency_buckets_{};
  std::atomic<uint64_t> latency_sum_ns_{0};
};

}  // namespace cbw::backup
