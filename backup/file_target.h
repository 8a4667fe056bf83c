#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "backup/target.h"
#include "backup/target_path.h"
#include "backup/unique_fd.h"

namespace cbw::backup {

// A local regular file or block device as a backup target. Synchronous I/O
// is pread/pwrite on the fd; the copier's queue is an io_uring ring of its
// own. Zero ranges: a block device gets ZERO_RANGE, a file a punched hole
// (with pwrite of zeros where the file system can do neither). Thread-safe as
// Target says; the fd is closed by the destructor, i.e. by the last user.
class FileTarget : public Target {
 public:
  // Opens (or, for mode absolute-paths, creates) the resolved path. See
  // OpenTarget for what is refused.
  static Result<std::shared_ptr<FileTarget>> Open(const TargetRequest& req, ResolvedPath where,
                                                  const std::vector<Drive*>& drives);
  ~FileTarget() override;

  int fd() const { return fd_.get(); }
  dev_t dev() const { return dev_; }
  ino_t ino() const { return ino_; }
  bool is_block() const { return is_block_; }

  Status Prepare() override;
  void Discard() override;
  Status Write(const char* buf, size_t len, uint64_t off) override;
  Status WriteZeroes(uint64_t off, uint64_t len) override;
  Status Read(char* buf, size_t len, uint64_t off) override;
  Result<uint64_t> Seek(uint64_t off, int whence) override;
  Status Flush() override;
  Result<std::unique_ptr<TargetQueue>> OpenQueue(unsigned depth) override;

 private:
  FileTarget() = default;

  UniqueFd fd_;
  UniqueFd parent_;  // the directory holding it (to undo a creation safely)
  std::string name_;
  std::string path_;
  dev_t dev_ = 0;
  ino_t ino_ = 0;
  bool is_block_ = false;
  bool created_ = false;
  bool truncate_ = false;  // Prepare() makes it all-hole at the drive's size
};

}  // namespace cbw::backup
