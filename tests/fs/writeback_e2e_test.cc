// End-to-end tests of the kernel's page cache over drives, through a real
// mount: `-o writeback_cache` (SPEC 9: the point in time stays exact, synced
// writes survive kill -9, break-guest-write shows at fsync and close), and
// the O_DIRECT cache policy of issue 14 (a direct writer drops the cache
// once and keeps buffered opens out of it; no stale page shows).
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tests/fs/shell_helpers.h"
#include "tests/lib/pit_oracle.h"

namespace cbw::test {
namespace {

// Whether `got` is the `initial` bytes with operations ops[0, required) all
// applied and any prefix of ops[required, optional_end) on top, decided per
// byte, over [base, base+span).
//
// Per byte, not per operation: with writeback caching the kernel writes
// dirty pages back in its own order, so a write in flight at the point in
// time may be in the backup in any of its pages (not only a prefix), and of
// two writes in flight the later may be in while the earlier is not. SPEC 9
// bounds the writes that returned before the command (all in) and those
// issued after it returned (none in), which is what this checks. Likewise
// after kill -9: every write synced before is on the source, later ones may
// or may not be.
::testing::AssertionResult OpsMatchPerByte(const std::string& initial, const std::string& got,
                                           const std::vector<Op>& ops, size_t required,
                                           size_t optional_end, uint64_t base, uint64_t span) {
  std::string image = initial;
  for (size_t k = 0; k < required; ++k) Apply(&image, ops[k]);
  std::vector<bool> ok(span);
  for (uint64_t i = 0; i < span; ++i) ok[i] = got[base + i] == image[base + i];
  for (size_t k = required; k < optional_end; ++k) {
    Apply(&image, ops[k]);
    for (uint64_t p = ops[k].off; p < ops[k].off + ops[k].len; ++p) {
      if (got[p] == image[p]) ok[p - base] = true;
    }
  }
  for (uint64_t i = 0; i < span; ++i) {
    if (ok[i]) continue;
    auto fail = ::testing::AssertionFailure();
    fail << "byte " << base + i << " is no state of the first " << required
         << " operations plus some of the next " << (optional_end - required) << " (of "
         << ops.size() << "); operations on it:";
    int shown = 0;
    for (size_t k = 0; k < ops.size() && shown < 8; ++k) {
      if (ops[k].off <= base + i && base + i < ops[k].off + ops[k].len) {
        fail << " #" << k;
        ++shown;
      }
    }
    return fail;
  }
  return ::testing::AssertionSuccess();
}

// The writer's slice of `target` at the point in time [issued, returned].
::testing::AssertionResult SliceMatchesWritebackPointInTime(const std::string& initial,
                                                            const std::string& target,
                                                            const Writer& w,
                                                            Clock::time_point issued,
                                                            Clock::time_point returned) {
  // The writer may still be running: its log is read under its lock.
  return w.WithOps([&](const std::vector<Op>& ops) {
    size_t required = 0;
    while (required < ops.size() && ops[required].end < issued) ++required;
    size_t optional_end = required;
    while (optional_end < ops.size() && ops[optional_end].start <= returned) ++optional_end;
    return OpsMatchPerByte(initial, target, ops, required, optional_end, w.base(), w.span());
  });
}

class WritebackE2E : public MountedDrive {
 protected:
  void MountWriteback(uint64_t size) { MountDrive(size, {"-o", "writeback_cache"}); }
};

TEST_F(WritebackE2E, DirtyPagesFromBeforeTheCommandAreInTheBackup) {
  constexpr uint64_t kSize = 16 << 20;
  MountWriteback(kSize);
  int fd = open((mount_ / "drive0").c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  // Returns once the data is in the kernel's cache; no sync.
  std::string first = RandomBytes(8 << 20, 5);
  ASSERT_EQ(pwrite(fd, first.data(), first.size(), 4096), static_cast<ssize_t>(first.size()));
  image_.replace(4096, first.size(), first);
  const std::string at_command = image_;
  ASSERT_EQ(mount_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                                {"target", dir_ / "t.img"},
                                                {"sync", "full"},
                                                {"speed", 1 << 20}})),
            0)
      << ReadFileOrDie(mount_ / "control");
  // After the point in time: must not be in the backup.
  std::string second = RandomBytes(kSize, 6);
  ASSERT_EQ(pwrite(fd, second.data(), second.size(), 0), static_cast<ssize_t>(second.size()));
  ASSERT_EQ(fsync(fd), 0) << strerror(errno);
  ASSERT_EQ(close(fd), 0);
  // (The writes may have copied every cluster already: the job may be over.)
  mount_.Control(Cmd("block-job-set-speed", {{"device", "drive0"}, {"speed", 0}}));
  ASSERT_TRUE(WaitResult(mount_, "drive0")) << mount_.JobRecord("drive0");
  EXPECT_EQ(Record(mount_, "drive0")["result"], "success");
  EXPECT_TRUE(ReadFileOrDie(dir_ / "t.img") == at_command);
  EXPECT_TRUE(ReadFileOrDie(dir_ / "src.img") == second);
}

