// Incremental backups through the real daemon (SPEC 7): dirty bitmaps over
// control, a full backup plus incrementals under concurrent writers, each
// refreshing the previous full copy to the drive at its point in time, or
// written into a qcow2 chain restored by qemu-img; sync full with a bitmap;
// the bitmap-mode table for failed and cancelled jobs (an nbdkit error
// filter, a dying qemu-nbd) and exact retries; persistent bitmaps across
// clean restarts and across kill -9 (also mid-job), and the state files as
// the README documents them.

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "tests/fs/shell_helpers.h"
#include "tests/lib/nbd_server.h"
#include "tests/lib/pit_oracle.h"

namespace cbw::test {
namespace {

constexpr uint64_t kMiB = 1 << 20;

std::string Backup(const std::string& target, const std::string& sync,
                   const std::string& bitmap = "", const std::string& mode = "") {
  json a = {{"device", "drive0"}, {"target", target}, {"sync", sync}};
  if (!bitmap.empty()) a["bitmap"] = bitmap;
  if (sync == "incremental" || sync == "bitmap") a["mode"] = "existing";
  if (!mode.empty()) a["bitmap-mode"] = mode;
  return Cmd("drive-backup", a);
}

class BitmapE2E : public ::testing::Test {
 protected:
  void Start(uint64_t size, bool fresh = true) {
    if (fresh) {
      image_ = RandomBytes(size, 42);
      WriteFileOrDie(dir_ / "src.img", image_);
    }
    ASSERT_TRUE(
        m_.Start({"--drive", "drive0=" + (dir_ / "src.img"), "--state-dir", dir_ / "state"}));
  }
  void WaitSuccess(const std::string& id = "drive0") {
    ASSERT_TRUE(WaitResult(m_, id, std::chrono::seconds(120))) << m_.JobRecord(id);
    ASSERT_EQ(Record(m_, id).value("result", ""), "success") << m_.JobRecord(id);
  }
  TempDir dir_;
  CbwfsMount m_;
  std::string image_;
};

TEST_F(BitmapE2E, CommandsQueryBlockAndQemusErrors) {
  Start(8 * kMiB);
  EXPECT_TRUE(Bitmaps(m_).empty());
  ASSERT_EQ(m_.Control(Cmd("block-dirty-bitmap-add",
                           {{"node", "drive0"}, {"name", "b0"}, {"persistent", true}})),
            0);
  ASSERT_EQ(m_.Control(Cmd(
                "block-dirty-bitmap-add",
                {{"node", "drive0"}, {"name", "b1"}, {"granularity", 4096}, {"disabled", true}})),
            0);
  json b0 = BitmapInfo(m_, "b0");
  EXPECT_EQ(b0.dump(), json({{"name", "b0"},
                             {"count", 0},
                             {"granularity", 65536},
                             {"recording", true},
                             {"busy", false},
                             {"persistent", true}})
                           .dump());
  EXPECT_FALSE(BitmapInfo(m_, "b1")["recording"].get<bool>());
  // A write marks the recording bitmap only.
  CommandResult r = RunShell("printf x | dd of=" + Q(m_ / "drive0") +
                             " bs=1 seek=70000 conv=notrunc status=none");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(BitmapInfo(m_, "b0")["count"], 65536);
  EXPECT_EQ(BitmapInfo(m_, "b1")["count"], 0);
  // Errors: QEMU's texts, the write fails with the errno of SPEC 2.2.
  struct Case {
    std::string cmd;
    int err;
    std::string desc;
  };
  const std::vector<Case> cases = {
      {Cmd("block-dirty-bitmap-add", {{"node", "drive0"}, {"name", "b0"}}), EBUSY,
       "Bitmap already exists: b0"},
      {Cmd("block-dirty-bitmap-add", {{"node", "nope"}, {"name", "x"}}), ENODEV,
       "Cannot find device='nope' nor node-name='nope'"},
      {Cmd("block-dirty-bitmap-add", {{"node", "drive0"}, {"name", "x"}, {"granularity", 1000}}),
       EINVAL, "Granularity must be power of 2 and at least 512"},
      {Cmd("block-dirty-bitmap-clear", {{"node", "drive0"}, {"name", "zz"}}), EINVAL,
       "Dirty bitmap 'zz' not found"},
      {Cmd("block-dirty-bitmap-remove", {{"node", "nope"}, {"name", "b0"}}), ENODEV,
       "Node 'nope' not found"},
      {Cmd("block-dirty-bitmap-add", {{"node", "drive0"}}), EINVAL, "Parameter 'name' is missing"},
      {Cmd("drive-backup", {{"device", "drive0"}, {"target", dir_ / "x.img"}, {"sync", "bitmap"}}),
       EINVAL, "must provide a valid bitmap name for 'bitmap' sync mode"},
      {Cmd("drive-backup", {{"device", "drive0"},
                            {"target", dir_ / "x.img"},
                            {"sync", "incremental"},
                            {"bitmap", "nope"}}),
       EINVAL, "Bitmap 'nope' could not be found"},
      {Cmd("transaction",
           {{"actions",
             {{{"type", "block-dirty-bitmap-add"}, {"data", {{"node", "drive0"}, {"name", "g"}}}}}},
            {"properties", {{"completion-mode", "grouped"}}}}),
       EINVAL,
       "Action 'block-dirty-bitmap-add' does not support Transaction property completion-mode = "
       "grouped"},
  };
  for (const auto& c : cases) {
    std::string reply;
    EXPECT_EQ(m_.Control(c.cmd, &reply), c.err) << c.cmd;
    json j = json::parse(reply, nullptr, false);
    EXPECT_EQ(j["error"]["desc"], c.desc) << c.cmd;
  }
  // Merge, clear, enable, disable, remove.
  ASSERT_EQ(m_.Control(Cmd("block-dirty-bitmap-merge",
                           {{"node", "drive0"}, {"target", "b1"}, {"bitmaps", {"b0"}}})),
            0);
  // b0's dirty 64 KiB granule covers 16 of b1's 4 KiB ones.
  EXPECT_EQ(BitmapInfo(m_, "b1")["count"], 65536);
  ASSERT_EQ(m_.Control(Cmd("block-dirty-bitmap-enable", {{"node", "drive0"}, {"name", "b1"}})), 0);
  EXPECT_TRUE(BitmapInfo(m_, "b1")["recording"].get<bool>());
  ASSERT_EQ(m_.Control(Cmd("block-dirty-bitmap-clear", {{"node", "drive0"}, {"name", "b0"}})), 0);
  EXPECT_EQ(BitmapInfo(m_, "b0")["count"], 0);
  ASSERT_EQ(m_.Control(Cmd("block-dirty-bitmap-remove", {{"node", "drive0"}, {"name", "b1"}})), 0);
  EXPECT_TRUE(BitmapInfo(m_, "b1").is_null());
}

// The oracle under concurrent writers: a full backup with a new bitmap at
// one point in time, then five incrementals, each refreshing the full copy
// in place, each equal to the drive at its own point in time.
TEST_F(BitmapE2E, FullPlusFiveIncrementalsUnderWritersEqualEachPointInTime) {
  constexpr uint64_t kSize = 32 * kMiB;
  Start(kSize);
  std::vector<std::unique_ptr<Writer>> writers;
  for (int i = 0; i < 2; ++i) {
    writers.push_back(std::make_unique<Writer>(m_ / "drive0", kSize / 2 * i, kSize / 2, 500 + i));
    writers.back()->Start();
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // writers under way
  auto check = [&](Clock::time_point issued, Clock::time_point returned) {
    std::string copy = ReadFileOrDie(dir_ / "copy.img");
    ASSERT_EQ(copy.size(), kSize);
    for (auto& w : writers) {
      EXPECT_TRUE(SliceMatchesPointInTime(image_, copy, *w, issued, returned));
    }
  };
  json full = {{"type", "drive-backup"},
               {"data", {{"device", "drive0"}, {"target", dir_ / "copy.img"}, {"sync", "full"}}}};
  json add = {{"type", "block-dirty-bitmap-add"},
              {"data", {{"node", "drive0"}, {"name", "b0"}, {"persistent", true}}}};
  auto issued = Clock::now();
  ASSERT_EQ(m_.Control(Cmd("transaction", {{"actions", {add, full}}})), 0)
      << ReadFileOrDie(m_ / "control");
  auto returned = Clock::now();
  WaitSuccess();
  check(issued, returned);
  uint64_t copied = 0;
  for (int i = 0; i < 5; ++i) {
    issued = Clock::now();
    ASSERT_EQ(m_.Control(Backup(dir_ / "copy.img", "incremental", "b0")), 0)
        << ReadFileOrDie(m_ / "control");
    returned = Clock::now();
    WaitSuccess();
    json rec = Record(m_, "drive0");
    copied += rec["len"].get<uint64_t>();
    check(issued, returned);
  }
  for (auto& w : writers) w->Stop();
  for (auto& w : writers) EXPECT_EQ(w->errors(), 0);
  RecordProperty("incremental_bytes", std::to_string(copied));
}

// The same oracle for the restore path of SPEC 7 with standard tools: a raw
// full backup, then five incrementals each into a qcow2 overlay whose backing
// file is the previous backup (probed, mode existing). After each job the
// chain converted by qemu-img equals the drive at that job's point in time,
// and every overlay passes qemu-img check. The writers punch and zero too, so
// zero ranges that were not written into an overlay would let stale backing
// data show through.
TEST_F(BitmapE2E, Qcow2ChainOfFiveIncrementalsUnderWritersRestoresEachPointInTime) {
  constexpr uint64_t kSize = 32 * kMiB;
  Start(kSize);
  std::vector<std::unique_ptr<Writer>> writers;
  for (int i = 0; i < 2; ++i) {
    writers.push_back(std::make_unique<Writer>(m_ / "drive0", kSize / 2 * i, kSize / 2, 700 + i));
    writers.back()->Start();
  }
  ASSERT_TRUE(WaitFor([&] {
    for (auto& w : writers) {
      if (w->ops().size() < 2) return false;
    }
    return true;
  })) << "writers under way";
  json full = {{"type", "drive-backup"},
               {"data", {{"device", "drive0"}, {"target", dir_ / "full.img"}, {"sync", "full"}}}};
  json add = {{"type", "block-dirty-bitmap-add"},
              {"data", {{"node", "drive0"}, {"name", "b0"}, {"persistent", true}}}};
  auto issued = Clock::now();
  ASSERT_EQ(m_.Control(Cmd("transaction", {{"actions", {add, full}}})), 0)
      << ReadFileOrDie(m_ / "control");
  auto returned = Clock::now();
  WaitSuccess();
  {
    std::string copy = ReadFileOrDie(dir_ / "full.img");
    ASSERT_EQ(copy.size(), kSize);
    for (auto& w : writers) {
      EXPECT_TRUE(SliceMatchesPointInTime(image_, copy, *w, issued, returned)) << "full";
    }
  }
  std::string prev = "full.img", prev_format = "raw";
  uint64_t copied = 0;
  for (int k = 1; k <= 5; ++k) {
    const std::string inc = "inc" + std::to_string(k) + ".qcow2";
    // A relative backing name, as a user moving the chain around would
    // write it (qemu-img resolves it next to the overlay).
    CommandResult c = RunCommand(
        {"qemu-img", "create", "-q", "-f", "qcow2", "-b", prev, "-F", prev_format, dir_ / inc});
    ASSERT_EQ(c.exit_code, 0) << c.err;
    issued = Clock::now();
    ASSERT_EQ(m_.Control(Backup(dir_ / inc, "incremental", "b0")), 0)
        << ReadFileOrDie(m_ / "control");
    returned = Clock::now();
    WaitSuccess();
    copied += Record(m_, "drive0")["len"].get<uint64_t>();
    c = RunCommand({"qemu-img", "check", "-q", dir_ / inc});
    EXPECT_EQ(c.exit_code, 0) << inc << ": " << c.out << c.err;
    const std::string restored = dir_ / ("restored" + std::to_string(k) + ".img");
    c = RunCommand({"qemu-img", "convert", "-O", "raw", dir_ / inc, restored});
    ASSERT_EQ(c.exit_code, 0) << c.err;
    std::string copy = ReadFileOrDie(restored);
    ASSERT_EQ(copy.size(), kSize);
    for (auto& w : writers) {
      EXPECT_TRUE(SliceMatchesPointInTime(image_, copy, *w, issued, returned)) << inc;
    }
    unlink(restored.c_str());
    prev = inc;
    prev_format = "qcow2";
  }
  for (auto& w : writers) w->Stop();
  for (auto& w : writers) EXPECT_EQ(w->errors(), 0);
  // The chain is what qemu-img expects of one: five deep, ending at full.img.
  CommandResult info =
      RunCommand({"qemu-img", "info", "--backing-chain", "--output=json", dir_ / "inc5.qcow2"});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  json chain = json::parse(info.out, nullptr, false);
  ASSERT_TRUE(chain.is_array()) << info.out;
  ASSERT_EQ(chain.size(), 6u) << info.out;
  EXPECT_EQ(chain.back()["format"], "raw");
  RecordProperty("incremental_bytes", std::to_string(copied));
}

// Persistent bitmaps across clean restarts: each incremental after a
// restart is exact.
TEST_F(BitmapE2E, AcrossCleanRestarts) {
  constexpr uint64_t kSize = 32 * kMiB;
  Start(kSize);
  json full = {{"type", "drive-backup"},
               {"data", {{"device", "drive0"}, {"target", dir_ / "copy.img"}, {"sync", "full"}}}};
  json add = {{"type", "block-dirty-bitmap-add"},
              {"data", {{"node", "drive0"}, {"name", "b0"}, {"persistent", true}}}};
  ASSERT_EQ(m_.Control(Cmd("transaction", {{"actions", {add, full}}})), 0);
  WaitSuccess();
  std::mt19937_64 rng(7);
  for (int round = 0; round < 3; ++round) {
    int fd = open((m_ / "drive0").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    for (int i = 0; i < 20; ++i) {
      std::string w = RandomBytes(4096 + rng() % 100000, rng());
      uint64_t at = rng() % (kSize - w.size());
      ASSERT_EQ(pwrite(fd, w.data(), w.size(), static_cast<off_t>(at)),
                static_cast<ssize_t>(w.size()));
    }
    close(fd);
    ASSERT_EQ(m_.Stop(), 0) << m_.log();
    Start(kSize, /*fresh=*/false);
    json b0 = BitmapInfo(m_, "b0");
    ASSERT_FALSE(b0.is_null());
    EXPECT_FALSE(b0.contains("inconsistent")) << b0.dump();
    EXPECT_GT(b0["count"].get<uint64_t>(), 0u);
    ASSERT_EQ(m_.Control(Backup(dir_ / "copy.img", "incremental", "b0")), 0)
        << ReadFileOrDie(m_ / "control");
    WaitSuccess();
    EXPECT_TRUE(SameBytes(ReadFileOrDie(dir_ / "copy.img"), ReadFileOrDie(dir_ / "src.img")))
        << "round " << round;
  }
}

// kill -9 at random moments while writers run: after each restart the
// bitmap is still usable (a superset) and the next incremental makes the
// copy exactly the drive. The extra copied (whole journal regions) is
// recorded.
TEST_F(BitmapE2E, AcrossKillNineAtRandomMoments) {
  constexpr uint64_t kSize = 512 * kMiB;  // 8 journal regions of 64 MiB
  image_.clear();
  MakeSparseFile(dir_ / "src.img", kSize);
  Start(kSize, /*fresh=*/false);
  json full = {{"type", "drive-backup"},
               {"data", {{"device", "drive0"}, {"target", dir_ / "copy.img"}, {"sync", "full"}}}};
  json add = {{"type", "block-dirty-bitmap-add"},
              {"data", {{"node", "drive0"}, {"name", "b0"}, {"persistent", true}}}};
  ASSERT_EQ(m_.Control(Cmd("transaction", {{"actions", {add, full}}})), 0);
  WaitSuccess();
  std::mt19937_64 rng(11);
  const int kills = UnderSanitizer() ? 1 : 3;
  uint64_t extra = 0, needed = 0;
  for (int k = 0; k < kills; ++k) {
    // A writer in the background; killed with the daemon at a random moment.
    Background writer("while :; do dd if=/dev/urandom of=" + Q(m_ / "drive0") +
                          " bs=4k count=1 seek=$(( (RANDOM % 2) * 81920 + RANDOM % 16384 ))"
                          " conv=notrunc status=none "
                          "2>/dev/null || exit 0; done",
                      dir_ / "writer.log");
    std::this_thread::sleep_for(std::chrono::milliseconds(200 + rng() % 800));
    m_.Stop(SIGKILL);
    writer.Signal(SIGKILL);
    writer.Wait(std::chrono::seconds(5));
    RunCommand({"fusermount3", "-uz", m_.mnt()});
    // What really changed since the copy: the clusters that differ.
    std::string src = ReadFileOrDie(dir_ / "src.img"), copy = ReadFileOrDie(dir_ / "copy.img");
    uint64_t differ = 0;
    for (uint64_t c = 0; c < kSize; c += 65536) {
      if (src.compare(c, 65536, copy, c, 65536) != 0) differ += 65536;
    }
    Start(kSize, /*fresh=*/false);
    json b0 = BitmapInfo(m_, "b0");
    ASSERT_FALSE(b0.is_null());
    ASSERT_FALSE(b0.contains("inconsistent")) << b0.dump() << m_.log();
    ASSERT_EQ(m_.Control(Backup(dir_ / "copy.img", "incremental", "b0")), 0)
        << ReadFileOrDie(m_ / "control");
    WaitSuccess();
    uint64_t len = Record(m_, "drive0")["len"].get<uint64_t>();
    EXPECT_GE(len, differ);
    EXPECT_LE(len, 2 * 64 * kMiB) << "more than the two journal regions written";
    extra += len - std::min(len, differ);
    needed += differ;
    EXPECT_TRUE(SameBytes(ReadFileOrDie(dir_ / "copy.img"), ReadFileOrDie(dir_ / "src.img")))
        << "after kill " << k;
  }
  RecordProperty("needed_bytes", std::to_string(needed));
  RecordProperty("extra_bytes", std::to_string(extra));
}

// sync full with a bitmap (SPEC 7): copies everything, then treats the
// bitmap by its mode: on-success clears it, so it becomes the base of the
// next incremental into that copy; always does the same; never is refused
// with sync full, as in QEMU.
TEST_F(BitmapE2E, FullSyncWithABitmapMakesTheBaseOfTheNextIncremental) {
  constexpr uint64_t kSize = 8 * kMiB;
  Start(kSize);
  ASSERT_EQ(m_.Control(Cmd("block-dirty-bitmap-add", {{"node", "drive0"}, {"name", "b0"}})), 0);
  CommandResult r = RunShell("head -c 300000 /dev/urandom | dd of=" + Q(m_ / "drive0") +
                             " bs=100000 seek=7 conv=notrunc status=none");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_GT(BitmapInfo(m_, "b0")["count"].get<uint64_t>(), 0u);
  std::string reply;
  EXPECT_EQ(m_.Control(Backup(dir_ / "copy.img", "full", "b0", "never"), &reply), EINVAL);
  EXPECT_EQ(json::parse(reply, nullptr, false)["error"]["desc"],
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode "
            "'full'");
  for (const std::string mode : {"on-success", "always"}) {
    ASSERT_EQ(m_.Control(Backup(dir_ / "copy.img", "full", "b0", mode)), 0)
        << ReadFileOrDie(m_ / "control");
    WaitSuccess();
    EXPECT_EQ(Record(m_, "drive0")["len"], kSize) << mode;
    EXPECT_EQ(BitmapInfo(m_, "b0")["count"], 0) << mode;
    r = RunShell("head -c 200000 /dev/urandom | dd of=" + Q(m_ / "drive0") +
                 " bs=100000 seek=30 conv=notrunc status=none");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ASSERT_EQ(m_.Control(Backup(dir_ / "copy.img", "incremental", "b0")), 0)
        << ReadFileOrDie(m_ / "control");
    WaitSuccess();
    EXPECT_LE(Record(m_, "drive0")["len"].get<uint64_t>(), 4 * 65536u) << mode;
    EXPECT_TRUE(SameBytes(ReadFileOrDie(dir_ / "copy.img"), ReadFileOrDie(dir_ / "src.img")))
        << mode;
  }
}

// ------------------------------------------------ failure, cancel, retry

// SPEC 7's bitmap-mode table for an incremental that fails and one that is
// cancelled, then a retry. The target is an nbdkit memory export (holding
// the full backup: the raw in-place refresh over NBD) behind the error
// filter, whose error file the test creates mid-job so every later request
// fails with EIO. Clusters written before the jobs (A) are what they copy;
// clusters written while a job runs (B during the failing one, C during the
// cancelled one) must be kept by every mode. query-block's count is checked
// after each step, and the retry must make the export exactly the drive.
class BitmapModeE2E : public BitmapE2E, public ::testing::WithParamInterface<std::string> {
 protected:
  static constexpr uint64_t kSize = 16 * kMiB;
  static constexpr uint64_t kCluster = 65536;

  // Writes random data over whole clusters `cs` of drive0, in the model too.
  void WriteClusters(const std::vector<uint64_t>& cs, uint64_t seed) {
    int fd = open((m_ / "drive0").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    for (uint64_t c : cs) {
      std::string d = RandomBytes(kCluster, seed++);
      ASSERT_EQ(pwrite(fd, d.data(), d.size(), static_cast<off_t>(c * kCluster)),
                static_cast<ssize_t>(d.size()));
      drive_.replace(c * kCluster, kCluster, d);
    }
    ASSERT_EQ(close(fd), 0);
  }
  uint64_t Count() { return BitmapInfo(m_, "b0")["count"].get<uint64_t>(); }
  // The incremental of this mode: sync incremental (bitmap-mode on-success
  // by default) or sync bitmap with the mode given.
  std::string Incremental(uint64_t speed) {
    json a = {
        {"device", "drive0"}, {"target", server_->uri()}, {"mode", "existing"}, {"bitmap", "b0"}};
    if (GetParam() == "on-success") {
      a["sync"] = "incremental";
    } else {
      a["sync"] = "bitmap";
      a["bitmap-mode"] = GetParam();
    }
    if (speed > 0) a["speed"] = speed;
    return Cmd("drive-backup", a);
  }
  // Starts a rate-limited incremental and waits until it has copied
  // something; returns the offset seen then (bytes already copied).
  uint64_t StartSlowIncremental() {
    EXPECT_EQ(m_.Control(Incremental(kMiB)), 0) << ReadFileOrDie(m_ / "control");
    uint64_t at = 0;
    EXPECT_TRUE(WaitFor([&] {
      at = Record(m_, "drive0").value("offset", uint64_t{0});
      return at > 0;
    })) << m_.JobRecord("drive0");
    EXPECT_FALSE(Record(m_, "drive0").contains("result")) << "still running";
    EXPECT_TRUE(BitmapInfo(m_, "b0")["busy"].get<bool>());
    return at;
  }
  // The count a mode leaves after a failed or cancelled job: on-success and
  // never keep every bit plus the new writes; always keeps only what the job
  // had not copied (at most `before - copied`) plus the new writes.
  void ExpectCountAfterUnsuccessful(uint64_t before, uint64_t copied, uint64_t added,
                                    const std::string& step) {
    const uint64_t count = Count();
    RecordProperty(step.substr(step.find(' ') + 1),
                   std::to_string(before) + " -> " + std::to_string(count) + " (copied " +
                       std::to_string(copied) + ", added " + std::to_string(added) + ")");
    if (GetParam() == "always") {
      EXPECT_LE(count, before - copied + added) << step;
      EXPECT_GE(count, added) << step;
    } else {
      EXPECT_EQ(count, before + added) << step;
    }
    EXPECT_FALSE(BitmapInfo(m_, "b0")["busy"].get<bool>()) << step;
  }

  std::unique_ptr<NbdServer> server_;
  std::string drive_;  // what drive0 holds
};

TEST_P(BitmapModeE2E, FailureThenCancelThenRetryLeaveTheBitmapAsTheModeSays) {
  Start(kSize);
  drive_ = image_;
  const std::string error_file = dir_ / "inject";
  server_ =
      NbdServer::Nbdkit(dir_.path(), {"--filter=error", "memory", std::to_string(kSize),
                                      "error=EIO", "error-rate=1", "error-file=" + error_file});
  ASSERT_TRUE(server_);
  // The full backup and the bitmap at one point in time.
  json full = {
      {"type", "drive-backup"},
      {"data",
       {{"device", "drive0"}, {"target", server_->uri()}, {"mode", "existing"}, {"sync", "full"}}}};
  json add = {{"type", "block-dirty-bitmap-add"}, {"data", {{"node", "drive0"}, {"name", "b0"}}}};
  ASSERT_EQ(m_.Control(Cmd("transaction", {{"actions", {add, full}}})), 0)
      << ReadFileOrDie(m_ / "control");
  WaitSuccess();
  ASSERT_TRUE(server_->ReadAll(dir_.path()) == drive_) << "the full backup";
  // A: 48 clusters in the first half; B and C: 8 each in the third and
  // fourth quarters, written while a job runs.
  std::mt19937_64 rng(GetParam().size());
  auto pick = [&](uint64_t lo, uint64_t hi, size_t n) {
    std::vector<uint64_t> all;
    for (uint64_t c = lo; c < hi; ++c) all.push_back(c);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(n);
    return all;
  };
  const std::vector<uint64_t> a = pick(0, 128, 48), b = pick(128, 192, 8), c = pick(192, 256, 8);
  WriteClusters(a, 1000);
  ASSERT_EQ(Count(), a.size() * kCluster);

  // 1. The target fails mid-job.
  uint64_t before = Count();
  uint64_t copied = StartSlowIncremental();
  WriteClusters(b, 2000);
  WriteFileOrDie(error_file, "");
  ASSERT_TRUE(WaitResult(m_, "drive0")) << m_.JobRecord("drive0");
  json rec = Record(m_, "drive0");
  ASSERT_EQ(rec.value("result", ""), "failed") << rec.dump();
  unlink(error_file.c_str());
  ExpectCountAfterUnsuccessful(before, copied, b.size() * kCluster, "after the failure");

  // 2. Cancelled mid-job.
  before = Count();
  copied = StartSlowIncremental();
  WriteClusters(c, 3000);
  ASSERT_EQ(m_.Control(Cmd("job-cancel", {{"id", "drive0"}})), 0);
  ASSERT_TRUE(WaitResult(m_, "drive0")) << m_.JobRecord("drive0");
  rec = Record(m_, "drive0");
  ASSERT_EQ(rec.value("result", ""), "cancelled") << rec.dump();
  ExpectCountAfterUnsuccessful(before, copied, c.size() * kCluster, "after the cancel");

  // 3. The retry: the export becomes exactly the drive (so no bit the
  // failed and cancelled jobs did not really copy was lost).
  before = Count();
  ASSERT_EQ(m_.Control(Incremental(0)), 0) << ReadFileOrDie(m_ / "control");
  WaitSuccess();
  EXPECT_EQ(Record(m_, "drive0")["len"].get<uint64_t>(), before);
  EXPECT_EQ(Count(), GetParam() == "never" ? before : 0u) << "after the retry";
  EXPECT_TRUE(server_->ReadAll(dir_.path()) == drive_) << "the retry refreshes the export";
  // never: the bitmap still covers everything since the full backup, so
  // the same incremental again is still exact.
  if (GetParam() == "never") {
    EXPECT_EQ(Count(), (a.size() + b.size() + c.size()) * kCluster);
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, BitmapModeE2E, ::testing::Values("on-success", "always", "never"),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                           std::string n = i.param;
                           n.erase(std::remove(n.begin(), n.end(), '-'), n.end());
                           return n;
                         });

// ----------------------------------------- a qcow2 chain through faults

// The pids of `parent`'s live children whose command line holds `needle`
// (cbwfs forks its qemu-nbd itself, so the test kills only that one).
std::vector<pid_t> ChildrenWith(pid_t parent, const std::string& needle) {
  auto slurp = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  std::vector<pid_t> out;
  DIR* d = opendir("/proc");
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    long pid = std::strtol(e->d_name, &end, 10);
    if (pid <= 0 || *end != '\0') continue;
    const std::string proc = std::string("/proc/") + e->d_name;
    std::string st = slurp(proc + "/stat");
    size_t paren = st.rfind(')');
    if (paren == std::string::npos || paren + 4 >= st.size()) continue;
    // After ") ": the state letter, then the parent's pid.
    if (st[paren + 2] == 'Z' || std::strtol(st.c_str() + paren + 4, nullptr, 10) != parent) {
      continue;
    }
    std::string cmd = slurp(proc + "/cmdline");
    for (char& ch : cmd) {
      if (ch == '\0') ch = ' ';
    }
    if (cmd.find(needle) != std::string::npos) out.push_back(static_cast<pid_t>(pid));
  }
  closedir(d);
  return out;
}

// The chain stays exact through faults of an incremental into a qcow2
// overlay (bitmap-mode on-success): the overlay's qemu-nbd dies mid-job (the
// job fails; the user deletes the broken overlay and makes it again), then
// the retry is cancelled mid-job, then retried once more into the same,
// partly written overlay. Each time query-block's count shows every bit kept
// plus the writes made meanwhile; the overlay that finally succeeds, and the
// next one on it, restore to the drive at their points in time.
TEST_F(BitmapE2E, Qcow2IncrementalFailedThenCancelledThenRetriedKeepsTheChainExact) {
  constexpr uint64_t kSize = 16 * kMiB, kCluster = 65536;
  Start(kSize);
  std::string drive = image_;
  auto write_clusters = [&](const std::vector<uint64_t>& cs, uint64_t seed) {
    int fd = open((m_ / "drive0").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    for (uint64_t c : cs) {
      std::string d = RandomBytes(kCluster, seed++);
      ASSERT_EQ(pwrite(fd, d.data(), d.size(), static_cast<off_t>(c * kCluster)),
                static_cast<ssize_t>(d.size()));
      drive.replace(c * kCluster, kCluster, d);
    }
    ASSERT_EQ(close(fd), 0);
  };
  auto count = [&] { return BitmapInfo(m_, "b0")["count"].get<uint64_t>(); };
  auto overlay = [&](const std::string& name, const std::string& backing,
                     const std::string& format) {
    unlink((dir_ / name).c_str());
    CommandResult c = RunCommand(
        {"qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", format, dir_ / name});
    EXPECT_EQ(c.exit_code, 0) << c.err;
  };
  auto incremental = [&](const std::string& name, uint64_t speed) {
    json a = {{"device", "drive0"},
              {"target", dir_ / name},
              {"mode", "existing"},
              {"sync", "incremental"},
              {"bitmap", "b0"}};
    if (speed > 0) a["speed"] = speed;
    ASSERT_EQ(m_.Control(Cmd("drive-backup", a)), 0) << ReadFileOrDie(m_ / "control");
  };
  auto restores_to_drive = [&](const std::string& name) -> ::testing::AssertionResult {
    CommandResult c = RunCommand({"qemu-img", "check", "-q", dir_ / name});
    if (c.exit_code != 0) return ::testing::AssertionFailure() << "check: " << c.out << c.err;
    const std::string out = dir_ / "restored.img";
    c = RunCommand({"qemu-img", "convert", "-O", "raw", dir_ / name, out});
    if (c.exit_code != 0) return ::testing::AssertionFailure() << "convert: " << c.err;
    std::string got = ReadFileOrDie(out);
    unlink(out.c_str());
    return SameBytes(got, drive);
  };
  auto wait_copying = [&] {
    ASSERT_TRUE(WaitFor([&] { return Record(m_, "drive0").value("offset", uint64_t{0}) > 0; }))
        << m_.JobRecord("drive0");
    ASSERT_FALSE(Record(m_, "drive0").contains("result")) << "still running";
  };

  json full = {{"type", "drive-backup"},
               {"data", {{"device", "drive0"}, {"target", dir_ / "full.img"}, {"sync", "full"}}}};
  json add = {{"type", "block-dirty-bitmap-add"}, {"data", {{"node", "drive0"}, {"name", "b0"}}}};
  ASSERT_EQ(m_.Control(Cmd("transaction", {{"actions", {add, full}}})), 0)
      << ReadFileOrDie(m_ / "control");
  WaitSuccess();
  std::vector<uint64_t> a, b, c;
  for (uint64_t i = 0; i < 48; ++i) a.push_back(i * 2);       // even clusters of the first 6 MiB
  for (uint64_t i = 0; i < 8; ++i) b.push_back(128 + i * 3);  // written during the failing job
  for (uint64_t i = 0; i < 8; ++i) c.push_back(200 + i * 5);  // during the cancelled one
  write_clusters(a, 100);
  ASSERT_EQ(count(), a.size() * kCluster);

  // 1. qemu-nbd dies under the job.
  overlay("inc1.qcow2", "full.img", "raw");
  incremental("inc1.qcow2", kMiB);
  wait_copying();
  write_clusters(b, 200);
  std::vector<pid_t> qemu = ChildrenWith(m_.pid(), "inc1.qcow2");
  ASSERT_EQ(qemu.size(), 1u) << "cbwfs's qemu-nbd for the overlay";
  ASSERT_EQ(kill(qemu[0], SIGKILL), 0);
  ASSERT_TRUE(WaitResult(m_, "drive0")) << m_.JobRecord("drive0");
  ASSERT_EQ(Record(m_, "drive0").value("result", ""), "failed") << m_.JobRecord("drive0");
  EXPECT_EQ(count(), (a.size() + b.size()) * kCluster) << "failure merges the frozen bits back";

  // 2. A new overlay in its place; this time the job is cancelled.
  overlay("inc1.qcow2", "full.img", "raw");
  incremental("inc1.qcow2", kMiB);
  wait_copying();
  write_clusters(c, 300);
  ASSERT_EQ(m_.Control(Cmd("job-cancel", {{"id", "drive0"}})), 0);
  ASSERT_TRUE(WaitResult(m_, "drive0")) << m_.JobRecord("drive0");
  ASSERT_EQ(Record(m_, "drive0").value("result", ""), "cancelled") << m_.JobRecord("drive0");
  EXPECT_EQ(count(), (a.size() + b.size() + c.size()) * kCluster)
      << "cancel merges the frozen bits back";

  // 3. Retried into the same, partly written overlay: exact.
  incremental("inc1.qcow2", 0);
  WaitSuccess();
  EXPECT_EQ(Record(m_, "drive0")["len"].get<uint64_t>(),
            (a.size() + b.size() + c.size()) * kCluster);
  EXPECT_EQ(count(), 0u);
  EXPECT_TRUE(restores_to_drive("inc1.qcow2")) << "inc1 after the retry";

  // 4. The chain goes on from there.
  write_clusters({1, 3, 5, 130, 255}, 400);
  {
    int fd = open((m_ / "drive0").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10 * kCluster, 4 * kCluster), 0);
    close(fd);
    std::memset(drive.data() + 10 * kCluster, 0, 4 * kCluster);
  }
  overlay("inc2.qcow2", "inc1.qcow2", "qcow2");
  incremental("inc2.qcow2", 0);
  WaitSuccess();
  EXPECT_EQ(Record(m_, "drive0")["len"].get<uint64_t>(), 9 * kCluster);
  EXPECT_TRUE(restores_to_drive("inc2.qcow2")) << "inc2";
}

// kill -9 in the middle of an incremental into a qcow2 overlay: cbwfs's
// qemu-nbd dies with it, the job comes back failed ("daemon stopped"), and
// the persistent bitmap comes back usable, a superset of the changes (the
// frozen bits and the writes made during the job, within the journal's
// regions): a retry into a fresh overlay restores exactly.
TEST_F(BitmapE2E, KillNineDuringAQcow2IncrementalThenRetryIsExact) {
  constexpr uint64_t kSize = 128 * kMiB, kCluster = 65536;  // two journal regions
  MakeSparseFile(dir_ / "src.img", kSize);
  Start(kSize, /*fresh=*/false);
  std::string drive(kSize, '\0');
  auto write_clusters = [&](uint64_t first, uint64_t n, uint64_t step, uint64_t seed) {
    int fd = open((m_ / "drive0").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t off = (first + i * step) * kCluster;
      std::string d = RandomBytes(kCluster, seed + i);
      ASSERT_EQ(pwrite(fd, d.data(), d.size(), static_cast<off_t>(off)),
                static_cast<ssize_t>(d.size()));
      drive.replace(off, kCluster, d);
    }
    ASSERT_EQ(close(fd), 0);
  };
  json full = {{"type", "drive-backup"},
               {"data", {{"device", "drive0"}, {"target", dir_ / "full.img"}, {"sync", "full"}}}};
  json add = {{"type", "block-dirty-bitmap-add"},
              {"data", {{"node", "drive0"}, {"name", "b0"}, {"persistent", true}}}};
  ASSERT_EQ(m_.Control(Cmd("transaction", {{"actions", {add, full}}})), 0)
      << ReadFileOrDie(m_ / "control");
  WaitSuccess();
  write_clusters(0, 48, 2, 100);  // A: in the first 64 MiB region only
  ASSERT_EQ(BitmapInfo(m_, "b0")["count"], 48 * kCluster);
  ASSERT_EQ(RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "full.img", "-F", "raw",
                        dir_ / "inc1.qcow2"})
                .exit_code,
            0);
  ASSERT_EQ(m_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                            {"target", dir_ / "inc1.qcow2"},
                                            {"mode", "existing"},
                                            {"sync", "incremental"},
                                            {"bitmap", "b0"},
                                            {"speed", kMiB}})),
            0)
      << ReadFileOrDie(m_ / "control");
  ASSERT_TRUE(WaitFor([&] { return Record(m_, "drive0").value("offset", uint64_t{0}) > 0; }))
      << m_.JobRecord("drive0");
  write_clusters(200, 8, 3, 200);  // B: during the job, same region
  ASSERT_FALSE(Record(m_, "drive0").contains("result")) << "still running";
  const std::vector<pid_t> qemu = ChildrenWith(m_.pid(), "inc1.qcow2");
  ASSERT_EQ(qemu.size(), 1u);
  EXPECT_EQ(m_.Stop(SIGKILL), 128 + SIGKILL);
  RunCommand({"fusermount3", "-uz", m_.mnt()});
  EXPECT_TRUE(WaitFor([&] { return kill(qemu[0], 0) != 0; }, std::chrono::seconds(10)))
      << "qemu-nbd died with cbwfs";

  Start(kSize, /*fresh=*/false);
  json rec = Record(m_, "drive0");
  EXPECT_EQ(rec.value("result", ""), "failed") << rec.dump();
  EXPECT_EQ(rec.value("error", ""), "daemon stopped") << rec.dump();
  json b0 = BitmapInfo(m_, "b0");
  ASSERT_FALSE(b0.is_null());
  ASSERT_FALSE(b0.contains("inconsistent")) << b0.dump() << m_.log();
  EXPECT_FALSE(b0["busy"].get<bool>());
  EXPECT_GE(b0["count"].get<uint64_t>(), (48 + 8) * kCluster) << "a superset of the changes";
  EXPECT_LE(b0["count"].get<uint64_t>(), 64 * kMiB) << "at most the one region written";
  RecordProperty("count_after_kill", std::to_string(b0["count"].get<uint64_t>()));
  // The overlay qemu-nbd was writing when killed is discarded for a new one.
  unlink((dir_ / "inc1.qcow2").c_str());
  ASSERT_EQ(RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "full.img", "-F", "raw",
                        dir_ / "inc1.qcow2"})
                .exit_code,
            0);
  ASSERT_EQ(m_.Control(Backup(dir_ / "inc1.qcow2", "incremental", "b0")), 0)
      << ReadFileOrDie(m_ / "control");
  WaitSuccess();
  CommandResult c = RunCommand({"qemu-img", "check", "-q", dir_ / "inc1.qcow2"});
  EXPECT_EQ(c.exit_code, 0) << c.out << c.err;
  c = RunCommand({"qemu-img", "convert", "-O", "raw", dir_ / "inc1.qcow2", dir_ / "restored.img"});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  EXPECT_TRUE(SameBytes(ReadFileOrDie(dir_ / "restored.img"), drive));
  EXPECT_EQ(BitmapInfo(m_, "b0")["count"], 0);
}

