// Backups to every target kind beyond a local raw file, through the real
// mount (SPEC 6): NBD exports of nbdkit (Unix socket and TCP) and of a
// qemu-nbd serving raw and qcow2 files, and qcow2 images cbwfs writes
// through its own qemu-nbd (freshly created, and an overlay whose backing
// file is a previous backup). Each kind passes the point-in-time oracle of
// files under concurrent writers with a speed limit and a pause/resume, a
// two-drive transaction, the snapshot view and cancel. Plus dead servers,
// refusals through the control file and a killed daemon's qemu-nbd.

#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tests/fs/mount_fixture.h"
#include "tests/fs/shell_helpers.h"
#include "tests/lib/nbd_server.h"
#include "tests/lib/pit_oracle.h"

namespace cbw::test {
namespace {

constexpr uint64_t kMiB = 1024 * 1024;
constexpr uint64_t kSize = 8 * kMiB;

// A /proc file ("" if the process is gone).
std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Live (not zombie) processes whose command line holds every needle.
std::vector<pid_t> ProcessesWith(const std::vector<std::string>& needles) {
  std::vector<pid_t> out;
  DIR* d = opendir("/proc");
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    long pid = std::strtol(e->d_name, &end, 10);
    if (pid <= 0 || *end != '\0') continue;
    std::string cmd = Slurp(std::string("/proc/") + e->d_name + "/cmdline");
    for (char& ch : cmd) {
      if (ch == '\0') ch = ' ';
    }
    bool all = !cmd.empty();
    for (const auto& n : needles) all = all && cmd.find(n) != std::string::npos;
    if (!all) continue;
    std::string st = Slurp(std::string("/proc/") + e->d_name + "/stat");
    size_t paren = st.rfind(')');
    if (paren != std::string::npos && paren + 2 < st.size() && st[paren + 2] == 'Z') continue;
    out.push_back(static_cast<pid_t>(pid));
  }
  closedir(d);
  return out;
}

// The image `path` in `format`, converted to raw by qemu-img.
std::string ConvertToRaw(const std::string& path, const std::string& format,
                         const std::string& scratch) {
  const std::string out = scratch + "/converted.raw";
  CommandResult r = RunCommand({"qemu-img", "convert", "-f", format, "-O", "raw", path, out});
  if (r.exit_code != 0) {
    ADD_FAILURE() << "qemu-img convert " << path << ": " << r.err;
    return "";
  }
  std::string data = ReadFileOrDie(out);
  unlink(out.c_str());
  return data;
}

// One backup target of a kind: the drive-backup arguments that name it, and
// how to read back what it holds.
struct KindTarget {
  json args;                          // "target", and "format"/"mode" as the kind needs
  std::unique_ptr<NbdServer> server;  // the NBD server the test runs, if any
  std::string image;                  // the qcow2 image cbwfs writes, if any
  std::function<std::string()> read;  // the target's content as raw bytes
};

enum class Kind { kNbdkitUnix, kNbdkitTcp, kQemuNbdRaw, kQemuNbdQcow2, kQcow2New, kQcow2Chain };

std::string Name(Kind k) {
  switch (k) {
    case Kind::kNbdkitUnix:
      return "NbdkitUnix";
    case Kind::kNbdkitTcp:
      return "NbdkitTcp";
    case Kind::kQemuNbdRaw:
      return "QemuNbdRaw";
    case Kind::kQemuNbdQcow2:
      return "QemuNbdQcow2";
    case Kind::kQcow2New:
      return "Qcow2New";
    case Kind::kQcow2Chain:
      return "Qcow2Chain";
  }
  return "?";
}

// A target of kind `k` for a drive of `size` bytes, named by `tag` in `dir`.
std::unique_ptr<KindTarget> MakeTarget(Kind k, const std::string& dir, const std::string& tag,
                                       uint64_t size) {
  auto t = std::make_unique<KindTarget>();
  const std::string sz = std::to_string(size);
  auto nbd_read = [&t, dir, size]() {
    KindTarget* raw = t.get();
    return [raw, dir, size] {
      std::string s = raw->server->ReadAll(dir);
      if (s.size() > size) s.resize(size);
      return s;
    };
  };
  switch (k) {
    case Kind::kNbdkitUnix:
    case Kind::kNbdkitTcp:
      t->server = NbdServer::Nbdkit(
          dir, {"memory", sz},
          k == Kind::kNbdkitTcp ? NbdServer::Transport::kTcp : NbdServer::Transport::kUnix);
      if (!t->server) return nullptr;
      // Old data in the export: zero ranges must be written, never skipped.
      {
        const std::string junk = dir + "/" + tag + ".junk";
        WriteFileOrDie(junk, RandomBytes(size, 99));
        if (NbdServer::Run({"nbdcopy", junk, t->server->uri()}) != 0) return nullptr;
        unlink(junk.c_str());
      }
      t->args = {{"target", t->server->uri()}, {"mode", "existing"}};
      t->read = nbd_read();
      break;
    case Kind::kQemuNbdRaw:
    case Kind::kQemuNbdQcow2: {
      const bool qcow2 = k == Kind::kQemuNbdQcow2;
      const std::string file = dir + "/" + tag + (qcow2 ? ".served.qcow2" : ".served.img");
      if (qcow2) {
        if (RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", file, sz}).exit_code != 0) {
          return nullptr;
        }
      } else {
        WriteFileOrDie(file, RandomBytes(size, 98));
      }
      t->server = NbdServer::QemuNbd(dir, file, qcow2 ? "qcow2" : "raw");
      if (!t->server) return nullptr;
      t->args = {{"target", t->server->uri()}, {"mode", "existing"}};
      t->read = nbd_read();
      break;
    }
    case Kind::kQcow2New:
      t->image = dir + "/" + tag + ".qcow2";
      t->args = {{"target", t->image}, {"format", "qcow2"}};
      break;
    case Kind::kQcow2Chain: {
      // A previous backup (older content) and an overlay on it, probed.
      const std::string full = dir + "/" + tag + ".full.img";
      WriteFileOrDie(full, RandomBytes(size, 97));
      t->image = dir + "/" + tag + ".inc.qcow2";
      if (RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", "-b", tag + ".full.img", "-F",
                      "raw", t->image})
              .exit_code != 0) {
        return nullptr;
      }
      t->args = {{"target", t->image}, {"mode", "existing"}};
      break;
    }
  }
  if (!t->image.empty()) {
    const std::string image = t->image;
    t->read = [image, dir, size] {
      std::string s = ConvertToRaw(image, "qcow2", dir);
      if (s.size() > size) s.resize(size);
      return s;
    };
  }
  return t;
}

