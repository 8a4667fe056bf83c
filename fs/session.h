#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <pthread.h>

#include <atomic>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "backup/status.h"
#include "backup/unique_fd.h"
#include "fs/cbw_fs.h"

namespace cbw::fs {

// The st_dev of the FUSE mount at `mountpoint` (absolute, canonical), read
// from /proc/self/mountinfo (the newest mount there), without any call into
// the mounted filesystem. nullopt if not found.
std::optional<dev_t> MountDevice(const std::string& mountpoint);

// Owns one FUSE session: creation, mount, signal handlers, detaching, the
// multithreaded loop and unmount. Destruction unmounts (if still mounted) and
// destroys the session. Not thread-safe: used by main only.
class Session {
 public:
  Session(CbwFs* fs, std::vector<std::string> mount_options);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Creates the session and mounts it. Blocks SIGTERM/SIGINT/SIGHUP in the
  // calling thread (and so in every thread started later): Loop() takes them
  // on a thread of its own.
  backup::Status Mount(const std::string& mountpoint);
  // Forks. The parent waits until the child's FUSE init has run, then exits 0
  // (or 1 if the child died first); it never returns. The child detaches
  // (setsid, stdio to /dev/null, cwd "/"), logs to syslog and returns OK.
  backup::Status Daemonize();
  // Runs the multithreaded loop until unmount or a signal. On SIGTERM,
  // SIGINT or SIGHUP (SPEC 8 "Stopping"): if drive files are open, logs which
  // and keeps serving until they are all closed (or a second signal comes);
  // then `on_stop` runs while the mount still serves (so events readers see
  // jobs being cancelled), and the loop ends.
  backup::Status Loop(std::function<void()> on_stop);
  // The most FUSE worker threads Loop may start (default 16; started on
  // demand). Call before Loop.
  void set_max_threads(unsigned n) { max_threads_ = n; }
  void Unmount();

 private:
  // The next stop signal's number, 0 when woken through `wake_fd`, -1 when
  // polling failed.
  static int WaitForSignal(int signal_fd, int wake_fd);
  // The signal watcher thread's body.
  void WatchSignals(int signal_fd, int wake_fd, const std::function<void()>& on_stop);

  CbwFs* fs_;
  std::vector<std::string> mount_options_;
  fuse_session* se_ = nullptr;
  bool mounted_ = false;
  unsigned max_threads_ = 16;
  pthread_t loop_thread_{};
  std::atomic<bool> loop_ended_{false};  // set by Loop for the watcher
  // Wakes the watcher: the loop ended, or a drive file closed during a stop.
  // A member (not Loop's) because CbwFs keeps the close callback that uses it.
  backup::UniqueFd wake_fd_;
  backup::UniqueFd ready_fd_;  // the child's end of the "init done" pipe
};

}  // namespace cbw::fs