// ------------------------------------------- the files the README documents

uint64_t Le(const std::string& s, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) {
    v |= static_cast<uint64_t>(static_cast<unsigned char>(s.at(at + static_cast<size_t>(i))))
         << (8 * i);
  }
  return v;
}

// CRC-32C as the README states it (reflected 0x82F63B78, ~0 in and out),
// written here independently of the daemon's.
uint32_t Crc32cAsDocumented(const std::string& s, size_t len) {
  uint32_t crc = 0xffffffffu;
  for (size_t i = 0; i < len; ++i) {
    crc ^= static_cast<unsigned char>(s[i]);
    for (int k = 0; k < 8; ++k) crc = (crc & 1) ? (crc >> 1) ^ 0x82f63b78u : crc >> 1;
  }
  return ~crc;
}

// The README's "bitmap files in --state-dir" read back from a real daemon's
// files after a clean stop, field by field; then what makes a bitmap
// `inconsistent` as the README says: a damaged file, and the source modified
// while cbwfs was stopped. Inconsistent bitmaps are refused with QEMU's text
// and only remove works.
TEST_F(BitmapE2E, StateFilesHaveTheLayoutTheReadmeDocuments) {
  constexpr uint64_t kSize = 8 * kMiB + 4096;  // a partial last granule
  Start(kSize);
  ASSERT_EQ(m_.Control(Cmd("block-dirty-bitmap-add",
                           {{"node", "drive0"}, {"name", "nightly/b 1"}, {"persistent", true}})),
            0);
  ASSERT_EQ(m_.Control(Cmd(
                "block-dirty-bitmap-add",
                {{"node", "drive0"}, {"name", "b0"}, {"persistent", true}, {"granularity", 4096}})),
            0);
  {
    int fd = open((m_ / "drive0").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(pwrite(fd, "x", 1, 5 * 4096 + 7), 1);  // granule 5 of b0, 0 of the other
    ASSERT_EQ(pwrite(fd, "y", 1, kSize - 1), 1);     // the last (partial) granule
    close(fd);
  }
  ASSERT_EQ(m_.Stop(), 0) << m_.log();
  struct stat src {};
  ASSERT_EQ(stat((dir_ / "src.img").c_str(), &src), 0);
  const std::string dir = dir_ / "state/bitmaps/drive0";

  // b0: b-b0-<FNV-1a of "b0">.bitmap.
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : std::string("b0")) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  char hex[17];
  snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  const std::string b0_file = dir + "/b-b0-" + hex + ".bitmap";
  const std::string b = ReadFileOrDie(b0_file);
  ASSERT_GE(b.size(), 72u) << b0_file;
  EXPECT_EQ(b.substr(0, 8), "CBWBITM1");
  EXPECT_EQ(Le(b, 8, 4), 1u) << "recording";
  ASSERT_EQ(Le(b, 12, 4), 2u);
  EXPECT_EQ(Le(b, 16, 8), 4096u);
  EXPECT_EQ(Le(b, 24, 8), kSize);
  const uint64_t generation = Le(b, 32, 8);
  EXPECT_GT(generation, 0u);
  EXPECT_EQ(Le(b, 40, 8), static_cast<uint64_t>(src.st_dev));
  EXPECT_EQ(Le(b, 48, 8), static_cast<uint64_t>(src.st_ino));
  EXPECT_EQ(b.substr(56, 2), "b0");
  const uint64_t granules = (kSize + 4095) / 4096, words = (granules + 63) / 64;
  ASSERT_EQ(Le(b, 58, 8), words);
  ASSERT_EQ(b.size(), 66 + 8 * words + 4);
  for (uint64_t w = 0; w < words; ++w) {
    uint64_t want = 0;
    if (w == 0) want |= uint64_t{1} << 5;
    if (w == (granules - 1) / 64) want |= uint64_t{1} << ((granules - 1) % 64);
    EXPECT_EQ(Le(b, 66 + 8 * w, 8), want) << "word " << w;
  }
  EXPECT_EQ(Le(b, 66 + 8 * words, 4), Crc32cAsDocumented(b, 66 + 8 * words));
  // A name with bytes outside [A-Za-z0-9._-]: '_' in the prefix.
  h = 1469598103934665603ull;
  for (unsigned char ch : std::string("nightly/b 1")) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  struct stat other {};
  EXPECT_EQ(stat((dir + "/b-nightly_b_1-" + hex + ".bitmap").c_str(), &other), 0);

  // The journal after a clean stop.
  const std::string j = ReadFileOrDie(dir + "/journal");
  ASSERT_GE(j.size(), 4097u);
  EXPECT_EQ(j.substr(0, 8), "CBWJRNL1");
  EXPECT_EQ(Le(j, 8, 8), 64 * kMiB) << "region size";
  EXPECT_EQ(Le(j, 16, 8), kSize);
  EXPECT_EQ(Le(j, 24, 8), generation);
  EXPECT_EQ(Le(j, 32, 8), 0u) << "lease 0: a clean stop";
  EXPECT_EQ(Le(j, 40, 8), static_cast<uint64_t>(src.st_mtim.tv_sec) * 1000000000ull +
                              static_cast<uint64_t>(src.st_mtim.tv_nsec));
  EXPECT_EQ(Le(j, 48, 8), static_cast<uint64_t>(src.st_dev));
  EXPECT_EQ(Le(j, 56, 8), static_cast<uint64_t>(src.st_ino));
  EXPECT_EQ(Le(j, 64, 4), Crc32cAsDocumented(j, 64));
  EXPECT_EQ(j.substr(68, 4096 - 68), std::string(4096 - 68, '\0'));
  EXPECT_EQ(j.size(), 4096u + 1) << "one bit per region";
  EXPECT_EQ(j[4096], '\0') << "no region since the last save";

  // Back with its bits.
  Start(kSize, /*fresh=*/false);
  EXPECT_EQ(BitmapInfo(m_, "b0")["count"], 2 * 4096);
  ASSERT_EQ(m_.Stop(), 0);

  // One flipped bit in b0's file: b0 is inconsistent, the other one is not.
  std::string damaged = b;
  damaged[66] ^= 1;
  WriteFileOrDie(b0_file, damaged);
  Start(kSize, /*fresh=*/false);
  json b0 = BitmapInfo(m_, "b0");
  EXPECT_EQ(b0.value("inconsistent", false), true) << b0.dump();
  EXPECT_EQ(b0["recording"], false);
  EXPECT_EQ(b0["count"], 0);
  EXPECT_FALSE(BitmapInfo(m_, "nightly/b 1").contains("inconsistent"));
  std::string reply;
  EXPECT_EQ(m_.Control(Backup(dir_ / "x.img", "incremental", "b0"), &reply), EINVAL);
  EXPECT_EQ(json::parse(reply, nullptr, false)["error"]["desc"],
            "Bitmap 'b0' is inconsistent and cannot be used");
  EXPECT_EQ(m_.Control(Cmd("block-dirty-bitmap-clear", {{"node", "drive0"}, {"name", "b0"}})),
            EINVAL);
  EXPECT_EQ(m_.Control(Cmd("block-dirty-bitmap-remove", {{"node", "drive0"}, {"name", "b0"}})), 0);
  EXPECT_TRUE(BitmapInfo(m_, "b0").is_null());
  EXPECT_NE(access(b0_file.c_str(), F_OK), 0) << "its file is gone";
  ASSERT_EQ(m_.Stop(), 0);

  // The source written while cbwfs was stopped (its mtime changes).
  {
    int fd = open((dir_ / "src.img").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(pwrite(fd, "z", 1, 3 * kMiB), 1);
    close(fd);
  }
  Start(kSize, /*fresh=*/false);
  b0 = BitmapInfo(m_, "nightly/b 1");
  EXPECT_EQ(b0.value("inconsistent", false), true) << b0.dump() << m_.log();
}

}  // namespace
}  // namespace cbw::test
