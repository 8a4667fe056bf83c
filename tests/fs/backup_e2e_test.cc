// End-to-end tests of backups through a real mount (SPEC 3, 4): the target
// must equal the drive at the point in time, however it is written meanwhile.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tests/fs/mount_fixture.h"
#include "tests/fs/shell_helpers.h"
#include "tests/lib/pit_oracle.h"

namespace cbw::test {
namespace {

// One mounted drive and a scratch directory: the shared fixture.
using BackupE2E = MountedDrive;

TEST_F(BackupE2E, IdleFullBackupEqualsDrive) {
  MountDrive(4 * 1024 * 1024 + 4097);  // unaligned tail
  std::string reply;
  ASSERT_EQ(
      mount_.Control(
          Cmd("drive-backup", {{"device", "drive0"}, {"target", dir_ / "t.img"}, {"sync", "full"}}),
          &reply),
      0)
      << reply;
  ASSERT_TRUE(WaitResult(mount_, "drive0")) << mount_.JobRecord("drive0");
  json rec = Record(mount_, "drive0");
  EXPECT_EQ(rec["result"], "success") << rec.dump();
  EXPECT_EQ(rec["offset"], rec["len"]);
  EXPECT_EQ(ReadFileOrDie(dir_ / "t.img"), image_);
}

TEST_F(BackupE2E, TargetEqualsPointInTimeUnderConcurrentWriters) {
  constexpr uint64_t kSize = 64 << 20;
  MountDrive(kSize);
  std::vector<std::unique_ptr<Writer>> writers;
  constexpr int kWriters = 4;
  for (int i = 0; i < kWriters; ++i) {
    writers.push_back(std::make_unique<Writer>(mount_ / "drive0", kSize / kWriters * i,
                                               kSize / kWriters, 1000 + i));
    writers.back()->Start();
  }
  // Let the writers get going, then start a rate-limited backup under them.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  auto issued = Clock::now();
  std::string reply;
  int err = mount_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                                {"target", dir_ / "t.img"},
                                                {"sync", "full"},
                                                {"speed", 32 << 20}}),
                           nullptr);
  auto returned = Clock::now();
  ASSERT_EQ(err, 0) << ReadFileOrDie(mount_ / "control");
  ASSERT_TRUE(WaitResult(mount_, "drive0")) << mount_.JobRecord("drive0");
  for (auto& w : writers) w->Stop();
  json rec = Record(mount_, "drive0");
  EXPECT_EQ(rec["result"], "success") << rec.dump();
  EXPECT_GT(rec["cbw-bytes"].get<uint64_t>(), 0u) << "writers should have raced the copier";
  std::string target = ReadFileOrDie(dir_ / "t.img");
  ASSERT_EQ(target.size(), kSize);
  size_t total_ops = 0;
  for (auto& w : writers) {
    EXPECT_EQ(w->errors(), 0);
    total_ops += w->ops().size();
    EXPECT_TRUE(SliceMatchesPointInTime(image_, target, *w, issued, returned));
  }
  // And no drive write was lost: the source is the initial image with every op applied.
  std::string final_image = image_;
  for (auto& w : writers) {
    for (const auto& op : w->ops()) Apply(&final_image, op);
  }
  EXPECT_EQ(ReadFileOrDie(dir_ / "src.img"), final_image);
  RecordProperty("drive_ops", static_cast<int>(total_ops));
}

