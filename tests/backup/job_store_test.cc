// --state-dir persistence: the record format, skipping bad files, and job
// records surviving a registry restart (clean stop, and a crash mid-job).

#include "backup/job_store.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/backup/test_util.h"

namespace cbw::backup {
namespace {

using testing::RandomBytes;
using testing::ReadAll;
using testing::TempDir;
using testing::WaitFor;

TEST(JobStoreTest, FormatParseRoundTripWithEscapes) {
  JobInfo i;
  i.id = "job0";
  i.drive = "drive0";
  i.target = "/tmp/a b\nc\\d\te\x01.img";
  i.status = JobStatus::kConcluded;
  i.result = JobResult::kFailed;
  i.error = "Input/output error";
  i.len = 1 << 20;
  i.offset = 4096;
  i.started = 1700000000.25;
  i.finished = 1700000001.5;
  i.listed = false;
  std::string text = JobStore::Format(i);
  EXPECT_EQ(text.find('\x01'), std::string::npos);
  auto back = JobStore::Parse(text);
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->target, i.target);
  EXPECT_EQ(back->error, i.error);
  EXPECT_EQ(back->status, JobStatus::kConcluded);
  EXPECT_EQ(back->result, JobResult::kFailed);
  EXPECT_EQ(back->offset, 4096u);
  EXPECT_DOUBLE_EQ(*back->finished, 1700000001.5);
  EXPECT_FALSE(back->listed);
  // Cut short, or tampered with: refused.
  EXPECT_FALSE(JobStore::Parse(text.substr(0, text.size() - 4)).ok());
  EXPECT_FALSE(JobStore::Parse("{\"id\": \"x\"}\n").ok());
  EXPECT_FALSE(JobStore::Parse("cbwfs-job 1\nid=job0\nend\n").ok());
}

TEST(JobStoreTest, OpenCreatesTheDirAndRefusesAnUnusableOne) {
  TempDir dir;
  auto s = JobStore::Open(dir / "a/b");
  ASSERT_TRUE(s.ok()) << s.status().message();
  struct stat st {};
  ASSERT_EQ(stat((dir / "a/b").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  testing::WriteAt(dir / "file", "x", 0);
  auto bad = JobStore::Open(dir / "file");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), ENOTDIR);
  EXPECT_NE(bad.status().message().find(dir / "file"), std::string::npos);
  EXPECT_NE(bad.status().message().find(std::strerror(ENOTDIR)), std::string::npos);
}

TEST(JobStoreTest, LoadSkipsCorruptAndForeignFiles) {
  TempDir dir;
  auto s = JobStore::Open(dir.path());
  ASSERT_TRUE(s.ok());
  JobInfo i;
  i.id = "good";
  i.drive = "drive0";
  i.status = JobStatus::kNull;
  i.result = JobResult::kSuccess;
  ASSERT_TRUE((*s)->Save(i).ok());
  testing::WriteAt(dir / "bad.job", "cbwfs-job 1\nid=bad\ndrive=d\n", 0);  // torn
  testing::WriteAt(dir / "other.job", JobStore::Format(i), 0);             // wrong id
  testing::WriteAt(dir / "junk.txt", "hello", 0);
  testing::WriteAt(dir / "bin.job", std::string("\0\xff\n", 3), 0);
  mkdir((dir / "sub.job").c_str(), 0700);
  testing::WriteAt(dir / ".x.tmp", "partial", 0);
  auto loaded = (*s)->Load();
  ASSERT_EQ(loaded.size(), 1u);
  EXPECT_EQ(loaded[0].id, "good");
  EXPECT_NE(access((dir / ".x.tmp").c_str(), F_OK), 0);   // stale temp removed
  EXPECT_EQ(access((dir / "bad.job").c_str(), F_OK), 0);  // corrupt left alone
}

struct StateFixture {
  explicit StateFixture(const std::string& state) {
    source = dir / "source.img";
    if (access(source.c_str(), F_OK) != 0) testing::WriteAt(source, RandomBytes(8 << 20, 3), 0);
    Open(state);
  }
  void Open(const std::string& state) {
    registry.reset();
    drive.reset();
    auto d = Drive::Open(DriveConfig{"drive0", source, false});
    if (!d.ok()) std::abort();
    drive = std::move(*d);
    RegistryOptions o;
    o.base_dir = dir.path();
    o.state_dir = state;
    auto r = JobRegistry::Open({drive.get()}, &bus, o);
    if (!r.ok()) std::abort();
    registry = std::move(*r);
  }
  BackupOptions Opts(const std::string& id, uint64_t speed = 0) {
    BackupOptions o;
    o.device = "drive0";
    o.job_id = id;
    o.target = id + ".img";
    o.speed = speed;
    return o;
  }
  TempDir dir;
  std::string source;
  EventBus bus;
  std::unique_ptr<Drive> drive;
  std::unique_ptr<JobRegistry> registry;
};

TEST(JobStoreTest, RecordsSurviveARestartUntilRemoved) {
  TempDir state;
  StateFixture f(state.path());
  ASSERT_TRUE(f.registry->StartBackups({f.Opts("done")}).ok());
  ASSERT_TRUE(WaitFor([&] { return f.registry->GetJobFile("done")->result != JobResult::kNone; }));
  ASSERT_TRUE(f.registry->StartBackups({f.Opts("slow", 1 << 20)}).ok());
  ASSERT_TRUE(WaitFor([&] { return f.registry->GetJobFile("slow")->offset > 0; }));
  f.Open(state.path());  // Shutdown cancels "slow"
  auto done = f.registry->GetJobFile("done");
  ASSERT_TRUE(done.has_value());
  EXPECT_EQ(done->result, JobResult::kSuccess);
  EXPECT_FALSE(done->listed);
  auto slow = f.registry->GetJobFile("slow");
  ASSERT_TRUE(slow.has_value());
  EXPECT_EQ(slow->result, JobResult::kCancelled);
  EXPECT_TRUE(f.registry->ListJobs().empty());
  ASSERT_TRUE(f.registry->RemoveJobFile("done").ok());
  EXPECT_NE(access((state / "done.job").c_str(), F_OK), 0);
  f.Open(state.path());
  EXPECT_FALSE(f.registry->GetJobFile("done").has_value());
  EXPECT_TRUE(f.registry->GetJobFile("slow").has_value());
  // A new job takes the id of a loaded record.
  ASSERT_TRUE(f.registry->StartBackups({f.Opts("slow")}).ok());
  ASSERT_TRUE(
      WaitFor([&] { return f.registry->GetJobFile("slow")->result == JobResult::kSuccess; }));
}

TEST(JobStoreTest, AJobRunningWhenTheProcessDiedComesBackFailed) {
  TempDir state;
  StateFixture f(state.path());
  f.registry.reset();
  f.drive.reset();
  // The child is the "daemon" that crashes, on the same source and state dir.
  pid_t pid = fork();
  if (pid == 0) {
    f.Open(state.path());
    if (!f.registry->StartBackups({f.Opts("torn", 1 << 20)}).ok()) _exit(2);
    WaitFor(
        [&] { return ReadAll(state / "torn.job").find("status=running") != std::string::npos; });
    _exit(0);  // no destructors: as if SIGKILLed
  }
  int st = 0;
  waitpid(pid, &st, 0);
  ASSERT_EQ(WEXITSTATUS(st), 0);
  f.Open(state.path());
  auto torn = f.registry->GetJobFile("torn");
  ASSERT_TRUE(torn.has_value());
  EXPECT_EQ(torn->result, JobResult::kFailed);
  EXPECT_EQ(torn->status, JobStatus::kConcluded);
  EXPECT_EQ(torn->error.value_or(""), "daemon stopped");
  EXPECT_FALSE(torn->listed);
  EXPECT_TRUE(torn->finished.has_value());
}

}  // namespace
}  // namespace cbw::backup
