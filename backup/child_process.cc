#include "backup/child_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <thread>

#include "backup/log.h"
#include "backup/mutex.h"
#include "backup/threads.h"

extern char** environ;

namespace cbw::backup {
namespace {

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

// Everything the child needs, prepared before fork: between fork and exec
// the child of a multithreaded process may only make async-signal-safe
// calls (no allocation, no locks).
struct SpawnRequest {
  const char* path = nullptr;
  char* const* argv = nullptr;
  int out_fd = -1;
  int err_fd = -1;
  // Set by the spawner.
  pid_t pid = -1;
  int error = 0;
  bool done = false;
};

// Marks every descriptor from 3 up close-on-exec (the exec-status pipe must
// stay open until exec itself).
void CloexecFrom3() {
  if (syscall(SYS_close_range, 3u, ~0u, CLOSE_RANGE_CLOEXEC) == 0) return;
  struct rlimit rl {};
  long max = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY
                 ? static_cast<long>(rl.rlim_cur)
                 : 65536;
  max = std::min(max, 1L << 20);
  for (long fd = 3; fd < max; ++fd) {
    int fl = fcntl(static_cast<int>(fd), F_GETFD);
    if (fl >= 0) fcntl(static_cast<int>(fd), F_SETFD, fl | FD_CLOEXEC);
  }
}

[[noreturn]] void ChildAfterFork(const SpawnRequest& r, pid_t parent, int status_fd) {
  // Die with the daemon (see the header), unless it is already gone.
  if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || getppid() != parent) _exit(127);
  setpgid(0, 0);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig != SIGKILL && sig != SIGSTOP) sigaction(sig, &dfl, nullptr);
  }
  int null = open("/dev/null", O_RDWR);
  if (null < 0 || dup2(null, 0) < 0) _exit(127);
  if (dup2(r.out_fd >= 0 ? r.out_fd : null, 1) < 0) _exit(127);
  if (dup2(r.err_fd >= 0 ? r.err_fd : null, 2) < 0) _exit(127);
  CloexecFrom3();
  execve(r.path, r.argv, environ);
  int e = errno;
  ssize_t n = write(status_fd, &e, sizeof e);
  (void)n;
  _exit(127);
}

// The process-wide spawner: one thread, alive as long as the process, forks
// every child (PR_SET_PDEATHSIG is tied to the forking thread).
class Spawner {
 public:
  static Spawner& Get() {
    // Never destroyed: its thread must outlive every child it forked.
    static Spawner* const spawner = new Spawner();
    return *spawner;
  }

  void Spawn(SpawnRequest* r) CBW_EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    if (broken_ != 0) {
      r->error = broken_;
      r->done = true;
      return;
    }
    queue_.push_back(r);
    cv_.SignalAll();
    while (!r->done) done_cv_.Wait(&lock);
  }

 private:
  Spawner() {
    try {
      std::thread([this] { Run(); }).detach();
    } catch (...) {
      MutexLock lock(&mu_);
      broken_ = EAGAIN;
    }
  }

  void Run() CBW_EXCLUDES(mu_) {
    // Process-directed signals are for the daemon's signal watcher.
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, nullptr);
    RunGuarded(
        "process spawner",
        [&] {
          for (;;) {
            SpawnRequest* r;
            {
              MutexLock lock(&mu_);
              while (queue_.empty()) cv_.Wait(&lock);
              r = queue_.front();
              queue_.pop_front();
            }
            Fork(r);
            MutexLock lock(&mu_);
            r->done = true;
            done_cv_.SignalAll();
          }
        },
        [&](const std::string&) {
          // The thread ends (and with it its children, by their death
          // signal): refuse further spawns rather than hang them.
          MutexLock lock(&mu_);
          broken_ = EIO;
          for (SpawnRequest* r : queue_) {
            r->error = EIO;
            r->done = true;
          }
          queue_.clear();
          done_cv_.SignalAll();
        });
  }

  static void Fork(SpawnRequest* r) {
    int status_pipe[2];
    if (pipe2(status_pipe, O_CLOEXEC) != 0) {
      r->error = errno;
      return;
    }
    const pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) ChildAfterFork(*r, parent, status_pipe[1]);
    int fork_errno = errno;
    close(status_pipe[1]);
    if (pid < 0) {
      close(status_pipe[0]);
      r->error = fork_errno;
      return;
    }
    // EOF: exec succeeded (the pipe closed on exec); an int: exec's errno.
    int e = 0;
    ssize_t n;
    do {
      n = read(status_pipe[0], &e, sizeof e);
    } while (n < 0 && errno == EINTR);
    close(status_pipe[0]);
    if (n == static_cast<ssize_t>(sizeof e)) {
      int st;
      while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
      }
      r->error = e != 0 ? e : EIO;
      return;
    }
    r->pid = pid;
  }

  Mutex mu_;
  CondVar cv_;       // a request was queued
  CondVar done_cv_;  // a request was served
  std::deque<SpawnRequest*> queue_ CBW_GUARDED_BY(mu_);
  int broken_ CBW_GUARDED_BY(mu_) = 0;
};