TEST_F(BackupE2E, SparseDriveBacksUpAsHoles) {
  // 16 GiB with a few MiB of data: the copier skips the holes.
  TempDir d;
  uint64_t size = 16ull << 30;
  MakeSparseFile(d / "sparse.img", size);
  std::string data = RandomBytes(4 << 20, 9);
  {
    int fd = open((d / "sparse.img").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(pwrite(fd, data.data(), data.size(), 5ll << 30), static_cast<ssize_t>(data.size()));
    close(fd);
  }
  ASSERT_TRUE(mount_.Start({"--drive", "big=" + (d / "sparse.img")}));
  ASSERT_EQ(mount_.Control(Cmd("drive-backup",
                               {{"device", "big"}, {"target", d / "t.img"}, {"sync", "full"}})),
            0)
      << ReadFileOrDie(mount_ / "control");
  ASSERT_TRUE(WaitResult(mount_, "big", std::chrono::seconds(120))) << mount_.JobRecord("big");
  json rec = Record(mount_, "big");
  EXPECT_EQ(rec["result"], "success");
  EXPECT_GE(rec["skipped-bytes"].get<uint64_t>(), size - (8 << 20));
  struct stat st {};
  ASSERT_EQ(stat((d / "t.img").c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), size);
  EXPECT_LT(static_cast<uint64_t>(st.st_blocks) * 512, 64ull << 20) << "target should stay sparse";
  int fd = open((d / "t.img").c_str(), O_RDONLY);
  std::string back(data.size(), '\0');
  ASSERT_EQ(pread(fd, back.data(), back.size(), 5ll << 30), static_cast<ssize_t>(back.size()));
  close(fd);
  EXPECT_TRUE(back == data);
}

TEST_F(BackupE2E, SyncNonePreservesOnlyOverwrittenClusters) {
  MountDrive(8 << 20);
  ASSERT_EQ(mount_.Control(
                Cmd("drive-backup",
                    {{"device", "drive0"}, {"target", dir_ / "scratch.img"}, {"sync", "none"}})),
            0)
      << ReadFileOrDie(mount_ / "control");
  ASSERT_TRUE(mount_.WaitJobStatus("drive0", {"running"}));
  int fd = open((mount_ / "drive0").c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  std::string junk = RandomBytes(100, 5);
  ASSERT_EQ(pwrite(fd, junk.data(), junk.size(), (1 << 20) + 10), 100);
  close(fd);
  // The scratch target holds the old 64 KiB cluster there, and nothing else.
  std::string scratch = ReadFileOrDie(dir_ / "scratch.img");
  ASSERT_EQ(scratch.size(), image_.size());
  EXPECT_TRUE(scratch.substr(1 << 20, 65536) == image_.substr(1 << 20, 65536));
  struct stat st {};
  ASSERT_EQ(stat((dir_ / "scratch.img").c_str(), &st), 0);
  EXPECT_LE(static_cast<uint64_t>(st.st_blocks) * 512, 256u * 1024);
  json rec = Record(mount_, "drive0");
  EXPECT_EQ(rec["cbw-bytes"], 65536);
  ASSERT_EQ(mount_.Control(Cmd("job-cancel", {{"id", "drive0"}})), 0);
  ASSERT_TRUE(WaitResult(mount_, "drive0"));
  EXPECT_EQ(Record(mount_, "drive0")["result"], "cancelled");
}

TEST_F(BackupE2E, SeveralJobsOnOneDriveKeepTheirOwnPointInTime) {
  MountDrive(8 << 20);
  ASSERT_EQ(mount_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                                {"job-id", "first"},
                                                {"target", dir_ / "a.img"},
                                                {"sync", "full"},
                                                {"speed", 1 << 20}})),
            0)
      << ReadFileOrDie(mount_ / "control");
  std::string at_first = image_;
  int fd = open((mount_ / "drive0").c_str(), O_WRONLY);
  std::string d1 = RandomBytes(3 << 20, 77);
  ASSERT_EQ(pwrite(fd, d1.data(), d1.size(), 4096), static_cast<ssize_t>(d1.size()));
  image_.replace(4096, d1.size(), d1);
  std::string at_second = image_;
  ASSERT_EQ(mount_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                                {"job-id", "second"},
                                                {"target", dir_ / "b.img"},
                                                {"sync", "full"}})),
            0)
      << ReadFileOrDie(mount_ / "control");
  std::string d2 = RandomBytes(5 << 20, 78);
  ASSERT_EQ(pwrite(fd, d2.data(), d2.size(), 1 << 20), static_cast<ssize_t>(d2.size()));
  close(fd);
  ASSERT_EQ(mount_.Control(Cmd("block-job-set-speed", {{"device", "first"}, {"speed", 0}})), 0);
  ASSERT_TRUE(WaitResult(mount_, "first"));
  ASSERT_TRUE(WaitResult(mount_, "second"));
  EXPECT_EQ(Record(mount_, "first")["result"], "success");
  EXPECT_EQ(Record(mount_, "second")["result"], "success");
  EXPECT_TRUE(ReadFileOrDie(dir_ / "a.img") == at_first);
  EXPECT_TRUE(ReadFileOrDie(dir_ / "b.img") == at_second);
}

