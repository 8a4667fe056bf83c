// Dirty bitmaps (SPEC 7): the bit structure, QEMU's checks and texts, the
// bitmap-mode table at the end of a job, persistence across clean and
// unclean stops, and what makes a bitmap inconsistent. Real files, real
// registries, real threads.

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <utime.h>

#include <thread>

#include "backup/bitmap_catalog.h"
#include "backup/dirty_bitmap.h"
#include "backup/job_store.h"
#include "tests/backup/test_util.h"

namespace cbw::backup {
namespace {

using testing::EventRecorder;
using testing::Fixture;
using testing::RandomBytes;
using testing::ReadAll;
using testing::WaitFor;

constexpr uint64_t kMiB = 1024 * 1024;
constexpr uint64_t kK = 1024;

// ---------------------------------------------------------------- DirtyBitmap

TEST(DirtyBitmapTest, SetResetCountAndRanges) {
  DirtyBitmap b(10 * kMiB + 100, 64 * kK);
  EXPECT_EQ(b.Count(), 0u);
  b.Set(100, 1);                 // granule 0
  b.Set(10 * kMiB + 50, 10);     // the partial last granule
  b.Set(kMiB, 3 * 64 * kK + 1);  // 4 granules
  EXPECT_EQ(b.Count(), 64 * kK + 100 + 4 * 64 * kK);
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  b.ForEachDirty([&](uint64_t o, uint64_t l) { ranges.emplace_back(o, l); });
  ASSERT_EQ(ranges.size(), 3u);
  EXPECT_EQ(ranges[0], std::make_pair(uint64_t{0}, 64 * kK));
  EXPECT_EQ(ranges[1], std::make_pair(kMiB, 4 * 64 * kK));
  EXPECT_EQ(ranges[2], std::make_pair(10 * kMiB, uint64_t{100}));
  EXPECT_TRUE(b.AnyDirty(kMiB + 3 * 64 * kK, 1));
  EXPECT_FALSE(b.AnyDirty(2 * kMiB, kMiB));
  b.Reset(kMiB, 64 * kK);
  EXPECT_FALSE(b.Get(kMiB));
  EXPECT_TRUE(b.Get(kMiB + 64 * kK));
  b.Clear();
  EXPECT_EQ(b.Count(), 0u);
}

TEST(DirtyBitmapTest, MergeAcrossGranularitiesAndWordsRoundTrip) {
  DirtyBitmap fine(4 * kMiB, 512), coarse(4 * kMiB, kMiB);
  fine.Set(3 * kMiB + 100, 1);
  coarse.Merge(fine);
  EXPECT_EQ(coarse.Count(), kMiB);
  EXPECT_TRUE(coarse.Get(3 * kMiB));
  DirtyBitmap back(4 * kMiB, 512);
  back.Merge(coarse);
  EXPECT_EQ(back.Count(), kMiB);
  DirtyBitmap copy(4 * kMiB, 512);
  EXPECT_TRUE(copy.SetWords(fine.Words()));
  EXPECT_EQ(copy.Count(), 512u);
  EXPECT_FALSE(copy.SetWords({1, 2}));
}

TEST(DirtyBitmapTest, ConcurrentSettersLoseNothing) {
  DirtyBitmap b(64 * kMiB, 4096);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t g = static_cast<uint64_t>(t); g < 16384; g += 4) b.Set(g * 4096, 1);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(b.Count(), 64 * kMiB);
}

// ---------------------------------------------------------------- QEMU's checks

BitmapCatalog Catalog(bool persist = false) {
  BitmapCatalog c;
  BitmapCatalog::Drive d;
  d.size = 8 * kMiB;
  d.can_persist = persist;
  c.AddDrive("drive0", d);
  c.AddDrive("drive1", d);
  return c;
}

BitmapAction Add(const std::string& name, std::optional<uint64_t> g = std::nullopt) {
  BitmapAction a;
  a.kind = BitmapAction::Kind::kAdd;
  a.node = "drive0";
  a.name = name;
  a.granularity = g;
  return a;
}

BitmapAction Op(BitmapAction::Kind k, const std::string& name, const std::string& node = "drive0") {
  BitmapAction a;
  a.kind = k;
  a.node = node;
  a.name = name;
  return a;
}

TEST(BitmapCatalogTest, CommandChecksInQemusOrderWithItsTexts) {
  BitmapCatalog c = Catalog();
  auto expect = [&](const BitmapAction& a, int err, const std::string& text) {
    Status s = c.Apply(a);
    EXPECT_EQ(s.code(), err) << text;
    EXPECT_EQ(s.message(), text);
  };
  expect(Add(""), EINVAL, "Bitmap name cannot be empty");
  BitmapAction bad_node = Add("b0");
  bad_node.node = "nope";
  expect(bad_node, ENODEV, "Cannot find device='nope' nor node-name='nope'");
  expect(Add("b0", 511), EINVAL, "Granularity must be power of 2 and at least 512");
  expect(Add("b0", 3 * 1024), EINVAL, "Granularity must be power of 2 and at least 512");
  BitmapAction persistent = Add("b0");
  persistent.persistent = true;
  expect(persistent, EINVAL,
         "Can't store persistent bitmaps to drive0 (cbwfs was started without --state-dir)");
  expect(Add(std::string(1024, 'x')), EINVAL, "Bitmap name is too long");
  ASSERT_TRUE(c.Apply(Add("b0", 512)).ok());
  EXPECT_EQ(c.Find("drive0", "b0")->granularity, 512u);
  expect(Add("b0"), EBUSY, "Bitmap already exists: b0");
  ASSERT_TRUE(c.Apply(Add("b1")).ok());
  EXPECT_EQ(c.Find("drive0", "b1")->granularity, 64 * kK);  // the default
  expect(Op(BitmapAction::Kind::kClear, "b9"), EINVAL, "Dirty bitmap 'b9' not found");
  expect(Op(BitmapAction::Kind::kRemove, "b0", "nope"), ENODEV, "Node 'nope' not found");
  ASSERT_TRUE(c.Apply(Op(BitmapAction::Kind::kDisable, "b1")).ok());
  EXPECT_FALSE(c.Find("drive0", "b1")->enabled);
  BitmapAction merge = Op(BitmapAction::Kind::kMerge, "b0");
  merge.sources = {{"", "b1"}, {"drive1", "x"}};
  expect(merge, EINVAL, "Dirty bitmap 'x' not found");
  merge.sources = {{"", "b1"}, {"", "nope"}};
  expect(merge, EINVAL, "Dirty bitmap 'nope' not found");
  // Transactions with completion-mode grouped refuse bitmap actions (7.2).
  Status g = c.Apply(Add("b5"), /*grouped=*/true);
  EXPECT_EQ(g.code(), EINVAL);
  EXPECT_EQ(g.message(),
            "Action 'block-dirty-bitmap-add' does not support Transaction property "
            "completion-mode = grouped");
  EXPECT_EQ(c.Find("drive0", "b5"), nullptr);
  // Removing works on anything not busy; the catalog forgets it.
  ASSERT_TRUE(c.Apply(Op(BitmapAction::Kind::kRemove, "b1")).ok());
  EXPECT_EQ(c.Find("drive0", "b1"), nullptr);
}

// do_backup_common's bitmap checks: iotest 257's test_backup_api matrix.
TEST(BitmapCatalogTest, BackupArgumentMatrix) {
  struct Case {
    std::string sync;
    std::optional<std::string> bitmap, mode;
    std::string error;  // "" = accepted
  };
  const std::vector<Case> cases = {
      {"incremental", std::nullopt, std::nullopt,
       "must provide a valid bitmap name for 'incremental' sync mode"},
      {"bitmap", std::nullopt, std::nullopt,
       "must provide a valid bitmap name for 'bitmap' sync mode"},
      {"incremental", "b0", "never",
       "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"},
      {"incremental", "b0", "always",
       "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"},
      {"incremental", "nope", std::nullopt, "Bitmap 'nope' could not be found"},
      {"full", "nope", "on-success", "Bitmap 'nope' could not be found"},
      {"bitmap", "b0", std::nullopt, "Bitmap sync mode must be given when providing a bitmap"},
      {"full", "b0", std::nullopt, "Bitmap sync mode must be given when providing a bitmap"},
      {"none", "b0", "on-success", "sync mode 'none' does not produce meaningful bitmap outputs"},
      {"full", "b0", "never",
       "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'"},
      {"top", "b0", "never",
       "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'top'"},
      {"full", std::nullopt, "always", "Cannot specify bitmap sync mode without a bitmap"},
      {"incremental", "b0", std::nullopt, ""},
      {"incremental", "b0", "on-success", ""},
      {"bitmap", "b0", "never", ""},
      {"bitmap", "b0", "always", ""},
      {"full", "b0", "on-success", ""},
      {"top", "b0", "always", ""},
      {"full", std::nullopt, std::nullopt, ""},
  };
  for (const auto& k : cases) {
    BitmapCatalog c = Catalog();
    ASSERT_TRUE(c.Apply(Add("b0")).ok());
    auto r = c.UseForBackup({"drive0", k.sync, k.bitmap, k.mode});
    if (k.error.empty()) {
      ASSERT_TRUE(r.ok()) << k.sync << ": " << r.status().message();
      EXPECT_EQ(r->has_value(), k.bitmap.has_value());
      if (k.bitmap) {
        EXPECT_TRUE(c.Find("drive0", "b0")->busy);
        // Busy now: a second use, a clear or a remove is refused.
        const std::string busy =
            "Bitmap 'b0' is currently in use by another operation and cannot be used";
        EXPECT_EQ(c.UseForBackup({"drive0", "incremental", "b0", std::nullopt}).status().message(),
                  busy);
        EXPECT_EQ(c.Apply(Op(BitmapAction::Kind::kClear, "b0")).message(), busy);
        EXPECT_EQ(c.Apply(Op(BitmapAction::Kind::kRemove, "b0")).code(), EBUSY);
      }
    } else {
      ASSERT_FALSE(r.ok()) << k.sync;
      EXPECT_EQ(r.status().message(), k.error) << k.sync;
      EXPECT_FALSE(c.Find("drive0", "b0")->busy);
    }
  }
  BitmapCatalog c = Catalog();
  BitmapCatalog::Meta bad;
  bad.inconsistent = true;
  bad.persistent = true;
  c.AddBitmap("drive0", "old", bad);
  EXPECT_EQ(c.UseForBackup({"drive0", "incremental", "old", std::nullopt}).status().message(),
            "Bitmap 'old' is inconsistent and cannot be used");
  EXPECT_EQ(c.Apply(Op(BitmapAction::Kind::kEnable, "old")).message(),
            "Bitmap 'old' is inconsistent and cannot be used");
  EXPECT_TRUE(c.Apply(Op(BitmapAction::Kind::kRemove, "old")).ok());  // only remove works
}

// ---------------------------------------------------------------- through the registry

BackupOptions Incremental(Fixture& f, const std::string& target, const std::string& bitmap,
                          const std::string& mode = "on-success",
                          SyncMode sync = SyncMode::kBitmap) {
  BackupOptions o = f.Opts(target, sync);
  o.mode = TargetMode::kExisting;
  o.format = "raw";
  o.bitmap = bitmap;
  o.bitmap_mode = mode;
  return o;
}

Status Bitmap(Fixture& f, BitmapAction a) { return f.registry->Transaction({{std::nullopt, a}}); }

uint64_t Count(Fixture& f, const std::string& name) {
  for (const auto& b : f.registry->Bitmaps("drive0")) {
    if (b.name == name) return b.count;
  }
  return UINT64_MAX;
}

// A full backup and a new bitmap at one point in time, writes after it, and
// an incremental into the full copy refreshes it to the drive as it is then.
TEST(BitmapJobTest, FullPlusBitmapThenIncrementalRefreshesInPlace) {
  const uint64_t size = 16 * kMiB;
  std::string data = RandomBytes(size, 60);
  Fixture f(size, data);
  ASSERT_TRUE(
      f.registry->Transaction({{std::nullopt, Add("b0")}, {f.Opts("full.img"), std::nullopt}})
          .ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }));
  ASSERT_EQ(f.Info("drive0")->result, JobResult::kSuccess);
  EXPECT_EQ(ReadAll(f.dir / "full.img"), data);
  EXPECT_EQ(Count(f, "b0"), 0u);
  // Changes: two clusters and a punched one.
  std::string w = RandomBytes(5000, 61);
  ASSERT_TRUE(f.drive->Write(w.data(), w.size(), 3 * kMiB + 65536 - 100).ok());
  ASSERT_TRUE(f.drive->PunchHole(9 * kMiB, 64 * kK).ok());
  data.replace(3 * kMiB + 65536 - 100, w.size(), w);
  data.replace(9 * kMiB, 64 * kK, std::string(64 * kK, '\0'));
  EXPECT_EQ(Count(f, "b0"), 3 * 64 * kK);
  ASSERT_TRUE(
      f.registry
          ->StartBackups({Incremental(f, "full.img", "b0", "on-success", SyncMode::kIncremental)})
          .ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }));
  auto info = f.Info("drive0");
  ASSERT_EQ(info->result, JobResult::kSuccess) << info->error.value_or("");
  EXPECT_EQ(info->len, 3 * 64 * kK);  // only the marked clusters are the job's
  EXPECT_EQ(info->offset, info->len);
  EXPECT_TRUE(testing::SameBytes(ReadAll(f.dir / "full.img"), data));
  EXPECT_EQ(Count(f, "b0"), 0u);  // on-success: adopted the (empty) successor
}

