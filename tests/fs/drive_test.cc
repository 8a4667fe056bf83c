// End-to-end tests of drive files (SPEC 2.1) through a real cbwfs mount.
#include <dirent.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>
#include <string>

#include "tests/fs/mount_fixture.h"

namespace cbw::test {
namespace {

constexpr uint64_t kOddSize = 4 * 1024 * 1024 + 4097;  // unaligned tail

class DriveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    image_ = RandomBytes(kOddSize, 1);
    WriteFileOrDie(dir_ / "src.img", image_);
    ASSERT_TRUE(mount_.Start({"--drive", "drive0=" + (dir_ / "src.img")}));
  }
  std::string drive() { return mount_ / "drive0"; }

  TempDir dir_;
  CbwfsMount mount_;
  std::string image_;
};

std::set<std::string> List(const std::string& dir) {
  std::set<std::string> names;
  DIR* d = opendir(dir.c_str());
  if (!d) return names;
  while (dirent* e = readdir(d)) names.insert(e->d_name);
  closedir(d);
  return names;
}

TEST_F(DriveTest, TreeAndAttributes) {
  EXPECT_EQ(List(mount_.mnt()), (std::set<std::string>{".", "..", "drive0", "control", "events",
                                                       "jobs", "metrics", "snapshots"}));
  struct stat st {};
  ASSERT_EQ(stat(drive().c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kOddSize);
  EXPECT_EQ(st.st_uid, getuid());
  ASSERT_EQ(stat((mount_ / "control").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  ASSERT_EQ(stat((mount_ / "events").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0444u);
  ASSERT_EQ(stat((mount_ / "jobs").c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  ASSERT_EQ(stat((mount_ / "snapshots").c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  EXPECT_NE(stat((mount_ / "nope").c_str(), &st), 0);
  EXPECT_EQ(errno, ENOENT);
}

TEST_F(DriveTest, ReadEqualsSource) {
  EXPECT_EQ(ReadFileOrDie(drive()), image_);
  // Unaligned pread across the tail.
  int fd = open(drive().c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  char buf[10000];
  ssize_t n = pread(fd, buf, sizeof buf, static_cast<off_t>(kOddSize - 5000));
  EXPECT_EQ(n, 5000);
  EXPECT_EQ(std::string(buf, 5000), image_.substr(kOddSize - 5000));
  EXPECT_EQ(pread(fd, buf, sizeof buf, static_cast<off_t>(kOddSize)), 0);
  close(fd);
}

TEST_F(DriveTest, WritesReachSourceAndReadBack) {
  int fd = open(drive().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  std::string data = RandomBytes(200000, 2);
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), 12345), static_cast<ssize_t>(data.size()));
  ASSERT_EQ(fsync(fd), 0);
  ASSERT_EQ(fdatasync(fd), 0);
  image_.replace(12345, data.size(), data);
  EXPECT_EQ(ReadFileOrDie(drive()), image_);
  close(fd);
  EXPECT_EQ(ReadFileOrDie(dir_ / "src.img"), image_);
}

TEST_F(DriveTest, WritePastEndIsEnospcAndTailIsCutShort) {
  int fd = open(drive().c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  EXPECT_EQ(pwrite(fd, "x", 1, static_cast<off_t>(kOddSize)), -1);
  EXPECT_EQ(errno, ENOSPC);
  EXPECT_EQ(pwrite(fd, "abcdefgh", 8, static_cast<off_t>(kOddSize - 3)), 3);
  close(fd);
  struct stat st {};
  ASSERT_EQ(stat((dir_ / "src.img").c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kOddSize);
  EXPECT_EQ(ReadFileOrDie(dir_ / "src.img").substr(kOddSize - 3), "abc");
}

TEST_F(DriveTest, TruncateIsRefusedAndOTruncIgnored) {
  EXPECT_EQ(truncate(drive().c_str(), 4096), -1);
  EXPECT_EQ(errno, EPERM);
  EXPECT_EQ(truncate(drive().c_str(), static_cast<off_t>(kOddSize)), 0);
  int fd = open(drive().c_str(), O_WRONLY | O_TRUNC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(write(fd, "hello", 5), 5);
  close(fd);
  struct stat st {};
  ASSERT_EQ(stat(drive().c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kOddSize);
  image_.replace(0, 5, "hello");
  EXPECT_EQ(ReadFileOrDie(drive()), image_);
  // The shell's `>` goes through the same path.
  CommandResult r = RunShell("printf 'shell' > " + drive());
  EXPECT_EQ(r.exit_code, 0) << r.err;
  image_.replace(0, 5, "shell");
  EXPECT_EQ(ReadFileOrDie(dir_ / "src.img"), image_);
}

TEST_F(DriveTest, PunchHoleZeroRangeAndSeek) {
  int fd = open(drive().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20), 0)
      << strerror(errno);
  std::fill(image_.begin() + (1 << 20), image_.begin() + (2 << 20), '\0');
  ASSERT_EQ(fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 3 << 20, 4096), 0)
      << strerror(errno);
  std::fill(image_.begin() + (3 << 20), image_.begin() + (3 << 20) + 4096, '\0');
  // Unsupported modes and growth are refused.
  EXPECT_EQ(fallocate(fd, 0, 0, 4096), -1);
  EXPECT_EQ(errno, EOPNOTSUPP);
  EXPECT_EQ(fallocate(fd, FALLOC_FL_ZERO_RANGE, static_cast<off_t>(kOddSize - 10), 4096), -1);
  EXPECT_EQ(errno, ENOSPC);
  EXPECT_EQ(ReadFileOrDie(drive()), image_);
  EXPECT_EQ(ReadFileOrDie(dir_ / "src.img"), image_);
  // The punched megabyte is a hole in the source and SEEK_HOLE finds it.
  off_t hole = lseek(fd, 0, SEEK_HOLE);
  EXPECT_EQ(hole, 1 << 20);
  off_t data = lseek(fd, 1 << 20, SEEK_DATA);
  EXPECT_EQ(data, 2 << 20);
  EXPECT_EQ(lseek(fd, static_cast<off_t>(kOddSize), SEEK_DATA), -1);
  EXPECT_EQ(errno, ENXIO);
  close(fd);
}

TEST_F(DriveTest, ODirectIsAccepted) {
  int fd = open(drive().c_str(), O_RDWR | O_DIRECT);
  ASSERT_GE(fd, 0) << strerror(errno);
  void* p = nullptr;
  ASSERT_EQ(posix_memalign(&p, 4096, 8192), 0);
  memset(p, 0x5a, 8192);
  EXPECT_EQ(pwrite(fd, p, 8192, 65536), 8192) << strerror(errno);
  memset(p, 0, 8192);
  EXPECT_EQ(pread(fd, p, 8192, 65536), 8192);
  EXPECT_EQ(static_cast<unsigned char*>(p)[8191], 0x5a);
  free(p);
  close(fd);
  image_.replace(65536, 8192, std::string(8192, '\x5a'));
  EXPECT_EQ(ReadFileOrDie(dir_ / "src.img"), image_);
}

TEST_F(DriveTest, CleanStopKeepsEveryWrite) {
  int fd = open(drive().c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  for (int i = 0; i < 64; ++i) {
    std::string d = RandomBytes(4096, 100 + i);
    off_t off = static_cast<off_t>((i * 65537) % (kOddSize - 4096));
    ASSERT_EQ(pwrite(fd, d.data(), d.size(), off), 4096);
    image_.replace(static_cast<size_t>(off), 4096, d);
  }
  close(fd);
  EXPECT_EQ(mount_.Stop(SIGTERM), 0) << mount_.log();
  EXPECT_EQ(ReadFileOrDie(dir_ / "src.img"), image_);
}

TEST(DriveMulti, TwoDrivesAndReadOnly) {
  TempDir dir;
  std::string a = RandomBytes(1 << 20, 3), b = RandomBytes(3 << 20, 4);
  WriteFileOrDie(dir / "a.img", a);
  WriteFileOrDie(dir / "b.img", b);
  CbwfsMount m;
  ASSERT_TRUE(m.Start(
      {"--drive", "a=" + (dir / "a.img"), "--drive", "b=" + (dir / "b.img") + ",readonly=on"}));
  EXPECT_EQ(ReadFileOrDie(m / "a"), a);
  EXPECT_EQ(ReadFileOrDie(m / "b"), b);
  struct stat st {};
  ASSERT_EQ(stat((m / "b").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0400u);
  EXPECT_EQ(open((m / "b").c_str(), O_WRONLY), -1);
  EXPECT_EQ(errno, EROFS);
  int fd = open((m / "b").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  EXPECT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096), -1);
  close(fd);
  EXPECT_EQ(ReadFileOrDie(dir / "b.img"), b);
  EXPECT_EQ(m.Unmount(), 0) << m.log();
}

TEST(DriveMulti, BlockDeviceSource) {
  // A loop device is a real block device; skip where none can be made.
  TempDir dir;
  std::string data = RandomBytes(8 << 20, 5);
  WriteFileOrDie(dir / "backing.img", data);
  CommandResult lo = RunCommand({"losetup", "--find", "--show", dir / "backing.img"});
  if (lo.exit_code != 0) GTEST_SKIP() << "no loop device here: " << lo.err;
  std::string dev = lo.out.substr(0, lo.out.find('\n'));
  {
    CbwfsMount m;
    ASSERT_TRUE(m.Start({"--drive", "blk=" + dev}));
    struct stat st {};
    ASSERT_EQ(stat((m / "blk").c_str(), &st), 0);
    EXPECT_EQ(static_cast<uint64_t>(st.st_size), data.size());
    EXPECT_EQ(ReadFileOrDie(m / "blk"), data);
    int fd = open((m / "blk").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(pwrite(fd, "block", 5, 4096), 5);
    close(fd);
    EXPECT_EQ(m.Unmount(), 0) << m.log();
  }
  RunCommand({"losetup", "-d", dev});
  data.replace(4096, 5, "block");
  EXPECT_EQ(ReadFileOrDie(dir / "backing.img"), data);
}

}  // namespace
}  // namespace cbw::test