json BackupArgs(const std::string& device, const std::string& id, const KindTarget& t,
                const std::string& sync, uint64_t speed) {
  json a = {{"device", device}, {"job-id", id}, {"sync", sync}};
  if (speed > 0) a["speed"] = speed;
  for (auto& [k, v] : t.args.items()) a[k] = v;
  return a;
}

class TargetKindE2E : public MountedDrive, public ::testing::WithParamInterface<Kind> {
 protected:
  bool qcow2() const { return GetParam() == Kind::kQcow2New || GetParam() == Kind::kQcow2Chain; }
};

TEST_P(TargetKindE2E, PointInTimeUnderWritersWithSpeedLimitAndPauseResume) {
  auto t = MakeTarget(GetParam(), dir_.path(), "t", kSize);
  ASSERT_TRUE(t);
  MountDrive(kSize);
  constexpr int kWriters = 4;
  std::vector<std::unique_ptr<Writer>> writers;
  for (int i = 0; i < kWriters; ++i) {
    writers.push_back(std::make_unique<Writer>(mount_ / "drive0", kSize / kWriters * i,
                                               kSize / kWriters, 50 + i));
    writers.back()->Start();
  }
  ASSERT_TRUE(WaitFor([&] {
    for (auto& w : writers) {
      if (w->ops().size() < 2) return false;
    }
    return true;
  })) << "writers under way";
  auto issued = Clock::now();
  int err = mount_.Control(Cmd("drive-backup", BackupArgs("drive0", "job", *t, "full", 8 * kMiB)));
  auto returned = Clock::now();
  ASSERT_EQ(err, 0) << ReadFileOrDie(mount_ / "control");
  // Once writers have raced the copier, the job pauses; the writers stop
  // (their copy-before-write copies count in the offset too), and the
  // offset stands still; then it resumes.
  ASSERT_TRUE(WaitFor([&] { return Record(mount_, "job").value("cbw-bytes", 0) > 0; }))
      << mount_.JobRecord("job");
  ASSERT_EQ(mount_.Control(Cmd("job-pause", {{"id", "job"}})), 0) << mount_.JobRecord("job");
  ASSERT_TRUE(mount_.WaitJobStatus("job", {"paused"})) << mount_.JobRecord("job");
  for (auto& w : writers) w->Stop();
  const uint64_t at = Record(mount_, "job")["offset"];
  const auto window = Clock::now() + std::chrono::milliseconds(200);
  while (Clock::now() < window) {
    ASSERT_EQ(Record(mount_, "job")["offset"].get<uint64_t>(), at) << "paused jobs copy nothing";
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_EQ(mount_.Control(Cmd("job-resume", {{"id", "job"}})), 0);
  ASSERT_TRUE(WaitResult(mount_, "job")) << mount_.JobRecord("job");
  json rec = Record(mount_, "job");
  EXPECT_EQ(rec["result"], "success") << rec.dump() << mount_.log();
  if (qcow2()) {
    EXPECT_TRUE(ProcessesWith({"qemu-nbd", t->image}).empty()) << "qemu-nbd stopped";
  }
  std::string target = t->read();
  ASSERT_EQ(target.size(), kSize);
  for (auto& w : writers) {
    EXPECT_EQ(w->errors(), 0);
    EXPECT_TRUE(SliceMatchesPointInTime(image_, target, *w, issued, returned));
  }
}

TEST_P(TargetKindE2E, TwoDriveTransactionUnderWriters) {
  auto ta = MakeTarget(GetParam(), dir_.path(), "ta", kSize);
  auto tb = MakeTarget(GetParam(), dir_.path(), "tb", kSize);
  ASSERT_TRUE(ta && tb);
  std::string a = RandomBytes(kSize, 1), b = RandomBytes(kSize, 2);
  WriteFileOrDie(dir_ / "a.img", a);
  WriteFileOrDie(dir_ / "b.img", b);
  ASSERT_TRUE(
      mount_.Start({"--drive", "a=" + (dir_ / "a.img"), "--drive", "b=" + (dir_ / "b.img")}));
  Writer wa(mount_ / "a", 0, kSize, 11), wb(mount_ / "b", 0, kSize, 12);
  wa.Start();
  wb.Start();
  ASSERT_TRUE(WaitFor([&] { return wa.op_count() > 2 && wb.op_count() > 2; }));
  const std::string txn =
      GroupedBackups({BackupArgs("a", "a", *ta, "full", 0), BackupArgs("b", "b", *tb, "full", 0)});
  auto issued = Clock::now();
  int err = mount_.Control(txn);
  auto returned = Clock::now();
  ASSERT_EQ(err, 0) << ReadFileOrDie(mount_ / "control");
  ASSERT_TRUE(WaitResult(mount_, "a"));
  ASSERT_TRUE(WaitResult(mount_, "b"));
  wa.Stop();
  wb.Stop();
  EXPECT_EQ(Record(mount_, "a")["result"], "success") << mount_.JobRecord("a");
  EXPECT_EQ(Record(mount_, "b")["result"], "success") << mount_.JobRecord("b");
  EXPECT_TRUE(SliceMatchesPointInTime(a, ta->read(), wa, issued, returned));
  EXPECT_TRUE(SliceMatchesPointInTime(b, tb->read(), wb, issued, returned));
}

TEST_P(TargetKindE2E, SnapshotViewThenCancel) {
  auto t = MakeTarget(GetParam(), dir_.path(), "t", kSize);
  ASSERT_TRUE(t);
  MountDrive(kSize);
  ASSERT_EQ(mount_.Control(Cmd("drive-backup", BackupArgs("drive0", "view", *t, "none", 0))), 0)
      << ReadFileOrDie(mount_ / "control");
  ASSERT_TRUE(mount_.WaitJobStatus("view", {"running"}));
  // Overwrite a few clusters: their old data goes to the target, and the
  // view reads it from there.
  {
    int fd = open((mount_ / "drive0").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    std::string junk = RandomBytes(300 * 1024, 8);
    ASSERT_EQ(pwrite(fd, junk.data(), junk.size(), kMiB + 12345),
              static_cast<ssize_t>(junk.size()));
    ASSERT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 5 * kMiB, kMiB), 0);
    close(fd);
  }
  EXPECT_EQ(Record(mount_, "view")["cbw-bytes"].get<uint64_t>(), 5u * 65536 + kMiB);
  std::string view = ReadFileOrDie(mount_ / "snapshots/view");
  EXPECT_TRUE(view == image_) << "the view is the drive at the point in time";
  ASSERT_EQ(mount_.Control(Cmd("job-cancel", {{"id", "view"}})), 0);
  ASSERT_TRUE(WaitResult(mount_, "view", std::chrono::seconds(10)));
  EXPECT_EQ(Record(mount_, "view")["result"], "cancelled");
  if (qcow2()) {
    EXPECT_TRUE(ProcessesWith({"qemu-nbd", t->image}).empty()) << "qemu-nbd stopped";
  }
  // The target holds the preserved clusters.
  std::string target = t->read();
  ASSERT_EQ(target.size(), kSize);
  EXPECT_TRUE(target.substr(kMiB, 320 * 1024) == image_.substr(kMiB, 320 * 1024));
  EXPECT_TRUE(target.substr(5 * kMiB, kMiB) == image_.substr(5 * kMiB, kMiB));
  EXPECT_TRUE(mount_.alive());
}

