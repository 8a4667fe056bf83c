// End-to-end backups to Ceph RBD images through a real mount (SPEC 6): the
// point-in-time oracle (`rbd export` of the image equals the drive at T under
// concurrent writers), speed limit, pause/resume, cancel, a 2-drive
// transaction, stale data in an existing image, a pool over its quota, the
// snapshot view, and refusals.

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tests/ceph/ceph_cluster.h"
#include "tests/fs/mount_fixture.h"
#include "tests/fs/shell_helpers.h"
#include "tests/lib/pit_oracle.h"

namespace cbw::test {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class RbdE2E : public MountedDrive {
 protected:
  void SetUp() override {
    cluster_ = CephCluster::Get();
    ASSERT_NE(cluster_, nullptr) << "no Ceph cluster";
    name_ = std::string("e2e-") + ::testing::UnitTest::GetInstance()->current_test_info()->name();
  }
  void TearDown() override {
    if (cluster_ == nullptr) return;
    if (mount_.alive()) mount_.Unmount();  // the daemon closes its images before it exits
    for (const auto& [pool, img] : cleanup_) cluster_->Remove(img, pool);
  }
  // Starts a backup of drive0 to `spec`; returns the write's errno.
  int Backup(const std::string& spec, json extra = json::object(),
             const std::string& id = "drive0") {
    json a = {{"device", "drive0"}, {"job-id", id}, {"target", spec}, {"sync", "full"}};
    for (auto& [k, v] : extra.items()) a[k] = v;
    return mount_.Control(Cmd("drive-backup", a));
  }
  std::string Reply() { return ReadFileOrDie(mount_ / "control"); }
  void Cleanup(const std::string& img, const std::string& pool = "rbd") {
    cleanup_.emplace_back(pool, img);
  }

