// Error policies under real I/O faults: the drive's source and/or the target
// live on a faultfs mount (tests/tools/faultfs.cc) that fails, shortens or
// slows chosen requests, so the engine's real read/write paths see them.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/backup/test_util.h"
#include "tests/lib/faultfs_mount.h"

namespace cbw::backup {
namespace {

using testing::EventRecorder;
using testing::RandomBytes;
using testing::ReadAll;
using testing::SameBytes;
using testing::TempDir;
using testing::WaitFor;

constexpr uint64_t kMiB = 1024 * 1024;

class FaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backing_ = dir_ / "backing";
    mnt_ = dir_ / "mnt";
    faults_ = std::make_unique<test::FaultFs>(FAULTFS_PATH, backing_, mnt_);
    if (!faults_->mounted()) GTEST_SKIP() << "faultfs could not mount (no /dev/fuse?)";
  }

  void TearDown() override {
    registry_.reset();
    drive_.reset();
    faults_.reset();
  }

  int Waiting() { return faults_->Waiting(); }
  bool WaitHeld(int n = 1) { return faults_->WaitHeld(n); }

  void SetFaults(const std::string& rules) { faults_->SetRules(rules); }

  // A drive whose source is on the fault mount (source_on_mount) or local.
  void MakeDrive(const std::string& data, bool source_on_mount) {
    data_ = data;
    std::string path = source_on_mount ? backing_ + "/src.img" : dir_ / "src.img";
    testing::WriteAt(path, data, 0);
    auto d = Drive::Open(DriveConfig{"drive0", source_on_mount ? mnt_ + "/src.img" : path, false});
    ASSERT_TRUE(d.ok()) << d.status().message();
    drive_ = std::move(*d);
    RegistryOptions o = ropts_;
    o.base_dir = mnt_;
    registry_ = std::make_unique<JobRegistry>(std::vector<Drive*>{drive_.get()}, &bus_, o);
  }

  BackupOptions Opts(SyncMode sync = SyncMode::kFull) {
    BackupOptions o;
    o.device = "drive0";
    o.target = "tgt.img";  // on the mount
    o.sync = sync;
    return o;
  }
  std::optional<JobInfo> Info() { return registry_->GetJobFile("drive0"); }
  bool Ended() {
    auto i = Info();
    return i && i->result != JobResult::kNone;
  }
  bool Status(JobStatus s) {
    auto i = Info();
    return i && i->status == s;
  }
  std::string Target() { return ReadAll(backing_ + "/tgt.img"); }
  std::string Source() { return ReadAll(mnt_ + "/src.img"); }

  TempDir dir_;
  RegistryOptions ropts_;  // for MakeDrive
  std::string backing_, mnt_;
  std::unique_ptr<test::FaultFs> faults_;
  EventBus bus_;
  std::string data_;
  std::unique_ptr<Drive> drive_;
  std::unique_ptr<JobRegistry> registry_;
};