INSTANTIATE_TEST_SUITE_P(Kinds, TargetKindE2E,
                         ::testing::Values(Kind::kNbdkitUnix, Kind::kNbdkitTcp, Kind::kQemuNbdRaw,
                                           Kind::kQemuNbdQcow2, Kind::kQcow2New, Kind::kQcow2Chain),
                         [](const ::testing::TestParamInfo<Kind>& i) { return Name(i.param); });

// ---------------------------------------------------------------- faults

using NbdFaultsE2E = MountedDrive;

TEST_F(NbdFaultsE2E, CancelEndsAJobOnADeadServerWithinFiveSeconds) {
  auto s = NbdServer::Nbdkit(dir_.path(), {"memory", std::to_string(16 * kMiB)});
  ASSERT_TRUE(s);
  MountDrive(16 * kMiB);
  ASSERT_EQ(mount_.Control(Cmd("drive-backup", {{"device", "drive0"},
                                                {"target", s->uri()},
                                                {"mode", "existing"},
                                                {"sync", "full"},
                                                {"speed", 4 * kMiB}})),
            0)
      << ReadFileOrDie(mount_ / "control");
  ASSERT_TRUE(WaitFor([&] { return Record(mount_, "drive0").value("offset", 0) > 0; }));
  s->Freeze();
  // A writer to a cluster not yet copied waits for its CBW on the dead
  // server, in the background.
  Background writer("exec dd if=/dev/zero of=" + Q(mount_ / "drive0") +
                        " bs=64k count=1 seek=200 conv=notrunc,fsync status=none",
                    dir_ / "dd.out");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // let requests hang
  auto t0 = Clock::now();
  ASSERT_EQ(mount_.Control(Cmd("job-cancel", {{"id", "drive0"}})), 0);
  ASSERT_TRUE(WaitResult(mount_, "drive0", std::chrono::seconds(10)));
  if (!UnderSanitizer()) {
    EXPECT_LT(Seconds(Clock::now() - t0), 5.0);
  }
  EXPECT_EQ(Record(mount_, "drive0")["result"], "cancelled");
  EXPECT_EQ(writer.Wait(std::chrono::seconds(10)), 0) << "the drive write went through";
  s->Thaw();
  EXPECT_TRUE(mount_.alive());
}

