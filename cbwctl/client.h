#pragma once

#include <unistd.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cbwctl/outcome.h"
#include "cbwctl/qmp.h"

namespace cbw::ctl {

// The I/O side of cbwctl: a mounted cbwfs seen only through its files
// (SPEC 2): control for commands, jobs/<id> for records, events for
// changes. Not thread-safe; cbwctl is single-threaded.

// Owns one file descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      if (fd_ >= 0) close(fd_);
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_ = -1;
};

// Ctrl-C while waiting: a SIGINT handler (without SA_RESTART, so blocking
// calls return EINTR) that marks the process interrupted and wakes a poll()
// through a self-pipe. Installed once, by the waiter.
void InstallInterruptHandler();
bool Interrupted();
// The read end of the self-pipe (readable once SIGINT came), or -1.
int InterruptFd();

class Mount {
 public:
  // Checks that `path` is a live cbwfs mount (its control file is there);
  // fails with kExitMount saying what is wrong (ENOTCONN: the daemon died).
  static Result<Mount> Open(const std::string& path);

  const std::string& path() const { return path_; }

  // Sends `command` in one write() on a fresh open of control and reads its
  // reply on that same open (SPEC 2.2). A QMP error is a Reply with ok ==
  // false; an Error means no reply could be had (kExitMount), or the write
  // was refused with no reply of ours to show (kExitRefused, errno text).
  Result<Reply> Execute(const OrderedJson& command);

  // jobs/<id>'s text; nullopt when there is no such record.
  Result<std::optional<std::string>> ReadRecord(const std::string& id);
  // The ids in jobs/.
  Result<std::vector<std::string>> JobIds();

 private:
  explicit Mount(std::string path) : path_(std::move(path)) {}
  std::string path_;
  unsigned sequence_ = 0;
};

// One open of MOUNTPOINT/events (O_NONBLOCK): the events emitted since it was
// opened, split into lines.
class EventStream {
 public:
  static Result<EventStream> Open(const Mount& mount);
  int fd() const { return fd_.get(); }
  // Reads whatever is available without blocking and appends each complete
  // line to `lines`. Returns false once the daemon has ended the stream.
  Result<bool> ReadAvailable(std::vector<std::string>* lines);

 private:
  Fd fd_;
  std::string partial_;
};

}  // namespace cbw::ctl
