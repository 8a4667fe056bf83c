#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backup/status.h"
#include "backup/unique_fd.h"

namespace cbw::backup {

// A helper program cbwfs runs (qemu-nbd, qemu-img) that must never outlive
// the daemon, kill -9 included.
//
// How: every child is forked by one spawner thread that lives as long as the
// process (a process-wide object created on first use and never destroyed),
// and the child sets PR_SET_PDEATHSIG(SIGTERM) before it execs. Linux sends
// that signal when the *thread* that forked the child exits, so forking from
// a job's or a FUSE worker's thread would kill qemu-nbd whenever that thread
// happened to leave; the spawner thread leaves only with the process. After
// prctl the child re-checks getppid() (the daemon may have died between fork
// and prctl) and exits if it was orphaned. The child also gets its own
// process group (a Ctrl-C meant for a foreground cbwfs must not kill it
// under a running job: the daemon stops it itself), a clean signal mask and
// default dispositions (the daemon blocks SIGTERM in its threads and ignores
// SIGPIPE, which exec would otherwise pass on), and no file descriptors but
// 0, 1 and 2.
//
// stdout and stderr go to memory files the daemon reads back (error messages
// of qemu-img and qemu-nbd).
//
// Thread safety: a ChildProcess is used by one thread at a time (its
// target); Start may be called from any thread. Ownership: the destructor
// kills (SIGKILL) and reaps a child still running.
class ChildProcess {
 public:
  // Starts argv (argv[0] is looked up in PATH unless it holds a '/').
  // Fails with ENOENT "<name> not found" when the program is missing.
  static Result<std::unique_ptr<ChildProcess>> Start(const std::vector<std::string>& argv);
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  const std::string& name() const { return name_; }
  // Waits for the child to exit until `deadline`; true once it has (its
  // wait status is then in wait_status()).
  bool WaitUntil(std::chrono::steady_clock::time_point deadline);
  bool exited() { return WaitUntil(std::chrono::steady_clock::time_point::min()); }
  std::optional<int> wait_status() const { return status_; }
  // Sends `sig` if the child has not been reaped yet.
  void Signal(int sig);
  // What the child wrote to stdout / stderr so far.
  std::string Stdout() const;
  std::string Stderr() const;
  // "exited with status N", "was killed by signal S".
  std::string DescribeStatus() const;

 private:
  ChildProcess() = default;

  pid_t pid_ = -1;
  std::string name_;
  UniqueFd pidfd_;  // pollable exit (pidfd_open), when the kernel has it
  UniqueFd out_, err_;
  std::optional<int> status_;
};

// Runs argv to completion with a deadline (killing it when the deadline
// passes). Returns the child, exited, for its status and output.
Result<std::unique_ptr<ChildProcess>> RunChild(const std::vector<std::string>& argv,
                                               std::chrono::milliseconds timeout);

}  // namespace cbw::backup
