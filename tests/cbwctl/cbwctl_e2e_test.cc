// cbwctl against the real cbwfs on a real mount: exit codes by job result,
// the daemon's error texts, status output, and the progress display through
// a pty (redrawn in place) and through a pipe (plain lines).

#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "tests/fs/mount_fixture.h"
#include "tests/fs/shell_helpers.h"

extern char** environ;

namespace cbw::test {
namespace {

using namespace std::chrono_literals;

constexpr int kJobFailed = 1;
constexpr int kUsage = 2;
constexpr int kCancelled = 3;
constexpr int kRefused = 4;
constexpr int kMount = 5;
constexpr int kInterrupted = 130;

std::string CbwctlBinary() {
  const char* env = getenv("CBWCTL_BINARY");
  return env && *env ? env : CBWCTL_BINARY_PATH;
}

int Count(const std::string& s, const std::string& what) {
  int n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + what.size())) ++n;
  return n;
}

// One cbwctl run in the background, its stdout on a pipe or on a pty (raw
// mode, so the bytes read are the bytes written), its stderr on a pipe.
// Killed on destruction if still running.
class Proc {
 public:
  Proc(const std::vector<std::string>& args, bool pty) {
    int out[2] = {-1, -1}, err[2] = {-1, -1};
    if (pty) {
      termios raw{};
      cfmakeraw(&raw);
      winsize ws{};
      ws.ws_col = 120;
      ws.ws_row = 40;
      if (openpty(&out[0], &out[1], nullptr, &raw, &ws) != 0) return;
      fcntl(out[0], F_SETFD, FD_CLOEXEC);
      fcntl(out[1], F_SETFD, FD_CLOEXEC);
    } else if (pipe2(out, O_CLOEXEC) != 0) {
      return;
    }
    if (pipe2(err, O_CLOEXEC) != 0) return;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, err[1], 2);
    std::vector<std::string> argv = {CbwctlBinary()};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> cargs;
    for (auto& a : argv) cargs.push_back(a.data());
    cargs.push_back(nullptr);
    if (posix_spawn(&pid_, cargs[0], &fa, nullptr, cargs.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    close(err[1]);
    fds_[0] = out[0];
    fds_[1] = err[0];
  }
  ~Proc() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    for (int fd : fds_) {
      if (fd >= 0) close(fd);
    }
  }
  Proc(const Proc&) = delete;
  Proc& operator=(const Proc&) = delete;

  bool started() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  // Collects output until `cond` holds (true) or the deadline passes.
  bool ReadUntil(const std::function<bool()>& cond, std::chrono::milliseconds deadline = 20s) {
    auto end = std::chrono::steady_clock::now() + deadline;
    while (!cond()) {
      if (std::chrono::steady_clock::now() > end || (fds_[0] < 0 && fds_[1] < 0)) return cond();
      Pump(50);
    }
    return true;
  }
  // Collects all output and the exit status (128+signal if killed; -1 if
  // still running at the deadline).
  int Finish(std::chrono::milliseconds deadline = 60s) {
    ReadUntil([&] { return fds_[0] < 0 && fds_[1] < 0; }, deadline);
    auto end = std::chrono::steady_clock::now() + deadline;
    int st = 0;
    for (;;) {
      pid_t r = waitpid(pid_, &st, WNOHANG);
      if (r == pid_) break;
      if (std::chrono::steady_clock::now() > end) return -1;
      std::this_thread::sleep_for(5ms);
    }
    pid_ = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }

  std::string out;
  std::string err;