// Writes during an incremental go to the successor; the target still equals
// the drive at the point in time, and the view is exact for clusters the
// bitmap does not mark too.
TEST(BitmapJobTest, IncrementalUnderWritesEqualsThePointInTimeAndTheViewIsExact) {
  const uint64_t size = 32 * kMiB;
  std::string data = RandomBytes(size, 62);
  Fixture f(size, data);
  testing::WriteAt(f.dir / "copy.img", data, 0);
  ASSERT_TRUE(Bitmap(f, Add("b0")).ok());
  for (uint64_t at : {uint64_t{1} * kMiB, 7 * kMiB, 20 * kMiB}) {
    std::string w = RandomBytes(200 * kK, at);
    ASSERT_TRUE(f.drive->Write(w.data(), w.size(), at).ok());
    data.replace(at, w.size(), w);
  }
  BackupOptions o = Incremental(f, "copy.img", "b0", "on-success", SyncMode::kIncremental);
  o.speed = 1;  // crawl, so the writes below race the job
  ASSERT_TRUE(f.registry->StartBackups({o}).ok());
  const std::string at_t = data;
  // Overwrite marked and unmarked clusters after the point in time.
  for (uint64_t at : {uint64_t{1} * kMiB + 4096, 12 * kMiB, 28 * kMiB}) {
    std::string w(64 * kK, 'z');
    ASSERT_TRUE(f.drive->Write(w.data(), w.size(), at).ok());
  }
  std::string view(size, 'x');
  auto r = f.registry->ReadSnapshot("drive0", view.data(), view.size(), 0);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(testing::SameBytes(view, at_t));
  ASSERT_TRUE(f.registry->SetSpeed("drive0", 0).ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }));
  ASSERT_EQ(f.Info("drive0")->result, JobResult::kSuccess);
  EXPECT_TRUE(testing::SameBytes(ReadAll(f.dir / "copy.img"), at_t));
  // Only the writes after T remain (1M+4096 spans two clusters).
  EXPECT_EQ(Count(f, "b0"), 4 * 64 * kK);
}

