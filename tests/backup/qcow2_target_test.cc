// qcow2 targets: created with qemu-img, written through a qemu-nbd child,
// probed by magic, backing chains read through and checked, qemu-nbd
// stopped cleanly (and a failed stop failing the target). Images are read
// back with qemu-img convert / compare.

#include "backup/qcow2_target.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <thread>

#include "backup/target_path.h"
#include "tests/backup/nbd_test_util.h"
#include "tests/backup/test_util.h"
#include "tests/lib/nbd_server.h"

namespace cbw::backup {
namespace {

using cbw::test::NbdServer;
using testing::NbdJobFixture;
using testing::ProcessesWith;
using testing::RandomBytes;
using testing::ReadAll;
using testing::SameBytes;
using testing::WaitFor;

constexpr uint64_t kMiB = 1024 * 1024;

// Runs a QEMU tool; its output goes to the test log when it fails.
int Sh(const std::vector<std::string>& argv) {
  char tmpl[] = "/tmp/cbw-qemu-tool-XXXXXX";
  int fd = mkstemp(tmpl);
  if (fd >= 0) close(fd);
  int r = NbdServer::Run(argv, tmpl);
  if (r != 0) {
    std::string cmd;
    for (const auto& a : argv) cmd += a + " ";
    fprintf(stderr, "%s-> %d: %s\n", cmd.c_str(), r, ReadAll(tmpl).c_str());
  }
  unlink(tmpl);
  return r;
}

// The image converted to raw.
std::string AsRaw(const std::string& dir, const std::string& image,
                  const std::string& format = "qcow2") {
  const std::string out = dir + "/converted.raw";
  if (Sh({"qemu-img", "convert", "-f", format, "-O", "raw", image, out}) != 0) return "";
  std::string data = ReadAll(out);
  unlink(out.c_str());
  return data;
}

bool Exists(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0;
}

bool IsQcow2(const std::string& path) {
  std::string head = ReadAll(path).substr(0, 4);
  return head == std::string("QFI\xfb", 4);
}

TEST(Qcow2JobTest, FormatQcow2CreatesTheImageWithQemuImg) {
  NbdJobFixture f(8 * kMiB);
  f.image.replace(2 * kMiB, 3 * kMiB, 3 * kMiB, '\0');  // zeros stay unallocated
  testing::WriteAt(f.source, f.image, 0);
  BackupOptions o = f.Opts("t.qcow2");
  o.mode = TargetMode::kAbsolutePaths;
  o.format = "qcow2";
  ASSERT_TRUE(f.registry->StartBackups({o}).ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }, 30));
  JobInfo i = f.Info("drive0");
  EXPECT_EQ(i.result, JobResult::kSuccess) << i.error.value_or("");
  EXPECT_GE(i.skipped_bytes, 3 * kMiB);
  const std::string t = f.dir / "t.qcow2";
  EXPECT_TRUE(IsQcow2(t));
  EXPECT_TRUE(SameBytes(AsRaw(f.dir.path(), t), f.image));
  // (The source itself is locked by the drive: compare with a copy.)
  testing::WriteAt(f.dir / "copy.raw", f.image, 0);
  EXPECT_EQ(Sh({"qemu-img", "compare", "-f", "raw", "-F", "qcow2", f.dir / "copy.raw", t}), 0);
  EXPECT_EQ(Sh({"qemu-img", "check", "-q", t}), 0) << "qemu-nbd left the image consistent";
  EXPECT_TRUE(ProcessesWith({"qemu-nbd", t}).empty()) << "qemu-nbd stopped before the end";
}

