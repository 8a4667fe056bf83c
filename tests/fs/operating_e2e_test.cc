// SPEC 8 "Operating it", through the real daemon: stopping while a drive file
// is open (an ext4 loop-mounted through the mount, with sqlite committing in
// it), block-device sources held with O_EXCL, and a restart that waits for
// the lock of a daemon still exiting.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/fs/shell_helpers.h"
#include "tests/lib/faultfs_mount.h"

namespace cbw::test {
namespace {

// Occurrences of `needle` in `text`.
size_t Count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t p = text.find(needle); p != std::string::npos; p = text.find(needle, p + 1)) ++n;
  return n;
}

// `file` attached to a loop device and that device mounted on `dir` (an
// existing filesystem on it). Detach() undoes both and says whether that
// worked; the destructor undoes whatever is left, lazily.
class LoopMount {
 public:
  LoopMount(const std::string& file, const std::string& dir, const std::string& options = "")
      : dir_(dir) {
    mkdir(dir.c_str(), 0755);
    CommandResult lo = RunCommand({"losetup", "--find", "--show", file});
    if (lo.exit_code != 0) {
      error_ = "losetup: " + lo.err;
      return;
    }
    dev_ = lo.out.substr(0, lo.out.find('\n'));
    std::vector<std::string> argv = {"mount"};
    if (!options.empty()) argv.insert(argv.end(), {"-o", options});
    argv.insert(argv.end(), {dev_, dir});
    CommandResult m = RunCommand(argv);
    if (m.exit_code != 0) {
      error_ = "mount: " + m.err;
      return;
    }
    mounted_ = true;
  }
  ~LoopMount() {
    if (mounted_) RunCommand({"umount", "-l", dir_});
    if (!dev_.empty()) RunCommand({"losetup", "-d", dev_});
  }
  LoopMount(const LoopMount&) = delete;
  LoopMount& operator=(const LoopMount&) = delete;

  bool ok() const { return mounted_; }
  const std::string& error() const { return error_; }
  std::string operator/(const std::string& name) const { return dir_ + "/" + name; }
  // umount, then losetup -d: the loop device lets go of the file.
  ::testing::AssertionResult Detach() {
    CommandResult u = RunCommand({"umount", dir_});
    if (u.exit_code != 0) return ::testing::AssertionFailure() << "umount: " << u.err;
    mounted_ = false;
    CommandResult d = RunCommand({"losetup", "-d", dev_});
    if (d.exit_code != 0) return ::testing::AssertionFailure() << "losetup -d: " << d.err;
    dev_.clear();
    return ::testing::AssertionSuccess();
  }

 private:
  std::string dir_;
  std::string dev_;
  std::string error_;
  bool mounted_ = false;
};

// A sqlite writer: commits rows 0, 1, 2, ... (4 KB each, one transaction
// each, sqlite's default fsyncs) into table t of `db`, printing each row
// number once it is committed.
constexpr const char* kSqliteWriter = R"py(
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER PRIMARY KEY, v TEXT)")
c.commit()
i = 0
while True:
    c.execute("INSERT INTO t VALUES (?, ?)", (i, "x" * 4000))
    c.commit()
    print(i, flush=True)
    i += 1
)py";

// The last row number the writer's output says was committed, or -1.
long LastCommitted(const std::string& out_path) {
  std::string out = ReadFileOrDie(out_path);
  size_t end = out.rfind('\n');
  if (end == std::string::npos) return -1;
  size_t begin = out.rfind('\n', end - 1);
  begin = begin == std::string::npos ? 0 : begin + 1;
  return std::atol(out.substr(begin, end - begin).c_str());
}

bool IsFuseMount(const std::string& path) {
  return RunCommand({"findmnt", "-n", "-t", "fuse.cbwfs", path}).exit_code == 0;
}