TEST_F(NbdFaultsE2E, RefusalsKeepTheirErrnoThroughTheControlFile) {
  MountDrive(kMiB);
  auto backup = [&](const std::string& target) {
    return mount_.Control(
        Cmd("drive-backup",
            {{"device", "drive0"}, {"target", target}, {"mode", "existing"}, {"sync", "full"}}));
  };
  EXPECT_EQ(backup("nbd+unix:///?socket=" + (dir_ / "none.sock")), ENOENT);
  EXPECT_EQ(LastReply()["error"]["desc"],
            "Failed to connect to '" + (dir_ / "none.sock") + "': No such file or directory");
  EXPECT_EQ(backup("nbd://127.0.0.1:1/"), ECONNREFUSED);
  EXPECT_EQ(LastReply()["error"]["desc"], "Failed to connect to '127.0.0.1:1': Connection refused");
  EXPECT_EQ(backup("nbd://"), EINVAL);
  EXPECT_EQ(LastReply()["error"]["desc"], "No valid URL specified");
  // A socket inside the mount is refused without being looked up.
  EXPECT_EQ(backup("nbd+unix:///?socket=" + (mount_ / "jobs/x.sock")), EINVAL);
  auto ro = NbdServer::Nbdkit(dir_.path(), {"-r", "memory", "1M"});
  ASSERT_TRUE(ro);
  EXPECT_EQ(backup(ro->uri()), EROFS);
  EXPECT_EQ(LastReply()["error"]["desc"], "NBD export is read-only");
  EXPECT_TRUE(mount_.alive());
}

