// Copier: the background copy, against a fake job (its CopierHost) over a
// real source file and a real file target.

#include "backup/copier.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <mutex>
#include <thread>

#include "backup/cluster_map.h"
#include "backup/drive.h"
#include "backup/target.h"
#include "tests/backup/test_util.h"

namespace cbw::backup {
namespace {

using testing::RandomBytes;
using testing::ReadAll;
using testing::TempDir;

constexpr uint64_t kMiB = 1024 * 1024;
constexpr uint64_t kCluster = 64 * 1024;

// A job reduced to what the copier asks: a cluster map, counters, and
// scripted answers to halts and errors.
class FakeJob : public CopierHost {
 public:
  explicit FakeJob(uint64_t clusters) : map_(clusters) {}
  Halt halt() override {
    std::lock_guard<std::mutex> l(mu_);
    if (cancel_after_ >= 0 && finished_ >= static_cast<uint64_t>(cancel_after_)) {
      return Halt::kCancel;
    }
    return Halt::kNone;
  }
  bool abandoned() override { return false; }
  std::optional<Run> ClaimNext(uint64_t* cursor, uint64_t end, uint64_t max) override {
    std::lock_guard<std::mutex> l(mu_);
    uint64_t c = map_.NextDirty(*cursor, end);
    if (c >= std::min(end, map_.size())) {
      *cursor = std::max(*cursor, std::min(end, map_.size()));
      return std::nullopt;
    }
    uint64_t e = map_.NextClean(c, std::min(end, c + max));
    map_.Claim(c, e);
    *cursor = e;
    ++claims_;
    max_out_ = std::max(max_out_, claims_ - finished_);
    return Run{c, e};
  }
  uint64_t NextDirty(uint64_t from) override {
    std::lock_guard<std::mutex> l(mu_);
    return map_.NextDirty(from);
  }
  void Finish(const Run& r, bool ok, uint64_t data, uint64_t zero) override {
    std::lock_guard<std::mutex> l(mu_);
    map_.Finish(r.c0, r.c1, ok);
    ++finished_;
    if (ok) {
      data_ += data;
      zero_ += zero;
    }
  }
  uint64_t ChunkBytes() override { return kMiB; }
  uint64_t DelayNs(uint64_t) override { return 0; }
  void Consume(uint64_t) override {}
  bool AllDone() override {
    std::lock_guard<std::mutex> l(mu_);
    return map_.dirty_count() == 0 && map_.copying_count() == 0;
  }
  void Wait(uint64_t) override { std::this_thread::sleep_for(std::chrono::milliseconds(1)); }
  bool OnPause() override { return true; }
  bool OnIoError(int err, bool is_read) override {
    std::lock_guard<std::mutex> l(mu_);
    errors_.emplace_back(err, is_read);
    return false;
  }

