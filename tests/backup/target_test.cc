// Targets: opening, refusals, path resolution that never enters the mount, the file target.

#include "backup/target.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/fs.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>

#include "backup/rate_limiter.h"
#include "backup/target_path.h"
#include "tests/backup/test_util.h"

namespace cbw::backup {
namespace {

using testing::EventRecorder;
using testing::Fixture;
using testing::RandomBytes;
using testing::ReadAll;
using testing::WaitFor;

constexpr uint64_t kMiB = 1024 * 1024;

TEST(TargetTest, Refusals) {
  Fixture f(kMiB, RandomBytes(kMiB, 24), 65536, "/nonexistent-mnt");
  auto o = f.Opts("");
  auto expect = [&](const std::string& target, TargetMode mode, int err, const std::string& msg) {
    o.target = target;
    o.mode = mode;
    Status s = f.registry->StartBackups({o});
    EXPECT_EQ(s.code(), err) << target << ": " << s.message();
    if (!msg.empty()) {
      EXPECT_EQ(s.message(), msg) << target;
    }
  };
  expect(f.source, TargetMode::kAbsolutePaths, EINVAL,
         "Target '" + f.source + "' is the source of drive 'drive0'");
  ASSERT_EQ(symlink(f.source.c_str(), (f.dir / "link").c_str()), 0);
  expect("link", TargetMode::kExisting, EINVAL, "Target 'link' is the source of drive 'drive0'");
  expect("/nonexistent-mnt/x", TargetMode::kAbsolutePaths, EINVAL,
         "Target '/nonexistent-mnt/x' is under the mountpoint '/nonexistent-mnt'");
  expect("/nonexistent-mnt", TargetMode::kAbsolutePaths, EINVAL, "");
  ASSERT_EQ(symlink("/nonexistent-mnt/y", (f.dir / "mlink").c_str()), 0);
  expect("mlink", TargetMode::kAbsolutePaths, EINVAL, "");
  expect("missing.img", TargetMode::kExisting, ENOENT,
         "Could not open 'missing.img': No such file or directory");
  ASSERT_EQ(mkdir((f.dir / "adir").c_str(), 0755), 0);
  expect("adir", TargetMode::kAbsolutePaths, EINVAL,
         "Target 'adir' is not a regular file or block device");
  expect("adir/", TargetMode::kAbsolutePaths, EINVAL, "");
  ASSERT_EQ(mkfifo((f.dir / "fifo").c_str(), 0644), 0);
  expect("fifo", TargetMode::kAbsolutePaths, EINVAL, "");
  testing::MakeSparse(f.dir / "small.img", kMiB - 1);
  expect("small.img", TargetMode::kExisting, EINVAL, "");
  // Foreign image formats are never overwritten as raw.
  struct Magic {
    const char* name;
    std::string bytes;
    uint64_t at;
  };
  std::vector<Magic> magics = {
      {"qcow2", std::string("QFI\xfb", 4), 0}, {"vmdk", "KDMV", 0},
      {"vmdk", "# Disk DescriptorFile", 0},    {"vhdx", "vhdxfile", 0},
      {"qed", std::string("QED\0", 4), 0},     {"vdi", std::string("\x7f\x10\xda\xbe", 4), 0x40}};
  for (const auto& m : magics) {
    std::string p = f.dir / (std::string("img.") + m.name);
    testing::MakeSparse(p, 2 * kMiB);
    testing::WriteAt(p, m.bytes, m.at);
    // A qcow2 image is written as qcow2 (qcow2_target_test); this one has
    // only the magic, so it is refused as a broken qcow2, never as raw.
    expect(p, TargetMode::kExisting, EINVAL,
           std::string(m.name) == "qcow2"
               ? "Image is not in qcow2 format"
               : "Target '" + p + "' is a " + m.name +
                     " image; refusing to overwrite it as raw (give format 'raw' to force)");
    EXPECT_EQ(ReadAll(p).substr(m.at, m.bytes.size()), m.bytes);
  }
  // Permission errors keep their errno (as a non-root user only).
  if (geteuid() != 0) {
    ASSERT_EQ(chmod(f.dir.path().c_str(), 0555), 0);
    expect("new.img", TargetMode::kAbsolutePaths, EACCES, "");
    chmod(f.dir.path().c_str(), 0755);
  }
  // Busy: another live job's target (also through a symlink).
  o.target = "busy.img";
  o.mode = TargetMode::kAbsolutePaths;
  o.sync = SyncMode::kNone;
  o.job_id = "first";
  ASSERT_TRUE(f.registry->StartBackups({o}).ok());
  o.job_id = "second";
  Status s = f.registry->StartBackups({o});
  EXPECT_EQ(s.code(), EBUSY);
  EXPECT_EQ(s.message(), "Target 'busy.img' is in use by job 'first'");
  ASSERT_EQ(symlink((f.dir / "busy.img").c_str(), (f.dir / "blink").c_str()), 0);
  o.target = "blink";
  EXPECT_EQ(f.registry->StartBackups({o}).code(), EBUSY);
}

TEST(TargetTest, ExistingTargetWithFormatRawIsOverwrittenAndStaleDataPunched) {
  std::string data = RandomBytes(4 * kMiB, 25);
  data.replace(kMiB, 2 * kMiB, std::string(2 * kMiB, '\0'));
  Fixture f(4 * kMiB, data);
  std::string p = f.dir / "q.img";
  testing::WriteAt(p, std::string("QFI\xfb", 4) + RandomBytes(6 * kMiB, 26), 0);
  auto o = f.Opts(p);
  o.mode = TargetMode::kExisting;
  o.format = "raw";
  ASSERT_TRUE(f.registry->StartBackups({o}).ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }));
  EXPECT_EQ(f.Info("drive0")->result, JobResult::kSuccess);
  std::string got = ReadAll(p);
  ASSERT_EQ(got.size(), 6 * kMiB + 4);  // existing targets keep their size
  EXPECT_TRUE(testing::SameBytes(got.substr(0, 4 * kMiB), data));
}