// A bitmap command fixes a point in time too (SPEC 9): a write that returned
// before `block-dirty-bitmap-disable` is in the bitmap, though the kernel
// had only cached it; one after `add` of a second bitmap is in that one.
TEST_F(WritebackE2E, BitmapCommandsSeeTheWritesCachedBeforeThem) {
  constexpr uint64_t kSize = 16 << 20;
  MountWriteback(kSize);
  auto bitmap = [&](const std::string& verb, const std::string& name) {
    return mount_.Control(Cmd("block-dirty-bitmap-" + verb, {{"node", "drive0"}, {"name", name}}));
  };
  ASSERT_EQ(bitmap("add", "b0"), 0) << ReadFileOrDie(mount_ / "control");
  int fd = open((mount_ / "drive0").c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  std::string data = RandomBytes(4096, 7);
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), 5 << 16), 4096);  // cluster 5, cached only
  ASSERT_EQ(bitmap("disable", "b0"), 0) << ReadFileOrDie(mount_ / "control");
  ASSERT_EQ(bitmap("add", "b1"), 0) << ReadFileOrDie(mount_ / "control");
  ASSERT_EQ(fsync(fd), 0) << strerror(errno);
  EXPECT_EQ(BitmapInfo(mount_, "b0")["count"], 65536) << Bitmaps(mount_);
  // b1 began after the write had reached cbwfs: nothing for it.
  EXPECT_EQ(BitmapInfo(mount_, "b1")["count"], 0) << Bitmaps(mount_);
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), 9 << 16), 4096);
  ASSERT_EQ(bitmap("disable", "b1"), 0) << ReadFileOrDie(mount_ / "control");
  ASSERT_EQ(close(fd), 0);
  EXPECT_EQ(BitmapInfo(mount_, "b0")["count"], 65536) << Bitmaps(mount_);
  EXPECT_EQ(BitmapInfo(mount_, "b1")["count"], 65536) << Bitmaps(mount_);
}