// SPEC 8 "Stopping" (issue 12, item 1): SIGTERM while an ext4 is mounted on
// a drive used to detach the mount at once; the inner filesystem aborted its
// journal with I/O errors. Now cbwfs names the open drive, keeps serving (the
// sqlite writer keeps committing, fusermount3 -u is refused as busy), and
// exits 0 once the loop device lets go; the source then checks clean.
TEST(Stopping, SigtermWithAnExt4MountedOnADriveWaitsUntilItIsReleased) {
  TempDir dir;
  const std::string src = dir / "src.img";
  MakeSparseFile(src, 64 << 20);
  CbwfsMount m;
  ASSERT_TRUE(m.Start({"--drive", "drive0=" + src}));
  CommandResult mkfs = RunCommand({"mkfs.ext4", "-q", "-F", m / "drive0"});
  ASSERT_EQ(mkfs.exit_code, 0) << mkfs.err;
  LoopMount inner(m / "drive0", dir / "inner");
  if (inner.error().rfind("losetup", 0) == 0)
    GTEST_SKIP() << "no loop device here: " << inner.error();
  ASSERT_TRUE(inner.ok()) << inner.error();
  const std::string file_data = RandomBytes(1 << 20, 61);

  Background writer("exec python3 -c " + Q(kSqliteWriter) + " " + Q(inner / "db.sqlite"),
                    dir / "writer.out");
  ASSERT_TRUE(WaitFor([&] { return LastCommitted(dir / "writer.out") >= 20; }))
      << ReadFileOrDie(dir / "writer.out");

  ASSERT_EQ(kill(m.pid(), SIGTERM), 0);
  ASSERT_TRUE(WaitFor([&] { return m.log().find("drive0 (1 open handle)") != std::string::npos; }))
      << "the stop does not name the open drive:\n"
      << m.log();
  EXPECT_TRUE(m.alive()) << m.log();
  // Still serving: the writer keeps committing, a new file is written and
  // synced, the control file answers.
  long at_signal = LastCommitted(dir / "writer.out");
  EXPECT_TRUE(WaitFor([&] { return LastCommitted(dir / "writer.out") >= at_signal + 20; }))
      << "the writer stalled after SIGTERM:\n"
      << ReadFileOrDie(dir / "writer.out") << m.log();
  {
    int fd = open((inner / "after-signal.bin").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd, 0) << strerror(errno);
    EXPECT_EQ(write(fd, file_data.data(), file_data.size()),
              static_cast<ssize_t>(file_data.size()));
    EXPECT_EQ(fsync(fd), 0) << strerror(errno);
    close(fd);
  }
  EXPECT_EQ(m.Control(Cmd("query-block")), 0);
  // fusermount3 -u cannot stop it either while the drive is open: the kernel
  // refuses to unmount a busy mount, and the daemon goes on serving.
  CommandResult fu = RunCommand({"fusermount3", "-u", m.mnt()});
  EXPECT_NE(fu.exit_code, 0);
  EXPECT_NE(fu.err.find("busy"), std::string::npos) << fu.err;
  EXPECT_TRUE(m.alive());
  // A new open of the drive is refused while stopping.
  int fd = open((m / "drive0").c_str(), O_RDONLY);
  EXPECT_EQ(fd, -1);
  EXPECT_EQ(errno, ESHUTDOWN) << strerror(errno);
  if (fd >= 0) close(fd);

  writer.Signal(SIGKILL);
  writer.Wait(std::chrono::seconds(10));
  long committed = LastCommitted(dir / "writer.out");
  EXPECT_TRUE(m.alive()) << m.log();
  ASSERT_TRUE(inner.Detach());
  // The loop device let go of the drive: cbwfs stops by itself.
  ASSERT_TRUE(WaitFor([&] { return !m.alive(); }, std::chrono::seconds(30))) << m.log();
  EXPECT_EQ(m.Stop(), 0) << m.log();
  EXPECT_FALSE(IsFuseMount(m.mnt()));
  EXPECT_NE(m.log().find("drive files are closed: stopping"), std::string::npos) << m.log();

  CommandResult fsck = RunCommand({"e2fsck", "-fn", src});
  EXPECT_EQ(fsck.exit_code, 0) << fsck.out << fsck.err;
  EXPECT_EQ(fsck.out.find("Fix?"), std::string::npos) << fsck.out;
  EXPECT_EQ((fsck.out + fsck.err).find("recovery"), std::string::npos) << fsck.out << fsck.err;
  LoopMount check(src, dir / "check", "ro");
  ASSERT_TRUE(check.ok()) << check.error();
  EXPECT_TRUE(ReadFileOrDie(check / "after-signal.bin") == file_data);
  CommandResult q =
      RunCommand({"python3", "-c",
                  "import sqlite3, sys\n"
                  "c = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro&immutable=1', uri=True)\n"
                  "print(c.execute('PRAGMA integrity_check').fetchone()[0],"
                  " c.execute('SELECT max(i) FROM t').fetchone()[0])\n",
                  check / "db.sqlite"});
  ASSERT_EQ(q.exit_code, 0) << q.err;
  std::istringstream in(q.out);
  std::string integrity;
  long max_row = -1;
  in >> integrity >> max_row;
  EXPECT_EQ(integrity, "ok") << q.out;
  // Every commit the writer saw return is there (one more may have landed
  // before it was killed).
  EXPECT_GE(max_row, committed) << q.out;
  EXPECT_LE(max_row, committed + 1) << q.out;
  EXPECT_TRUE(check.Detach());
}