std::optional<std::string> FindInPath(const std::string& name) {
  if (name.find('/') != std::string::npos) {
    return access(name.c_str(), X_OK) == 0 ? std::optional<std::string>(name) : std::nullopt;
  }
  const char* env = std::getenv("PATH");
  std::string path = env != nullptr && *env != '\0' ? env : "/usr/local/bin:/usr/bin:/bin";
  size_t i = 0;
  while (i <= path.size()) {
    size_t j = path.find(':', i);
    if (j == std::string::npos) j = path.size();
    std::string dir = j > i ? path.substr(i, j - i) : ".";
    std::string full = dir + "/" + name;
    struct stat st {};
    if (stat(full.c_str(), &st) == 0 && S_ISREG(st.st_mode) && access(full.c_str(), X_OK) == 0) {
      return full;
    }
    i = j + 1;
  }
  return std::nullopt;
}

std::string ReadMemFile(int fd) {
  std::string out;
  if (fd < 0) return out;
  struct stat st {};
  if (fstat(fd, &st) != 0 || st.st_size <= 0) return out;
  // Error messages are short; keep the end of anything long.
  constexpr off_t kMax = 64 * 1024;
  off_t from = std::max<off_t>(0, st.st_size - kMax);
  out.resize(static_cast<size_t>(st.st_size - from));
  ssize_t n = pread(fd, out.data(), out.size(), from);
  out.resize(n > 0 ? static_cast<size_t>(n) : 0);
  return out;
}

}  // namespace

Result<std::unique_ptr<ChildProcess>> ChildProcess::Start(const std::vector<std::string>& argv) {
  if (argv.empty()) return Status::Error(EINVAL, "no program to run");
  std::optional<std::string> path = FindInPath(argv[0]);
  if (!path) return Status::Error(ENOENT, "'" + argv[0] + "' not found in PATH");
  std::unique_ptr<ChildProcess> c(new ChildProcess());
  c->name_ = argv[0];
  c->out_.Reset(memfd_create("child-stdout", MFD_CLOEXEC));
  c->err_.Reset(memfd_create("child-stderr", MFD_CLOEXEC));
  if (!c->out_.valid() || !c->err_.valid()) return Status::FromErrno(errno, "memfd_create");
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  SpawnRequest r;
  r.path = path->c_str();
  r.argv = args.data();
  r.out_fd = c->out_.get();
  r.err_fd = c->err_.get();
  Spawner::Get().Spawn(&r);
  if (r.pid < 0) return Status::FromErrno(r.error, "Could not run '" + *path + "'");
  c->pid_ = r.pid;
  int pfd = static_cast<int>(syscall(SYS_pidfd_open, r.pid, 0));
  if (pfd >= 0) c->pidfd_.Reset(pfd);
  return c;
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0 && !status_) {
    Signal(SIGKILL);
    if (!WaitUntil(std::chrono::steady_clock::now() + std::chrono::seconds(5))) {
      LogWarn(name_ + " (pid " + std::to_string(pid_) + ") did not die on SIGKILL");
    }
  }
}

bool ChildProcess::WaitUntil(std::chrono::steady_clock::time_point deadline) {
  if (status_) return true;
  for (;;) {
    int st = 0;
    pid_t r = waitpid(pid_, &st, WNOHANG);
    if (r == pid_) {
      status_ = st;
      pidfd_.Reset();
      return true;
    }
    if (r < 0 && errno != EINTR) {
      // Not our child any more (someone else reaped it): treat as gone.
      status_ = W_EXITCODE(127, 0);
      pidfd_.Reset();
      return true;
    }
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return false;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now);
    if (pidfd_.valid()) {
      pollfd p{pidfd_.get(), POLLIN, 0};
      poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count() + 1, 1000)));
    } else {
      std::this_thread::sleep_for(std::min<std::chrono::milliseconds>(
          left + std::chrono::milliseconds(1), std::chrono::milliseconds(5)));
    }
  }
}

void ChildProcess::Signal(int sig) {
  if (pid_ > 0 && !status_) kill(pid_, sig);
}

std::string ChildProcess::Stdout() const { return ReadMemFile(out_.get()); }
std::string ChildProcess::Stderr() const { return ReadMemFile(err_.get()); }

std::string ChildProcess::DescribeStatus() const {
  if (!status_) return "is still running";
  if (WIFEXITED(*status_)) return "exited with status " + std::to_string(WEXITSTATUS(*status_));
  if (WIFSIGNALED(*status_)) {
    return std::string("was killed by signal ") + strsignal(WTERMSIG(*status_));
  }
  return "ended";
}

Result<std::unique_ptr<ChildProcess>> RunChild(const std::vector<std::string>& argv,
                                               std::chrono::milliseconds timeout) {
  auto c = ChildProcess::Start(argv);
  if (!c.ok()) return c.status();
  if (!(*c)->WaitUntil(std::chrono::steady_clock::now() + timeout)) {
    (*c)->Signal(SIGKILL);
    (*c)->WaitUntil(std::chrono::steady_clock::now() + std::chrono::seconds(5));
    return Status::Error(ETIMEDOUT, "'" + argv[0] + "' did not finish within " +
                                        std::to_string(timeout.count() / 1000) + " s");
  }
  return c;
}

}  // namespace cbw::backup
