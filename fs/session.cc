#include "fs/session.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "backup/log.h"

namespace cbw::fs {

using backup::Status;

Session::Session(CbwFs* fs, std::vector<std::string> mount_options)
    : fs_(fs), mount_options_(std::move(mount_options)) {}

Session::~Session() {
  Unmount();
  if (signals_) fuse_remove_signal_handlers(se_);
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
  if (fuse_set_signal_handlers(se_) != 0) {
    return Status::Error(EIO, "cannot install signal handlers");
  }
  signals_ = true;
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
  setsid();
  if (chdir("/") != 0) { /* "/" always exists; nothing relies on cwd after start */
  }
  int null = open("/dev/null", O_RDWR);
  if (null >= 0) {
    dup2(null, 0);
    dup2(null, 1);
    dup2(null, 2);
    if (null > 2) close(null);
  }
  backup::SetLogToSyslog(true);
  ready_fd_ = std::move(wr);
  int fd = ready_fd_.get();
  fs_->SetOnInit([fd] {
    char c = 1;
    if (write(fd, &c, 1) != 1) backup::LogWarn("could not tell the parent the mount is live");
  });
  return Status::Ok();
}

Status Session::Loop() {
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
  // r > 0 is the signal that ended the loop: a clean stop.
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
