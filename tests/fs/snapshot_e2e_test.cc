// End-to-end tests of snapshot views (SPEC 5) through a real mount: every
// read of snapshots/<id> equals the drive at the job's point in time, while
// the drive is hammered; holes, cp, qemu-img, broken and ended views; and
// examples/fleece.sh.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tests/fs/shell_helpers.h"

namespace cbw::test {
namespace {

// Random unaligned writes, punches and zeroings over the whole drive, through
// the mount. Hold() parks it between operations (so the test can take the
// point-in-time image); Release() lets it go on.
class HammerWriter {
 public:
  HammerWriter(std::string path, uint64_t size, uint64_t seed)
      : path_(std::move(path)), size_(size), rng_(seed) {}
  ~HammerWriter() { Stop(); }
  void Start() {
    thread_ = std::thread([this] { Run(); });
  }
  void Stop() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
      hold_ = false;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  void Hold() {
    std::unique_lock lock(mu_);
    hold_ = true;
    cv_.wait(lock, [&] { return parked_ || stop_; });
  }
  void Release() {
    {
      std::lock_guard lock(mu_);
      hold_ = false;
    }
    cv_.notify_all();
  }
  uint64_t ops() const { return ops_; }
  uint64_t bytes() const { return bytes_; }
  int errors() const { return errors_; }

 private:
  void Run() {
    int fd = open(path_.c_str(), O_RDWR);
    if (fd < 0) {
      ++errors_;
      return;
    }
    for (;;) {
      {
        std::unique_lock lock(mu_);
        if (hold_) {
          parked_ = true;
          cv_.notify_all();
          cv_.wait(lock, [&] { return !hold_; });
          parked_ = false;
        }
        if (stop_) break;
      }
      uint64_t len = 1 + rng_() % (192 * 1024);
      uint64_t off = rng_() % (size_ - len + 1);
      int kind = static_cast<int>(rng_() % 8);
      int r;
      if (kind == 0) {
        r = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                      static_cast<off_t>(len));
      } else if (kind == 1) {
        r = fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                      static_cast<off_t>(len));
      } else {
        std::string data = RandomBytes(len, rng_());
        r = pwrite(fd, data.data(), len, static_cast<off_t>(off)) == static_cast<ssize_t>(len) ? 0
                                                                                               : -1;
      }
      if (r != 0) {
        ++errors_;
      } else {
        ++ops_;
        bytes_ += len;
      }
    }
    close(fd);
  }

  std::string path_;
  uint64_t size_;
  std::mt19937_64 rng_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool hold_ = false, parked_ = false, stop_ = false;
  std::atomic<uint64_t> ops_{0}, bytes_{0};
  std::atomic<int> errors_{0};
};

struct ReadStats {
  std::atomic<uint64_t> reads{0}, bytes{0}, mismatches{0}, errors{0};
  std::mutex mu;
  std::string first_problem;
  void Problem(const std::string& what) {
    std::lock_guard lock(mu);
    if (first_problem.empty()) first_problem = what;
  }
};

// Reads [off, off+len) of `fd` and compares it with `pit`.
void CheckedRead(int fd, const std::string& pit, uint64_t off, size_t len, ReadStats* st) {
  std::string buf(len, '\0');
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, buf.data() + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      ++st->errors;
      st->Problem("pread at " + std::to_string(off + done) + ": " + strerror(errno));
      return;
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  ++st->reads;
  st->bytes += done;
  size_t want = off >= pit.size() ? 0 : std::min<size_t>(len, pit.size() - off);
  if (done != want || buf.compare(0, done, pit, off, done) != 0) {
    ++st->mismatches;
    size_t at = 0;
    while (at < done && at < want && buf[at] == pit[off + at]) ++at;
    st->Problem("read of " + std::to_string(len) + " at " + std::to_string(off) + " differs at " +
                std::to_string(off + at) + " (got " + std::to_string(done) + " bytes)");
  }
}

class SnapshotE2E : public MountedDrive {
 protected:
  // Holds the writer, copies the drive (the point in time), starts the job,
  // lets the writer go. Returns the point-in-time image.
  std::string StartUnderWriter(HammerWriter* w, const std::string& id, const std::string& sync,
                               json extra = json::object()) {
    w->Hold();
    std::string pit = ReadFileOrDie(mount_ / "drive0");
    StartJob(id, sync, std::move(extra));
    w->Release();
    return pit;
  }