TEST_F(BackupE2E, TransactionOverTwoDrivesWithRacingWrites) {
  std::string a = RandomBytes(16 << 20, 1), b = RandomBytes(16 << 20, 2);
  WriteFileOrDie(dir_ / "a.img", a);
  WriteFileOrDie(dir_ / "b.img", b);
  ASSERT_TRUE(
      mount_.Start({"--drive", "a=" + (dir_ / "a.img"), "--drive", "b=" + (dir_ / "b.img")}));
  Writer wa(mount_ / "a", 0, 16 << 20, 11), wb(mount_ / "b", 0, 16 << 20, 12);
  wa.Start();
  wb.Start();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const std::string txn = GroupedBackups(
      {{{"device", "a"}, {"target", dir_ / "ta.img"}, {"sync", "full"}, {"speed", 16 << 20}},
       {{"device", "b"}, {"target", dir_ / "tb.img"}, {"sync", "full"}, {"speed", 16 << 20}}});
  auto issued = Clock::now();
  int err = mount_.Control(txn);
  auto returned = Clock::now();
  ASSERT_EQ(err, 0) << ReadFileOrDie(mount_ / "control");
  ASSERT_TRUE(WaitResult(mount_, "a"));
  ASSERT_TRUE(WaitResult(mount_, "b"));
  wa.Stop();
  wb.Stop();
  EXPECT_EQ(Record(mount_, "a")["result"], "success");
  EXPECT_EQ(Record(mount_, "b")["result"], "success");
  EXPECT_TRUE(SliceMatchesPointInTime(a, ReadFileOrDie(dir_ / "ta.img"), wa, issued, returned));
  EXPECT_TRUE(SliceMatchesPointInTime(b, ReadFileOrDie(dir_ / "tb.img"), wb, issued, returned));
}

TEST_F(BackupE2E, FailedTransactionStartsNothing) {
  MountDrive(1 << 20);
  json txn = {
      {"execute", "transaction"},
      {"arguments",
       {{"actions",
         {{{"type", "drive-backup"},
           {"data", {{"device", "drive0"}, {"target", dir_ / "ok.img"}, {"sync", "full"}}}},
          {{"type", "drive-backup"},
           {"data", {{"device", "nodev"}, {"target", dir_ / "x.img"}, {"sync", "full"}}}}}}}}};
  EXPECT_EQ(mount_.Control(txn.dump()), ENODEV);
  EXPECT_EQ(mount_.JobRecord("drive0"), "");
  struct stat st {};
  EXPECT_NE(stat((dir_ / "ok.img").c_str(), &st), 0) << "a refused transaction leaves no target";
}

// A tmpfs too small for the target: ENOSPC under each on-target-error policy.
class EnospcE2E : public BackupE2E {
 protected:
  void SetUp() override {
    small_ = dir_ / "small";
    mkdir(small_.c_str(), 0755);
    if (mount("tmpfs", small_.c_str(), "tmpfs", 0, "size=1m") != 0) {
      GTEST_SKIP() << "cannot mount tmpfs: " << strerror(errno);
    }
    mounted_ = true;
    MountDrive(4 << 20);
  }
  void TearDown() override {
    if (mounted_) umount2(small_.c_str(), MNT_DETACH);
  }
  void Grow() { ASSERT_EQ(mount("tmpfs", small_.c_str(), "tmpfs", MS_REMOUNT, "size=16m"), 0); }
  std::string small_;
  bool mounted_ = false;
};

TEST_F(EnospcE2E, ReportFailsTheJob) {
  ASSERT_EQ(
      mount_.Control(Cmd("drive-backup",
                         {{"device", "drive0"}, {"target", small_ + "/t.img"}, {"sync", "full"}})),
      0)
      << ReadFileOrDie(mount_ / "control");
  ASSERT_TRUE(WaitResult(mount_, "drive0"));
  json rec = Record(mount_, "drive0");
  EXPECT_EQ(rec["result"], "failed");
  EXPECT_EQ(rec["error"], "No space left on device");
  EXPECT_EQ(ReadFileOrDie(dir_ / "src.img"), image_);
}

TEST_F(EnospcE2E, StopPausesThenResumeCompletes) {
  for (std::string policy : {"stop", "enospc"}) {
    SCOPED_TRACE(policy);
    std::string id = "j" + policy;
    ASSERT_EQ(mount_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                                  {"job-id", id},
                                                  {"target", small_ + "/" + id + ".img"},
                                                  {"sync", "full"},
                                                  {"on-target-error", policy}})),
              0)
        << ReadFileOrDie(mount_ / "control");
    ASSERT_TRUE(mount_.WaitJobStatus(id, {"paused"})) << mount_.JobRecord(id);
    EXPECT_EQ(Record(mount_, id)["io-status"], "nospace");
    Grow();
    ASSERT_EQ(mount_.Control(Cmd("job-resume", {{"id", id}})), 0)
        << ReadFileOrDie(mount_ / "control");
    ASSERT_TRUE(WaitResult(mount_, id)) << mount_.JobRecord(id);
    EXPECT_EQ(Record(mount_, id)["result"], "success");
    EXPECT_TRUE(ReadFileOrDie(small_ + "/" + id + ".img") == image_);
    RunCommand({"rm", "-f", small_ + "/" + id + ".img"});
    ASSERT_EQ(mount("tmpfs", small_.c_str(), "tmpfs", MS_REMOUNT, "size=1m"), 0);
  }
}