 private:
  void Pump(int timeout_ms) {
    pollfd p[2] = {{fds_[0], POLLIN, 0}, {fds_[1], POLLIN, 0}};
    if (poll(p, 2, timeout_ms) <= 0) return;
    for (int i = 0; i < 2; ++i) {
      if (fds_[i] < 0 || !(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[4096];
      ssize_t n = read(fds_[i], buf, sizeof buf);
      if (n > 0) {
        (i == 0 ? out : err).append(buf, static_cast<size_t>(n));
      } else if (n == 0 || errno != EINTR) {  // a pty's master reads EIO once the child is gone
        close(fds_[i]);
        fds_[i] = -1;
      }
    }
  }

  pid_t pid_ = -1;
  int fds_[2] = {-1, -1};
};

class CbwctlTest : public MountedDrive {
 protected:
  // Runs cbwctl -m MOUNTPOINT `args` to its end.
  CommandResult Ctl(const std::vector<std::string>& args, std::chrono::seconds deadline = 60s) {
    std::vector<std::string> argv = {CbwctlBinary(), "-m", mount_.mnt()};
    argv.insert(argv.end(), args.begin(), args.end());
    return RunCommand(argv, deadline);
  }
  std::vector<std::string> WithMount(std::vector<std::string> args) {
    args.insert(args.begin(), {"-m", mount_.mnt()});
    return args;
  }
  std::string Target(const std::string& name) { return dir_ / name; }
  // The desc of the last reply the daemon gave (any open).
  std::string LastDesc() {
    json r = LastReply();
    return r.contains("error") ? r["error"].value("desc", "") : "";
  }
};

TEST_F(CbwctlTest, BackupWaitSucceedsAndTheTargetEqualsTheSource) {
  MountDrive(8 << 20);
  CommandResult r = Ctl({"backup", "drive0", Target("t.img"), "--wait"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(r.err, "");
  EXPECT_NE(r.out.find("drive0: success, 8.0 MiB in "), std::string::npos) << r.out;
  EXPECT_TRUE(ReadFileOrDie(Target("t.img")) == image_) << "target differs from the source";
  EXPECT_EQ(Record(mount_, "drive0").value("result", ""), "success");
}

TEST_F(CbwctlTest, RelativeTargetIsCbwctlsWorkingDirectoryAndJobIdIsUsed) {
  MountDrive(1 << 20);
  mkdir((dir_ / "sub").c_str(), 0755);
  CommandResult r = RunShell("cd " + Q(dir_ / "sub") + " && " + Q(CbwctlBinary()) + " -m " +
                             Q(mount_.mnt()) + " backup drive0 rel.img --job-id nightly --wait -q");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(r.out, "");  // -q
  json rec = Record(mount_, "nightly");
  EXPECT_EQ(rec.value("target", ""), dir_ / "sub/rel.img");
  EXPECT_TRUE(ReadFileOrDie(dir_ / "sub/rel.img") == image_);
}

TEST_F(CbwctlTest, DefaultMountpointFromTheEnvironment) {
  MountDrive(1 << 20);
  CommandResult r =
      RunShell("CBWFS_MOUNT=" + Q(mount_.mnt()) + " " + Q(CbwctlBinary()) + " status --json");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "");  // no jobs yet
  // -m wins over the environment.
  r = RunShell("CBWFS_MOUNT=/nonexistent " + Q(CbwctlBinary()) + " -m " + Q(mount_.mnt()) +
               " status");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("JOB ", 0), 0u) << r.out;
}

TEST_F(CbwctlTest, FailingJobExitsWithTheFailedCodeAndShowsTheError) {
  MountDrive(8 << 20);
  const std::string small = dir_ / "small";
  mkdir(small.c_str(), 0755);
  if (mount("tmpfs", small.c_str(), "tmpfs", 0, "size=1M") != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs here: " << strerror(errno);
  }
  CommandResult r = Ctl({"backup", "drive0", small + "/t.img", "--wait"});
  umount2(small.c_str(), MNT_DETACH);
  EXPECT_EQ(r.exit_code, kJobFailed) << r.out << r.err;
  EXPECT_NE(r.err.find("cbwctl: job drive0 failed: No space left on device"), std::string::npos)
      << r.err;
  EXPECT_NE(r.out.find("failed"), std::string::npos) << r.out;
  EXPECT_EQ(Record(mount_, "drive0").value("result", ""), "failed");
  // wait on the ended job says the same at once.
  r = Ctl({"wait", "drive0"});
  EXPECT_EQ(r.exit_code, kJobFailed) << r.err;
  EXPECT_NE(r.err.find("No space left on device"), std::string::npos) << r.err;
}

TEST_F(CbwctlTest, CancelOfARunningJobMakesWaitExitCancelled) {
  MountDrive(32 << 20);
  CommandResult r = Ctl({"backup", "drive0", Target("t.img"), "--speed", "1M"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "started job drive0\n");

  Proc wait(WithMount({"wait", "drive0"}), /*pty=*/false);
  ASSERT_TRUE(wait.started());
  // Its first line says it is following the job.
  ASSERT_TRUE(wait.ReadUntil([&] { return wait.out.find("drive0: running") != std::string::npos; }))
      << wait.out << wait.err;
  r = Ctl({"cancel", "drive0"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(wait.Finish(), kCancelled) << wait.out << wait.err;
  EXPECT_NE(wait.err.find("cbwctl: job drive0 was cancelled at "), std::string::npos) << wait.err;
  EXPECT_EQ(Record(mount_, "drive0").value("result", ""), "cancelled");

  // A job that has already ended is reported at once, with the same code.
  r = Ctl({"wait", "drive0"});
  EXPECT_EQ(r.exit_code, kCancelled) << r.err;
  // Cancelling it again is refused with the daemon's text.
  r = Ctl({"cancel", "drive0"});
  EXPECT_EQ(r.exit_code, kRefused);
  EXPECT_EQ(r.err, "cbwctl: " + LastDesc() + "\n");
  EXPECT_NE(LastDesc(), "");
}

TEST_F(CbwctlTest, CtrlCStopsWaitingButNotTheJob) {
  MountDrive(32 << 20);
  Proc wait(WithMount({"backup", "drive0", Target("t.img"), "--speed", "1M", "--wait"}),
            /*pty=*/false);
  ASSERT_TRUE(wait.started());
  ASSERT_TRUE(wait.ReadUntil([&] { return wait.out.find("drive0: running") != std::string::npos; }))
      << wait.out << wait.err;
  kill(wait.pid(), SIGINT);
  EXPECT_EQ(wait.Finish(), kInterrupted) << wait.out << wait.err;
  EXPECT_NE(wait.err.find("stopped waiting; job drive0 keeps running"), std::string::npos)
      << wait.err;
  json rec = Record(mount_, "drive0");
  EXPECT_EQ(rec.value("status", ""), "running") << rec;
  EXPECT_FALSE(rec.contains("result")) << rec;
  EXPECT_EQ(Ctl({"cancel", "drive0"}).exit_code, 0);
}

TEST_F(CbwctlTest, DaemonStopEndsWaitWithTheJobsCancel) {
  MountDrive(32 << 20);
  Proc wait(WithMount({"backup", "drive0", Target("t.img"), "--speed", "1M", "--wait"}),
            /*pty=*/false);
  ASSERT_TRUE(wait.started());
  ASSERT_TRUE(wait.ReadUntil([&] { return wait.out.find("drive0: running") != std::string::npos; }))
      << wait.out << wait.err;
  EXPECT_EQ(mount_.Stop(SIGTERM), 0) << mount_.log();
  // SPEC 1: a stop cancels running jobs while the mount still serves.
  EXPECT_EQ(wait.Finish(), kCancelled) << wait.out << wait.err;
}

TEST_F(CbwctlTest, StatusTableJsonAndDetail) {
  MountDrive(4 << 20);
  ASSERT_EQ(Ctl({"backup", "drive0", Target("a.img"), "--job-id", "j1", "--wait", "-q"}).exit_code,
            0);
  // A fleecing job runs until cancelled: a live row beside an ended one.
  CommandResult r = Ctl({"backup", "drive0", Target("b.img"), "--job-id", "j2", "--sync", "none"});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  r = Ctl({"status"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::string> lines;
  for (size_t pos = 0, nl; (nl = r.out.find('\n', pos)) != std::string::npos; pos = nl + 1) {
    lines.push_back(r.out.substr(pos, nl - pos));
  }
  ASSERT_EQ(lines.size(), 3u) << r.out;
  EXPECT_EQ(lines[0].rfind("JOB ", 0), 0u) << r.out;
  EXPECT_EQ(lines[1].rfind("j1 ", 0), 0u) << r.out;  // oldest first
  EXPECT_NE(lines[1].find("success"), std::string::npos) << r.out;
  EXPECT_NE(lines[1].find("100.0%"), std::string::npos) << r.out;
  EXPECT_NE(lines[1].find(Target("a.img")), std::string::npos) << r.out;
  EXPECT_EQ(lines[2].rfind("j2 ", 0), 0u) << r.out;
  EXPECT_NE(lines[2].find("running"), std::string::npos) << r.out;
  EXPECT_NE(lines[2].find(" none "), std::string::npos) << r.out;

  r = Ctl({"status", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::vector<json> recs = JsonLines(r.out);
  ASSERT_EQ(recs.size(), 2u) << r.out;
  EXPECT_EQ(recs[0].value("device", ""), "j1");
  EXPECT_EQ(recs[0].value("result", ""), "success");
  EXPECT_EQ(recs[1].value("device", ""), "j2");
  EXPECT_EQ(recs[1].value("status", ""), "running");

  r = Ctl({"status", "j1"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("job:      j1\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("result:   success\n"), std::string::npos) << r.out;
  r = Ctl({"status", "j2", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out, nullptr, false).value("sync", ""), "none") << r.out;

  r = Ctl({"status", "nosuch"});
  EXPECT_EQ(r.exit_code, kRefused);
  EXPECT_EQ(r.err, "cbwctl: no such job: nosuch\n");
  r = Ctl({"wait", "nosuch"});
  EXPECT_EQ(r.exit_code, kRefused);
  EXPECT_EQ(r.err, "cbwctl: no such job: nosuch\n");
  EXPECT_EQ(Ctl({"cancel", "j2"}).exit_code, 0);
}

TEST_F(CbwctlTest, RefusedCommandsShowTheDaemonsError) {
  MountDrive(1 << 20);
  CommandResult r = Ctl({"backup", "nosuch", Target("t.img")});
  EXPECT_EQ(r.exit_code, kRefused);
  EXPECT_NE(LastDesc(), "");
  EXPECT_EQ(r.err, "cbwctl: " + LastDesc() + "\n");
  EXPECT_NE(r.err.find("nosuch"), std::string::npos) << r.err;

  r = Ctl({"backup", "drive0", Target("t.img"), "--format", "vmdk"});
  EXPECT_EQ(r.exit_code, kRefused) << r.err;
  EXPECT_EQ(r.err, "cbwctl: " + LastDesc() + "\n");

  // No bitmap exists by that name, whether or not the daemon knows bitmaps
  // yet (today: CommandNotFound): the error is the daemon's own.
  r = Ctl({"bitmap", "remove", "drive0", "nosuch"});
  EXPECT_EQ(r.exit_code, kRefused) << r.out;
  EXPECT_NE(LastDesc(), "");
  EXPECT_EQ(r.err, "cbwctl: " + LastDesc() + "\n");
}

TEST_F(CbwctlTest, UsageErrorsExit2AndMountErrorsExit5) {
  MountDrive(1 << 20);
  for (const auto& args :
       std::vector<std::vector<std::string>>{{},
                                             {"frobnicate"},
                                             {"backup", "drive0"},
                                             {"backup", "drive0", "t.img", "--speed", "fast"},
                                             {"backup", "drive0", "t.img", "--sync", "sometimes"},
                                             {"status", "--speed", "1M"},
                                             {"wait"},
                                             {"cancel"},
                                             {"bitmap", "merge", "drive0", "b0"},
                                             {"status", "--no-such-option"}}) {
    std::vector<std::string> argv = {CbwctlBinary()};
    argv.insert(argv.end(), args.begin(), args.end());
    CommandResult r = RunCommand(argv);
    EXPECT_EQ(r.exit_code, kUsage) << ::testing::PrintToString(args) << r.err;
    EXPECT_NE(r.err.find("Try 'cbwctl --help'."), std::string::npos) << r.err;
    EXPECT_EQ(r.out, "");
  }
  CommandResult help = RunCommand({CbwctlBinary(), "--help"});
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_EQ(help.out.rfind("Usage: cbwctl", 0), 0u) << help.out;

  CommandResult r = RunCommand({CbwctlBinary(), "-m", dir_ / "nonexistent", "status"});
  EXPECT_EQ(r.exit_code, kMount);
  EXPECT_NE(r.err.find("No such file or directory"), std::string::npos) << r.err;
  r = RunCommand({CbwctlBinary(), "-m", dir_.path(), "status"});
  EXPECT_EQ(r.exit_code, kMount);
  EXPECT_NE(r.err.find("is not a cbwfs mount"), std::string::npos) << r.err;
}

TEST_F(CbwctlTest, ProgressBarOnATerminalRedrawsInPlace) {
  MountDrive(8 << 20);
  Proc p(WithMount({"backup", "drive0", Target("t.img"), "--speed", "4M", "--wait"}),
         /*pty=*/true);
  ASSERT_TRUE(p.started());
  EXPECT_EQ(p.Finish(), 0) << p.out << p.err;
  EXPECT_EQ(p.err, "");
  const std::string& o = p.out;
  // Redrawn in place several times (4 a second for about 2 s), each redraw
  // a "\r", the bar and an erase to end of line; no newline until the end.
  EXPECT_GE(Count(o, "\rdrive0 ["), 4) << o;
  EXPECT_EQ(Count(o, "\n"), 2) << o;  // the kept final bar, and the outcome
  size_t first_nl = o.find('\n');
  std::string bars = o.substr(0, first_nl);
  EXPECT_NE(bars.find("%"), std::string::npos) << o;
  EXPECT_NE(bars.find("/8.0 MiB"), std::string::npos) << o;
  EXPECT_NE(bars.find("MiB/s"), std::string::npos) << o;
  EXPECT_NE(bars.find("ETA "), std::string::npos) << o;
  EXPECT_NE(bars.find("\x1b[K"), std::string::npos) << o;
  // Some redraw shows progress strictly between 0 and 100%.
  bool middle = false;
  for (size_t pos = 0; (pos = bars.find("\rdrive0 [", pos)) != std::string::npos; ++pos) {
    std::string frame = bars.substr(pos + 1, bars.find('\r', pos + 1) - pos - 1);
    if (frame.find(" 0.0%") == std::string::npos && frame.find("100.0%") == std::string::npos &&
        frame.find("ETA") != std::string::npos) {
      middle = true;
    }
  }
  EXPECT_TRUE(middle) << o;
  // The last bar is kept: 100%, the result, then the outcome line.
  std::string last = bars.substr(bars.rfind('\r') + 1);
  EXPECT_NE(last.find("100.0%"), std::string::npos) << last;
  EXPECT_NE(last.find(" 8.0 MiB/8.0 MiB "), std::string::npos) << last;
  EXPECT_NE(last.find("success"), std::string::npos) << last;
  EXPECT_NE(o.substr(first_nl + 1).rfind("drive0: success, 8.0 MiB in ", 0), std::string::npos)
      << o;
  EXPECT_TRUE(ReadFileOrDie(Target("t.img")) == image_);
}

TEST_F(CbwctlTest, ProgressThroughAPipeIsPlainLines) {
  MountDrive(8 << 20);
  CommandResult r = Ctl({"backup", "drive0", Target("t.img"), "--speed", "4M", "--wait"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(r.out.find('\r'), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find('\x1b'), std::string::npos) << r.out;
  ASSERT_FALSE(r.out.empty());
  EXPECT_EQ(r.out.back(), '\n');
  std::vector<std::string> lines;
  for (size_t pos = 0, nl; (nl = r.out.find('\n', pos)) != std::string::npos; pos = nl + 1) {
    lines.push_back(r.out.substr(pos, nl - pos));
  }
  ASSERT_GE(lines.size(), 3u) << r.out;
  EXPECT_EQ(lines.front().rfind("drive0: running ", 0), 0u) << r.out;
  EXPECT_NE(lines.front().find("/8.0 MiB"), std::string::npos) << r.out;
  EXPECT_NE(lines.front().find("ETA "), std::string::npos) << r.out;
  EXPECT_EQ(lines[lines.size() - 2].rfind("drive0: 100.0% 8.0 MiB/8.0 MiB ", 0), 0u) << r.out;
  EXPECT_NE(lines[lines.size() - 2].find("/s success"), std::string::npos) << r.out;
  EXPECT_EQ(lines.back().rfind("drive0: success, 8.0 MiB in ", 0), 0u) << r.out;
  EXPECT_TRUE(ReadFileOrDie(Target("t.img")) == image_);
}

}  // namespace
}  // namespace cbw::test
