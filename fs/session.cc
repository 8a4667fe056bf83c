#include "fs/session.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
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
  fs_->SetSession(se_);
  // SIGUSR1 is blocked too, so that a stray one does not kill the daemon
  // (its default action) with the mount up.
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

namespace {

const char* SignalName(int sig) {
  switch (sig) {
    case SIGTERM:
      return "SIGTERM";
    case SIGINT:
      return "SIGINT";
    case SIGHUP:
      return "SIGHUP";
    default:
      return "a signal";
  }
}

// "drive0 (2 open handles), drive1 (1 open handle)"
std::string Describe(const std::vector<CbwFs::OpenDrive>& open) {
  std::string out;
  for (const auto& d : open) {
    if (!out.empty()) out += ", ";
    out += d.name + " (" + std::to_string(d.handles) +
           (d.handles == 1 ? " open handle)" : " open handles)");
  }
  return out;
}

}  // namespace

int Session::WaitForSignal(int signal_fd, int wake_fd) {
  for (;;) {
    pollfd fds[2] = {{signal_fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      backup::LogError(std::string("signal watcher: poll: ") + std::strerror(errno));
      return -1;
    }
    if (fds[0].revents & POLLIN) {
      signalfd_siginfo si{};
      if (read(signal_fd, &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
        return static_cast<int>(si.ssi_signo);
      }
    }
    if (fds[1].revents & POLLIN) {
      eventfd_t n;
      eventfd_read(wake_fd, &n);
      return 0;
    }
  }
}

void Session::WatchSignals(int signal_fd, int wake_fd, const std::function<void()>& on_stop) {
  int sig = WaitForSignal(signal_fd, wake_fd);
  if (sig <= 0) return;  // the loop ended by itself (unmount), or poll failed
  // A stop while drive files are open would cut their users off (an ext4 on
  // a loop device over a drive aborts its journal): serve until they close,
  // unless a second signal insists. fusermount3 -u cannot stop it meanwhile
  // either: the kernel refuses to unmount a busy mount.
  std::vector<CbwFs::OpenDrive> open = fs_->BeginStop([wake_fd] { eventfd_write(wake_fd, 1); });
  if (open.empty()) {
    backup::LogInfo(std::string("got ") + SignalName(sig) + ": stopping");
  } else {
    backup::LogWarn(std::string("got ") + SignalName(sig) +
                    " with drive files open: " + Describe(open) +
                    "; serving until they are closed, then stopping (a second SIGTERM or "
                    "SIGINT stops now)");
    for (;;) {
      int again = WaitForSignal(signal_fd, wake_fd);
      if (again < 0 || loop_ended_.load()) return;
      open = fs_->OpenDrives();
      if (again > 0) {
        backup::LogWarn(std::string("got ") + SignalName(again) + " again: stopping now" +
                        (open.empty() ? "" : ", with drive files open: " + Describe(open)));
        break;
      }
      if (open.empty()) {
        backup::LogInfo("the drive files are closed: stopping");
        break;
      }
      backup::LogInfo("still open: " + Describe(open));
    }
  }
  backup::RunGuarded("stopping on a signal", [&] {
    if (on_stop) on_stop();
  });
  // Whatever on_stop did, the loop ends. libfuse's loop only notices
  // fuse_session_exit when its wait is interrupted, hence SIGUSR2.
  fuse_session_exit(se_);
  if (int e = pthread_kill(loop_thread_, SIGUSR2); e != 0) {
    backup::LogError(std::string("waking the FUSE loop: ") + std::strerror(e));
  }
}

Status Session::Loop(std::function<void()> on_stop) {
  loop_thread_ = pthread_self();
  // The stop signals are blocked in every thread (Mount), so they wait for
  // the watcher's signalfd. The eventfd wakes the watcher when the loop ends
  // by itself (unmount) and, during a stop, when a drive file closes.
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGTERM, SIGINT, SIGHUP}) sigaddset(&set, sig);
  backup::UniqueFd signal_fd(signalfd(-1, &set, SFD_CLOEXEC));
  if (!signal_fd.valid()) return Status::FromErrno(errno, "signalfd");
  wake_fd_ = backup::UniqueFd(eventfd(0, EFD_CLOEXEC));
  if (!wake_fd_.valid()) return Status::FromErrno(errno, "eventfd");
  loop_ended_ = false;
  std::thread watcher([&] {
    backup::RunGuarded("signal watcher",
                       [&] { WatchSignals(signal_fd.get(), wake_fd_.get(), on_stop); });
  });

  fuse_loop_config* cfg = fuse_loop_cfg_create();
  // One /dev/fuse fd per worker (no contention on a shared fd). Workers are
  // started on demand and never retired: a cap on idle threads makes libfuse
  // create and destroy a thread per request under load. The cap (16 by
  // default) bounds memory (each worker owns a max_write-sized buffer) while
  // leaving room for writers that wait on CBW copies; blocked events readers
  // hold no worker.
  fuse_loop_cfg_set_clone_fd(cfg, 1);
  fuse_loop_cfg_set_max_threads(cfg, max_threads_);
  int r = fuse_session_loop_mt(se_, cfg);
  fuse_loop_cfg_destroy(cfg);
  ready_fd_.Reset();
  // The watcher waits for a signal or for this (unless a signal ended the
  // loop and it is finishing on its own).
  loop_ended_ = true;
  eventfd_write(wake_fd_.get(), 1);
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
