#pragma once

#include <gtest/gtest.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tests/lib/test_support.h"

namespace cbw::test {

// Helpers for end-to-end tests that run the real cbwfs binary on a real FUSE
// mount. Every wait polls with a deadline; nothing sleeps a fixed time.

// Path of the cbwfs binary under test.
std::string CbwfsBinary();

// One cbwfs daemon on a temp mountpoint, run in the foreground (-f) as a
// child. The destructor always lazily unmounts and kills the daemon, whatever
// state the test left it in.
class CbwfsMount {
 public:
  CbwfsMount();
  ~CbwfsMount();
  CbwfsMount(const CbwfsMount&) = delete;
  CbwfsMount& operator=(const CbwfsMount&) = delete;

  // Starts cbwfs with `args` (e.g. {"--drive", "drive0=/x"}) and the
  // mountpoint last; succeeds once the mount answers and the daemon lives.
  ::testing::AssertionResult Start(const std::vector<std::string>& args);
  // SIGTERM (or `sig`), then waits for exit; returns the exit status (or
  // 128+signal if killed).
  int Stop(int sig = 15);
  // fusermount3 -u, then waits for the daemon's exit status.
  int Unmount();
  bool alive();

  const std::string& mnt() const { return mnt_; }
  std::string operator/(const std::string& name) const { return mnt_ + "/" + name; }
  std::string log() const;  // the daemon's stderr so far
  pid_t pid() const { return pid_; }

  // Writes `json` into control through a fresh open (one write()); returns 0
  // or the write's errno. `reply` gets what a fresh open then reads.
  int Control(const std::string& json, std::string* reply = nullptr);
  // The jobs/<id> record, or "" if absent.
  std::string JobRecord(const std::string& id);
  // Waits until jobs/<id> has "status" equal to one of `statuses`.
  bool WaitJobStatus(const std::string& id, const std::vector<std::string>& statuses,
                     std::chrono::milliseconds deadline = std::chrono::seconds(60));

 private:
  TempDir dir_;
  std::string mnt_;
  std::string log_path_;
  pid_t pid_ = -1;
  int exit_status_ = -1;
  bool Reap(bool wait);
};

}  // namespace cbw::test
