// Operating cbwfs (SPEC 8) through the real binary: --log-file and the
// syslog fallback, --config, systemd's readiness protocol, `metrics` as a
// reserved name.

#include <gtest/gtest.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/fs/mount_fixture.h"

namespace cbw::test {
namespace {

using nlohmann::json;

constexpr long kFuseSuperMagic = 0x65735546;

std::string Backup(const std::string& id, const std::string& target, uint64_t speed = 0) {
  json args = {{"device", "d"}, {"job-id", id}, {"target", target}, {"sync", "full"}};
  if (speed) args["speed"] = speed;
  return json{{"execute", "drive-backup"}, {"arguments", args}}.dump();
}

// Writes `json` into MOUNT/control (one write); returns the errno or 0.
int Control(const std::string& mnt, const std::string& json) {
  return RunShell("printf '%s' '" + json + "' > " + mnt + "/control").exit_code;
}

std::string JobResult(const std::string& mnt, const std::string& id) {
  CommandResult r = RunShell("jq -r .result " + mnt + "/jobs/" + id + " 2>/dev/null");
  std::string out = r.out;
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return r.exit_code == 0 ? out : "";
}

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// A detached daemon with --log-file logs each job's start, success, failure
// (with the reason) and cancel at info, with a timestamp and its pid.
TEST(LogsE2E, DetachedDaemonLogsEveryJobsLifeToTheLogFile) {
  TempDir dir;
  WriteFileOrDie(dir / "src.img", RandomBytes(4 << 20, 5));
  mkdir((dir / "mnt").c_str(), 0755);
  mkdir((dir / "small").c_str(), 0755);
  // A tiny filesystem for a target that fails with ENOSPC.
  const bool small = mount("tmpfs", (dir / "small").c_str(), "tmpfs", 0, "size=1m") == 0;
  const std::string log = dir / "log/cbwfs.log";
  mkdir((dir / "log").c_str(), 0755);
  CommandResult r = RunCommand(
      {CbwfsBinary(), "--log-file", log, "--drive", "d=" + (dir / "src.img"), dir / "mnt"},
      std::chrono::seconds(20));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string mnt = dir / "mnt";

  ASSERT_EQ(Control(mnt, Backup("ok", dir / "ok.img")), 0);
  ASSERT_TRUE(WaitFor([&] { return JobResult(mnt, "ok") == "success"; }));
  ASSERT_EQ(Control(mnt, Backup("slow", dir / "slow.img", 64 * 1024)), 0);
  ASSERT_EQ(Control(mnt, "{\"execute\":\"job-cancel\",\"arguments\":{\"id\":\"slow\"}}"), 0);
  ASSERT_TRUE(WaitFor([&] { return JobResult(mnt, "slow") == "cancelled"; }));
  if (small) {
    ASSERT_EQ(Control(mnt, Backup("full", dir / "small/t.img")), 0);
    ASSERT_TRUE(WaitFor([&] { return JobResult(mnt, "full") == "failed"; }));
  }
  EXPECT_NE(Control(mnt, "{\"execute\":\"nope\"}"), 0);
  ASSERT_EQ(RunCommand({"fusermount3", "-u", mnt}).exit_code, 0);
  ASSERT_TRUE(WaitFor([&] { return Contains(ReadFileOrDie(log), "unmounted cleanly"); }))
      << ReadFileOrDie(log);
  if (small) umount2((dir / "small").c_str(), MNT_DETACH);

  const std::string text = ReadFileOrDie(log);
  for (const char* want : {
           "info: job 'ok' started: drive 'd'",
           "info: job 'ok' succeeded",
           "info: job 'slow' started",
           "info: job 'slow' cancelled",
           "error: control: nope: CommandNotFound: The command nope has not been found",
           "info: mounted on ",
       }) {
    EXPECT_TRUE(Contains(text, want)) << "missing '" << want << "' in:\n" << text;
  }
  if (small) {
    EXPECT_TRUE(Contains(text, "info: job 'full' failed: No space left on device")) << text;
  }
  // Every line: "YYYY-MM-DDTHH:MM:SS.mmmZ cbwfs[PID]: LEVEL: text".
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    EXPECT_EQ(line.size() > 30 && line[4] == '-' && line[10] == 'T' && line[23] == 'Z' &&
                  line.compare(24, 7, " cbwfs[") == 0,
              true)
        << line;
  }
  // Detached, nothing went to the caller's stderr after the start.
  EXPECT_FALSE(Contains(r.err, "job '")) << r.err;
}

TEST(LogsE2E, LogFileIsReopenedAfterRotation) {
  CbwfsMount m;
  TempDir dir;
  WriteFileOrDie(dir / "src.img", RandomBytes(1 << 20, 6));
  const std::string log = dir / "cbwfs.log";
  ASSERT_TRUE(m.Start({"--log-file", log, "--drive", "d=" + (dir / "src.img")}));
  ASSERT_TRUE(WaitFor([&] { return Contains(ReadFileOrDie(log), "mounted on"); }));
  ASSERT_EQ(rename(log.c_str(), (log + ".1").c_str()), 0);
  // Refused commands are logged: keep sending until a line reaches the new file.
  EXPECT_TRUE(WaitFor([&] {
    m.Control("{\"execute\":\"rotated\"}");
    struct stat st {};
    return stat(log.c_str(), &st) == 0 && Contains(ReadFileOrDie(log), "rotated");
  }));
  EXPECT_FALSE(Contains(ReadFileOrDie(log), "mounted on"));
  EXPECT_TRUE(Contains(ReadFileOrDie(log + ".1"), "mounted on"));
}

// No syslog socket: what is logged before detaching reaches the caller's
// stderr, with a note (once) that later messages need --log-file.
TEST(LogsE2E, WithoutASyslogSocketMessagesBeforeDetachingReachStderr) {
  struct stat st {};
  if (stat("/dev/log", &st) == 0) {
    // Whether anything listens there is what cbwfs checks; the test cannot
    // take the machine's syslog away, so it runs only where there is none.
    int fd = socket(AF_UNIX, SOCK_DGRAM, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strcpy(a.sun_path, "/dev/log");
    bool listening = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    close(fd);
    if (listening) GTEST_SKIP() << "this machine has a syslog socket at /dev/log";
  }
  TempDir dir;
  WriteFileOrDie(dir / "src.img", RandomBytes(1 << 20, 7));
  mkdir((dir / "mnt").c_str(), 0755);
  CommandResult r = RunCommand({CbwfsBinary(), "--drive", "d=" + (dir / "src.img"), dir / "mnt"},
                               std::chrono::seconds(20));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  RunCommand({"fusermount3", "-u", dir / "mnt"});
  EXPECT_TRUE(Contains(r.err, "no syslog socket (/dev/log)")) << r.err;
  EXPECT_TRUE(Contains(r.err, "--log-file")) << r.err;
  size_t first = r.err.find("no syslog socket");
  EXPECT_EQ(r.err.find("no syslog socket", first + 1), std::string::npos) << "said twice";

  // A start that fails before detaching says why on stderr too.
  CommandResult bad =
      RunCommand({CbwfsBinary(), "--drive", "d=" + (dir / "missing.img"), dir / "mnt"},
                 std::chrono::seconds(20));
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_TRUE(Contains(bad.err, dir / "missing.img")) << bad.err;
}

TEST(LogsE2E, AnUnwritableLogFileFailsTheStart) {
  TempDir dir;
  WriteFileOrDie(dir / "src.img", RandomBytes(1 << 20, 8));
  mkdir((dir / "mnt").c_str(), 0755);
  CommandResult r = RunCommand({CbwfsBinary(), "-f", "--log-file", dir / "no/such/dir/log",
                                "--drive", "d=" + (dir / "src.img"), dir / "mnt"},
                               std::chrono::seconds(20));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(r.err, dir / "no/such/dir/log")) << r.err;
  EXPECT_TRUE(Contains(r.err, "No such file or directory")) << r.err;
}

TEST(ConfigE2E, OptionsComeFromTheFileAndTheCommandLineOverridesThem) {
  TempDir dir;
  WriteFileOrDie(dir / "a.img", RandomBytes(1 << 20, 1));
  WriteFileOrDie(dir / "b.img", RandomBytes(1 << 20, 2));
  WriteFileOrDie(dir / "c.img", RandomBytes(1 << 20, 3));
  mkdir((dir / "mnt").c_str(), 0755);
  WriteFileOrDie(dir / "cbwfs.conf",
                 "# test configuration\n"
                 "drive = a=" +
                     (dir / "a.img") +
                     "\n"
                     "drive = b=" +
                     (dir / "b.img") +
                     ",readonly=on\n"
                     "mountpoint = " +
                     (dir / "mnt") +
                     "\n"
                     "log-file = " +
                     (dir / "file.log") +
                     "\n"
                     "log-level = debug\n"
                     "foreground = true\n");
  // Only the file: `foreground = true` keeps the daemon our child, the
  // mountpoint and drives come from it.
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execl(CbwfsBinary().c_str(), "cbwfs", "--config", (dir / "cbwfs.conf").c_str(),
          static_cast<char*>(nullptr));
    _exit(127);
  }
  ASSERT_TRUE(WaitFor([&] {
    struct stat st {};
    return stat((dir / "mnt/a").c_str(), &st) == 0;
  }));
  struct stat st {};
  EXPECT_EQ(stat((dir / "mnt/b").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0400u);  // readonly=on from the file
  EXPECT_TRUE(WaitFor([&] { return Contains(ReadFileOrDie(dir / "file.log"), "debug: "); }));
  // Still our child: foreground = true was honoured.
  EXPECT_EQ(waitpid(pid, nullptr, WNOHANG), 0);
  RunCommand({"fusermount3", "-u", dir / "mnt"});
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);