TEST(Qcow2JobTest, ExistingQcow2IsProbedAndItsOldDataOverwritten) {
  NbdJobFixture f(4 * kMiB);
  f.image.replace(kMiB, kMiB, kMiB, '\0');
  testing::WriteAt(f.source, f.image, 0);
  const std::string t = f.dir / "old.qcow2";
  ASSERT_EQ(Sh({"qemu-img", "create", "-q", "-f", "qcow2", t, "8M"}), 0);
  ASSERT_EQ(Sh({"qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 8M", t}), 0);
  ASSERT_TRUE(f.registry->StartBackups({f.Opts(t)}).ok());  // existing, no format
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }, 30));
  EXPECT_EQ(f.Info("drive0").result, JobResult::kSuccess) << f.Info("drive0").error.value_or("");
  std::string raw = AsRaw(f.dir.path(), t);
  ASSERT_EQ(raw.size(), 8 * kMiB) << "the image keeps its size";
  EXPECT_TRUE(SameBytes(raw.substr(0, f.image.size()), f.image)) << "zeros written, not skipped";
  EXPECT_EQ(raw.substr(4 * kMiB), std::string(4 * kMiB, '\x55')) << "past the drive: untouched";
}

TEST(Qcow2JobTest, OverlayOnAPreviousBackupReadsThroughItsBacking) {
  NbdJobFixture f(4 * kMiB);
  // A full raw backup at T0.
  BackupOptions full = f.Opts("full.img");
  full.mode = TargetMode::kAbsolutePaths;
  ASSERT_TRUE(f.registry->StartBackups({full}).ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }, 30));
  ASSERT_EQ(f.Info("drive0").result, JobResult::kSuccess);
  const std::string t0 = f.image;
  // The drive changes (data, and zeros over old data); the overlay of the
  // next backup takes only what the job writes.
  std::string d = RandomBytes(kMiB, 3);
  ASSERT_TRUE(f.drive->Write(d.data(), d.size(), kMiB).ok());
  f.image.replace(kMiB, d.size(), d);
  std::string z(512 * 1024, '\0');
  ASSERT_TRUE(f.drive->Write(z.data(), z.size(), 3 * kMiB).ok());
  f.image.replace(3 * kMiB, z.size(), z);
  const std::string inc = f.dir / "inc.qcow2";
  ASSERT_EQ(Sh({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "full.img", "-F", "raw", inc}), 0);
  // sync=none: only clusters overwritten during the job land in the
  // overlay; everything else reads through to full.img.
  BackupOptions none = f.Opts(inc);
  none.sync = SyncMode::kNone;
  ASSERT_TRUE(f.registry->StartBackups({none}).ok());
  std::string w = RandomBytes(65536, 4);
  const std::string before_w = f.image.substr(0, 65536);
  ASSERT_TRUE(f.drive->Write(w.data(), w.size(), 0).ok());  // CBW: T1's cluster 0
  // The view reads the point in time through the qcow2 target.
  std::string view(4 * kMiB, 'x');
  ASSERT_TRUE(f.registry->ReadSnapshot("drive0", view.data(), view.size(), 0).ok());
  EXPECT_TRUE(SameBytes(view, f.image));
  ASSERT_TRUE(f.registry->Cancel("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }, 30));
  std::string want = t0;
  want.replace(0, 65536, before_w);
  EXPECT_TRUE(SameBytes(AsRaw(f.dir.path(), inc), want));
  // sync=full onto a fresh overlay: every cluster written (zeros as zeros,
  // not read through), the chain reads as the drive.
  f.image.replace(0, w.size(), w);
  const std::string inc2 = f.dir / "inc2.qcow2";
  ASSERT_EQ(Sh({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "full.img", "-F", "raw", inc2}),
            0);
  ASSERT_TRUE(f.registry->StartBackups({f.Opts(inc2)}).ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }, 30));
  EXPECT_EQ(f.Info("drive0").result, JobResult::kSuccess) << f.Info("drive0").error.value_or("");
  EXPECT_TRUE(SameBytes(AsRaw(f.dir.path(), inc2), f.image));
  testing::WriteAt(f.dir / "copy.raw", f.image, 0);
  EXPECT_EQ(Sh({"qemu-img", "compare", "-f", "raw", "-F", "qcow2", f.dir / "copy.raw", inc2}), 0);
  EXPECT_EQ(Sh({"qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", f.dir / "full.img", inc2}),
            1)
      << "differs from the previous backup";
}