TEST(Qcow2DaemonKilled, LeavesNoQemuNbdAndItsJobComesBackFailed) {
  TempDir dir;
  const std::string src = dir / "src.img";
  WriteFileOrDie(src, RandomBytes(16 * kMiB, 5));
  const std::vector<std::string> args = {"--drive", "drive0=" + src, "--state-dir", dir / "state"};
  const std::string image = dir / "t.qcow2";
  {
    CbwfsMount m;
    ASSERT_TRUE(m.Start(args));
    ASSERT_EQ(m.Control(Cmd("drive-backup", {{"device", "drive0"},
                                             {"target", image},
                                             {"format", "qcow2"},
                                             {"sync", "full"},
                                             {"speed", 2 * kMiB}})),
              0)
        << ReadFileOrDie(m / "control");
    ASSERT_TRUE(WaitFor([&] { return Record(m, "drive0").value("offset", 0) > 0; }));
    std::vector<pid_t> qemu = ProcessesWith({"qemu-nbd", image});
    ASSERT_EQ(qemu.size(), 1u);
    EXPECT_EQ(m.Stop(SIGKILL), 128 + SIGKILL);
    EXPECT_TRUE(WaitFor(
        [&] {
          return ProcessesWith({"qemu-nbd", image}).empty();
        },
        std::chrono::seconds(10)))
        << "qemu-nbd " << qemu[0] << " outlived cbwfs";
  }
  CbwfsMount m;
  ASSERT_TRUE(m.Start(args));
  json rec = Record(m, "drive0");
  EXPECT_EQ(rec.value("result", ""), "failed") << rec.dump();
  EXPECT_EQ(rec.value("error", ""), "daemon stopped") << rec.dump();
}

}  // namespace
}  // namespace cbw::test