  // Command-line drives replace the file's; the file still gives the rest.
  CbwfsMount m;
  ASSERT_TRUE(m.Start({"--config", dir / "cbwfs.conf", "--drive", "c=" + (dir / "c.img")}));
  CommandResult ls = RunCommand({"ls", m.mnt()});
  EXPECT_TRUE(Contains(ls.out, "c\n")) << ls.out;
  EXPECT_FALSE(Contains(ls.out, "a\n")) << ls.out;
  EXPECT_EQ(ReadFileOrDie(m / "c"), ReadFileOrDie(dir / "c.img"));
}

TEST(ConfigE2E, BadFilesAreRefusedNamingTheFile) {
  TempDir dir;
  WriteFileOrDie(dir / "bad.conf", "drive = a=/x\nfrobnicate = 1\n");
  CommandResult r = RunCommand({CbwfsBinary(), "--config", dir / "bad.conf"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(Contains(r.err, dir / "bad.conf")) << r.err;
  EXPECT_TRUE(Contains(r.err, "frobnicate")) << r.err;

  WriteFileOrDie(dir / "help.conf", "help = 1\n");
  r = RunCommand({CbwfsBinary(), "--config", dir / "help.conf"});
  EXPECT_EQ(r.exit_code, 2) << r.out;

  r = RunCommand({CbwfsBinary(), "--config", dir / "missing.conf"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(r.err, dir / "missing.conf")) << r.err;
  EXPECT_TRUE(Contains(r.err, "No such file or directory")) << r.err;
}

// systemd's Type=notify: READY=1 only once the mount answers, STOPPING=1
// when it stops.
TEST(NotifyE2E, ReadyArrivesOnlyOnceTheMountAnswersAndStoppingAtStop) {
  TempDir dir;
  WriteFileOrDie(dir / "src.img", RandomBytes(1 << 20, 4));
  const std::string sock_path = dir / "notify.sock";
  int sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(sock, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof a.sun_path, "%s", sock_path.c_str());
  ASSERT_EQ(bind(sock, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  timeval tv{30, 0};
  setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

  CbwfsMount m;
  setenv("NOTIFY_SOCKET", sock_path.c_str(), 1);
  // The fixture waits for the mount itself; the datagram is checked below
  // against the mount's state when it arrived, which the fixture's own
  // waiting cannot change.
  pid_t pid = -1;
  std::string ready;
  bool live_at_ready = false;
  std::thread receiver([&] {
    char buf[4096];
    ssize_t n = recv(sock, buf, sizeof buf, 0);
    if (n <= 0) return;
    ready.assign(buf, static_cast<size_t>(n));
    // At once, no retry: the mount must answer now.
    struct statfs sfs {};
    struct stat st {};
    live_at_ready = statfs(m.mnt().c_str(), &sfs) == 0 && sfs.f_type == kFuseSuperMagic &&
                    stat((m.mnt() + "/control").c_str(), &st) == 0;
  });
  ASSERT_TRUE(m.Start({"--drive", "d=" + (dir / "src.img")}));
  unsetenv("NOTIFY_SOCKET");
  receiver.join();
  pid = m.pid();
  EXPECT_TRUE(Contains(ready, "READY=1")) << ready;
  EXPECT_TRUE(live_at_ready) << "READY=1 came before the mount answered";

  EXPECT_EQ(m.Unmount(), 0);
  char buf[4096];
  ssize_t n = recv(sock, buf, sizeof buf, 0);
  ASSERT_GT(n, 0) << "no STOPPING=1 (pid " << pid << ")";
  EXPECT_EQ(std::string(buf, static_cast<size_t>(n)), "STOPPING=1");
  close(sock);
}

TEST(OptionsE2E, MetricsIsNotADriveName) {
  TempDir dir;
  WriteFileOrDie(dir / "src.img", RandomBytes(4096, 1));
  CommandResult r = RunCommand({CbwfsBinary(), "--drive", "metrics=" + (dir / "src.img"), "/mnt"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(Contains(r.err, "'metrics' is reserved")) << r.err;
}

}  // namespace
}  // namespace cbw::test