// SPEC 7's table on cancel: on-success merges back, always keeps what was
// not copied plus new writes, never keeps everything.
TEST(BitmapJobTest, ModesOnCancel) {
  for (const std::string mode : {"on-success", "always", "never"}) {
    const uint64_t size = 8 * kMiB;
    Fixture f(size, RandomBytes(size, 63));
    testing::MakeSparse(f.dir / "copy.img", size);
    ASSERT_TRUE(Bitmap(f, Add("b0")).ok());
    std::string w(4 * kMiB, 'w');
    ASSERT_TRUE(f.drive->Write(w.data(), w.size(), 0).ok());  // 64 clusters marked
    BackupOptions o = Incremental(f, "copy.img", "b0", mode);
    o.speed = 64 * kK;  // about a cluster a second
    ASSERT_TRUE(f.registry->StartBackups({o}).ok());
    ASSERT_TRUE(WaitFor([&] { return f.Info("drive0")->offset >= 64 * kK; }));
    std::string w2(64 * kK, 'n');
    ASSERT_TRUE(f.drive->Write(w2.data(), w2.size(), 6 * kMiB).ok());  // a new write
    ASSERT_TRUE(f.registry->Cancel("drive0").ok());
    ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }));
    const uint64_t copied = f.Info("drive0")->offset;
    auto bits = f.registry->BitmapCopy("drive0", "b0");
    ASSERT_TRUE(bits);
    EXPECT_TRUE(bits->Get(6 * kMiB)) << mode;
    if (mode == "always") {
      EXPECT_EQ(bits->Count(), 4 * kMiB - copied + 64 * kK) << mode;
      EXPECT_FALSE(bits->Get(0)) << mode << ": the first cluster was copied";
    } else {
      EXPECT_EQ(bits->Count(), 4 * kMiB + 64 * kK) << mode;
    }
    EXPECT_FALSE(f.registry->Bitmaps("drive0")[0].busy);
  }
}