  // Several readers (one sequential, the others random and unaligned) read
  // snapshots/<id> for `duration` while the writer runs; every byte must be
  // the point-in-time image.
  void ReadConcurrently(const std::string& id, const std::string& pit,
                        std::chrono::milliseconds duration, ReadStats* st) {
    std::atomic<bool> stop{false};
    std::vector<std::thread> readers;
    const std::string view = mount_ / ("snapshots/" + id);
    readers.emplace_back([&] {
      int fd = open(view.c_str(), O_RDONLY);
      if (fd < 0) return st->Problem("open view: " + std::string(strerror(errno)));
      uint64_t off = 0;
      while (!stop) {
        size_t len = 1000003;  // odd-sized sequential reads
        CheckedRead(fd, pit, off, len, st);
        off = off + len >= pit.size() ? 0 : off + len;
      }
      close(fd);
    });
    for (int i = 0; i < 3; ++i) {
      readers.emplace_back([&, i] {
        int fd = open(view.c_str(), O_RDONLY);
        if (fd < 0) return st->Problem("open view: " + std::string(strerror(errno)));
        std::mt19937_64 rng(100 + i);
        while (!stop) {
          size_t len = 1 + rng() % (300 * 1024);
          uint64_t off = rng() % pit.size();
          CheckedRead(fd, pit, off, len, st);
        }
        close(fd);
      });
    }
    auto end = Clock::now() + duration;
    while (Clock::now() < end && st->mismatches == 0 && st->errors == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    stop = true;
    for (auto& t : readers) t.join();
  }

  void ExpectViewGone(const std::string& id) {
    CommandResult r = Sh("ls -A snapshots; stat snapshots/" + id + " >/dev/null; echo st=$?");
    EXPECT_EQ(r.out, "st=1\n") << r.out;
    EXPECT_NE(r.err.find("No such file or directory"), std::string::npos) << r.err;
  }
};

TEST_F(SnapshotE2E, ViewExistsWhileTheJobLivesWithTheDrivesSize) {
  MountDrive((8 << 20) + 4097);
  EXPECT_EQ(Sh("ls -A snapshots").out, "");
  StartJob("s", "none");
  struct stat st {};
  ASSERT_EQ(stat((mount_ / "snapshots/s").c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), image_.size());
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(st.st_mode & 0222, 0u) << "read-only";
  CommandResult r =
      Sh("ls snapshots; cmp snapshots/s $D/src.img && echo same; "
         "echo x > snapshots/s; echo w=$?");
  EXPECT_EQ(r.out, "s\nsame\nw=1\n") << r.err;
  ASSERT_EQ(mount_.Control(Cmd("job-cancel", {{"id", "s"}})), 0);
  ExpectViewGone("s");
}

class SnapshotUnderWriter : public SnapshotE2E,
                            public ::testing::WithParamInterface<const char*> {};

TEST_P(SnapshotUnderWriter, EveryReadIsThePointInTimeImage) {
  constexpr uint64_t kSize = 24 << 20;
  MountDrive(kSize);
  // Some holes in the drive to begin with.
  {
    int fd = open((dir_ / "src.img").c_str(), O_RDWR);
    ASSERT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 3 << 20, 2 << 20), 0);
    close(fd);
  }
  HammerWriter w(mount_ / "drive0", kSize, 7);
  w.Start();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const std::string sync = GetParam();
  json extra = json::object();
  // sync=full: rate-limited, and it waits in `pending` (its view still live)
  // until finalized, however fast the writer's CBW copies finish it.
  if (sync == "full") extra = {{"speed", 4 << 20}, {"auto-finalize", false}};
  std::string pit = StartUnderWriter(&w, "v", sync, extra);
  WriteFileOrDie(dir_ / "pit.img", pit);

  ReadStats st;
  // A user's tool on the view at the same time.
  Background cmp("cmp " + Q(mount_ / "snapshots/v") + " " + Q(dir_ / "pit.img") + " && echo same",
                 dir_ / "cmp.log");
  ReadConcurrently("v", pit, std::chrono::milliseconds(2500), &st);
  int cmp_status = cmp.Wait(std::chrono::seconds(30));
  w.Stop();
  EXPECT_EQ(w.errors(), 0);
  EXPECT_GT(w.ops(), 20u) << "the writer should have raced the readers";
  EXPECT_EQ(st.mismatches, 0u) << st.first_problem;
  EXPECT_EQ(st.errors, 0u) << st.first_problem;
  EXPECT_GT(st.reads, 20u);
  EXPECT_EQ(cmp_status, 0) << ReadFileOrDie(dir_ / "cmp.log");
  EXPECT_EQ(ReadFileOrDie(dir_ / "cmp.log"), "same\n");
  json rec = Record(mount_, "v");
  EXPECT_FALSE(rec.contains("result")) << "the job should still be live: " << rec.dump();
  EXPECT_GT(rec.value("cbw-bytes", uint64_t{0}), 0u);
  RecordProperty("writer_ops", std::to_string(w.ops()));
  RecordProperty("view_reads", std::to_string(st.reads.load()));
  RecordProperty("view_mib_read", std::to_string(st.bytes.load() >> 20));
  if (sync == "full") {
    // The target is the same point in time.
    ASSERT_TRUE(mount_.WaitJobStatus("v", {"pending"}, std::chrono::seconds(30)));
    ASSERT_EQ(mount_.Control(Cmd("job-finalize", {{"id", "v"}})), 0);
    ASSERT_TRUE(WaitResult(mount_, "v"));
    EXPECT_EQ(Record(mount_, "v")["result"], "success");
    EXPECT_TRUE(ReadFileOrDie(dir_ / "v.img") == pit);
  } else {
    ASSERT_EQ(mount_.Control(Cmd("job-cancel", {{"id", "v"}})), 0);
    ASSERT_TRUE(WaitResult(mount_, "v"));
  }
  ExpectViewGone("v");
}