// The handles are counted per drive; while waiting the drive files work,
// new opens are refused with ESHUTDOWN, and a second signal stops at once.
TEST(Stopping, SecondSignalStopsAtOnceWithDrivesOpen) {
  TempDir dir;
  WriteFileOrDie(dir / "a.img", RandomBytes(1 << 20, 62));
  WriteFileOrDie(dir / "b.img", RandomBytes(1 << 20, 63));
  CbwfsMount m;
  ASSERT_TRUE(
      m.Start({"--drive", "drive0=" + (dir / "a.img"), "--drive", "drive1=" + (dir / "b.img")}));
  int a1 = open((m / "drive0").c_str(), O_RDWR);
  int a2 = open((m / "drive0").c_str(), O_RDONLY);
  int b1 = open((m / "drive1").c_str(), O_RDWR);
  ASSERT_GE(a1, 0);
  ASSERT_GE(a2, 0);
  ASSERT_GE(b1, 0);
  ASSERT_EQ(kill(m.pid(), SIGTERM), 0);
  ASSERT_TRUE(WaitFor([&] {
    return m.log().find("drive0 (2 open handles), drive1 (1 open handle)") != std::string::npos;
  })) << m.log();
  EXPECT_TRUE(m.alive());
  EXPECT_EQ(pwrite(a1, "still", 5, 4096), 5) << strerror(errno);
  char buf[5] = {};
  EXPECT_EQ(pread(a2, buf, 5, 4096), 5) << strerror(errno);
  EXPECT_EQ(std::string(buf, 5), "still");
  EXPECT_EQ(open((m / "drive1").c_str(), O_RDONLY), -1);
  EXPECT_EQ(errno, ESHUTDOWN);
  // Closing some of them is not enough.
  close(a2);
  close(b1);
  ASSERT_TRUE(WaitFor([&] {
    return m.log().find("still open: drive0 (1 open handle)") != std::string::npos;
  })) << m.log();
  EXPECT_TRUE(m.alive());
  // The second signal: stops now, with drive0 still open.
  auto t0 = Clock::now();
  EXPECT_EQ(m.Stop(SIGINT), 0) << m.log();
  EXPECT_LT(Seconds(Clock::now() - t0), 20.0);
  EXPECT_NE(m.log().find("got SIGINT again: stopping now"), std::string::npos) << m.log();
  EXPECT_FALSE(IsFuseMount(m.mnt()));
  close(a1);
  EXPECT_EQ(ReadFileOrDie(dir / "a.img").substr(4096, 5), "still");
}

// A drive file opened and written, then SIGTERM: the daemon waits for the
// close, then stops (jobs cancelled, sources flushed) and exits 0.
TEST(Stopping, SigtermStopsOnceTheLastHandleCloses) {
  TempDir dir;
  std::string image = RandomBytes(4 << 20, 64);
  WriteFileOrDie(dir / "src.img", image);
  CbwfsMount m;
  ASSERT_TRUE(m.Start({"--drive", "drive0=" + (dir / "src.img")}));
  ASSERT_EQ(
      m.Control(Cmd(
          "drive-backup",
          {{"device", "drive0"}, {"job-id", "j"}, {"target", dir / "t.img"}, {"sync", "none"}})),
      0);
  int fd = open((m / "drive0").c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(kill(m.pid(), SIGTERM), 0);
  ASSERT_TRUE(WaitFor([&] { return m.log().find("drive0 (1 open handle)") != std::string::npos; }))
      << m.log();
  // The job still runs meanwhile: a write is copied before it lands.
  ASSERT_EQ(pwrite(fd, "after", 5, 0), 5) << strerror(errno);
  EXPECT_EQ(Record(m, "j").value("status", ""), "running");
  EXPECT_TRUE(m.alive());
  close(fd);
  ASSERT_TRUE(WaitFor([&] { return !m.alive(); })) << m.log();
  EXPECT_EQ(m.Stop(), 0) << m.log();
  image.replace(0, 5, "after");
  EXPECT_TRUE(ReadFileOrDie(dir / "src.img") == image);
  EXPECT_NE(m.log().find("cancel"), std::string::npos) << m.log();
}

// SPEC 8 "Block devices" (issue 12, item 2): a block-device source is held
// with O_EXCL, so mkfs (or any exclusive opener) is refused while cbwfs runs
// and works once it has exited; a device something else holds exclusively is
// refused at start, at once.
TEST(BlockDevice, SourceIsHeldExclusively) {
  TempDir dir;
  std::string data = RandomBytes(8 << 20, 65);
  WriteFileOrDie(dir / "backing.img", data);
  CommandResult lo = RunCommand({"losetup", "--find", "--show", dir / "backing.img"});
  if (lo.exit_code != 0) GTEST_SKIP() << "no loop device here: " << lo.err;
  std::string dev = lo.out.substr(0, lo.out.find('\n'));
  {
    CbwfsMount m;
    ASSERT_TRUE(m.Start({"--drive", "blk=" + dev}));
    int fd = open(dev.c_str(), O_RDONLY | O_EXCL);
    EXPECT_EQ(fd, -1) << "an exclusive open succeeded while cbwfs holds " << dev;
    EXPECT_EQ(errno, EBUSY) << strerror(errno);
    if (fd >= 0) close(fd);
    CommandResult mkfs = RunCommand({"mkfs.ext4", "-q", "-F", dev});
    EXPECT_NE(mkfs.exit_code, 0) << "mkfs wrote over a source cbwfs holds";
    EXPECT_TRUE(ReadFileOrDie(m / "blk") == data);
    EXPECT_EQ(m.Unmount(), 0) << m.log();
  }
  int fd = open(dev.c_str(), O_RDONLY | O_EXCL);
  EXPECT_GE(fd, 0) << strerror(errno);
  // Held by someone else: refused at start, naming the device, without the
  // wait meant for a cbwfs that is still exiting.
  if (fd >= 0) {
    mkdir((dir / "mnt").c_str(), 0755);
    CommandResult r = RunCommand({CbwfsBinary(), "-f", "--drive", "blk=" + dev, dir / "mnt"},
                                 std::chrono::seconds(30));
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find(dev), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("busy"), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find("waiting"), std::string::npos) << r.err;
    close(fd);
  }
  RunCommand({"losetup", "-d", dev});
  EXPECT_TRUE(ReadFileOrDie(dir / "backing.img") == data);
}

