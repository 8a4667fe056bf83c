#include "fs/session.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "backup/log.h"
#include "backup/threads.h"

namespace cbw::fs {

using backup::Status;

std::optional<dev_t> MountDevice(const std::string& mountpoint) {
  // Each line: id parent major:minor root mountpoint options ... - fstype ...
  // Mount points escape space, tab, newline and backslash as \ooo.
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  std::optional<dev_t> found;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string id, parent, majmin, root, mp;
    if (!(f >> id >> parent >> majmin >> root >> mp)) continue;
    std::string unescaped;
    for (size_t i = 0; i < mp.size(); ++i) {
      if (mp[i] == '\\' && i + 3 < mp.size()) {
        unescaped += static_cast<char>(std::stoi(mp.substr(i + 1, 3), nullptr, 8));
        i += 3;
      } else {
        unescaped += mp[i];
      }
    }
    if (unescaped != mountpoint) continue;
    unsigned maj = 0, min = 0;
    if (std::sscanf(majmin.c_str(), "%u:%u", &maj, &min) != 2) continue;
    found = makedev(maj, min);  // the last (newest) mount on it wins
  }
  return found;
}

Session::Session(CbwFs* fs, std::vector<std::string> mount_options)
    : fs_(fs), mount_options_(std::move(mount_options)) {}

Session::~Session() {
  Unmount();
  if (se_) fuse_session_destroy(se_);
}

Status Session::Mount(const std::string& mountpoint) {
  // default_permissions: the kernel checks the mode bits we report, so
  // control (0600) and the drives obey their owner even with allow_other.
  std::string opts = "fsname=cbwfs,subtype=cbwfs,default_permissions";
  for (const auto& o : mount_options_) opts += "," + o;
  std::vector<std::string> argv_s = {"cbwfs", "-o", opts};
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  se_ = fuse_session_new(&args, &CbwFs::Ops(), sizeof(fuse_lowlevel_ops), fs_);
  fuse_opt_free_args(&args);
  if (!se_) return Status::Error(EINVAL, "cannot start FUSE with mount options '" + opts + "'");
  sigset_t stop;
  sigemptyset(&stop);
  for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGUSR1}) sigaddset(&stop, sig);
  if (int e = pthread_sigmask(SIG_BLOCK, &stop, nullptr); e != 0) {
    return Status::FromErrno(e, "blocking signals");
  }
  // SIGUSR2 only interrupts the loop's wait (see Loop).
  struct sigaction sa {};
  sa.sa_handler = [](int) {};
  if (sigaction(SIGUSR2, &sa, nullptr) != 0) return Status::FromErrno(errno, "sigaction");
  if (signal(SIGPIPE, SIG_IGN) == SIG_ERR) return Status::FromErrno(errno, "ignoring SIGPIPE");
  if (fuse_session_mount(se_, mountpoint.c_str()) != 0) {
    return Status::Error(EIO, "cannot mount on '" + mountpoint +
                                  "' (is /dev/fuse available and fusermount3 installed?)");
  }
  mounted_ = true;
  return Status::Ok();
}

Status Session::Daemonize() {
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) return Status::FromErrno(errno, "pipe");
  backup::UniqueFd rd(p[0]), wr(p[1]);
  pid_t pid = fork();
  if (pid < 0) return Status::FromErrno(errno, "fork");
  if (pid > 0) {
    // Parent: the mount belongs to the child now; wait for its FUSE init.
    wr.Reset();
    char c = 0;
    ssize_t n;
    do {
      n = read(rd.get(), &c, 1);
    } while (n < 0 && errno == EINTR);
    _exit(n == 1 ? 0 : 1);
  }
  rd.Reset();
  // In the child: a failure here ends it, and the parent, seeing the pipe
  // close without a byte, exits 1.
  if (setsid() < 0) return Status::FromErrno(errno, "setsid");
  // Nothing relies on the cwd after start (paths were resolved against it).
  if (chdir("/") != 0) return Status::FromErrno(errno, "chdir /");
  // stdio to /dev/null: a caller capturing our output would wait forever.
  // No O_CLOEXEC: it may become fd 0..2 itself (no thread runs yet to exec).
  backup::UniqueFd null(open("/dev/null", O_RDWR));
  if (null.get() < 0) return Status::FromErrno(errno, "/dev/null");
  for (int fd : {0, 1, 2}) {
    if (dup2(null.get(), fd) < 0) return Status::FromErrno(errno, "dup2 /dev/null");
  }
  // If stdio was closed, /dev/null came back as one of 0..2: keep it open.
  if (null.get() <= 2) null.Release();
  backup::SetLogToSyslog(true);
  ready_fd_ = std::move(wr);
  int fd = ready_fd_.get();
  fs_->SetOnInit([fd] {
    char c = 1;
    if (write(fd, &c, 1) != 1) backup::LogWarn("could not tell the parent the mount is live");
  });
  return Status::Ok();
}

Status Session::Loop(std::function<void()> on_stop) {
  loop_thread_ = pthread_self();
  // The signal watcher: stops jobs while FUSE still serves, then ends the
  // loop. libfuse's loop only notices fuse_session_exit when its wait is
  // interrupted, hence SIGUSR2 to this thread. SIGUSR1 ends the watcher when
  // the loop ended by itself (unmount).
  std::thread watcher([this, on_stop = std::move(on_stop)] {
    backup::RunGuarded("signal watcher", [&] {
      sigset_t set;
      sigemptyset(&set);
      for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGUSR1}) sigaddset(&set, sig);
      int sig = 0;
      if (int e = sigwait(&set, &sig); e != 0) {
        backup::LogError(std::string("signal watcher: sigwait: ") + std::strerror(e));
        return;
      }
      if (sig == SIGUSR1) return;
      backup::RunGuarded("stopping on a signal", [&] {
        backup::LogInfo(std::string("got ") + strsignal(sig) + ": stopping");
        if (on_stop) on_stop();
      });
      // Whatever on_stop did, the loop ends: a signal always stops the daemon.
      fuse_session_exit(se_);
      if (int e = pthread_kill(loop_thread_, SIGUSR2); e != 0) {
        backup::LogError(std::string("waking the FUSE loop: ") + std::strerror(e));
      }
    });
  });

  fuse_loop_config* cfg = fuse_loop_cfg_create();
  // One /dev/fuse fd per worker (no contention on a shared fd). Workers are
  // started on demand and never retired: a cap on idle threads makes libfuse
  // create and destroy a thread per request under load. 16 bounds memory (each
  // worker owns a max_write-sized buffer) while leaving room for writers that
  // wait on CBW copies; blocked events readers hold no worker.
  fuse_loop_cfg_set_clone_fd(cfg, 1);
  fuse_loop_cfg_set_max_threads(cfg, 16);
  int r = fuse_session_loop_mt(se_, cfg);
  fuse_loop_cfg_destroy(cfg);
  ready_fd_.Reset();
  // The watcher is in sigwait (SIGUSR1 ends it) unless a signal ended the
  // loop and it is exiting on its own (ESRCH then is no error).
  if (int e = pthread_kill(watcher.native_handle(), SIGUSR1); e != 0 && e != ESRCH) {
    backup::LogError(std::string("stopping the signal watcher: ") + std::strerror(e));
  }
  watcher.join();
  if (r < 0) return Status::Error(-r, std::string("FUSE loop: ") + std::strerror(-r));
  return Status::Ok();
}

void Session::Unmount() {
  if (mounted_) {
    fuse_session_unmount(se_);
    mounted_ = false;
  }
}

}  // namespace cbw::fs
