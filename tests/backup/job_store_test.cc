// --state-dir persistence: durable record files in the codec's format,
// skipping bad files, and job records surviving a registry restart (clean
// stop, and a crash mid-job). The daemon's format is control/'s JSON codec,
// which backup/ tests cannot link; its round trip and a registry restart
// through it are tested in tests/control/job_record_codec_test.cc. Here a
// line-per-field codec stands in: the store does not care what the bytes are.

#include "backup/job_store.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sstream>

#include "tests/backup/test_util.h"

namespace cbw::backup {
namespace {

using testing::RandomBytes;
using testing::ReadAll;
using testing::TempDir;
using testing::WaitFor;

// "rec", then what the registry reads back, one field a line, then "end".
// Strings must not hold newlines (these tests' do not).
class LineCodec : public JobRecordCodec {
 public:
  std::string_view FileSuffix() const override { return ".rec"; }
  std::string Encode(const JobInfo& i) const override {
    std::ostringstream o;
    o.precision(17);
    o << "rec\n"
      << i.id << '\n'
      << i.drive << '\n'
      << i.target << '\n'
      << static_cast<int>(i.status) << '\n'
      << static_cast<int>(i.result) << '\n'
      << i.offset << '\n'
      << i.len << '\n'
      << i.started << '\n'
      << (i.finished ? std::to_string(*i.finished) : "-") << '\n'
      << (i.error ? "+" + *i.error : "-") << '\n'
      << "end\n";
    return o.str();
  }
  Result<JobInfo> Decode(std::string_view bytes) const override {
    std::istringstream in{std::string(bytes)};
    std::string l[12];
    for (std::string& line : l) {
      if (!std::getline(in, line)) return Status::Error(EINVAL, "cut short");
    }
    if (l[0] != "rec" || l[11] != "end" || in.peek() != EOF) {
      return Status::Error(EINVAL, "not a record");
    }
    JobInfo i;
    i.id = l[1];
    i.drive = l[2];
    i.target = l[3];
    i.status = static_cast<JobStatus>(std::stoi(l[4]));
    i.result = static_cast<JobResult>(std::stoi(l[5]));
    i.offset = std::stoull(l[6]);
    i.len = std::stoull(l[7]);
    i.started = std::stod(l[8]);
    if (l[9] != "-") i.finished = std::stod(l[9]);
    if (l[10] != "-") i.error = l[10].substr(1);
    i.listed = false;
    return i;
  }
};

std::shared_ptr<const JobRecordCodec> Codec() { return std::make_shared<LineCodec>(); }

JobInfo Ended(const std::string& id) {
  JobInfo i;
  i.id = id;
  i.drive = "drive0";
  i.status = JobStatus::kNull;
  i.result = JobResult::kSuccess;
  i.started = 1700000000.5;
  i.finished = 1700000001.0;
  return i;
}

TEST(JobStoreTest, OpenCreatesTheDirAndRefusesAnUnusableOne) {
  TempDir dir;
  auto s = JobStore::Open(dir / "a/b", Codec());
  ASSERT_TRUE(s.ok()) << s.status().message();
  struct stat st {};
  ASSERT_EQ(stat((dir / "a/b").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  testing::WriteAt(dir / "file", "x", 0);
  auto bad = JobStore::Open(dir / "file", Codec());
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), ENOTDIR);
  EXPECT_NE(bad.status().message().find(dir / "file"), std::string::npos);
  EXPECT_NE(bad.status().message().find(std::strerror(ENOTDIR)), std::string::npos);
  // Without a format there is nothing to write.
  auto none = JobStore::Open(dir / "c", nullptr);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), EINVAL);
}