// A refused incremental leaves the bitmap as it was; the retry is right.
TEST(BitmapJobTest, RefusedThenRetriedGivesACorrectCopy) {
  const uint64_t size = 8 * kMiB;
  std::string data = RandomBytes(size, 64);
  Fixture f(size, data);
  testing::WriteAt(f.dir / "copy.img", data, 0);
  ASSERT_TRUE(Bitmap(f, Add("b0")).ok());
  std::string w = RandomBytes(kMiB, 65);
  ASSERT_TRUE(f.drive->Write(w.data(), w.size(), 2 * kMiB).ok());
  data.replace(2 * kMiB, kMiB, w);
  testing::MakeSparse(f.dir / "small.img", kMiB);
  EXPECT_EQ(f.registry->StartBackups({Incremental(f, "small.img", "b0")}).code(), EINVAL);
  EXPECT_FALSE(f.registry->Bitmaps("drive0")[0].busy);
  EXPECT_EQ(Count(f, "b0"), kMiB);
  ASSERT_TRUE(f.registry->StartBackups({Incremental(f, "copy.img", "b0")}).ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }));
  ASSERT_EQ(f.Info("drive0")->result, JobResult::kSuccess);
  EXPECT_TRUE(testing::SameBytes(ReadAll(f.dir / "copy.img"), data));
}