TEST_F(FaultTest, TargetEioReportFailsTheJob) {
  MakeDrive(RandomBytes(4 * kMiB, 1), false);
  EventRecorder rec(&bus_);
  SetFaults("tgt.img write eio 2097152 2162688");
  ASSERT_TRUE(registry_->StartBackups({Opts()}).ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  auto i = Info();
  EXPECT_EQ(i->result, JobResult::kFailed);
  EXPECT_EQ(i->error, "Input/output error");
  EXPECT_EQ(rec.SequenceUntil("drive0"),
            "created,running,ERROR(write,report),aborting,COMPLETED(Input/output error),"
            "concluded,null");
  EXPECT_TRUE(SameBytes(ReadAll(dir_ / "src.img"), data_));
}

TEST_F(FaultTest, TargetEioIgnoreRetriesAndSucceeds) {
  MakeDrive(RandomBytes(4 * kMiB, 2), false);
  EventRecorder rec(&bus_);
  SetFaults("tgt.img write eio 0 4194304 3");
  auto o = Opts();
  o.on_target_error = ErrorPolicy::kIgnore;
  ASSERT_TRUE(registry_->StartBackups({o}).ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  EXPECT_EQ(Info()->result, JobResult::kSuccess);
  EXPECT_TRUE(SameBytes(Target(), data_));
  EXPECT_NE(rec.Sequence("drive0").find("ERROR(write,ignore)"), std::string::npos);
}

TEST_F(FaultTest, TargetEioStopPausesUntilResumed) {
  MakeDrive(RandomBytes(4 * kMiB, 3), false);
  EventRecorder rec(&bus_);
  SetFaults("tgt.img write eio 1048576 1048577");
  auto o = Opts();
  o.on_target_error = ErrorPolicy::kStop;
  ASSERT_TRUE(registry_->StartBackups({o}).ok());
  ASSERT_TRUE(WaitFor([&] { return Status(JobStatus::kPaused); }));
  auto i = Info();
  EXPECT_EQ(i->io_status, IoStatus::kFailed);
  EXPECT_TRUE(i->paused);
  EXPECT_EQ(registry_->Dismiss("drive0").message(),
            "Job 'drive0' in state 'paused' cannot accept command verb 'dismiss'");
  SetFaults("");
  ASSERT_TRUE(registry_->Resume("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  i = Info();
  EXPECT_EQ(i->result, JobResult::kSuccess);
  EXPECT_EQ(i->io_status, IoStatus::kOk);
  EXPECT_EQ(i->offset, i->len);
  EXPECT_TRUE(SameBytes(Target(), data_));
  EXPECT_EQ(rec.SequenceUntil("drive0"),
            "created,running,ERROR(write,stop),paused,running,waiting,pending,COMPLETED,"
            "concluded,null");
}

TEST_F(FaultTest, EnospcPolicyStopsOnEnospcAndReportsOtherErrors) {
  MakeDrive(RandomBytes(4 * kMiB, 4), false);
  SetFaults("tgt.img write enospc 3145728 3145729");
  auto o = Opts();
  o.on_target_error = ErrorPolicy::kEnospc;
  ASSERT_TRUE(registry_->StartBackups({o}).ok());
  ASSERT_TRUE(WaitFor([&] { return Status(JobStatus::kPaused); }));
  EXPECT_EQ(Info()->io_status, IoStatus::kNoSpace);
  SetFaults("tgt.img write eio 3145728 3145729");
  ASSERT_TRUE(registry_->Resume("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  EXPECT_EQ(Info()->result, JobResult::kFailed);
  EXPECT_EQ(Info()->error, "Input/output error");
}

// EDQUOT is not ENOSPC: the enospc policy reports it; stop pauses with
// io-status failed; report fails the job with its text.
TEST_F(FaultTest, TargetEdquotUnderEachPolicy) {
  struct Case {
    ErrorPolicy policy;
    bool pauses;
  } cases[] = {
      {ErrorPolicy::kReport, false}, {ErrorPolicy::kEnospc, false}, {ErrorPolicy::kStop, true}};
  MakeDrive(RandomBytes(4 * kMiB, 41), false);
  for (const auto& c : cases) {
    SCOPED_TRACE(ToString(c.policy));
    registry_->RemoveJobFile("drive0");
    SetFaults("tgt.img write edquot 1048576 1048577");
    auto o = Opts();
    o.on_target_error = c.policy;
    ASSERT_TRUE(registry_->StartBackups({o}).ok());
    if (c.pauses) {
      ASSERT_TRUE(WaitFor([&] { return Status(JobStatus::kPaused); }));
      EXPECT_EQ(Info()->io_status, IoStatus::kFailed);
      SetFaults("");
      ASSERT_TRUE(registry_->Resume("drive0").ok());
      ASSERT_TRUE(WaitFor([&] { return Ended(); }));
      EXPECT_EQ(Info()->result, JobResult::kSuccess);
      EXPECT_TRUE(SameBytes(Target(), data_));
    } else {
      ASSERT_TRUE(WaitFor([&] { return Ended(); }));
      EXPECT_EQ(Info()->result, JobResult::kFailed);
      EXPECT_EQ(Info()->error, "Disk quota exceeded");
    }
    EXPECT_TRUE(SameBytes(ReadAll(dir_ / "src.img"), data_));
  }
}

TEST_F(FaultTest, SourceReadErrorsUseOnSourceError) {
  MakeDrive(RandomBytes(4 * kMiB, 5), true);
  EventRecorder rec(&bus_);
  SetFaults("src.img read eio 2097152 2097153");
  auto o = Opts();
  o.on_source_error = ErrorPolicy::kStop;
  ASSERT_TRUE(registry_->StartBackups({o}).ok());
  ASSERT_TRUE(WaitFor([&] { return Status(JobStatus::kPaused); }));
  EXPECT_EQ(Info()->io_status, IoStatus::kFailed);
  EXPECT_NE(rec.Sequence("drive0").find("ERROR(read,stop)"), std::string::npos);
  // Resume into the same fault, now reported: the job fails.
  ASSERT_TRUE(registry_->Resume("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return Status(JobStatus::kPaused); }));
  ASSERT_TRUE(registry_->Cancel("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  EXPECT_EQ(Info()->result, JobResult::kCancelled);
  EXPECT_TRUE(SameBytes(ReadAll(backing_ + "/src.img"), data_));  // never written
}

TEST_F(FaultTest, SourceReadErrorReport) {
  MakeDrive(RandomBytes(2 * kMiB, 6), true);
  EventRecorder rec(&bus_);
  SetFaults("src.img read eio 0 2097152");
  ASSERT_TRUE(registry_->StartBackups({Opts()}).ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  EXPECT_EQ(Info()->result, JobResult::kFailed);
  EXPECT_NE(rec.Sequence("drive0").find("ERROR(read,report)"), std::string::npos);
}

TEST_F(FaultTest, ShortReadsInTheCopierAreCompleted) {
  std::string data = RandomBytes(3 * kMiB + 12345, 7);
  MakeDrive(data, true);
  SetFaults("src.img read short\n");
  ASSERT_TRUE(registry_->StartBackups({Opts()}).ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }, 60));
  EXPECT_EQ(Info()->result, JobResult::kSuccess) << Info()->error.value_or("");
  EXPECT_TRUE(SameBytes(Target(), data));
}

// Short writes reach the engine's plain pwrite (CBW) path as short counts.
// (The kernel turns a short reply to an *asynchronous* FUSE direct write,
// as io_uring issues them, into EIO, so the copier sees those as errors.)
TEST_F(FaultTest, ShortWritesOnTheCbwPathAreCompleted) {
  std::string data = RandomBytes(2 * kMiB, 12);
  MakeDrive(data, false);
  ASSERT_TRUE(registry_->StartBackups({Opts(SyncMode::kNone)}).ok());
  SetFaults("tgt.img write short\n");
  std::string w(300000, 'w');
  ASSERT_TRUE(drive_->Write(w.data(), w.size(), 1000).ok());
  ASSERT_TRUE(drive_->Write(w.data(), w.size(), kMiB + 7).ok());
  EXPECT_EQ(Info()->cbw_bytes, 10 * 65536u);
  std::string view(2 * kMiB, '\0');
  ASSERT_TRUE(registry_->ReadSnapshot("drive0", view.data(), view.size(), 0).ok());
  EXPECT_TRUE(SameBytes(view, data));
  std::string tgt = Target();
  EXPECT_TRUE(SameBytes(tgt.substr(0, 5 * 65536), data.substr(0, 5 * 65536)));
  ASSERT_TRUE(registry_->Cancel("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
}

TEST_F(FaultTest, FsyncFailureFailsTheJob) {
  MakeDrive(RandomBytes(kMiB, 8), false);
  SetFaults("tgt.img fsync eio");
  ASSERT_TRUE(registry_->StartBackups({Opts()}).ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  EXPECT_EQ(Info()->result, JobResult::kFailed);
}

TEST_F(FaultTest, CancelIsPromptWithSlowTarget) {
  MakeDrive(RandomBytes(16 * kMiB, 9), false);
  SetFaults("tgt.img write slow=200");
  ASSERT_TRUE(registry_->StartBackups({Opts()}).ok());
  ASSERT_TRUE(WaitHeld());
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(registry_->Cancel("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  // In-flight requests finish (at most one slow round), nothing more starts.
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 2.0);
  EXPECT_EQ(Info()->result, JobResult::kCancelled);
}

TEST_F(FaultTest, CbwFailureBreakSnapshot) {
  MakeDrive(RandomBytes(2 * kMiB, 10), false);
  EventRecorder rec(&bus_);
  ASSERT_TRUE(registry_->StartBackups({Opts(SyncMode::kNone)}).ok());
  SetFaults("tgt.img write eio");
  std::string w(1000, 'w');
  ASSERT_TRUE(drive_->Write(w.data(), w.size(), 100).ok());  // the write proceeds
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  EXPECT_EQ(Info()->result, JobResult::kFailed);
  EXPECT_EQ(Info()->error, "Input/output error");
  // The store fails in the background (buffered CBW): the job's last events
  // may still be on their way when its record shows the result.
  const std::string want = "created,running,aborting,COMPLETED(Input/output error),concluded,null";
  EXPECT_TRUE(WaitFor([&] { return rec.Sequence("drive0") == want; })) << rec.Sequence("drive0");
  char buf[16];
  EXPECT_EQ(registry_->ReadSnapshot("drive0", buf, sizeof(buf), 0).status().code(), EIO);
  std::string expect = data_;
  expect.replace(100, w.size(), w);
  EXPECT_TRUE(SameBytes(ReadAll(dir_ / "src.img"), expect));
}

TEST_F(FaultTest, CbwFailureBreakGuestWrite) {
  MakeDrive(RandomBytes(2 * kMiB, 11), false);
  auto o = Opts(SyncMode::kNone);
  o.on_cbw_error = CbwErrorPolicy::kBreakGuestWrite;
  ASSERT_TRUE(registry_->StartBackups({o}).ok());
  SetFaults("tgt.img write eio");
  std::string w(1000, 'w');
  auto r = drive_->Write(w.data(), w.size(), 70000);
  EXPECT_EQ(r.status().code(), EIO);
  EXPECT_TRUE(SameBytes(ReadAll(dir_ / "src.img"), data_));  // source untouched
  EXPECT_TRUE(Status(JobStatus::kRunning));
  SetFaults("");
  ASSERT_TRUE(drive_->Write(w.data(), w.size(), 70000).ok());
  std::string view(2 * kMiB, '\0');
  auto rr = registry_->ReadSnapshot("drive0", view.data(), view.size(), 0);
  ASSERT_TRUE(rr.ok());
  EXPECT_TRUE(SameBytes(view, data_));
  ASSERT_TRUE(registry_->Cancel("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  EXPECT_EQ(Info()->result, JobResult::kCancelled);
}

// A drive write to a cluster the copier is copying waits for that copy.
TEST_F(FaultTest, WriteWaitsForInFlightCopyOfItsCluster) {
  MakeDrive(RandomBytes(2 * kMiB, 13), false);
  SetFaults("tgt.img write slow=400 0 1048576 1");
  ASSERT_TRUE(registry_->StartBackups({Opts()}).ok());
  ASSERT_TRUE(WaitHeld());  // the copy is in flight
  std::string w(100, 'w');
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(drive_->Write(w.data(), w.size(), 5000).ok());
  double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GT(waited, 0.15);
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  EXPECT_EQ(Info()->result, JobResult::kSuccess);
  EXPECT_EQ(Info()->cbw_bytes, 0u);  // the copier preserved it, not the writer
  EXPECT_TRUE(SameBytes(Target(), data_));
}

// The copy a writer waits for fails: the cluster is dirty again and the
// writer copies it itself before writing. (With on-target-error=stop the
// failed copier waits for a resume, so the writer surely gets there first.)
TEST_F(FaultTest, FailedCopyIsRedoneByTheWaitingWriter) {
  MakeDrive(RandomBytes(2 * kMiB, 14), false);
  EventRecorder rec(&bus_);
  SetFaults("tgt.img write slow=400 0 1048576 1\ntgt.img write eio 0 1048576 1\n");
  auto o = Opts();
  o.on_target_error = ErrorPolicy::kStop;
  ASSERT_TRUE(registry_->StartBackups({o}).ok());
  ASSERT_TRUE(WaitHeld());  // the copier's copy of the cluster is in flight
  std::string w(100, 'w');
  ASSERT_TRUE(drive_->Write(w.data(), w.size(), 5000).ok());
  EXPECT_EQ(Info()->cbw_bytes, 65536u);
  ASSERT_TRUE(WaitFor([&] { return Status(JobStatus::kPaused); }));
  ASSERT_TRUE(registry_->Resume("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  EXPECT_EQ(Info()->result, JobResult::kSuccess);
  EXPECT_NE(rec.Sequence("drive0").find("ERROR(write,stop)"), std::string::npos);
  EXPECT_TRUE(SameBytes(Target(), data_));
}

// A drive write to a cluster waits for snapshot reads of it in flight from
// the source (frozen reads), so the reader gets the point-in-time data.
TEST_F(FaultTest, WriteWaitsForFrozenSnapshotRead) {
  MakeDrive(RandomBytes(2 * kMiB, 15), true);
  ASSERT_TRUE(registry_->StartBackups({Opts(SyncMode::kNone)}).ok());
  SetFaults("src.img read slow=500 0 65536 1");
  std::string view(65536, '\0');
  std::thread reader([&] {
    auto r = registry_->ReadSnapshot("drive0", view.data(), view.size(), 0);
    EXPECT_TRUE(r.ok());
  });
  ASSERT_TRUE(WaitHeld());  // the view's read of the source is in flight
  std::string w(65536, 'w');
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(drive_->Write(w.data(), w.size(), 0).ok());
  double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  reader.join();
  EXPECT_GT(waited, 0.2);
  EXPECT_TRUE(SameBytes(view, data_.substr(0, 65536)));
  ASSERT_TRUE(registry_->Cancel("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
}

// A real ENOSPC: the target on a tmpfs too small for it. enospc stops the
// job (io-status nospace); after the tmpfs grows, resume completes it.
TEST(RealEnospcTest, StopOnFullTmpfsThenResumeAfterGrowing) {
  TempDir dir;
  std::string mnt = dir / "tmpfs";
  ASSERT_EQ(mkdir(mnt.c_str(), 0755), 0);
  if (mount("cbwtest", mnt.c_str(), "tmpfs", 0, "size=2m") != 0) {
    GTEST_SKIP() << "cannot mount tmpfs: " << std::strerror(errno);
  }
  std::string data = RandomBytes(4 * kMiB, 16);
  {
    std::string src = dir / "src.img";
    testing::WriteAt(src, data, 0);
    auto d = Drive::Open(DriveConfig{"drive0", src, false});
    ASSERT_TRUE(d.ok());
    EventBus bus;
    EventRecorder rec(&bus);
    RegistryOptions ro;
    ro.base_dir = mnt;
    JobRegistry reg({d->get()}, &bus, ro);
    BackupOptions o;
    o.device = "drive0";
    o.target = "t.img";
    o.on_target_error = ErrorPolicy::kEnospc;
    ASSERT_TRUE(reg.StartBackups({o}).ok());
    ASSERT_TRUE(WaitFor([&] { return reg.GetJobFile("drive0")->status == JobStatus::kPaused; }));
    EXPECT_EQ(reg.GetJobFile("drive0")->io_status, IoStatus::kNoSpace);
    EXPECT_NE(rec.Sequence("drive0").find("ERROR(write,stop)"), std::string::npos);
    ASSERT_EQ(mount("cbwtest", mnt.c_str(), "tmpfs", MS_REMOUNT, "size=16m"), 0);
    ASSERT_TRUE(reg.Resume("drive0").ok());
    ASSERT_TRUE(WaitFor([&] { return reg.GetJobFile("drive0")->result != JobResult::kNone; }));
    EXPECT_EQ(reg.GetJobFile("drive0")->result, JobResult::kSuccess);
    EXPECT_TRUE(SameBytes(ReadAll(mnt + "/t.img"), data));
  }
  umount2(mnt.c_str(), MNT_DETACH);
}

// The target's filesystem goes read-only mid-job (every write to it fails
// with EROFS, as after an ext4 errors=remount-ro; a real remount is refused
// while the target is open for writing) while writes hit the drive. With
// on-target-error=stop and break-guest-write the job pauses (io-status
// failed), drive writes whose old data cannot be saved fail with EIO and never
// reach the source; once the filesystem is writable again the job resumes, the
// target is the point in time and the source holds exactly the writes that
// succeeded.
TEST_F(FaultTest, TargetFilesystemGoesReadOnlyUnderWriters) {
  MakeDrive(RandomBytes(8 * kMiB, 42), false);
  std::string expected_source = data_;
  auto o = Opts();
  o.speed = 4 * kMiB;  // still copying when the filesystem turns read-only
  o.on_target_error = ErrorPolicy::kStop;
  o.on_cbw_error = CbwErrorPolicy::kBreakGuestWrite;
  ASSERT_TRUE(registry_->StartBackups({o}).ok());
  SetFaults("tgt.img write erofs");
  std::mt19937_64 rng(43);
  int refused = 0, done = 0;
  auto write_some = [&](int n) {
    for (int i = 0; i < n; ++i) {
      uint64_t len = 512 + rng() % (256 * 1024);
      uint64_t off = rng() % (data_.size() - len);
      std::string buf = RandomBytes(len, rng());
      auto r = drive_->Write(buf.data(), len, off);
      if (r.ok()) {
        expected_source.replace(off, len, buf);
        ++done;
      } else {
        EXPECT_EQ(r.status().code(), EIO);
        ++refused;
      }
    }
  };
  write_some(40);
  ASSERT_TRUE(WaitFor([&] { return Status(JobStatus::kPaused); }));
  EXPECT_EQ(Info()->io_status, IoStatus::kFailed);
  EXPECT_GT(refused, 0);
  EXPECT_TRUE(SameBytes(ReadAll(dir_ / "src.img"), expected_source));
  SetFaults("");
  ASSERT_TRUE(registry_->Resume("drive0").ok());
  ASSERT_TRUE(registry_->SetSpeed("drive0", 0).ok());
  write_some(40);
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  EXPECT_EQ(Info()->result, JobResult::kSuccess);
  EXPECT_GT(done, 0);
  EXPECT_TRUE(SameBytes(Target(), data_));
  EXPECT_TRUE(SameBytes(ReadAll(dir_ / "src.img"), expected_source));
}

// ---------------------------------------------------------------------------
// Dead targets: target I/O that never returns ("hang" rule) must not hang
// job-cancel, Shutdown, or drive writes (beyond the CBW timeout).

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST_F(FaultTest, CancelConcludesWithinSecondsWhileTheTargetHangs) {
  MakeDrive(RandomBytes(16 * kMiB, 41), false);
  SetFaults("tgt.img write hang 4194304 16777216");
  ASSERT_TRUE(registry_->StartBackups({Opts()}).ok());
  // Stalled in the hung range.
  ASSERT_TRUE(WaitFor([&] { return Info()->offset >= 4 * kMiB; }, 10));
  ASSERT_TRUE(WaitHeld()) << "the target does not hang";
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(registry_->Cancel("drive0").ok());
  EXPECT_LT(SecondsSince(t0), 0.5);
  EXPECT_TRUE(WaitFor([&] { return Ended(); }, 5)) << "still live 5 s after cancel";
  EXPECT_LT(SecondsSince(t0), 4.0);
  EXPECT_EQ(Info()->result, JobResult::kCancelled);
  EXPECT_TRUE(SameBytes(ReadAll(dir_ / "src.img"), data_));
  // The mount comes back: the stuck copier finishes in the background.
  SetFaults("");
}

TEST_F(FaultTest, ShutdownIsBoundedWhileTheTargetHangs) {
  MakeDrive(RandomBytes(16 * kMiB, 42), false);
  SetFaults("tgt.img write hang 4194304 16777216\ntgt.img fsync hang\n");
  ASSERT_TRUE(registry_->StartBackups({Opts()}).ok());
  ASSERT_TRUE(WaitFor([&] { return Info()->offset >= 4 * kMiB; }, 10));
  auto t0 = std::chrono::steady_clock::now();
  registry_->Shutdown();
  EXPECT_LT(SecondsSince(t0), 10.0);
  auto i = Info();
  ASSERT_TRUE(i.has_value());
  EXPECT_EQ(i->status, JobStatus::kNull);  // concluded, auto-dismissed
  EXPECT_EQ(i->result, JobResult::kCancelled);
  EXPECT_TRUE(SameBytes(ReadAll(dir_ / "src.img"), data_));
  SetFaults("");
}

// The synchronous CBW path (no buffer).
TEST_F(FaultTest, HungCbwBreakSnapshotTimesOutLetsTheWriteThroughAndFailsTheJob) {
  ropts_.cbw_timeout_ms = 500;
  ropts_.cbw_buffer_bytes = 0;
  MakeDrive(RandomBytes(4 * kMiB, 43), false);
  ASSERT_TRUE(registry_->StartBackups({Opts(SyncMode::kNone)}).ok());
  SetFaults("tgt.img write hang");
  std::string fresh = RandomBytes(65536, 44);
  auto t0 = std::chrono::steady_clock::now();
  auto w = drive_->Write(fresh.data(), fresh.size(), kMiB);
  ASSERT_TRUE(w.ok()) << w.status().message();
  EXPECT_GE(SecondsSince(t0), 0.4);
  EXPECT_LT(SecondsSince(t0), 3.0);
  ASSERT_TRUE(WaitFor([&] { return Ended(); }, 5));
  EXPECT_EQ(Info()->result, JobResult::kFailed);
  EXPECT_NE(Info()->error.value_or("").find("timed out"), std::string::npos) << *Info()->error;
  EXPECT_EQ(ReadAll(dir_ / "src.img").substr(kMiB, fresh.size()), fresh);
  SetFaults("");
}

TEST_F(FaultTest, HungCbwBreakGuestWriteTimesOutWithEioAndKeepsTheJob) {
  ropts_.cbw_timeout_ms = 500;
  MakeDrive(RandomBytes(4 * kMiB, 45), false);
  BackupOptions o = Opts(SyncMode::kNone);
  o.on_cbw_error = CbwErrorPolicy::kBreakGuestWrite;
  ASSERT_TRUE(registry_->StartBackups({o}).ok());
  SetFaults("tgt.img write hang");
  std::string fresh = RandomBytes(65536, 46);
  auto t0 = std::chrono::steady_clock::now();
  auto w = drive_->Write(fresh.data(), fresh.size(), kMiB);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), EIO);
  EXPECT_LT(SecondsSince(t0), 3.0);
  EXPECT_TRUE(Status(JobStatus::kRunning));
  EXPECT_TRUE(SameBytes(ReadAll(dir_ / "src.img"), data_));  // refused: untouched
  // Its copy worker is still stuck; cancel ends the job promptly anyway.
  t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(registry_->Cancel("drive0").ok());
  EXPECT_TRUE(WaitFor([&] { return Ended(); }, 5));
  EXPECT_EQ(Info()->result, JobResult::kCancelled);
  SetFaults("");
}

// Buffered CBW (break-snapshot): a drive write does not wait for the
// target. With the target hung, writes to dirty clusters return (the
// synchronous path would wait the whole minute of CBW timeout), the view
// reads their point-in-time data from memory, and once the target answers
// again the stores put it there.
TEST_F(FaultTest, BufferedCbwWritesDoNotWaitForAHungTarget) {
  ropts_.cbw_timeout_ms = 60'000;
  MakeDrive(RandomBytes(4 * kMiB, 47), false);
  ASSERT_TRUE(registry_->StartBackups({Opts(SyncMode::kNone)}).ok());
  SetFaults("tgt.img write hang");
  std::string expect = data_;
  const std::vector<uint64_t> offs = {2 * kMiB + 100, 3 * kMiB, 4 * kMiB - 4096};
  for (uint64_t off : offs) {
    std::string fresh = RandomBytes(4096, off);
    auto w = drive_->Write(fresh.data(), fresh.size(), off);
    ASSERT_TRUE(w.ok()) << w.status().message();
    expect.replace(off, fresh.size(), fresh);
  }
  ASSERT_TRUE(WaitHeld());  // the stores are stuck in the target
  EXPECT_TRUE(SameBytes(ReadAll(dir_ / "src.img"), expect));
  // The view: the overwritten clusters come from memory (the target hangs),
  // the rest from the source.
  std::string view(2 * kMiB, '\0');
  auto r = registry_->ReadSnapshot("drive0", view.data(), view.size(), 2 * kMiB);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_TRUE(SameBytes(view, data_.substr(2 * kMiB)));
  EXPECT_TRUE(Status(JobStatus::kRunning));
  SetFaults("");
  // The stores finish: the target holds the old clusters (fleecing).
  EXPECT_TRUE(WaitFor([&] {
    std::string t = Target();
    for (uint64_t off : offs) {
      const uint64_t c = off / 65536 * 65536;
      if (t.size() < c + 65536 || t.compare(c, 65536, data_, c, 65536) != 0) return false;
    }
    return true;
  }));
  EXPECT_EQ(Info()->cbw_bytes, 3 * 65536u);
  ASSERT_TRUE(registry_->Cancel("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
  EXPECT_EQ(Info()->result, JobResult::kCancelled);
}

// A full buffer: writers wait for room, and the CBW timeout still applies
// (break-snapshot: the write goes through, the job fails).
TEST_F(FaultTest, BufferedCbwFullBufferWaitsThenTimesOut) {
  ropts_.cbw_timeout_ms = 500;
  ropts_.cbw_buffer_bytes = 128 * 1024;
  MakeDrive(RandomBytes(4 * kMiB, 48), false);
  ASSERT_TRUE(registry_->StartBackups({Opts(SyncMode::kNone)}).ok());
  SetFaults("tgt.img write hang");
  std::string fresh = RandomBytes(65536, 49);
  // Two clusters fill the buffer at once.
  ASSERT_TRUE(drive_->Write(fresh.data(), fresh.size(), kMiB).ok());
  ASSERT_TRUE(drive_->Write(fresh.data(), fresh.size(), 2 * kMiB).ok());
  EXPECT_TRUE(Status(JobStatus::kRunning));
  auto t0 = std::chrono::steady_clock::now();
  auto w = drive_->Write(fresh.data(), fresh.size(), 3 * kMiB);
  ASSERT_TRUE(w.ok()) << w.status().message();
  EXPECT_GE(SecondsSince(t0), 0.4);
  ASSERT_TRUE(WaitFor([&] { return Ended(); }, 5));
  EXPECT_EQ(Info()->result, JobResult::kFailed);
  EXPECT_NE(Info()->error.value_or("").find("timed out"), std::string::npos) << *Info()->error;
  std::string src = ReadAll(dir_ / "src.img");
  for (uint64_t off : {kMiB, 2 * kMiB, 3 * kMiB}) {
    EXPECT_EQ(src.substr(off, fresh.size()), fresh);
  }
  SetFaults("");
}

// Seeks on a view: a buffered cluster is data even where the target still
// has a hole.
TEST_F(FaultTest, BufferedCbwClustersAreDataToSeeks) {
  std::string data(4 * kMiB, '\0');
  std::string old = RandomBytes(65536, 50);
  data.replace(10 * 65536, old.size(), old);
  MakeDrive(data, false);
  {
    // A sparse source: data only in cluster 10.
    int fd = open((dir_ / "src.img").c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 10 * 65536), 0);
    ASSERT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 11 * 65536,
                        4 * kMiB - 11 * 65536),
              0);
    close(fd);
  }
  ASSERT_TRUE(registry_->StartBackups({Opts(SyncMode::kNone)}).ok());
  SetFaults("tgt.img write hang");
  std::string fresh = RandomBytes(4096, 51);
  ASSERT_TRUE(drive_->Write(fresh.data(), fresh.size(), 10 * 65536).ok());
  auto d = registry_->SeekSnapshot("drive0", 0, SEEK_DATA);
  ASSERT_TRUE(d.ok()) << d.status().message();
  EXPECT_EQ(*d, 10 * 65536u);
  auto h = registry_->SeekSnapshot("drive0", 10 * 65536, SEEK_HOLE);
  ASSERT_TRUE(h.ok()) << h.status().message();
  EXPECT_EQ(*h, 11 * 65536u);
  std::string view(65536, '\0');
  ASSERT_TRUE(registry_->ReadSnapshot("drive0", view.data(), view.size(), 10 * 65536).ok());
  EXPECT_TRUE(SameBytes(view, old));
  SetFaults("");
  ASSERT_TRUE(registry_->Cancel("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return Ended(); }));
}

}  // namespace
}  // namespace cbw::backup