TEST(TargetTest, AbsolutePathsTruncatesExistingFile) {
  std::string data = RandomBytes(2 * kMiB, 27);
  Fixture f(2 * kMiB, data);
  testing::WriteAt(f.dir / "t.img", RandomBytes(5 * kMiB, 28), 0);
  ASSERT_TRUE(f.registry->StartBackups({f.Opts("t.img")}).ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }));
  EXPECT_TRUE(testing::SameBytes(ReadAll(f.dir / "t.img"), data));
}

TEST(TargetTest, ProbeImageFormat) {
  unsigned char buf[512] = {};
  EXPECT_FALSE(ProbeImageFormat(buf, sizeof(buf)).has_value());
  std::memcpy(buf, "QFI\xfb", 4);
  EXPECT_EQ(ProbeImageFormat(buf, sizeof(buf)), "qcow2");
}

TEST(TargetPathTest, FollowsSymlinksByHandAndKeepsTheFinalName) {
  testing::TempDir dir;
  ASSERT_EQ(mkdir((dir / "a").c_str(), 0755), 0);
  ASSERT_EQ(mkdir((dir / "b").c_str(), 0755), 0);
  testing::MakeSparse(dir / "b/file.img", 4096);
  ASSERT_EQ(symlink("../b", (dir / "a/up").c_str()), 0);
  ASSERT_EQ(symlink((dir / "a/up/file.img").c_str(), (dir / "abs").c_str()), 0);
  auto r = ResolvePath("abs", dir.path(), "/nonexistent-mnt", 0);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_TRUE(r->exists);
  EXPECT_EQ(r->name, "file.img");
  EXPECT_EQ(r->path, dir / "b/file.img");
  EXPECT_TRUE(S_ISREG(r->st.st_mode));
  // A missing last component is fine (it may be created); a missing
  // directory is not.
  r = ResolvePath("a/./../b/new.img", dir.path(), "", 0);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->exists);
  EXPECT_EQ(r->path, dir / "b/new.img");
  EXPECT_EQ(ResolvePath("nodir/x", dir.path(), "", 0).status().code(), ENOENT);
  EXPECT_EQ(ResolvePath("b/file.img/x", dir.path(), "", 0).status().code(), ENOTDIR);
  ASSERT_EQ(symlink("loop", (dir / "loop").c_str()), 0);
  EXPECT_EQ(ResolvePath("loop", dir.path(), "", 0).status().code(), ELOOP);
}

// Refusals by path (literal, or reached through symlinks and "..") and by
// the mount's device number.
TEST(TargetPathTest, RefusesTheMountByPathAndByDevice) {
  testing::TempDir dir;
  const std::string mnt = dir / "mnt";
  ASSERT_EQ(mkdir(mnt.c_str(), 0755), 0);
  ASSERT_EQ(symlink(mnt.c_str(), (dir / "to-mnt").c_str()), 0);
  ASSERT_EQ(symlink((mnt + "/jobs").c_str(), (dir / "to-jobs").c_str()), 0);
  for (const std::string& p : {mnt + "/x.img", mnt, dir / "to-mnt/jobs/nope/x.img",
                               dir / "to-jobs/x.img", dir / "mnt/../x.img"}) {
    auto r = ResolvePath(p, "", mnt, 0);
    ASSERT_FALSE(r.ok()) << p;
    EXPECT_EQ(r.status().code(), EINVAL) << p;
    EXPECT_EQ(r.status().message(), "Target '" + p + "' is under the mountpoint '" + mnt + "'");
  }
  // By device: a directory on the mount's device is never entered.
  struct stat st {};
  ASSERT_EQ(stat(dir.path().c_str(), &st), 0);
  auto r = ResolvePath(dir / "other/x.img", "", "/nonexistent-mnt", st.st_dev);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), EINVAL);
}

}  // namespace
}  // namespace cbw::backup
