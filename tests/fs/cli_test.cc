// End-to-end tests of the command line (SPEC 1): usage errors, refused
// sources, locking, daemonizing and clean stops.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>

#include "tests/fs/mount_fixture.h"

namespace cbw::test {
namespace {

bool Mounted(const std::string& mnt) {
  CommandResult r = RunCommand({"findmnt", "-n", "-M", mnt});
  return r.exit_code == 0;
}

TEST(Cli, HelpAndVersion) {
  CommandResult r = RunCommand({CbwfsBinary(), "--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("--drive NAME=PATH"), std::string::npos);
  r = RunCommand({CbwfsBinary(), "--version"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("cbwfs "), std::string::npos);
}

TEST(Cli, UsageErrorsExit2AndNameTheOption) {
  TempDir dir;
  struct Case {
    std::vector<std::string> args;
    std::string needle;
  } cases[] = {
      {{"--bogus"}, "bogus"},
      {{dir.path()}, "--drive"},
      {{"--drive", "0bad=/x", dir.path()}, "0bad"},
      {{"--drive", "d=/x", "--cluster-size", "3K", dir.path()}, "--cluster-size"},
      {{"--drive", "d=/x", "--drive", "d=/y", dir.path()}, "twice"},
      {{"--drive", "events=/x", dir.path()}, "reserved"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> argv = {CbwfsBinary()};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    CommandResult r = RunCommand(argv);
    EXPECT_EQ(r.exit_code, 2) << c.needle << ": " << r.err;
    EXPECT_NE(r.err.find(c.needle), std::string::npos) << r.err;
  }
}

TEST(Cli, BadSourcesExit1WithPathAndErrno) {
  TempDir dir;
  mkdir((dir / "mnt").c_str(), 0755);
  mkdir((dir / "adir").c_str(), 0755);
  mkfifo((dir / "fifo").c_str(), 0600);
  struct Case {
    std::string path;
    std::string needle;
  } cases[] = {
      {dir / "missing.img", "No such file or directory"},
      {dir / "adir", "Is a directory"},
      {dir / "fifo", "not a regular file or block device"},
  };
  for (const auto& c : cases) {
    CommandResult r = RunCommand({CbwfsBinary(), "-f", "--drive", "d=" + c.path, dir / "mnt"});
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find(c.path), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(c.needle), std::string::npos) << r.err;
  }
  // A missing mountpoint is named too.
  WriteFileOrDie(dir / "ok.img", std::string(4096, 'a'));
  CommandResult r = RunCommand({CbwfsBinary(), "--drive", "d=" + (dir / "ok.img"), dir / "nomnt"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("nomnt"), std::string::npos) << r.err;
  EXPECT_FALSE(Mounted(dir / "mnt"));
}

TEST(Cli, SecondCbwfsOnTheSameImageIsRefused) {
  TempDir dir;
  WriteFileOrDie(dir / "src.img", RandomBytes(1 << 20, 7));
  CbwfsMount first;
  ASSERT_TRUE(first.Start({"--drive", "d=" + (dir / "src.img")}));
  mkdir((dir / "mnt2").c_str(), 0755);
  // SPEC 8: it waits up to 10 s for the lock (the holder might be a cbwfs
  // still exiting), saying so once, then fails as before.
  auto t0 = std::chrono::steady_clock::now();
  CommandResult r =
      RunCommand({CbwfsBinary(), "-f", "--drive", "d=" + (dir / "src.img"), dir / "mnt2"});
  double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find(dir / "src.img"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("busy"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("Failed to lock '" + (dir / "src.img") + "': it is in use by another cbwfs"),
            std::string::npos)
      << r.err;
  size_t wait = r.err.find("waiting up to 10 s");
  EXPECT_NE(wait, std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("waiting", wait + 1), std::string::npos) << "said more than once: " << r.err;
  EXPECT_GE(took, 9.5) << r.err;
  EXPECT_FALSE(Mounted(dir / "mnt2"));
  // QEMU's image locking sees cbwfs's lock too.
  if (RunCommand({"sh", "-c", "command -v qemu-io"}).exit_code == 0) {
    CommandResult q = RunCommand({"qemu-io", "-f", "raw", "-c", "write 0 512", dir / "src.img"});
    EXPECT_NE(q.exit_code, 0);
    EXPECT_NE((q.out + q.err).find("lock"), std::string::npos) << q.out << q.err;
  }
  // Once the first one stops, the image is free at once.
  EXPECT_EQ(first.Unmount(), 0);
  CbwfsMount again;
  EXPECT_TRUE(again.Start({"--drive", "d=" + (dir / "src.img")}));
}

TEST(Cli, ImageHeldByQemuIsRefused) {
  if (RunCommand({"sh", "-c", "command -v qemu-io"}).exit_code != 0) {
    GTEST_SKIP() << "qemu-io not installed";
  }
  TempDir dir;
  WriteFileOrDie(dir / "src.img", RandomBytes(1 << 20, 8));
  mkdir((dir / "mnt").c_str(), 0755);
  // qemu-io keeps the image open (with write permission) while its stdin is open.
  int in[2];
  ASSERT_EQ(pipe(in), 0);
  pid_t q = fork();
  if (q == 0) {
    dup2(in[0], 0);
    close(in[1]);
    int null = open("/dev/null", O_WRONLY);
    dup2(null, 1);
    dup2(null, 2);
    execlp("qemu-io", "qemu-io", "-f", "raw", (dir / "src.img").c_str(), nullptr);
    _exit(127);
  }
  close(in[0]);
  // Wait until qemu-io holds its image lock (an OFD lock on the image's inode).
  struct stat st {};
  ASSERT_EQ(stat((dir / "src.img").c_str(), &st), 0);
  std::string inode = ":" + std::to_string(st.st_ino) + " ";
  ASSERT_TRUE(
      WaitFor([&] { return ReadFileOrDie("/proc/locks").find(inode) != std::string::npos; }));
  CommandResult r =
      RunCommand({CbwfsBinary(), "-f", "--drive", "d=" + (dir / "src.img"), dir / "mnt"},
                 std::chrono::seconds(20));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("lock"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(dir / "src.img"), std::string::npos) << r.err;
  close(in[1]);  // qemu-io sees EOF and quits
  int status;
  waitpid(q, &status, 0);
}

TEST(Cli, DaemonizesOnceTheMountIsLive) {
  TempDir dir;
  std::string data = RandomBytes(1 << 20, 9);
  WriteFileOrDie(dir / "src.img", data);
  mkdir((dir / "mnt").c_str(), 0755);
  // RunCommand captures stdout/stderr through pipes: it only returns if the
  // detached daemon let go of them.
  CommandResult r = RunCommand({CbwfsBinary(), "--drive", "d=" + (dir / "src.img"), dir / "mnt"},
                               std::chrono::seconds(20));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Usable at once: no waiting after the parent exits.
  struct stat st {};
  EXPECT_EQ(stat((dir / "mnt/control").c_str(), &st), 0);
  EXPECT_EQ(ReadFileOrDie(dir / "mnt/d"), data);
  CommandResult u = RunCommand({"fusermount3", "-u", dir / "mnt"});
  EXPECT_EQ(u.exit_code, 0) << u.err;
  EXPECT_TRUE(WaitFor([&] {
    return RunCommand({"pgrep", "-f", "cbwfs --drive d=" + (dir / "src.img")}).exit_code != 0;
  }));
  // The image is free again.
  CbwfsMount again;
  EXPECT_TRUE(again.Start({"--drive", "d=" + (dir / "src.img")}));
}

// Detaching forks: anything the daemon needs must still run in the child
// (the job records of --state-dir are written by a thread of the engine).
TEST(Cli, DetachedDaemonKeepsJobRecords) {
  TempDir dir;
  WriteFileOrDie(dir / "src.img", RandomBytes(2 << 20, 12));
  mkdir((dir / "mnt").c_str(), 0755);
  CommandResult r = RunCommand({CbwfsBinary(), "--state-dir", dir / "state", "--drive",
                                "d=" + (dir / "src.img"), dir / "mnt"},
                               std::chrono::seconds(20));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  CommandResult b = RunShell(
      "echo '{\"execute\":\"drive-backup\",\"arguments\":{\"device\":\"d\","
      "\"target\":\"" +
      (dir / "t.img") + "\",\"sync\":\"full\"}}' > " + (dir / "mnt/control"));
  EXPECT_EQ(b.exit_code, 0) << b.err;
  // The final record reaches the state dir while the daemon runs.
  EXPECT_TRUE(WaitFor([&] {
    return RunShell("jq -e '.result == \"success\"' " + (dir / "state/d.json")).exit_code == 0;
  })) << RunShell("cat " + (dir / "state/d.json")).out;
  EXPECT_EQ(RunCommand({"fusermount3", "-u", dir / "mnt"}).exit_code, 0);
  EXPECT_TRUE(WaitFor([&] {
    return RunCommand({"pgrep", "-f", "cbwfs --state-dir " + (dir / "state")}).exit_code != 0;
  }));
  EXPECT_EQ(ReadFileOrDie(dir / "t.img"), ReadFileOrDie(dir / "src.img"));
}

TEST(Cli, SigintAndUnmountExitZero) {
  TempDir dir;
  WriteFileOrDie(dir / "src.img", RandomBytes(1 << 20, 10));
  {
    CbwfsMount m;
    ASSERT_TRUE(m.Start({"--drive", "d=" + (dir / "src.img")}));
    EXPECT_EQ(m.Stop(SIGINT), 0) << m.log();
    EXPECT_FALSE(Mounted(m.mnt()));
  }
  {
    CbwfsMount m;
    ASSERT_TRUE(m.Start({"--drive", "d=" + (dir / "src.img")}));
    EXPECT_EQ(m.Unmount(), 0) << m.log();
  }
}

TEST(Cli, LeftoverMountIsReportedNotHung) {
  TempDir dir;
  WriteFileOrDie(dir / "src.img", RandomBytes(1 << 20, 11));
  CbwfsMount m;
  ASSERT_TRUE(m.Start({"--drive", "d=" + (dir / "src.img")}));
  EXPECT_EQ(m.Stop(SIGKILL), 128 + SIGKILL);
  CommandResult r = RunCommand({CbwfsBinary(), "-f", "--drive", "d=" + (dir / "src.img"), m.mnt()},
                               std::chrono::seconds(20));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("fusermount3 -uz"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace cbw::test