// ---------------------------------------------------------------- persistence

struct NullCodec : JobRecordCodec {
  std::string_view FileSuffix() const override { return ".rec"; }
  std::string Encode(const JobInfo& i) const override { return i.id + "\n"; }
  Result<JobInfo> Decode(std::string_view) const override {
    return Status::Error(EINVAL, "not kept in these tests");
  }
};

struct Persisted {
  explicit Persisted(uint64_t size) {
    source = dir / "src.img";
    testing::MakeSparse(source, size);
    Open();
  }
  void Open() {
    auto d = Drive::Open({"drive0", source, false});
    if (!d.ok()) std::abort();
    drive = std::move(*d);
    RegistryOptions o;
    o.base_dir = dir.path();
    o.state_dir = dir / "state";
    o.record_codec = std::make_shared<NullCodec>();
    o.bitmap_region_size = 1 * kMiB;
    auto r = JobRegistry::Open({drive.get()}, &bus, o);
    if (!r.ok()) std::abort();
    registry = std::move(*r);
  }
  // A clean stop: jobs end, the drive is flushed, bitmaps saved clean.
  void CleanStop() {
    registry->Shutdown();
    (void)drive->Flush(false);
    registry->SaveBitmapsAtStop();
    registry.reset();
    drive.reset();
  }
  // As after kill -9: nothing more is saved (the registry's destructor only
  // cancels jobs; the journal keeps its lease).
  void Crash() {
    registry.reset();
    drive.reset();
  }
  std::optional<BitmapInfo> Info(const std::string& name) {
    for (const auto& b : registry->Bitmaps("drive0")) {
      if (b.name == name) return b;
    }
    return std::nullopt;
  }
  Status Run(BitmapAction a) { return registry->Transaction({{std::nullopt, a}}); }
  testing::TempDir dir;
  std::string source;
  EventBus bus;
  std::unique_ptr<Drive> drive;
  std::unique_ptr<JobRegistry> registry;
};