TEST(JobStoreTest, SaveWritesTheCodecsBytesUnderItsSuffix) {
  TempDir dir;
  auto s = JobStore::Open(dir.path(), Codec());
  ASSERT_TRUE(s.ok());
  JobInfo i = Ended("job0");
  ASSERT_TRUE((*s)->Save(i).ok());
  EXPECT_EQ((*s)->PathOf("job0"), dir / "job0.rec");
  EXPECT_EQ(ReadAll(dir / "job0.rec"), LineCodec().Encode(i));
  struct stat st {};
  ASSERT_EQ(stat((dir / "job0.rec").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  // Replaced whole, and no temp file is left behind.
  i.error = "Input/output error";
  ASSERT_TRUE((*s)->Save(i).ok());
  EXPECT_EQ(ReadAll(dir / "job0.rec"), LineCodec().Encode(i));
  EXPECT_NE(access((dir / ".job0.tmp").c_str(), F_OK), 0);
  // An id that is no file name is refused before anything is created.
  i.id = "../x";
  EXPECT_EQ((*s)->Save(i).code(), EINVAL);
  ASSERT_TRUE((*s)->Remove("job0").ok());
  EXPECT_NE(access((dir / "job0.rec").c_str(), F_OK), 0);
  EXPECT_TRUE((*s)->Remove("job0").ok());
  EXPECT_TRUE((*s)->Load().empty());
}

TEST(JobStoreTest, LoadSkipsCorruptAndForeignFiles) {
  TempDir dir;
  auto s = JobStore::Open(dir.path(), Codec());
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE((*s)->Save(Ended("good")).ok());
  JobInfo early = Ended("early");
  early.started = 1600000000;
  ASSERT_TRUE((*s)->Save(early).ok());
  testing::WriteAt(dir / "bad.rec", "rec\nbad\ndrive0\n", 0);              // torn
  testing::WriteAt(dir / "other.rec", LineCodec().Encode(Ended("x")), 0);  // wrong id
  testing::WriteAt(dir / "1x.rec", LineCodec().Encode(Ended("1x")), 0);    // not an id
  testing::WriteAt(dir / "old.job", "cbwfs-job 1\nid=old\nend\n", 0);      // other suffix
  testing::WriteAt(dir / "junk.txt", "hello", 0);
  testing::WriteAt(dir / "bin.rec", std::string("\0\xff\n", 3), 0);
  testing::WriteAt(dir / "huge.rec", std::string(65 * 1024, 'x'), 0);
  mkdir((dir / "sub.rec").c_str(), 0700);
  symlink((dir / "good.rec").c_str(), (dir / "link.rec").c_str());
  testing::WriteAt(dir / ".x.tmp", "partial", 0);
  auto loaded = (*s)->Load();
  ASSERT_EQ(loaded.size(), 2u);
  EXPECT_EQ(loaded[0].id, "early");  // oldest start first
  EXPECT_EQ(loaded[1].id, "good");
  EXPECT_EQ(loaded[1].result, JobResult::kSuccess);
  EXPECT_NE(access((dir / ".x.tmp").c_str(), F_OK), 0);   // stale temp removed
  EXPECT_EQ(access((dir / "bad.rec").c_str(), F_OK), 0);  // corrupt left alone
  EXPECT_EQ(access((dir / "old.job").c_str(), F_OK), 0);  // foreign left alone
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
    o.record_codec = Codec();
    auto r = JobRegistry::Open({drive.get()}, &bus, o);
    if (!r.ok()) std::abort();
    registry = std::move(*r);
    registry->StartBackgroundThreads();
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
  EXPECT_NE(access((state / "done.rec").c_str(), F_OK), 0);
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
    WaitFor([&] {
      auto r = LineCodec().Decode(ReadAll(state / "torn.rec"));
      return r.ok() && r->status == JobStatus::kRunning;
    });
    _exit(0);  // no destructors: as if SIGKILLed
  }
  int st = 0;
  waitpid(pid, &st, 0);
  ASSERT_EQ(WEXITSTATUS(st), 0);
  // A torn record has no end time: the registry takes its file's mtime.
  struct stat rec {};
  ASSERT_EQ(stat((state / "torn.rec").c_str(), &rec), 0);
  const double mtime = static_cast<double>(rec.st_mtim.tv_sec) + rec.st_mtim.tv_nsec / 1e9;
  f.Open(state.path());
  auto torn = f.registry->GetJobFile("torn");
  ASSERT_TRUE(torn.has_value());
  EXPECT_EQ(torn->result, JobResult::kFailed);
  EXPECT_EQ(torn->status, JobStatus::kConcluded);
  EXPECT_EQ(torn->error.value_or(""), "daemon stopped");
  EXPECT_FALSE(torn->listed);
  ASSERT_TRUE(torn->finished.has_value());
  EXPECT_DOUBLE_EQ(*torn->finished, std::max(mtime, torn->started));
}

}  // namespace
}  // namespace cbw::backup