TEST_F(WritebackE2E, TargetEqualsPointInTimeUnderConcurrentWriters) {
  constexpr uint64_t kSize = 64 << 20;
  MountWriteback(kSize);
  std::vector<std::unique_ptr<Writer>> writers;
  constexpr int kWriters = 4;
  for (int i = 0; i < kWriters; ++i) {
    writers.push_back(std::make_unique<Writer>(mount_ / "drive0", kSize / kWriters * i,
                                               kSize / kWriters, 2000 + i));
    writers.back()->Start();
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  auto issued = Clock::now();
  int err = mount_.Control(Cmd(
      "drive-backup",
      {{"device", "drive0"}, {"target", dir_ / "t.img"}, {"sync", "full"}, {"speed", 32 << 20}}));
  auto returned = Clock::now();
  ASSERT_EQ(err, 0) << ReadFileOrDie(mount_ / "control");
  ASSERT_TRUE(WaitResult(mount_, "drive0")) << mount_.JobRecord("drive0");
  for (auto& w : writers) w->Stop();
  json rec = Record(mount_, "drive0");
  EXPECT_EQ(rec["result"], "success") << rec.dump();
  std::string target = ReadFileOrDie(dir_ / "t.img");
  ASSERT_EQ(target.size(), kSize);
  for (auto& w : writers) {
    EXPECT_EQ(w->errors(), 0);
    EXPECT_TRUE(SliceMatchesWritebackPointInTime(image_, target, *w, issued, returned));
  }
  // Nothing was lost: after the last close every write is on the source.
  std::string final_image = image_;
  for (auto& w : writers) {
    for (const auto& op : w->ops()) Apply(&final_image, op);
  }
  EXPECT_TRUE(ReadFileOrDie(dir_ / "src.img") == final_image);
}

TEST_F(WritebackE2E, TransactionOverTwoDrivesWithRacingWrites) {
  std::string a = RandomBytes(16 << 20, 1), b = RandomBytes(16 << 20, 2);
  WriteFileOrDie(dir_ / "a.img", a);
  WriteFileOrDie(dir_ / "b.img", b);
  ASSERT_TRUE(mount_.Start({"-o", "writeback_cache", "--drive", "a=" + (dir_ / "a.img"), "--drive",
                            "b=" + (dir_ / "b.img")}));
  Writer wa(mount_ / "a", 0, 16 << 20, 21), wb(mount_ / "b", 0, 16 << 20, 22);
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
  EXPECT_TRUE(
      SliceMatchesWritebackPointInTime(a, ReadFileOrDie(dir_ / "ta.img"), wa, issued, returned));
  EXPECT_TRUE(
      SliceMatchesWritebackPointInTime(b, ReadFileOrDie(dir_ / "tb.img"), wb, issued, returned));
}

TEST_F(WritebackE2E, SnapshotViewIsThePointInTimeUnderWriters) {
  constexpr uint64_t kSize = 24 << 20;
  MountWriteback(kSize);
  Writer w(mount_ / "drive0", 0, kSize, 31);
  w.Start();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto issued = Clock::now();
  int err = mount_.Control(Cmd(
      "drive-backup",
      {{"device", "drive0"}, {"job-id", "v"}, {"target", dir_ / "scratch.img"}, {"sync", "none"}}));
  auto returned = Clock::now();
  ASSERT_EQ(err, 0) << ReadFileOrDie(mount_ / "control");
  // Read while the writer goes on (its dirty pages reach cbwfs meanwhile).
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  std::string view = ReadFileOrDie(mount_ / "snapshots/v");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  std::string again = ReadFileOrDie(mount_ / "snapshots/v");
  w.Stop();
  EXPECT_EQ(w.errors(), 0);
  ASSERT_EQ(view.size(), kSize);
  EXPECT_TRUE(SliceMatchesWritebackPointInTime(image_, view, w, issued, returned));
  EXPECT_TRUE(view == again) << "the view must not change under the writer";
  json rec = Record(mount_, "v");
  EXPECT_GT(rec.value("cbw-bytes", uint64_t{0}), 0u) << rec.dump();
  ASSERT_EQ(mount_.Control(Cmd("job-cancel", {{"id", "v"}})), 0);
  ASSERT_TRUE(WaitResult(mount_, "v"));
}

// Random unaligned writes with fsync (or fdatasync) every kSyncEvery writes;
// `synced()` is the number of operations an fsync has covered. Stops at the
// first error (the daemon is gone). Every attempted write is logged, the
// failed one too (it may have landed in part).
class SyncingWriter {
 public:
  static constexpr int kSyncEvery = 8;
  SyncingWriter(std::string path, uint64_t size, uint64_t seed)
      : path_(std::move(path)), size_(size), rng_(seed) {}
  ~SyncingWriter() { Join(); }
  void Start() {
    thread_ = std::thread([this] { Run(); });
  }
  void Join() {
    if (thread_.joinable()) thread_.join();
  }
  size_t synced() const { return synced_; }
  uint64_t syncs() const { return syncs_; }
  const std::vector<Op>& ops() const { return ops_; }  // after Join

 private:
  void Run() {
    int fd = open(path_.c_str(), O_RDWR);
    if (fd < 0) return;
    for (;;) {
      uint64_t len = 1 + rng_() % (64 * 1024);
      uint64_t off = rng_() % (size_ - len + 1);
      ops_.push_back({off, RandomBytes(len, rng_()), len, Clock::now(), {}});
      const Op& op = ops_.back();
      if (pwrite(fd, op.data.data(), len, static_cast<off_t>(off)) != static_cast<ssize_t>(len)) {
        break;
      }
      if (ops_.size() % kSyncEvery == 0) {
        int r = syncs_ % 2 == 0 ? fsync(fd) : fdatasync(fd);
        if (r != 0) break;
        ++syncs_;
        synced_ = ops_.size();
      }
    }
    close(fd);
  }

  std::string path_;
  uint64_t size_;
  std::mt19937_64 rng_;
  std::thread thread_;
  std::vector<Op> ops_;
  std::atomic<size_t> synced_{0};
  std::atomic<uint64_t> syncs_{0};
};

TEST_F(WritebackE2E, SyncedWritesSurviveKill9) {
  constexpr uint64_t kSize = 32 << 20;
  MountWriteback(kSize);
  SyncingWriter w(mount_ / "drive0", kSize, 41);
  w.Start();
  ASSERT_TRUE(WaitFor([&] { return w.syncs() >= 40; }, std::chrono::seconds(60)));
  // Dead at once: whatever is only in the kernel's cache is lost, as on a
  // crash; what an fsync returned for must be on the source.
  EXPECT_EQ(mount_.Stop(SIGKILL), 128 + SIGKILL);
  w.Join();
  const size_t synced = w.synced();
  ASSERT_GE(synced, 40u * SyncingWriter::kSyncEvery);
  std::string src = ReadFileOrDie(dir_ / "src.img");
  ASSERT_EQ(src.size(), kSize);
  EXPECT_TRUE(OpsMatchPerByte(image_, src, w.ops(), synced, w.ops().size(), 0, kSize));
  RecordProperty("synced_ops", std::to_string(synced));
  RecordProperty("ops", std::to_string(w.ops().size()));
}

// A tmpfs too small for any CBW copy: break-guest-write refuses the drive
// writes, which in writeback-cache mode the kernel reports at fsync and close.
class WritebackEnospcE2E : public WritebackE2E {
 protected:
  void SetUp() override {
    small_ = dir_ / "small";
    mkdir(small_.c_str(), 0755);
    if (mount("tmpfs", small_.c_str(), "tmpfs", 0, "size=1m") != 0) {
      GTEST_SKIP() << "cannot mount tmpfs: " << strerror(errno);
    }
    mounted_ = true;
    MountWriteback(4 << 20);
  }
  void TearDown() override {
    if (mounted_) umount2(small_.c_str(), MNT_DETACH);
  }
  std::string small_;
  bool mounted_ = false;
};

TEST_F(WritebackEnospcE2E, BreakGuestWriteFailsAtFsyncAndClose) {
  WriteFileOrDie(small_ + "/filler", std::string(1000 * 1024, 'f'));
  ASSERT_EQ(mount_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                                {"job-id", "gw"},
                                                {"target", small_ + "/gw.img"},
                                                {"sync", "none"},
                                                {"on-cbw-error", "break-guest-write"}})),
            0)
      << ReadFileOrDie(mount_ / "control");
  std::string junk = RandomBytes(4096, 3);
  int fd = open((mount_ / "drive0").c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  // Cached: write() cannot know yet.
  ASSERT_EQ(pwrite(fd, junk.data(), junk.size(), 0), 4096);
  EXPECT_EQ(fsync(fd), -1);
  EXPECT_EQ(errno, EIO);
  EXPECT_EQ(close(fd), 0) << "fsync reported the error already";
  EXPECT_TRUE(ReadFileOrDie(dir_ / "src.img") == image_)
      << "a refused write must not reach the source";
  // Nor stay in the kernel's cache (cbwfs drops the page just after).
  EXPECT_TRUE(
      WaitFor([&] { return ReadFileOrDie(mount_ / "drive0") == image_; }, std::chrono::seconds(10)))
      << "the refused data still shows through the mount";

  // Without fsync, the close reports it.
  fd = open((mount_ / "drive0").c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(pwrite(fd, junk.data(), junk.size(), 1 << 20), 4096);
  EXPECT_EQ(close(fd), -1);
  EXPECT_EQ(errno, EIO);
  EXPECT_TRUE(ReadFileOrDie(dir_ / "src.img") == image_);
  EXPECT_EQ(Record(mount_, "gw")["status"], "running");
  ASSERT_EQ(mount_.Control(Cmd("job-cancel", {{"id", "gw"}})), 0);
  ASSERT_TRUE(WaitResult(mount_, "gw"));
}

// The O_DIRECT policy (write-through mode). Whether a read came from the
// kernel's cache or from cbwfs is seen by changing the source behind cbwfs's
// back (never done in real use): a cached page still shows the old bytes.
class DirectPolicyE2E : public MountedDrive {
 protected:
  static constexpr size_t kBlock = 4096;
  void SetUp() override { MountDrive(4 << 20); }
  // Writes `c` over the first block of the source, bypassing cbwfs.
  void ChangeBehind(char c) {
    int fd = open((dir_ / "src.img").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    std::string b(kBlock, c);
    ASSERT_EQ(pwrite(fd, b.data(), b.size(), 0), static_cast<ssize_t>(kBlock));
    close(fd);
  }
  // The first byte of the drive as `fd` reads it (buffered).
  static char FirstByte(int fd) {
    char c = 0;
    EXPECT_EQ(pread(fd, &c, 1, 0), 1) << strerror(errno);
    return c;
  }
  int OpenBuffered() { return open((mount_ / "drive0").c_str(), O_RDWR); }
  int OpenDirect() { return open((mount_ / "drive0").c_str(), O_RDWR | O_DIRECT); }
};

TEST_F(DirectPolicyE2E, DirectOpenDropsTheCacheOnceAndKeepsBufferedOpensOut) {
  // Buffered opens share the cache across opens.
  int a = OpenBuffered();
  ASSERT_GE(a, 0);
  const char orig = FirstByte(a);
  ChangeBehind('1');
  int b = OpenBuffered();
  ASSERT_GE(b, 0);
  EXPECT_EQ(FirstByte(b), orig) << "buffered opens keep the cache";
  close(b);

  // A direct open drops it.
  int d = OpenDirect();
  ASSERT_GE(d, 0);
  EXPECT_EQ(FirstByte(a), '1') << "the cache should have been dropped at the direct open";
  // While it is open, new buffered opens do not cache.
  int c = OpenBuffered();
  ASSERT_GE(c, 0);
  EXPECT_EQ(FirstByte(c), '1');
  ChangeBehind('2');
  EXPECT_EQ(FirstByte(c), '2') << "a buffered open beside a direct writer should not cache";
  close(c);
  close(d);

  // The direct writer gone: the next buffered open drops the cache once
  // more (`a` filled it meanwhile), and caching resumes.
  ChangeBehind('3');
  int e = OpenBuffered();
  ASSERT_GE(e, 0);
  EXPECT_EQ(FirstByte(e), '3');
  ChangeBehind('4');
  int f = OpenBuffered();
  ASSERT_GE(f, 0);
  EXPECT_EQ(FirstByte(f), '3') << "with no direct writer, the cache is kept again";
  close(e);
  close(f);
  close(a);
}

TEST_F(DirectPolicyE2E, DirectWritesAreReadBackByEveryBufferedReader) {
  const uint64_t size = image_.size();
  // A buffered reader fills the cache first (the benchmark's order).
  int before = OpenBuffered();
  ASSERT_GE(before, 0);
  EXPECT_TRUE(ReadFileOrDie(mount_ / "drive0") == image_);
  int d = OpenDirect();
  ASSERT_GE(d, 0);
  int beside = OpenBuffered();
  ASSERT_GE(beside, 0);
  void* mem = nullptr;
  ASSERT_EQ(posix_memalign(&mem, kBlock, 64 * 1024), 0);
  std::unique_ptr<char, decltype(&free)> buf(static_cast<char*>(mem), &free);
  std::mt19937_64 rng(51);
  for (int i = 0; i < 200; ++i) {
    size_t len = kBlock * (1 + rng() % 16);
    uint64_t off = kBlock * (rng() % ((size - len) / kBlock + 1));
    std::string data = RandomBytes(len, rng());
    std::memcpy(buf.get(), data.data(), len);
    ASSERT_EQ(pwrite(d, buf.get(), len, static_cast<off_t>(off)), static_cast<ssize_t>(len))
        << strerror(errno);
    image_.replace(off, len, data);
    // Both buffered readers see each write at once, whatever they cached.
    for (int fd : {before, beside}) {
      std::string back(len, '\0');
      ASSERT_EQ(pread(fd, back.data(), len, static_cast<off_t>(off)), static_cast<ssize_t>(len));
      ASSERT_TRUE(back == data) << "stale read at " << off << " after direct write " << i;
    }
  }
  close(d);
  close(beside);
  // After the direct writer closed: a fresh buffered open and the old one.
  EXPECT_TRUE(ReadFileOrDie(mount_ / "drive0") == image_);
  std::string all(size, '\0');
  ASSERT_EQ(pread(before, all.data(), size, 0), static_cast<ssize_t>(size));
  EXPECT_TRUE(all == image_);
  close(before);
  EXPECT_TRUE(ReadFileOrDie(dir_ / "src.img") == image_);
}

}  // namespace
}  // namespace cbw::test