INSTANTIATE_TEST_SUITE_P(Sync, SnapshotUnderWriter, ::testing::Values("full", "none"));

TEST_F(SnapshotE2E, SparseViewSeeksCopiesAndConverts) {
  constexpr uint64_t kSize = 64 << 20;
  MakeSparseFile(dir_ / "src.img", kSize);
  std::string d1 = RandomBytes(1 << 20, 1), d2 = RandomBytes(65536 + 3, 2);
  {
    int fd = open((dir_ / "src.img").c_str(), O_WRONLY);
    ASSERT_EQ(pwrite(fd, d1.data(), d1.size(), 8 << 20), static_cast<ssize_t>(d1.size()));
    ASSERT_EQ(pwrite(fd, d2.data(), d2.size(), 40 << 20), static_cast<ssize_t>(d2.size()));
    close(fd);
  }
  std::string pit = ReadFileOrDie(dir_ / "src.img");
  ASSERT_TRUE(mount_.Start({"--drive", "drive0=" + (dir_ / "src.img")}));
  StartJob("f", "none");
  // Rewrite the drive after the point in time: data into a hole, a punch
  // and new bytes over the old data.
  int fd = open((mount_ / "drive0").c_str(), O_RDWR);
  std::string junk = RandomBytes(300000, 3);
  ASSERT_EQ(pwrite(fd, junk.data(), junk.size(), 20 << 20), static_cast<ssize_t>(junk.size()));
  ASSERT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8 << 20, 512 << 10), 0);
  ASSERT_EQ(pwrite(fd, junk.data(), 5000, (40 << 20) + 100), 5000);
  close(fd);

  int vfd = open((mount_ / "snapshots/f").c_str(), O_RDONLY);
  ASSERT_GE(vfd, 0);
  // Data starts where the point-in-time data starts (nothing before 8 MiB
  // was ever written).
  EXPECT_EQ(lseek(vfd, 0, SEEK_DATA), 8 << 20);
  off_t hole = lseek(vfd, 8 << 20, SEEK_HOLE);
  EXPECT_GE(hole, (8 << 20) + (1 << 20));
  EXPECT_LE(hole, 20 << 20);
  // Walk every data segment: together they cover all non-zero bytes of the
  // point in time, and leave most of the drive as holes.
  uint64_t data_bytes = 0;
  off_t pos = 0;
  std::vector<bool> covered(kSize / 4096, false);
  for (;;) {
    off_t d = lseek(vfd, pos, SEEK_DATA);
    if (d < 0) {
      EXPECT_EQ(errno, ENXIO);
      break;
    }
    off_t h = lseek(vfd, d, SEEK_HOLE);
    ASSERT_GT(h, d);
    data_bytes += static_cast<uint64_t>(h - d);
    for (off_t b = d / 4096; b < (h + 4095) / 4096; ++b) covered[static_cast<size_t>(b)] = true;
    pos = h;
  }
  for (uint64_t b = 0; b < kSize / 4096; ++b) {
    if (covered[b]) continue;
    const char* p = pit.data() + b * 4096;
    bool zero = std::all_of(p, p + 4096, [](char ch) { return ch == 0; });
    ASSERT_TRUE(zero) << "non-zero point-in-time data at " << b * 4096 << " reported as a hole";
  }
  EXPECT_LE(data_bytes, 4u << 20) << "holes should be found";
  EXPECT_EQ(lseek(vfd, kSize, SEEK_DATA), -1);
  EXPECT_EQ(errno, ENXIO);
  RecordProperty("view_data_bytes_by_seek", std::to_string(data_bytes));
  close(vfd);

  // cp --sparse=always keeps holes; qemu-img convert reads the same image.
  CommandResult r =
      Sh("cp --sparse=always snapshots/f $D/cp.img && "
         "qemu-img convert -f raw -O raw snapshots/f $D/qemu.img && "
         "stat -c %b $D/cp.img");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  uint64_t cp_alloc = std::stoull(r.out) * 512;
  EXPECT_LE(cp_alloc, 4u << 20) << "cp --sparse=always should keep the holes";
  RecordProperty("cp_sparse_allocated_bytes", std::to_string(cp_alloc));
  EXPECT_TRUE(ReadFileOrDie(dir_ / "cp.img") == pit);
  EXPECT_TRUE(ReadFileOrDie(dir_ / "qemu.img") == pit);
  ASSERT_EQ(mount_.Control(Cmd("job-cancel", {{"id", "f"}})), 0);
}