  std::mutex mu_;
  ClusterMap map_;
  uint64_t claims_ = 0, finished_ = 0, data_ = 0, zero_ = 0;
  uint64_t max_out_ = 0;  // most claims held at once
  long cancel_after_ = -1;
  std::vector<std::pair<int, bool>> errors_;
};

struct CopySetup {
  explicit CopySetup(const std::string& content, uint64_t size) {
    testing::MakeSparse(dir / "src.img", size);
    if (!content.empty()) testing::WriteAt(dir / "src.img", content, 0);
    auto d = Drive::Open({"d", dir / "src.img", false});
    if (!d.ok()) std::abort();
    drive = std::move(*d);
  }
  std::shared_ptr<Target> OpenFile(const std::string& name, TargetMode mode) {
    TargetRequest req;
    req.spec = dir / name;
    req.mode = mode;
    req.format = "raw";
    req.size = drive->size();
    auto t = OpenTarget(req, {drive.get()});
    EXPECT_TRUE(t.ok()) << t.status().message();
    if (!t.ok()) return nullptr;
    EXPECT_TRUE((*t)->Prepare().ok());
    return *t;
  }
  TempDir dir;
  std::unique_ptr<Drive> drive;
};

TEST(CopierTest, CopiesDataZerosAndHolesAndFinishesEveryClaim) {
  const uint64_t size = 16 * kMiB + 12345;  // a partial last cluster
  std::string data = RandomBytes(size, 11);
  data.replace(2 * kMiB, kMiB, std::string(kMiB, '\0'));  // zeros, allocated
  CopySetup s(data.substr(0, 8 * kMiB), size);
  testing::WriteAt(s.dir / "src.img", data.substr(12 * kMiB), 12 * kMiB);  // a hole before
  std::string want = data;
  want.replace(8 * kMiB, 4 * kMiB, std::string(4 * kMiB, '\0'));
  FakeJob job((size + kCluster - 1) / kCluster);
  auto target = s.OpenFile("t.img", TargetMode::kAbsolutePaths);
  Copier copier(&job, {kCluster, kMiB, 4}, s.drive.get(), target);
  EXPECT_EQ(copier.Run(), Copier::Outcome::kSuccess);
  EXPECT_TRUE(testing::SameBytes(ReadAll(s.dir / "t.img"), want));
  EXPECT_EQ(job.claims_, job.finished_);
  EXPECT_EQ(job.map_.dirty_count(), 0u);
  EXPECT_EQ(job.data_ + job.zero_, size);
  EXPECT_EQ(job.zero_, 5 * kMiB);
  // Zeros and holes stay holes on a fresh target.
  struct stat st {};
  ASSERT_EQ(stat((s.dir / "t.img").c_str(), &st), 0);
  EXPECT_LE(static_cast<uint64_t>(st.st_blocks) * 512, size - 5 * kMiB + kMiB);
}

TEST(CopierTest, AnExistingTargetGetsItsStaleBytesZeroed) {
  const uint64_t size = 4 * kMiB;
  std::string data = RandomBytes(size, 12);
  data.replace(kMiB, kMiB, std::string(kMiB, '\0'));
  CopySetup s(data, size);
  testing::WriteAt(s.dir / "old.img", RandomBytes(size, 13), 0);
  FakeJob job(size / kCluster);
  Copier copier(&job, {kCluster, kMiB, 8}, s.drive.get(),
                s.OpenFile("old.img", TargetMode::kExisting));
  EXPECT_EQ(copier.Run(), Copier::Outcome::kSuccess);
  EXPECT_TRUE(testing::SameBytes(ReadAll(s.dir / "old.img"), data));
}

TEST(CopierTest, ClustersAlreadyDoneAreNotCopied) {
  const uint64_t size = 4 * kMiB;
  CopySetup s(RandomBytes(size, 14), size);
  FakeJob job(size / kCluster);
  job.map_.Claim(0, 32);
  job.map_.Finish(0, 32, true);  // as if CBW had preserved the first half
  Copier copier(&job, {kCluster, kMiB, 2}, s.drive.get(),
                s.OpenFile("t.img", TargetMode::kAbsolutePaths));
  EXPECT_EQ(copier.Run(), Copier::Outcome::kSuccess);
  EXPECT_EQ(job.data_, 2 * kMiB);
  EXPECT_EQ(ReadAll(s.dir / "t.img").substr(0, 2 * kMiB), std::string(2 * kMiB, '\0'));
}

// An incremental's scattered clusters: single-cluster requests go in flight
// beside the chunk-sized ones (random reads want a deeper queue), and only
// the dirty clusters are copied.
TEST(CopierTest, ScatteredClustersAlsoGoThroughTheSmallSlots) {
  const uint64_t size = 64 * kMiB, n = size / kCluster;
  const std::string data = RandomBytes(size, 16);
  CopySetup s(data, size);
  FakeJob job(n);
  std::string want(size, '\0');
  uint64_t dirty = 0;
  for (uint64_t c = 0; c < n; ++c) {
    if (c % 3 == 0) {
      want.replace(c * kCluster, kCluster, data, c * kCluster, kCluster);
      ++dirty;
    } else {
      job.map_.Claim(c, c + 1);
      job.map_.Finish(c, c + 1, true);
    }
  }
  Copier copier(&job, {kCluster, kMiB, 2, 6}, s.drive.get(),
                s.OpenFile("t.img", TargetMode::kAbsolutePaths));
  EXPECT_EQ(copier.Run(), Copier::Outcome::kSuccess);
  EXPECT_TRUE(testing::SameBytes(ReadAll(s.dir / "t.img"), want));
  EXPECT_EQ(job.data_, dirty * kCluster);
  EXPECT_EQ(job.claims_, job.finished_);
  EXPECT_GT(job.max_out_, 2u) << "only the chunk-sized slots were used";
  EXPECT_LE(job.max_out_, 8u);
}

// A fully dirty drive is copied in chunks: the small slots stay out of it.
TEST(CopierTest, ContiguousDirtyClustersGoInChunksOnly) {
  const uint64_t size = 32 * kMiB;
  CopySetup s(RandomBytes(size, 17), size);
  FakeJob job(size / kCluster);
  Copier copier(&job, {kCluster, kMiB, 2, 6}, s.drive.get(),
                s.OpenFile("t.img", TargetMode::kAbsolutePaths));
  EXPECT_EQ(copier.Run(), Copier::Outcome::kSuccess);
  EXPECT_EQ(job.claims_, size / kMiB);
  EXPECT_LE(job.max_out_, 2u);
}

TEST(CopierTest, ACancelStopsDispatchingAndReleasesNothingHalfDone) {
  const uint64_t size = 32 * kMiB;
  CopySetup s(RandomBytes(size, 15), size);
  FakeJob job(size / kCluster);
  job.cancel_after_ = 3;
  Copier copier(&job, {kCluster, kMiB, 2}, s.drive.get(),
                s.OpenFile("t.img", TargetMode::kAbsolutePaths));
  EXPECT_EQ(copier.Run(), Copier::Outcome::kCancelled);
  EXPECT_EQ(job.claims_, job.finished_);
  EXPECT_EQ(job.map_.copying_count(), 0u);
  EXPECT_GT(job.map_.dirty_count(), 0u);
}

TEST(CopierTest, ATargetThatCannotBeWrittenIsAWriteErrorForTheHost) {
  const uint64_t size = 2 * kMiB;
  CopySetup s(RandomBytes(size, 16), size);
  auto target = s.OpenFile("t.img", TargetMode::kAbsolutePaths);
  // The same file opened read-only: every write fails with EBADF.
  struct ReadOnly : Target {
    explicit ReadOnly(std::shared_ptr<cbw::backup::Target> t) : inner(std::move(t)) {
      size_ = inner->size();
    }
    Status Write(const char*, size_t, uint64_t) override { return Status::Error(EBADF, "ro"); }
    Status WriteZeroes(uint64_t, uint64_t) override { return Status::Error(EBADF, "ro"); }
    Status Read(char* b, size_t l, uint64_t o) override { return inner->Read(b, l, o); }
    Status Flush() override { return Status::Ok(); }
    Result<std::unique_ptr<TargetQueue>> OpenQueue(unsigned) override {
      struct Q : TargetQueue {
        std::vector<TargetCompletion> done;
        int poll_fd() const override { return -1; }
        void SubmitWrite(const char*, size_t, uint64_t, uint64_t tag) override {
          done.push_back({tag, EBADF});
        }
        void SubmitZeroes(uint64_t, uint64_t, uint64_t tag) override {
          done.push_back({tag, EBADF});
        }
        void Reap(std::vector<TargetCompletion>* out) override {
          out->insert(out->end(), done.begin(), done.end());
          done.clear();
        }
        unsigned in_flight() const override { return 0; }
      };
      return std::unique_ptr<TargetQueue>(new Q());
    }
    std::shared_ptr<cbw::backup::Target> inner;
  };
  FakeJob job(size / kCluster);
  Copier copier(&job, {kCluster, kMiB, 2}, s.drive.get(), std::make_shared<ReadOnly>(target));
  EXPECT_EQ(copier.Run(), Copier::Outcome::kFailed);
  ASSERT_FALSE(job.errors_.empty());
  EXPECT_EQ(job.errors_[0], std::make_pair(EBADF, false));
  EXPECT_EQ(job.claims_, job.finished_);
  EXPECT_EQ(job.map_.copying_count(), 0u);
}

}  // namespace
}  // namespace cbw::backup