TEST_F(EnospcE2E, IgnoreRetriesUntilThereIsRoom) {
  ASSERT_EQ(mount_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                                {"target", small_ + "/t.img"},
                                                {"sync", "full"},
                                                {"on-target-error", "ignore"}})),
            0)
      << ReadFileOrDie(mount_ / "control");
  // It keeps running (retrying) while the disk is full.
  ASSERT_TRUE(WaitFor([&] {
    auto r = Record(mount_, "drive0");
    return r.is_object() && r["offset"].get<uint64_t>() > 0;
  }));
  EXPECT_FALSE(Record(mount_, "drive0").contains("result"));
  Grow();
  ASSERT_TRUE(WaitResult(mount_, "drive0")) << mount_.JobRecord("drive0");
  EXPECT_EQ(Record(mount_, "drive0")["result"], "success");
  EXPECT_TRUE(ReadFileOrDie(small_ + "/t.img") == image_);
}

TEST_F(EnospcE2E, CbwErrorPolicies) {
  // A full scratch target makes every CBW copy fail.
  WriteFileOrDie(small_ + "/filler", std::string(1000 * 1024, 'f'));
  ASSERT_EQ(mount_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                                {"job-id", "gw"},
                                                {"target", small_ + "/gw.img"},
                                                {"sync", "none"},
                                                {"on-cbw-error", "break-guest-write"}})),
            0)
      << ReadFileOrDie(mount_ / "control");
  int fd = open((mount_ / "drive0").c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  std::string junk = RandomBytes(4096, 3);
  EXPECT_EQ(pwrite(fd, junk.data(), junk.size(), 0), -1);
  EXPECT_EQ(errno, EIO);
  EXPECT_EQ(ReadFileOrDie(dir_ / "src.img"), image_) << "a refused write must not reach the source";
  EXPECT_EQ(Record(mount_, "gw")["status"], "running");
  ASSERT_EQ(mount_.Control(Cmd("job-cancel", {{"id", "gw"}})), 0);
  ASSERT_TRUE(WaitResult(mount_, "gw"));

  // The default, break-snapshot: the write goes ahead and the job fails.
  ASSERT_EQ(mount_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                                {"job-id", "bs"},
                                                {"target", small_ + "/bs.img"},
                                                {"sync", "none"}})),
            0)
      << ReadFileOrDie(mount_ / "control");
  EXPECT_EQ(pwrite(fd, junk.data(), junk.size(), 0), 4096);
  close(fd);
  image_.replace(0, 4096, junk);
  EXPECT_EQ(ReadFileOrDie(dir_ / "src.img"), image_);
  ASSERT_TRUE(WaitResult(mount_, "bs"));
  EXPECT_EQ(Record(mount_, "bs")["result"], "failed");
}

TEST_F(BackupE2E, StopDuringJobCancelsItAndKeepsSource) {
  MountDrive(32 << 20);
  ASSERT_EQ(mount_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                                {"target", dir_ / "t.img"},
                                                {"sync", "full"},
                                                {"speed", 1 << 20}})),
            0);
  int fd = open((mount_ / "drive0").c_str(), O_WRONLY);
  std::string d = RandomBytes(1 << 20, 4);
  ASSERT_EQ(pwrite(fd, d.data(), d.size(), 8 << 20), static_cast<ssize_t>(d.size()));
  close(fd);
  image_.replace(8 << 20, d.size(), d);
  auto t0 = Clock::now();
  EXPECT_EQ(mount_.Stop(SIGTERM), 0) << mount_.log();
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(20))
      << "a rate-limited job must not delay the stop";
  EXPECT_EQ(ReadFileOrDie(dir_ / "src.img"), image_);
}

// The README's demo runs as documented (on the binary under test, a smaller image).
TEST(DemoExample, BacksUpUnderAWriterAndVerifies) {
  CommandResult r = RunShell("CBWFS_BINARY='" + CbwfsBinary() + "' DEMO_MB=32 '" +
                                 std::string(CBW_SOURCE_DIR) + "/examples/demo.sh'",
                             std::chrono::seconds(180));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("OK: the backup equals the drive"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace cbw::test
