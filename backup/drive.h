#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backup/status.h"
#include "backup/unique_fd.h"

namespace cbw::backup {

// An observer of a drive's write path. Each live backup job installs one (its
// copy-before-write state); dirty bitmaps will be another.
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
  virtual Status BeforeWrite(uint64_t offset, uint64_t length) = 0;
};

struct DriveConfig {
  std::string name;  // as shown under the mountpoint
  std::string path;  // source: regular file or block device
  bool readonly = false;
};

// One source image behind the CBW interposer. Every write-like operation goes
// through Write/PunchHole/ZeroRange, which run the installed hooks first.
//
// Thread model: all methods are safe to call concurrently. The hook list is
// guarded by a write gate (not a mutex on the hot path): a writer enters the
// gate, runs hooks and writes the source, then leaves; InstallHooks and
// RemoveHook close the gate, wait for writers inside to drain, change the list
// and reopen it. So a hook sees every write that starts after its install
// returned, and none that returned before: that instant is a job's point in
// time. Lock order: Drive gate mutex is a leaf (hooks are never called with it
// held).
//
// Ownership: the Drive owns the source fd and its locks (released on close).
class Drive {
 public:
  // Opens and locks the source: O_RDWR (O_RDONLY if readonly), refused unless
  // a regular file or block device; takes an exclusive OFD lock (compatible
  // with QEMU's image locking bytes) and flock, so a second cbwfs or a QEMU
  // using the image is refused with EBUSY and a message naming the path.
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

  // Reads up to len bytes at off; short at the end of the drive, 0 past it.
  Result<size_t> Read(void* buf, size_t len, uint64_t off) const;
  // Writes through the hooks. ENOSPC when off >= size; cut short at the end.
  // EROFS on a read-only drive.
  Result<size_t> Write(const void* buf, size_t len, uint64_t off);
  // fallocate(PUNCH_HOLE|KEEP_SIZE) / (ZERO_RANGE|KEEP_SIZE) through the
  // hooks; the range is clipped to the drive. Block devices use BLKDISCARD /
  // BLKZEROOUT equivalents via fallocate where the kernel supports it, else
  // write zeroes.
  Status PunchHole(uint64_t off, uint64_t len);
  Status ZeroRange(uint64_t off, uint64_t len);
  // fdatasync (datasync) or fsync of the source.
  Status Flush(bool datasync);
  // lseek(SEEK_DATA / SEEK_HOLE) on the source; ENXIO past the data.
  Result<uint64_t> Seek(uint64_t off, int whence) const;
  // Used bytes of the source (st_blocks * 512), for query-block.
  uint64_t AllocatedBytes() const;

  // Installs hooks on several drives at one common instant: closes the gates
  // of all of them (in address order), waits for in-flight writes, adds each
  // hook, reopens. Writes that returned before this call are visible to the
  // copiers; writes that start after it run the new hooks.
  static void InstallHooks(const std::vector<std::pair<Drive*, std::shared_ptr<WriteHook>>>& hooks);
  // Removes a hook; returns once no write is still running it.
  void RemoveHook(const WriteHook* hook);

 private:
  Drive() = default;
  class GateGuard;
  void CloseGate();
  void OpenGate();
  void EnterGate();
  void LeaveGate();
  template <class Op>
  Status RunHooksThen(uint64_t off, uint64_t len, Op op);
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

  // Write gate (see the class comment).
  std::atomic<int> in_flight_{0};
  std::atomic<bool> closed_{false};
  std::mutex gate_mu_;  // only for waiting; protects nothing else
  std::condition_variable gate_cv_;
  std::mutex install_mu_;                          // serialises installers
  std::vector<std::shared_ptr<WriteHook>> hooks_;  // changed only with the gate closed
};

}  // namespace cbw::backup
