#pragma once

// A faultfs mount (tests/tools/faultfs.cc) for a test's lifetime: a
// passthrough FUSE filesystem over `backing` whose I/O can be made to fail,
// slow down or hang by writing rules to MOUNTPOINT/.faults. Shared by the
// engine's fault tests and the end-to-end tests.

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>

#include "tests/lib/test_support.h"

namespace cbw::test {

class FaultFs {
 public:
  // `binary`: the faultfs executable (the test target's FAULTFS_PATH).
  FaultFs(const std::string& binary, const std::string& backing, const std::string& mnt)
      : mnt_(mnt) {
    mkdir(backing.c_str(), 0755);
    mkdir(mnt.c_str(), 0755);
    struct stat base {};
    stat(backing.c_str(), &base);
    pid_ = fork();
    if (pid_ == 0) {
      int null = open("/dev/null", O_RDWR);
      if (null >= 0) dup2(null, 1);
      execl(binary.c_str(), "faultfs", backing.c_str(), mnt.c_str(), nullptr);
      _exit(127);
    }
    mounted_ = WaitFor([&] {
      struct stat st {};
      return stat(mnt.c_str(), &st) == 0 && st.st_dev != base.st_dev;
    });
  }
  ~FaultFs() {
    if (pid_ <= 0) return;
    RunCommand({"fusermount3", "-uz", mnt_});
    kill(pid_, SIGTERM);
    if (!WaitFor([&] { return waitpid(pid_, nullptr, WNOHANG) == pid_; },
                 std::chrono::seconds(5))) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  FaultFs(const FaultFs&) = delete;
  FaultFs& operator=(const FaultFs&) = delete;

  bool mounted() const { return mounted_; }
  const std::string& mnt() const { return mnt_; }
  std::string operator/(const std::string& name) const { return mnt_ + "/" + name; }
  // Replaces all rules (and releases requests held by a `hang` rule).
  void SetRules(const std::string& rules) {
    WriteFileOrDie(mnt_ + "/.faults", rules.empty() ? std::string("\n") : rules);
  }
  // Waits until a slow or hang rule holds at least n requests.
  bool WaitHeld(int n = 1) {
    return WaitFor([&] { return Waiting() >= n; }, std::chrono::seconds(10));
  }
  // Requests a slow or hang rule holds right now.
  int Waiting() {
    std::string st = ReadFileOrDie(mnt_ + "/.status");
    return st.rfind("waiting ", 0) == 0 ? std::atoi(st.c_str() + 8) : -1;
  }

 private:
  std::string mnt_;
  pid_t pid_ = -1;
  bool mounted_ = false;
};

}  // namespace cbw::test
