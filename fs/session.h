#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <string>
#include <vector>

#include "backup/status.h"
#include "backup/unique_fd.h"
#include "fs/cbw_fs.h"

namespace cbw::fs {

// Owns one FUSE session: creation, mount, signal handlers, detaching, the
// multithreaded loop and unmount. Destruction unmounts (if still mounted) and
// destroys the session. Not thread-safe: used by main only.
class Session {
 public:
  Session(CbwFs* fs, std::vector<std::string> mount_options);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Creates the session and mounts it; installs SIGTERM/SIGINT/SIGHUP
  // handlers that end the loop.
  backup::Status Mount(const std::string& mountpoint);
  // Forks. The parent waits until the child's FUSE init has run, then exits 0
  // (or 1 if the child died first); it never returns. The child detaches
  // (setsid, stdio to /dev/null, cwd "/"), logs to syslog and returns OK.
  backup::Status Daemonize();
  // Runs the multithreaded loop until unmount or a signal.
  backup::Status Loop();
  void Unmount();

 private:
  CbwFs* fs_;
  std::vector<std::string> mount_options_;
  fuse_session* se_ = nullptr;
  bool mounted_ = false;
  bool signals_ = false;
  backup::UniqueFd ready_fd_;  // the child's end of the "init done" pipe
};

}  // namespace cbw::fs