TEST(Qcow2JobTest, RefusesUnsafeOrBrokenImagesBeforeWriting) {
  NbdJobFixture f(2 * kMiB);
  auto refused = [&](const std::string& target, int err, const std::string& msg,
                     std::optional<std::string> format = std::nullopt) {
    BackupOptions o = f.Opts(target);
    o.format = format;
    Status s = f.registry->StartBackups({o});
    EXPECT_EQ(s.code(), err) << target << ": " << s.message();
    if (!msg.empty()) {
      EXPECT_EQ(s.message(), msg) << target;
    }
  };
  // A backing file that is a drive's source, directly or further down.
  const std::string a = f.dir / "a.qcow2", b = f.dir / "b.qcow2";
  ASSERT_EQ(Sh({"qemu-img", "create", "-q", "-f", "qcow2", "-b", f.source, "-F", "raw", a}), 0);
  refused(a, EINVAL,
          "Target '" + a + "' has backing file '" + f.source +
              "', which is the source of drive 'drive0'");
  ASSERT_EQ(Sh({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b}), 0);
  refused(b, EINVAL,
          "Target '" + b + "' has backing file '" + f.source +
              "', which is the source of drive 'drive0'");
  // A backing file under the mount is never looked up (-u: qemu-img does
  // not open it either).
  NbdJobFixture m(2 * kMiB);
  RegistryOptions ro;
  ro.base_dir = m.dir.path();
  ro.mountpoint = "/nonexistent-mnt";
  JobRegistry reg({m.drive.get()}, &m.bus, ro);
  const std::string c = m.dir / "c.qcow2";
  ASSERT_EQ(Sh({"qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/nonexistent-mnt/drive0",
                "-F", "raw", c, "2M"}),
            0);
  Status s = reg.StartBackups({m.Opts(c)});
  EXPECT_EQ(s.code(), EINVAL);
  EXPECT_EQ(s.message(), "Target '" + c +
                             "' has backing file '/nonexistent-mnt/drive0' under the mountpoint "
                             "'/nonexistent-mnt'");
  // Names QEMU would treat as protocols or JSON.
  const std::string j = f.dir / "j.qcow2";
  ASSERT_EQ(Sh({"qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "nbd://127.0.0.1:1/", "-F",
                "raw", j, "2M"}),
            0);
  refused(j, EINVAL,
          "Target '" + j +
              "': backing file 'nbd://127.0.0.1:1/' (not a local file) is not "
              "supported");
  // Too small, not qcow2 at all, missing.
  const std::string small = f.dir / "small.qcow2";
  ASSERT_EQ(Sh({"qemu-img", "create", "-q", "-f", "qcow2", small, "1M"}), 0);
  refused(small, EINVAL,
          "Target '" + small + "' is smaller than the drive (1048576 < 2097152 bytes)");
  testing::MakeSparse(f.dir / "plain.img", 2 * kMiB);
  refused(f.dir / "plain.img", EINVAL, "Image is not in qcow2 format", "qcow2");
  refused(f.dir / "missing.qcow2", ENOENT,
          "Could not open '" + (f.dir / "missing.qcow2") + "': No such file or directory", "qcow2");
  // Another image format, probed: still never overwritten.
  const std::string v = f.dir / "v.vdi";
  ASSERT_EQ(Sh({"qemu-img", "create", "-q", "-f", "vdi", v, "4M"}), 0);
  refused(v, EINVAL, "");
  // A qcow2 image another process holds open (QEMU's image locking).
  const std::string held = f.dir / "held.qcow2";
  ASSERT_EQ(Sh({"qemu-img", "create", "-q", "-f", "qcow2", held, "2M"}), 0);
  {
    auto server = NbdServer::QemuNbd(f.dir.path(), held, "qcow2");
    ASSERT_TRUE(server);
    BackupOptions o = f.Opts(held);
    Status st = f.registry->StartBackups({o});
    EXPECT_EQ(st.code(), EBUSY) << st.message();
    EXPECT_NE(st.message().find("lock"), std::string::npos) << st.message();
  }
  EXPECT_FALSE(f.registry->GetJobFile("drive0")) << "nothing started";
}

// ---------------------------------------------------------------- the target