// SPEC 8 (issue 12, item 5): remounting right after fusermount3 -u failed
// with "in use by another cbwfs" while the old daemon was still flushing.
// The old daemon is held in its final fsync (the source is on faultfs with
// a hanging fsync), a new one starts on the same source and mountpoint: it
// says once that it waits, and mounts as soon as the old one is gone.
TEST(LockWait, RemountWhileThePreviousDaemonIsStillExiting) {
  TempDir dir;
  FaultFs faults(FAULTFS_PATH, dir / "backing", dir / "fmnt");
  if (!faults.mounted()) GTEST_SKIP() << "faultfs could not mount";
  WriteFileOrDie(dir / "backing/src.img", RandomBytes(4 << 20, 66));
  const std::string src = faults / "src.img";
  CbwfsMount old;
  ASSERT_TRUE(old.Start({"--drive", "drive0=" + src}));
  faults.SetRules("src.img fsync hang\n");
  CommandResult u = RunCommand({"fusermount3", "-u", old.mnt()});
  ASSERT_EQ(u.exit_code, 0) << u.err;
  ASSERT_TRUE(WaitFor([&] { return faults.Waiting() >= 1; })) << "the old daemon did not flush";
  ASSERT_TRUE(old.alive());

  Background again("exec " + Q(CbwfsBinary()) + " -f --drive drive0=" + Q(src) + " " + Q(old.mnt()),
                   dir / "again.log");
  ASSERT_TRUE(WaitFor([&] {
    return ReadFileOrDie(dir / "again.log").find("waiting") != std::string::npos;
  })) << ReadFileOrDie(dir / "again.log");
  EXPECT_TRUE(old.alive());
  faults.SetRules("\n");  // no rules: the old daemon's fsync returns, it exits
  ASSERT_TRUE(WaitFor([&] { return !old.alive(); })) << old.log();
  EXPECT_EQ(old.Stop(), 0) << old.log();
  ASSERT_TRUE(WaitFor([&] { return IsFuseMount(old.mnt()); }, std::chrono::seconds(15)))
      << ReadFileOrDie(dir / "again.log");
  struct stat st {};
  EXPECT_EQ(stat((old / "drive0").c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 4 << 20);
  std::string log = ReadFileOrDie(dir / "again.log");
  EXPECT_EQ(Count(log, "waiting"), 1u) << log;
  EXPECT_NE(log.find("in use by another cbwfs"), std::string::npos) << log;
  CommandResult u2 = RunCommand({"fusermount3", "-u", old.mnt()});
  EXPECT_EQ(u2.exit_code, 0) << u2.err;
  int status = again.Wait(std::chrono::seconds(30));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status << "\n" << log;
}

}  // namespace
}  // namespace cbw::test