TEST_F(SnapshotE2E, BrokenSnapshotReadsFailWithEio) {
  const std::string small = dir_ / "small";
  mkdir(small.c_str(), 0755);
  if (mount("tmpfs", small.c_str(), "tmpfs", 0, "size=1m") != 0) {
    GTEST_SKIP() << "cannot mount tmpfs: " << strerror(errno);
  }
  struct Umount {
    std::string p;
    ~Umount() { umount2(p.c_str(), MNT_DETACH); }
  } umount_guard{small};
  MountDrive(4 << 20);
  WriteFileOrDie(small + "/filler", std::string(1000 * 1024, 'f'));
  ASSERT_EQ(mount_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                                {"job-id", "b"},
                                                {"target", small + "/b.img"},
                                                {"sync", "none"},
                                                {"auto-finalize", false},
                                                {"auto-dismiss", false}})),
            0)
      << ReadFileOrDie(mount_ / "control");
  int vfd = open((mount_ / "snapshots/b").c_str(), O_RDONLY);
  ASSERT_GE(vfd, 0);
  char c;
  ASSERT_EQ(pread(vfd, &c, 1, 0), 1);
  // The CBW copy cannot be stored: under break-snapshot the write proceeds.
  int fd = open((mount_ / "drive0").c_str(), O_WRONLY);
  std::string junk = RandomBytes(4096, 3);
  EXPECT_EQ(pwrite(fd, junk.data(), junk.size(), 65536 + 10), 4096);
  close(fd);
  // The store of the buffered copy fails in the background; from then on
  // every read of the view fails, the overwritten cluster and the others.
  std::string buf(65536, '\0');
  EXPECT_TRUE(WaitFor([&] { return pread(vfd, buf.data(), buf.size(), 0) == -1; }));
  for (uint64_t off : {uint64_t{0}, uint64_t{65536}, uint64_t{3 << 20}}) {
    errno = 0;
    EXPECT_EQ(pread(vfd, buf.data(), buf.size(), static_cast<off_t>(off)), -1) << off;
    EXPECT_EQ(errno, EIO) << off;
  }
  close(vfd);
  CommandResult r = Sh("cat snapshots/b > /dev/null; echo st=$?");
  EXPECT_EQ(r.out, "st=1\n");
  EXPECT_TRUE(r.err.find("Input/output error") != std::string::npos ||
              r.err.find("No such file") != std::string::npos)
      << r.err;
  ASSERT_TRUE(WaitResult(mount_, "b"));
  EXPECT_EQ(Record(mount_, "b")["result"], "failed");
}

TEST_F(SnapshotE2E, CancelRemovesTheViewAndOpenReadersGetEio) {
  MountDrive(4 << 20);
  StartJob("c", "none");
  int vfd = open((mount_ / "snapshots/c").c_str(), O_RDONLY);
  ASSERT_GE(vfd, 0);
  std::string buf(4096, '\0');
  ASSERT_EQ(pread(vfd, buf.data(), buf.size(), 0), 4096);
  EXPECT_TRUE(buf == image_.substr(0, 4096));
  ASSERT_EQ(mount_.Control(Cmd("job-cancel", {{"id", "c"}})), 0);
  ExpectViewGone("c");
  struct stat st {};
  EXPECT_EQ(stat((mount_ / "snapshots/c").c_str(), &st), -1);
  EXPECT_EQ(errno, ENOENT);
  errno = 0;
  EXPECT_EQ(pread(vfd, buf.data(), buf.size(), 0), -1);
  EXPECT_EQ(errno, EIO);
  close(vfd);
}