BitmapAction PersistentAdd(const std::string& name) {
  BitmapAction a = Add(name, 64 * kK);
  a.persistent = true;
  return a;
}

TEST(PersistentBitmapTest, BitsComeBackAfterACleanStop) {
  Persisted p(16 * kMiB);
  ASSERT_TRUE(p.Run(PersistentAdd("b0")).ok());
  ASSERT_TRUE(p.Run(Add("mem")).ok());
  std::string w(100, 'a');
  ASSERT_TRUE(p.drive->Write(w.data(), w.size(), 5 * kMiB).ok());
  auto before = p.registry->BitmapCopy("drive0", "b0")->Words();
  p.CleanStop();
  p.Open();
  auto b0 = p.Info("b0");
  ASSERT_TRUE(b0);
  EXPECT_TRUE(b0->persistent);
  EXPECT_FALSE(b0->inconsistent);
  EXPECT_EQ(b0->count, 64 * kK);
  EXPECT_EQ(p.registry->BitmapCopy("drive0", "b0")->Words(), before);
  EXPECT_FALSE(p.Info("mem"));  // not persistent: gone
}

// After an unclean stop the bitmap is a superset: the saved bits plus every
// journal region written since the last save, never less.
TEST(PersistentBitmapTest, AfterACrashTheBitmapIsASupersetOfTheChanges) {
  Persisted p(16 * kMiB);
  ASSERT_TRUE(p.Run(PersistentAdd("b0")).ok());
  std::string w(100, 'a');
  // Written after the last save (the add): only the journal knows.
  ASSERT_TRUE(p.drive->Write(w.data(), w.size(), 5 * kMiB + 70000).ok());
  ASSERT_TRUE(p.drive->Write(w.data(), w.size(), 11 * kMiB).ok());
  p.Crash();
  p.Open();
  auto bits = p.registry->BitmapCopy("drive0", "b0");
  ASSERT_TRUE(bits);
  EXPECT_FALSE(p.Info("b0")->inconsistent);
  EXPECT_TRUE(bits->Get(5 * kMiB + 70000));
  EXPECT_TRUE(bits->Get(11 * kMiB));
  // Whole 1 MiB journal regions: a superset, and not the whole drive.
  EXPECT_EQ(bits->Count(), 2 * kMiB);
  // The recovered state is saved at once: a second crash keeps it.
  p.Crash();
  p.Open();
  EXPECT_EQ(p.registry->BitmapCopy("drive0", "b0")->Count(), 2 * kMiB);
}

TEST(PersistentBitmapTest, ASourceChangedWhileStoppedMakesItInconsistent) {
  Persisted p(8 * kMiB);
  ASSERT_TRUE(p.Run(PersistentAdd("b0")).ok());
  p.CleanStop();
  // Someone writes the image directly while cbwfs is not running.
  testing::WriteAt(p.source, "foreign", 4096);
  p.Open();
  auto b0 = p.Info("b0");
  ASSERT_TRUE(b0);
  EXPECT_TRUE(b0->inconsistent);
  EXPECT_FALSE(b0->recording);
  // Refused for backups and changes; removable.
  BackupOptions o;
  o.device = "drive0";
  o.target = "x.img";
  o.sync = SyncMode::kIncremental;
  o.bitmap = "b0";
  EXPECT_EQ(p.registry->StartBackups({o}).message(),
            "Bitmap 'b0' is inconsistent and cannot be used");
  EXPECT_EQ(p.Run(Op(BitmapAction::Kind::kClear, "b0")).message(),
            "Bitmap 'b0' is inconsistent and cannot be used");
  ASSERT_TRUE(p.Run(Op(BitmapAction::Kind::kRemove, "b0")).ok());
  EXPECT_FALSE(p.Info("b0"));
  p.CleanStop();
  p.Open();
  EXPECT_FALSE(p.Info("b0"));  // its file went too
}

