#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backup/job_types.h"
#include "backup/status.h"

namespace cbw::backup {

class Drive;

// One finished asynchronous target request: its tag and 0 or an errno.
struct TargetCompletion {
  uint64_t tag = 0;
  int error = 0;
};

// A queue of asynchronous requests on one target, for one thread (the
// background copier). Requests complete whole or with an errno: short
// transfers are finished inside. Buffers must stay valid until their
// completion is reaped. Not thread-safe.
class TargetQueue {
 public:
  virtual ~TargetQueue() = default;
  // Readable (POLLIN) when Reap may have completions; the copier waits on it
  // together with its source reads.
  virtual int poll_fd() const = 0;
  // At most the depth given to Target::OpenQueue may be in flight.
  virtual void SubmitWrite(const char* buf, size_t len, uint64_t off, uint64_t tag) = 0;
  virtual void SubmitZeroes(uint64_t off, uint64_t len, uint64_t tag) = 0;
  // Moves the completions that are ready into `out`; never blocks.
  virtual void Reap(std::vector<TargetCompletion>* out) = 0;
  virtual unsigned in_flight() const = 0;
  // A hint that much has been written: start writing it back (files), so
  // the final flush has little left to do.
  virtual void StartWriteback() {}
};

// Where a backup job writes the point-in-time image: a local file or block
// device, an NBD export, a Ceph RBD image, or a qcow2 image (SPEC 6). The
// copier and the copy-before-write path see only this interface.
//
// Thread safety: the synchronous methods may be called from any thread at
// once (CBW workers, snapshot readers); a queue belongs to one thread.
// Ownership: shared. Every user (the job, its copier, a CBW copy, a view
// read) holds a shared_ptr, so a user stuck in I/O on a dead target keeps
// the target alive and the last one to let go closes it.
class Target {
 public:
  virtual ~Target() = default;
  Target(const Target&) = delete;
  Target& operator=(const Target&) = delete;

  // As the user named it (made absolute for relative paths): JobInfo.target.
  const std::string& display() const { return display_; }
  // What makes two targets the same one (another live job's target is
  // refused), e.g. "file:<dev>:<ino>".
  const std::string& identity() const { return identity_; }
  // Bytes the target can hold (at least the drive's size).
  uint64_t size() const { return size_; }
  // True when ranges never written read as zeros (a freshly created target
  // without backing): zero ranges may then be skipped. Otherwise they are
  // written as zeros (never skipped, never trimmed).
  bool zeroed() const { return zeroed_; }

  // Called once every target of a transaction is open and valid: the only
  // step that changes an existing target (e.g. truncating a raw file).
  virtual Status Prepare() { return Status::Ok(); }
  // Undoes OpenTarget for a refused transaction: removes what it created.
  virtual void Discard() {}

  virtual Status Write(const char* buf, size_t len, uint64_t off) = 0;
  virtual Status WriteZeroes(uint64_t off, uint64_t len) = 0;
  // Reads `len` bytes (zeros past what the medium holds).
  virtual Status Read(char* buf, size_t len, uint64_t off) = 0;
  // lseek(SEEK_DATA/SEEK_HOLE) semantics; media that cannot tell report all
  // data (SEEK_DATA returns off, SEEK_HOLE the end).
  virtual Result<uint64_t> Seek(uint64_t off, int whence) {
    return whence == SEEK_DATA ? off : size_;
  }
  // Makes everything written so far durable.
  virtual Status Flush() = 0;
  virtual Result<std::unique_ptr<TargetQueue>> OpenQueue(unsigned depth) = 0;
  // Ends the target when its job concludes (e.g. stops a qemu-nbd child
  // cleanly). Users still holding it get errors from then on. Idempotent.
  virtual Status Close() { return Status::Ok(); }

 protected:
  Target() = default;
  std::string display_;
  std::string identity_;
  uint64_t size_ = 0;
  bool zeroed_ = false;
};

// What drive-backup asked for, and what the daemon knows about its mount.
struct TargetRequest {
  std::string spec;        // as given: a path, nbd:// or nbd+unix:// (rbd: later)
  std::string base_dir;    // relative paths are relative to this
  std::string mountpoint;  // absolute, canonical: refused by path
  dev_t mount_dev = 0;     // the mount's st_dev: refused by device (0: unknown)
  TargetMode mode = TargetMode::kAbsolutePaths;
  // `format` as given ("raw", "qcow2"); unset: raw, or probed with mode
  // existing.
  std::optional<std::string> format;
  uint64_t size = 0;  // the drive's size
  // Remote targets (NBD, qcow2 through qemu-nbd): a server with requests
  // outstanding that answers nothing for this long fails them (ETIMEDOUT).
  std::chrono::milliseconds io_timeout{30'000};
};

// Validates and opens a target without changing anything on disk except
// creating a missing file (mode absolute-paths). Refuses, before anything
// under the mountpoint is looked up, a target inside the mount; refuses a
// drive's source, a wrong file type, a target smaller than the drive, and
// (mode existing, no format) a foreign image format; a qcow2 image found so
// is written as qcow2. nbd:// and nbd+unix:// specs are NBD exports
// (backup/nbd_target.h). Does I/O on a user-given path and may connect to
// a server: never call it with an engine lock held.
Result<std::shared_ptr<Target>> OpenTarget(const TargetRequest& req,
                                           const std::vector<Drive*>& drives);

// The name of a foreign image format recognised in `head` (the first bytes
// of a file), or nullopt for none.
std::optional<std::string> ProbeImageFormat(const unsigned char* head, size_t len);

}  // namespace cbw::backup