TEST_F(SnapshotE2E, FleecingScratchHoldsOnlyOverwrittenClusters) {
  constexpr uint64_t kSize = 64 << 20, kCluster = 64 << 10;
  MountDrive(kSize);
  MakeSparseFile(dir_ / "scratch.img", kSize);
  ASSERT_EQ(mount_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                                {"job-id", "fl"},
                                                {"target", dir_ / "scratch.img"},
                                                {"mode", "existing"},
                                                {"sync", "none"}})),
            0)
      << ReadFileOrDie(mount_ / "control");
  // 200 distinct clusters get a small unaligned write each.
  std::mt19937_64 rng(5);
  std::vector<uint64_t> clusters(kSize / kCluster);
  for (uint64_t i = 0; i < clusters.size(); ++i) clusters[i] = i;
  std::shuffle(clusters.begin(), clusters.end(), rng);
  clusters.resize(200);
  int fd = open((mount_ / "drive0").c_str(), O_WRONLY);
  uint64_t written = 0;
  for (uint64_t c : clusters) {
    std::string d = RandomBytes(3000, c);
    uint64_t off = c * kCluster + 1 + rng() % (kCluster - 3001);
    ASSERT_EQ(pwrite(fd, d.data(), d.size(), static_cast<off_t>(off)), 3000);
    written += d.size();
  }
  close(fd);
  uint64_t overwritten = clusters.size() * kCluster;
  // The old clusters reach the scratch file in the background (buffered
  // copy-before-write): wait for them.
  uint64_t scratch = 0;
  EXPECT_TRUE(WaitFor([&] {
    struct stat st {};
    if (stat((dir_ / "scratch.img").c_str(), &st) != 0) return false;
    scratch = static_cast<uint64_t>(st.st_blocks) * 512;
    return scratch >= overwritten;
  })) << scratch
      << " of " << overwritten << " bytes stored";
  EXPECT_LE(scratch, overwritten + (1 << 20)) << "the scratch target should stay sparse";
  EXPECT_EQ(Record(mount_, "fl")["cbw-bytes"], overwritten);
  RecordProperty("bytes_written", std::to_string(written));
  RecordProperty("clusters_overwritten_bytes", std::to_string(overwritten));
  RecordProperty("scratch_allocated_bytes", std::to_string(scratch));

  // Read throughput of the view against the drive itself (no assertion).
  auto read_all = [&](const std::string& path, std::string* out) {
    int f = open(path.c_str(), O_RDONLY);
    posix_fadvise(f, 0, 0, POSIX_FADV_DONTNEED);
    out->assign(kSize, '\0');
    auto t = Clock::now();
    uint64_t off = 0;
    while (off < kSize) {
      ssize_t n = pread(f, out->data() + off, 1 << 20, static_cast<off_t>(off));
      if (n <= 0) break;
      off += static_cast<uint64_t>(n);
    }
    double s = Seconds(Clock::now() - t);
    close(f);
    return static_cast<double>(kSize) / (1 << 20) / s;
  };
  std::string view, drive;
  double view_mbs = read_all(mount_ / "snapshots/fl", &view);
  double drive_mbs = read_all(mount_ / "drive0", &drive);
  EXPECT_TRUE(view == image_) << "the view is the image before the writes";
  EXPECT_FALSE(drive == image_);
  RecordProperty("view_read_mb_per_s", std::to_string(view_mbs));
  RecordProperty("drive_read_mb_per_s", std::to_string(drive_mbs));
  std::printf(
      "fleecing: %llu bytes written in %zu clusters (%llu bytes), scratch allocated %llu; "
      "read view %.0f MB/s, drive %.0f MB/s\n",
      static_cast<unsigned long long>(written), clusters.size(),
      static_cast<unsigned long long>(overwritten), static_cast<unsigned long long>(scratch),
      view_mbs, drive_mbs);
  ASSERT_EQ(mount_.Control(Cmd("job-cancel", {{"id", "fl"}})), 0);
}

// examples/fleece.sh must keep working (it uses the binary under test).
TEST(FleeceExample, RunsAndVerifies) {
  CommandResult r = RunShell("CBWFS_BINARY=" + Q(CbwfsBinary()) + " FLEECE_MB=64 " +
                                 Q(std::string(CBW_SOURCE_DIR) + "/examples/fleece.sh"),
                             std::chrono::seconds(120));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("OK"), std::string::npos) << r.out;
  std::printf("%s", r.out.c_str());
}

}  // namespace
}  // namespace cbw::test