  CephCluster* cluster_ = nullptr;
  std::string name_;  // of this test's image (image_ holds the drive's bytes)
  std::vector<std::pair<std::string, std::string>> cleanup_;
};

TEST_F(RbdE2E, ExportEqualsTheDriveAtThePointInTimeUnderConcurrentWriters) {
  constexpr uint64_t kSize = 32 * kMiB;
  MountDrive(kSize);
  std::vector<std::unique_ptr<Writer>> writers;
  constexpr int kWriters = 4;
  for (int i = 0; i < kWriters; ++i) {
    writers.push_back(std::make_unique<Writer>(mount_ / "drive0", kSize / kWriters * i,
                                               kSize / kWriters, 2000 + i));
    writers.back()->Start();
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  Cleanup(name_);
  const auto issued = Clock::now();
  int err = Backup(cluster_->Spec(name_), {{"speed", 16 * kMiB}});
  const auto returned = Clock::now();
  ASSERT_EQ(err, 0) << Reply();
  // The writers race the copier for a while after T (the oracle's cost
  // grows with their operations; RBD is slower than a local file).
  WaitFor([&] { return Record(mount_, "drive0").contains("result"); }, std::chrono::seconds(2));
  for (auto& w : writers) w->Stop();
  ASSERT_TRUE(WaitResult(mount_, "drive0", std::chrono::seconds(120)))
      << mount_.JobRecord("drive0");
  json rec = Record(mount_, "drive0");
  EXPECT_EQ(rec["result"], "success") << rec.dump();
  EXPECT_EQ(rec["target"], cluster_->Spec(name_));
  EXPECT_GT(rec["cbw-bytes"].get<uint64_t>(), 0u) << "writers should have raced the copier";
  std::string target = cluster_->Export(name_);
  ASSERT_EQ(target.size(), kSize) << "created at the drive's size";
  for (auto& w : writers) {
    EXPECT_EQ(w->errors(), 0);
    EXPECT_TRUE(SliceMatchesPointInTime(image_, target, *w, issued, returned));
  }
  std::string final_image = image_;
  for (auto& w : writers) {
    for (const auto& op : w->ops()) Apply(&final_image, op);
  }
  EXPECT_TRUE(ReadFileOrDie(dir_ / "src.img") == final_image) << "no drive write was lost";
}

TEST_F(RbdE2E, SpeedLimitPauseResumeCancelAndShutdown) {
  MountDrive(16 * kMiB);
  Cleanup(name_);
  const auto t0 = Clock::now();
  ASSERT_EQ(Backup(cluster_->Spec(name_), {{"speed", 4 * kMiB}}), 0) << Reply();
  ASSERT_TRUE(WaitFor([&] { return Record(mount_, "drive0")["offset"].get<uint64_t>() > 0; }));
  ASSERT_EQ(mount_.Control(Cmd("job-pause", {{"id", "drive0"}})), 0) << Reply();
  ASSERT_TRUE(mount_.WaitJobStatus("drive0", {"paused"}));
  const uint64_t at_pause = Record(mount_, "drive0")["offset"];
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  EXPECT_EQ(Record(mount_, "drive0")["offset"], at_pause) << "a paused job copies nothing";
  ASSERT_EQ(mount_.Control(Cmd("job-resume", {{"id", "drive0"}})), 0) << Reply();
  ASSERT_TRUE(WaitResult(mount_, "drive0")) << mount_.JobRecord("drive0");
  EXPECT_EQ(Record(mount_, "drive0")["result"], "success");
  EXPECT_GE(Seconds(Clock::now() - t0), 2.5) << "16 MiB at 4 MiB/s (after a 100 ms burst)";
  EXPECT_TRUE(cluster_->Export(name_) == image_);

  // Cancel: a slow job ends as cancelled; the image stays, as in QEMU.
  ASSERT_EQ(Backup(cluster_->Spec(name_), {{"speed", kMiB}}, "slow"), 0) << Reply();
  ASSERT_TRUE(mount_.WaitJobStatus("slow", {"running"}));
  ASSERT_EQ(mount_.Control(Cmd("job-cancel", {{"id", "slow"}})), 0) << Reply();
  ASSERT_TRUE(WaitResult(mount_, "slow", std::chrono::seconds(10)));
  EXPECT_EQ(Record(mount_, "slow")["result"], "cancelled");
  EXPECT_TRUE(cluster_->Exists(name_));

  // SIGTERM with an RBD job running: it is cancelled, and the daemon closes
  // its cluster connection (rados_shutdown) and exits cleanly.
  ASSERT_EQ(Backup(cluster_->Spec(name_), {{"speed", kMiB}}, "last"), 0) << Reply();
  ASSERT_TRUE(mount_.WaitJobStatus("last", {"running"}));
  const auto s0 = Clock::now();
  EXPECT_EQ(mount_.Stop(SIGTERM), 0) << mount_.log();
  EXPECT_LT(Seconds(Clock::now() - s0), 20.0);
  EXPECT_TRUE(ReadFileOrDie(dir_ / "src.img") == image_);
}

TEST_F(RbdE2E, TransactionOverTwoDrivesWithRacingWrites) {
  std::string a = RandomBytes(8 * kMiB, 1), b = RandomBytes(8 * kMiB, 2);
  WriteFileOrDie(dir_ / "a.img", a);
  WriteFileOrDie(dir_ / "b.img", b);
  ASSERT_TRUE(
      mount_.Start({"--drive", "a=" + (dir_ / "a.img"), "--drive", "b=" + (dir_ / "b.img")}));
  Writer wa(mount_ / "a", 0, 8 * kMiB, 11), wb(mount_ / "b", 0, 8 * kMiB, 12);
  wa.Start();
  wb.Start();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  Cleanup(name_ + "-a");
  Cleanup(name_ + "-b");
  json action_a = {{"device", "a"},
                   {"target", cluster_->Spec(name_ + "-a")},
                   {"sync", "full"},
                   {"speed", 8 * kMiB}};
  json action_b = {{"device", "b"},
                   {"target", cluster_->Spec(name_ + "-b")},
                   {"sync", "full"},
                   {"speed", 8 * kMiB}};
  json txn = {{"execute", "transaction"},
              {"arguments",
               {{"actions",
                 {{{"type", "drive-backup"}, {"data", action_a}},
                  {{"type", "drive-backup"}, {"data", action_b}}}},
                {"properties", {{"completion-mode", "grouped"}}}}}};
  const auto issued = Clock::now();
  int err = mount_.Control(txn.dump());
  const auto returned = Clock::now();
  ASSERT_EQ(err, 0) << Reply();
  ASSERT_TRUE(WaitResult(mount_, "a"));
  ASSERT_TRUE(WaitResult(mount_, "b"));
  wa.Stop();
  wb.Stop();
  EXPECT_EQ(Record(mount_, "a")["result"], "success");
  EXPECT_EQ(Record(mount_, "b")["result"], "success");
  EXPECT_TRUE(SliceMatchesPointInTime(a, cluster_->Export(name_ + "-a"), wa, issued, returned));
  EXPECT_TRUE(SliceMatchesPointInTime(b, cluster_->Export(name_ + "-b"), wb, issued, returned));

  // A transaction refused as a whole creates no image: here its second
  // target is the first's.
  json dup = txn;
  dup["arguments"]["actions"][0]["data"]["target"] = cluster_->Spec(name_ + "-new");
  dup["arguments"]["actions"][1]["data"]["target"] =
      "rbd:rbd/" + name_ + "-new:conf=/dev/null:mon_host=[v2\\:" +
      cluster_->mon_addr().substr(0, cluster_->mon_addr().find(':')) +
      "\\:" + cluster_->mon_addr().substr(cluster_->mon_addr().find(':') + 1) +
      "]:auth_client_required=none";
  EXPECT_EQ(mount_.Control(dup.dump()), EBUSY) << Reply();
  EXPECT_NE(Reply().find("is in use by job"), std::string::npos) << Reply();
  EXPECT_FALSE(cluster_->Exists(name_ + "-new"));
}

TEST_F(RbdE2E, ExistingImageGetsZerosOverStaleDataAndTooSmallIsRefused) {
  // A drive with holes and zeroed ranges between data.
  constexpr uint64_t kSize = 16 * kMiB;
  image_.assign(kSize, '\0');
  MakeSparseFile(dir_ / "src.img", kSize);
  {
    std::string d1 = RandomBytes(3 * kMiB, 7), d2 = RandomBytes(kMiB + 5, 8);
    int fd = open((dir_ / "src.img").c_str(), O_WRONLY);
    ASSERT_EQ(pwrite(fd, d1.data(), d1.size(), kMiB), static_cast<ssize_t>(d1.size()));
    ASSERT_EQ(pwrite(fd, d2.data(), d2.size(), 9 * kMiB), static_cast<ssize_t>(d2.size()));
    std::string zeros(2 * kMiB, '\0');
    ASSERT_EQ(pwrite(fd, zeros.data(), zeros.size(), 12 * kMiB), 2 * static_cast<ssize_t>(kMiB));
    close(fd);
    image_.replace(kMiB, d1.size(), d1);
    image_.replace(9 * kMiB, d2.size(), d2);
  }
  ASSERT_TRUE(mount_.Start({"--drive", "drive0=" + (dir_ / "src.img")}));
  const std::string img = std::string("e2e-stale");
  std::string stale = RandomBytes(2 * kSize, 99);
  WriteFileOrDie(dir_ / "stale", stale);
  ASSERT_EQ(cluster_->Rbd({"import", "--no-progress", dir_ / "stale", "rbd/" + img}).exit_code, 0);
  Cleanup(img);
  ASSERT_EQ(Backup(cluster_->Spec(img), {{"mode", "existing"}}), 0) << Reply();
  ASSERT_TRUE(WaitResult(mount_, "drive0")) << mount_.JobRecord("drive0");
  json rec = Record(mount_, "drive0");
  EXPECT_EQ(rec["result"], "success") << rec.dump();
  std::string got = cluster_->Export(img);
  ASSERT_EQ(got.size(), 2 * kSize) << "an existing image is never resized";
  EXPECT_TRUE(got.substr(0, kSize) == image_) << "zeros where the point in time is zero";
  EXPECT_TRUE(got.substr(kSize) == stale.substr(kSize)) << "past the drive: untouched";

  // Too small, in either mode: refused before anything is written.
  const std::string small = "e2e-small";
  ASSERT_EQ(cluster_->Rbd({"create", "--size", "8M", small}).exit_code, 0);
  Cleanup(small);
  for (const char* mode : {"existing", "absolute-paths"}) {
    EXPECT_EQ(Backup(cluster_->Spec(small), {{"mode", mode}}, "small"), EINVAL);
    json r = json::parse(Reply(), nullptr, false);
    EXPECT_EQ(r["error"]["desc"], "Target '" + cluster_->Spec(small) +
                                      "' is smaller than the drive (8388608 < 16777216 bytes)")
        << r.dump();
  }
  EXPECT_EQ(mount_.JobRecord("small"), "");
}

// Polls `ceph osd pool ls detail` until the pool's flags do (or do not)
// contain "full_quota".
bool WaitPoolFull(CephCluster* c, const std::string& pool, bool full) {
  return WaitFor(
      [&] {
        CommandResult r = c->Ceph({"osd", "pool", "ls", "detail"});
        for (size_t p = 0; (p = r.out.find("pool ", p)) != std::string::npos; ++p) {
          size_t eol = r.out.find('\n', p);
          std::string line = r.out.substr(p, eol - p);
          if (line.find("'" + pool + "'") == std::string::npos) continue;
          return (line.find("full_quota") != std::string::npos) == full;
        }
        return false;
      },
      std::chrono::seconds(90));
}

TEST_F(RbdE2E, PoolQuotaFullStopsTheJobWithEnospcAndResumeCompletesIt) {
  const std::string pool = "quota";
  ASSERT_EQ(cluster_->Ceph({"osd", "pool", "create", pool, "8", "8"}).exit_code, 0);
  ASSERT_EQ(cluster_->Rbd({"pool", "init", pool}).exit_code, 0);
  struct DropPool {
    CephCluster* c;
    std::string pool;
    ~DropPool() { c->Ceph({"osd", "pool", "rm", pool, pool, "--yes-i-really-really-mean-it"}); }
  } drop{cluster_, pool};
  MountDrive(8 * kMiB);
  // The image exists before the pool fills (creating one in a full pool
  // waits for room); then the pool goes over a 1 MiB quota.
  ASSERT_EQ(cluster_->Rbd({"create", "--size", "8M", pool + "/" + name_}).exit_code, 0);
  ASSERT_EQ(cluster_->Ceph({"osd", "pool", "set-quota", pool, "max_bytes", "1048576"}).exit_code,
            0);
  WriteFileOrDie(dir_ / "filler", RandomBytes(2 * kMiB, 3));
  ASSERT_EQ(cluster_->Rados({"-p", pool, "put", "filler", dir_ / "filler"}).exit_code, 0);
  ASSERT_TRUE(WaitPoolFull(cluster_, pool, true)) << "the mon never flagged the pool full";

  // report (the default): the job fails with ENOSPC's text.
  ASSERT_EQ(Backup(cluster_->Spec(name_, pool), {{"mode", "existing"}}, "rep"), 0) << Reply();
  ASSERT_TRUE(WaitResult(mount_, "rep")) << mount_.JobRecord("rep");
  EXPECT_EQ(Record(mount_, "rep")["result"], "failed");
  EXPECT_EQ(Record(mount_, "rep")["error"], "No space left on device");

  // enospc: the job stops with io-status nospace; with room again, resume
  // completes it.
  ASSERT_EQ(Backup(cluster_->Spec(name_, pool),
                   {{"mode", "existing"}, {"on-target-error", "enospc"}}, "nospc"),
            0)
      << Reply();
  ASSERT_TRUE(mount_.WaitJobStatus("nospc", {"paused"})) << mount_.JobRecord("nospc");
  EXPECT_EQ(Record(mount_, "nospc")["io-status"], "nospace");
  ASSERT_EQ(cluster_->Ceph({"osd", "pool", "set-quota", pool, "max_bytes", "0"}).exit_code, 0);
  ASSERT_TRUE(WaitPoolFull(cluster_, pool, false));
  ASSERT_EQ(mount_.Control(Cmd("job-resume", {{"id", "nospc"}})), 0) << Reply();
  ASSERT_TRUE(WaitResult(mount_, "nospc")) << mount_.JobRecord("nospc");
  EXPECT_EQ(Record(mount_, "nospc")["result"], "success") << mount_.JobRecord("nospc");
  EXPECT_TRUE(cluster_->Export(name_, pool) == image_);
  mount_.Unmount();
}

TEST_F(RbdE2E, SnapshotViewReadsThePointInTimeThroughTheImage) {
  MountDrive(8 * kMiB);
  Cleanup(name_);
  ASSERT_EQ(Backup(cluster_->Spec(name_), {{"sync", "none"}}), 0) << Reply();
  ASSERT_TRUE(mount_.WaitJobStatus("drive0", {"running"}));
  // Overwrite some clusters: their old data goes to the image, and the view
  // reads them from there.
  int fd = open((mount_ / "drive0").c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  for (uint64_t off : {uint64_t{0}, 3 * kMiB + 100, 8 * kMiB - 4096}) {
    std::string junk = RandomBytes(70000, off);
    ssize_t n = pwrite(fd, junk.data(), std::min<size_t>(junk.size(), 8 * kMiB - off),
                       static_cast<off_t>(off));
    ASSERT_GT(n, 0);
  }
  close(fd);
  EXPECT_GT(Record(mount_, "drive0")["cbw-bytes"].get<uint64_t>(), 0u);
  EXPECT_TRUE(ReadFileOrDie(mount_ / "snapshots/drive0") == image_);
  // The image holds exactly the preserved clusters' old data.
  std::string img = cluster_->Export(name_);
  ASSERT_EQ(img.size(), 8 * kMiB);
  EXPECT_TRUE(img.substr(0, 65536) == image_.substr(0, 65536));
  ASSERT_EQ(mount_.Control(Cmd("job-cancel", {{"id", "drive0"}})), 0);
  ASSERT_TRUE(WaitResult(mount_, "drive0"));
}

TEST_F(RbdE2E, ConfFileInsideTheMountIsRefusedWithoutAHang) {
  MountDrive(kMiB);
  symlink((mount_ / "drive0").c_str(), (dir_ / "link.conf").c_str());
  for (const std::string& conf : {mount_ / "drive0", dir_ / "link.conf"}) {
    const auto t0 = Clock::now();
    EXPECT_EQ(Backup("rbd:rbd/x:conf=" + conf), EINVAL);
    EXPECT_LT(Seconds(Clock::now() - t0), 10.0);
    EXPECT_NE(Reply().find("is under the mountpoint"), std::string::npos) << Reply();
  }
  EXPECT_TRUE(mount_.alive());
  EXPECT_TRUE(ReadFileOrDie(dir_ / "src.img") == image_);
  EXPECT_FALSE(cluster_->Exists("x"));
}

}  // namespace
}  // namespace cbw::test
