// Issue 13's defects, through the real daemon: targets that lead into the
// mount through symlinks (the daemon once deadlocked on itself), a hung
// target under a guest queue deeper than the FUSE worker pool, and seeks on
// the view of a huge sparse drive.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <liburing.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "tests/fs/shell_helpers.h"
#include "tests/lib/faultfs_mount.h"

namespace cbw::test {
namespace {

using SelfDeadlock = MountedDrive;

// Every way into the mount through a symlink is refused at once, with
// EINVAL, and the daemon keeps answering (it used to hang on its own lookup
// of jobs/nope while holding the registry lock, and SIGINT hung with it).
TEST_F(SelfDeadlock, TargetsThroughSymlinksIntoTheMountAreRefusedAtOnce) {
  MountDrive(1 << 20);
  ASSERT_EQ(symlink(mount_.mnt().c_str(), (dir_ / "to-mnt").c_str()), 0);
  ASSERT_EQ(symlink((mount_ / "jobs").c_str(), (dir_ / "to-jobs").c_str()), 0);
  ASSERT_EQ(symlink((mount_ / "snapshots").c_str(), (dir_ / "to-snaps").c_str()), 0);
  ASSERT_EQ(symlink((mount_ / "drive0").c_str(), (dir_ / "to-drive").c_str()), 0);
  ASSERT_EQ(symlink("to-mnt/jobs", (dir_ / "rel-jobs").c_str()), 0);
  // A live job, so snapshots/ has an entry to walk through.
  StartJob("live", "none");
  for (const std::string target :
       {"to-mnt/jobs/nope/x.img", "to-mnt/jobs/live", "to-jobs/nope/x.img", "to-jobs/x.img",
        "to-snaps/live", "to-snaps/nope/x.img", "to-mnt/snapshots/live/x", "to-drive",
        "to-mnt/drive0", "rel-jobs/nope/x.img", "to-mnt/control"}) {
    for (const char* mode : {"absolute-paths", "existing"}) {
      auto t0 = Clock::now();
      CommandResult r = RunShell("echo " +
                                     Q(Cmd("drive-backup", {{"device", "drive0"},
                                                            {"job-id", "j"},
                                                            {"target", dir_ / target},
                                                            {"mode", mode},
                                                            {"sync", "full"}})) +
                                     " > " + Q(mount_ / "control"),
                                 std::chrono::seconds(10));
      EXPECT_NE(r.exit_code, -1) << target << ": the daemon hangs on itself";
      EXPECT_NE(r.exit_code, 0) << target;
      EXPECT_NE(r.err.find("Invalid argument"), std::string::npos) << target << ": " << r.err;
      EXPECT_LT(Seconds(Clock::now() - t0), 5.0) << target;
      json reply = LastReply();
      EXPECT_NE(reply["error"]["desc"].get<std::string>().find("under the mountpoint"),
                std::string::npos)
          << target << ": " << reply.dump();
    }
  }
  EXPECT_TRUE(Record(mount_, "j").is_null());
  // Still answering, and SIGINT still stops it.
  CommandResult r = RunShell("cat " + Q(mount_ / "jobs/live"), std::chrono::seconds(5));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(mount_.Stop(SIGINT), 0) << mount_.log();
}

// A target that stops answering while 32 writers are inside CBW copies: more
// than the 16 FUSE workers. Drive writes that must wait leave their worker
// (they wait on the drive's own writer threads), so job-cancel and a read of
// jobs/j still answer within 5 s, and cancelling lets the writers finish.
TEST(HungTargetUnderLoad, CancelAndJobFilesAnswerWithThirtyTwoWritersInFlight) {
  TempDir dir;
  FaultFs faults(FAULTFS_PATH, dir / "backing", dir / "fmnt");
  if (!faults.mounted()) GTEST_SKIP() << "faultfs could not mount";
  constexpr uint64_t kSize = 64 << 20;
  std::string image = RandomBytes(kSize, 77);
  WriteFileOrDie(dir / "src.img", image);
  faults.SetRules("tgt.img write hang 8388608 67108864\n");
  CbwfsMount m;
  // Synchronous CBW (no buffer): the writers wait in the CBW path, which is
  // what this test is about. (Buffered, they would not wait at all.)
  ASSERT_TRUE(m.Start({"--drive", "drive0=" + (dir / "src.img"), "--cbw-buffer", "0"}));
  ASSERT_EQ(m.Control(Cmd("drive-backup", {{"device", "drive0"},
                                           {"job-id", "j"},
                                           {"target", dir / "fmnt/tgt.img"},
                                           {"sync", "full"}})),
            0)
      << ReadFileOrDie(m / "control");
  // The copier's whole queue (8 chunks) hangs before the writers start, so
  // what faultfs holds beyond 8 below is theirs.
  ASSERT_TRUE(WaitFor([&] { return faults.Waiting() >= 8; }, std::chrono::seconds(20)))
      << "the copier never hung: waiting " << faults.Waiting();
  // 32 O_DIRECT writes in flight at once (io_uring: a VM's queue), each to
  // its own cluster well past the copier's claims.
  int fd = open((m / "drive0").c_str(), O_RDWR | O_DIRECT);
  ASSERT_GE(fd, 0);
  io_uring ring{};
  ASSERT_EQ(io_uring_queue_init(64, &ring, 0), 0);
  void* blocks = nullptr;
  ASSERT_EQ(posix_memalign(&blocks, 4096, 32 * 4096), 0);
  for (int i = 0; i < 32; ++i) {
    std::memset(static_cast<char*>(blocks) + i * 4096, 'a' + i % 26, 4096);
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    io_uring_prep_write(sqe, fd, static_cast<char*>(blocks) + i * 4096, 4096,
                        (32ull << 20) + i * 65536ull);
    io_uring_sqe_set_data64(sqe, static_cast<uint64_t>(i));
  }
  ASSERT_EQ(io_uring_submit(&ring), 32);
  std::atomic<int> finished{0}, failed{0};
  std::thread reaper([&] {
    for (int i = 0; i < 32; ++i) {
      io_uring_cqe* cqe = nullptr;
      if (io_uring_wait_cqe(&ring, &cqe) != 0) {
        ++failed;
        continue;
      }
      if (cqe->res != 4096) ++failed;
      io_uring_cqe_seen(&ring, cqe);
      ++finished;
    }
  });
  struct Joiner {
    std::thread& t;
    FaultFs& f;
    ~Joiner() {
      f.SetRules("");  // whatever happens, nothing stays hung
      if (t.joinable()) t.join();
    }
  } joiner{reaper, faults};
  // The CBW copies (16 at most per job) hang in the target, the rest queue.
  // (faultfs sees one of them: the kernel lets one direct write at a time
  // into a FUSE file; the copier's 8 asynchronous ones are the others.)
  ASSERT_TRUE(WaitFor([&] { return faults.Waiting() >= 9; }, std::chrono::seconds(20)))
      << "waiting " << faults.Waiting();
  EXPECT_EQ(finished.load(), 0);
  auto t0 = Clock::now();
  CommandResult r = RunShell("cat " + Q(m / "jobs/j"), std::chrono::seconds(5));
  EXPECT_EQ(r.exit_code, 0) << "jobs/j did not answer: " << r.err;
  EXPECT_LT(Seconds(Clock::now() - t0), 5.0);
  t0 = Clock::now();
  r = RunShell("echo " + Q(Cmd("job-cancel", {{"id", "j"}})) + " > " + Q(m / "control"),
               std::chrono::seconds(5));
  EXPECT_EQ(r.exit_code, 0) << "job-cancel did not answer: " << r.err;
  EXPECT_LT(Seconds(Clock::now() - t0), 5.0);
  EXPECT_TRUE(WaitResult(m, "j", std::chrono::seconds(5))) << m.JobRecord("j");
  EXPECT_EQ(Record(m, "j").value("result", ""), "cancelled");
  // Cancelled: the writers go through (break-snapshot) without the copies.
  EXPECT_TRUE(WaitFor([&] { return finished.load() == 32; }, std::chrono::seconds(10)));
  faults.SetRules("");  // wakes what still hangs in the target
  reaper.join();
  io_uring_queue_exit(&ring);
  close(fd);
  free(blocks);
  EXPECT_EQ(failed.load(), 0);
  std::string want = image;
  for (int i = 0; i < 32; ++i) {
    want.replace((32ull << 20) + i * 65536ull, 4096,
                 std::string(4096, static_cast<char>('a' + i % 26)));
  }
  EXPECT_EQ(m.Unmount(), 0) << m.log();
  EXPECT_EQ(ReadFileOrDie(dir / "src.img"), want);
}

// The view of an 8 TiB sparse drive: 200 seeks through the mount take well
// under a second each (they walked every cluster, 60 s in all), and so does
// reading the data region found.
TEST(HugeView, SeeksOnAnEightTiBSparseViewAreQuick) {
  TempDir dir;
  const uint64_t size = uint64_t{8} << 40;
  MakeSparseFile(dir / "src.img", size);
  std::string data = RandomBytes(1 << 20, 5);
  {
    int fd = open((dir / "src.img").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(pwrite(fd, data.data(), data.size(), static_cast<off_t>(size / 2)),
              static_cast<ssize_t>(data.size()));
    close(fd);
  }
  CbwfsMount m;
  ASSERT_TRUE(m.Start({"--drive", "drive0=" + (dir / "src.img")}));
  ASSERT_EQ(m.Control(Cmd("drive-backup", {{"device", "drive0"},
                                           {"job-id", "v"},
                                           {"target", dir / "scratch.img"},
                                           {"sync", "none"}})),
            0);
  int fd = open((m / "snapshots/v").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  auto t0 = Clock::now();
  for (int i = 0; i < 100; ++i) {
    EXPECT_EQ(lseek(fd, i * 4096, SEEK_DATA), static_cast<off_t>(size / 2));
    EXPECT_EQ(lseek(fd, static_cast<off_t>(size / 2), SEEK_HOLE),
              static_cast<off_t>(size / 2 + data.size()));
  }
  double took = Seconds(Clock::now() - t0);
  EXPECT_LT(took, 10.0);
  std::string got(data.size(), '\0');
  EXPECT_EQ(pread(fd, got.data(), got.size(), static_cast<off_t>(size / 2)),
            static_cast<ssize_t>(got.size()));
  EXPECT_EQ(got, data);
  close(fd);
  RecordProperty("seconds_for_200_seeks", std::to_string(took));
}

}  // namespace
}  // namespace cbw::test