TEST(PersistentBitmapTest, CorruptOrMissingRecordsMakeItInconsistent) {
  for (const std::string damage : {"journal", "bitmap", "header", "granularity"}) {
    Persisted p(8 * kMiB);
    ASSERT_TRUE(p.Run(PersistentAdd("b0")).ok());
    p.CleanStop();
    const std::string dir = p.dir / "state/bitmaps/drive0";
    if (damage == "journal") {
      ASSERT_EQ(unlink((dir + "/journal").c_str()), 0);
    } else {
      std::string file = dir + "/" + BitmapStore::FileName("b0");
      std::string bytes = ReadAll(file);
      ASSERT_GT(bytes.size(), 20u);
      if (damage == "bitmap") bytes[bytes.size() - 10] ^= 0x55;
      if (damage == "header") bytes[1] ^= 0x55;        // the magic: nothing in it can be read
      if (damage == "granularity") bytes[16] ^= 0x55;  // 65536 -> not a power of two
      testing::WriteAt(file, bytes, 0);
    }
    p.Open();
    auto b0 = p.Info("b0");
    ASSERT_TRUE(b0) << damage;
    EXPECT_TRUE(b0->inconsistent) << damage;
    EXPECT_EQ(b0->granularity, 65536u) << damage;
    // Only remove works, and it removes the damaged file too.
    ASSERT_TRUE(p.Run(Op(BitmapAction::Kind::kRemove, "b0")).ok()) << damage;
    p.CleanStop();
    p.Open();
    EXPECT_FALSE(p.Info("b0")) << damage;
  }
}

// A damaged header whose bitmap's name the file name cannot give back (a
// long name) is left alone and logged: the bitmap is not shown.
TEST(PersistentBitmapTest, ADamagedFileOfALongNameIsSkipped) {
  const std::string name(50, 'n');
  Persisted p(8 * kMiB);
  ASSERT_TRUE(p.Run(PersistentAdd(name)).ok());
  p.CleanStop();
  const std::string file = p.dir / "state/bitmaps/drive0" + "/" + BitmapStore::FileName(name);
  std::string bytes = ReadAll(file);
  bytes[0] ^= 0x55;
  testing::WriteAt(file, bytes, 0);
  p.Open();
  EXPECT_FALSE(p.Info(name));
  EXPECT_EQ(BitmapStore::NameFromFileName(BitmapStore::FileName(name)), std::nullopt);
  EXPECT_EQ(BitmapStore::NameFromFileName(BitmapStore::FileName("b0")), "b0");
  EXPECT_EQ(BitmapStore::NameFromFileName(BitmapStore::FileName("a/b")), std::nullopt);
}

// The first write into a region since the last save waits for the journal
// (on the drive's slow path); later writes there do not.
TEST(PersistentBitmapTest, TheFirstWriteIntoARegionIsJournalledBeforeItLands) {
  Persisted p(8 * kMiB);
  ASSERT_TRUE(p.Run(PersistentAdd("b0")).ok());
  const std::string journal = p.dir / "state/bitmaps/drive0/journal";
  auto region_bit = [&](uint64_t r) {
    std::string j = ReadAll(journal);
    size_t byte = BitmapStore::kJournalHeaderBytes + r / 8;
    return byte < j.size() && ((static_cast<unsigned char>(j[byte]) >> (r % 8)) & 1);
  };
  EXPECT_FALSE(region_bit(3));
  std::string w(10, 'q');
  ASSERT_TRUE(p.drive->Write(w.data(), w.size(), 3 * kMiB + 5).ok());
  EXPECT_TRUE(region_bit(3));  // on disk before the write returned
  EXPECT_FALSE(region_bit(4));
}

}  // namespace
}  // namespace cbw::backup