TargetRequest CreateRequest(const std::string& dir, const std::string& name, uint64_t size) {
  TargetRequest r;
  r.spec = dir + "/" + name;
  r.base_dir = dir;
  r.mountpoint = "/nonexistent-mnt";
  r.mode = TargetMode::kAbsolutePaths;
  r.format = "qcow2";
  r.size = size;
  return r;
}

std::shared_ptr<Qcow2Target> OpenQcow2(const TargetRequest& r) {
  auto where = ResolvePath(r.spec, r.base_dir, r.mountpoint, 0);
  if (!where.ok()) return nullptr;
  auto t = Qcow2Target::Open(r, std::move(*where), {});
  if (!t.ok()) {
    ADD_FAILURE() << t.status().message();
    return nullptr;
  }
  return *t;
}

TEST(Qcow2TargetTest, QemuNbdStopsCleanlyAndLeavesNothingBehind) {
  testing::TempDir dir;
  auto t = OpenQcow2(CreateRequest(dir.path(), "t.qcow2", 4 * kMiB));
  ASSERT_TRUE(t);
  EXPECT_TRUE(t->zeroed());
  EXPECT_EQ(t->qemu_nbd_pid(), -1) << "nothing runs before Prepare";
  ASSERT_TRUE(t->Prepare().ok());
  const pid_t pid = t->qemu_nbd_pid();
  ASSERT_GT(pid, 0);
  EXPECT_EQ(ProcessesWith({"qemu-nbd", dir / "t.qcow2"}), std::vector<pid_t>{pid});
  std::string d = RandomBytes(kMiB + 3, 5);
  ASSERT_TRUE(t->Write(d.data(), d.size(), 12345).ok());
  ASSERT_TRUE(t->Flush().ok());
  std::string back(d.size(), 'x');
  ASSERT_TRUE(t->Read(back.data(), back.size(), 12345).ok());
  EXPECT_TRUE(back == d);
  ASSERT_TRUE(t->Close().ok());
  EXPECT_EQ(kill(pid, 0), -1) << "qemu-nbd exited (and was reaped)";
  std::string raw = AsRaw(dir.path(), dir / "t.qcow2");
  ASSERT_EQ(raw.size(), 4 * kMiB);
  EXPECT_TRUE(raw.substr(12345, d.size()) == d);
  EXPECT_FALSE(t->Write(d.data(), 512, 0).ok()) << "closed";
}

TEST(Qcow2TargetTest, QemuNbdThatDiesFailsClose) {
  testing::TempDir dir;
  auto t = OpenQcow2(CreateRequest(dir.path(), "t.qcow2", 4 * kMiB));
  ASSERT_TRUE(t);
  ASSERT_TRUE(t->Prepare().ok());
  std::string d = RandomBytes(kMiB, 6);
  ASSERT_TRUE(t->Write(d.data(), d.size(), 0).ok());
  kill(t->qemu_nbd_pid(), SIGKILL);
  Status s = t->Close();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("qemu-nbd was killed by signal"), std::string::npos) << s.message();
}

TEST(Qcow2TargetTest, DiscardRemovesWhatOpenAndPrepareMade) {
  testing::TempDir dir;
  auto t = OpenQcow2(CreateRequest(dir.path(), "t.qcow2", 4 * kMiB));
  ASSERT_TRUE(t);
  EXPECT_TRUE(Exists(dir / "t.qcow2")) << "the inode is held from Open";
  ASSERT_TRUE(t->Prepare().ok());
  const pid_t pid = t->qemu_nbd_pid();
  t->Discard();
  EXPECT_FALSE(Exists(dir / "t.qcow2"));
  EXPECT_EQ(kill(pid, 0), -1);
  // A refused transaction: the first target's file goes too.
  NbdJobFixture f(2 * kMiB);
  testing::MakeSparse(f.dir / "small.img", kMiB);
  BackupOptions a = f.Opts("new.qcow2");
  a.mode = TargetMode::kAbsolutePaths;
  a.format = "qcow2";
  BackupOptions b = f.Opts("small.img");
  b.job_id = "b";
  EXPECT_EQ(f.registry->StartBackups({a, b}).code(), EINVAL);
  EXPECT_FALSE(Exists(f.dir / "new.qcow2"));
}

}  // namespace
}  // namespace cbw::backup
