// --state-dir and dead targets through the real daemon: job records across
// SIGTERM and SIGKILL restarts, and a backup target on a hung faultfs mount.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "tests/fs/mount_fixture.h"
#include "tests/lib/faultfs_mount.h"

namespace cbw::test {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// The content of a file, or "" if it cannot be read (yet).
std::string ReadIfAny(const std::string& path) {
  CommandResult r = RunCommand({"cat", path});
  return r.exit_code == 0 ? r.out : "";
}

json Record(CbwfsMount& m, const std::string& id) {
  json j = json::parse(m.JobRecord(id), nullptr, false);
  return j.is_object() ? j : json::object();
}

std::string Backup(const std::string& id, const std::string& target, uint64_t speed) {
  return json{{"execute", "drive-backup"},
              {"arguments",
               {{"device", "drive0"},
                {"job-id", id},
                {"target", target},
                {"sync", "full"},
                {"speed", speed}}}}
      .dump();
}

TEST(StateDir, RecordsSurviveSigtermAndSigkill) {
  TempDir dir;
  const std::string src = dir / "src.img";
  const std::string image = RandomBytes(8 << 20, 5);
  WriteFileOrDie(src, image);
  const std::vector<std::string> args = {"--drive", "drive0=" + src, "--state-dir", dir / "state"};
  std::string done_shown;  // jobs/done as the first daemon showed it
  {
    CbwfsMount m;
    ASSERT_TRUE(m.Start(args));
    ASSERT_EQ(m.Control(Backup("done", dir / "done.img", 0)), 0);
    ASSERT_TRUE(m.WaitJobStatus("done", {"null", "concluded"}));
    // The record in the state dir is the job's jobs/ file, byte for byte (the
    // persister writes it shortly after the last change), and jq reads it.
    EXPECT_TRUE(WaitFor([&] {
      done_shown = m.JobRecord("done");
      return json::parse(done_shown, nullptr, false).value("status", "") == "null" &&
             ReadIfAny(dir / "state/done.json") == done_shown;
    })) << ReadIfAny(dir / "state/done.json")
        << done_shown;
    CommandResult jq = RunCommand(
        {"jq", "-r", R"(.device + " " + .status + " " + .result)", dir / "state/done.json"});
    EXPECT_EQ(jq.exit_code, 0) << jq.err;
    EXPECT_EQ(jq.out, "done null success\n");
    ASSERT_EQ(m.Control(Backup("stopped", dir / "stopped.img", 1 << 20)), 0);
    ASSERT_TRUE(WaitFor([&] { return Record(m, "stopped").value("offset", 0) > 0; }));
    EXPECT_EQ(m.Stop(SIGTERM), 0);
  }
  struct stat st {};
  ASSERT_EQ(stat((dir / "state").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  {
    CbwfsMount m;
    ASSERT_TRUE(m.Start(args));
    EXPECT_EQ(Record(m, "done").value("result", ""), "success") << m.JobRecord("done");
    EXPECT_EQ(m.JobRecord("done"), done_shown);  // read back from the record, unchanged
    EXPECT_EQ(Record(m, "stopped").value("result", ""), "cancelled") << m.JobRecord("stopped");
    ASSERT_EQ(m.Control(Backup("killed", dir / "killed.img", 1 << 20)), 0);
    ASSERT_TRUE(WaitFor([&] { return Record(m, "killed").value("offset", 0) > 0; }));
    // Records are written by a persister thread, within milliseconds.
    ASSERT_TRUE(WaitFor([&] { return access((dir / "state/killed.json").c_str(), F_OK) == 0; }));
    EXPECT_EQ(m.Stop(SIGKILL), 128 + SIGKILL);
    RunCommand({"fusermount3", "-uz", m.mnt()});
  }
  {
    CbwfsMount m;
    ASSERT_TRUE(m.Start(args));
    json k = Record(m, "killed");
    EXPECT_EQ(k.value("result", ""), "failed") << k.dump();
    EXPECT_EQ(k.value("status", ""), "concluded") << k.dump();
    EXPECT_EQ(k.value("error", ""), "daemon stopped") << k.dump();
    EXPECT_EQ(Record(m, "done").value("result", ""), "success");
    // Not listed to QMP; rm drops the record for good.
    std::string reply;
    ASSERT_EQ(m.Control(R"({"execute":"query-block-jobs"})", &reply), 0);
    EXPECT_EQ(json::parse(reply, nullptr, false).value("return", json::array({1})).size(), 0u)
        << reply;
    ASSERT_EQ(unlink((m / "jobs/done").c_str()), 0);
    EXPECT_EQ(m.Stop(SIGTERM), 0);
  }
  EXPECT_EQ(ReadFileOrDie(src), image);
  {
    CbwfsMount m;
    ASSERT_TRUE(m.Start(args));
    EXPECT_EQ(m.JobRecord("done"), "");
    EXPECT_FALSE(m.JobRecord("killed").empty());
    EXPECT_EQ(m.Stop(SIGTERM), 0);
  }
}

TEST(StateDir, UnusableStateDirFailsTheStart) {
  TempDir dir;
  WriteFileOrDie(dir / "src.img", std::string(1 << 20, 'x'));
  WriteFileOrDie(dir / "afile", "x");
  mkdir((dir / "mnt").c_str(), 0755);
  CommandResult r = RunCommand({CbwfsBinary(), "-f", "--drive", "drive0=" + (dir / "src.img"),
                                "--state-dir", dir / "afile", dir / "mnt"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find(dir / "afile"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("Not a directory"), std::string::npos) << r.err;
}

// A target on a faultfs mount whose writes hang.
class HungTarget : public ::testing::Test {
 protected:
  void SetUp() override {
    faults_ = std::make_unique<FaultFs>(FAULTFS_PATH, dir_ / "backing", dir_ / "fmnt");
    if (!faults_->mounted()) GTEST_SKIP() << "faultfs could not mount";
    image_ = RandomBytes(32 << 20, 9);
    WriteFileOrDie(dir_ / "src.img", image_);
    faults_->SetRules("tgt.img write hang 8388608 33554432\n");
    ASSERT_TRUE(
        m_.Start({"--drive", "drive0=" + (dir_ / "src.img"), "--state-dir", dir_ / "state"}));
    ASSERT_EQ(m_.Control(Backup("j", dir_ / "fmnt/tgt.img", 0)), 0);
    ASSERT_TRUE(WaitFor([&] { return Record(m_, "j").value("offset", 0) >= (8 << 20); }));
  }
  void TearDown() override { faults_.reset(); }
  TempDir dir_;
  std::unique_ptr<FaultFs> faults_;
  std::string image_;
  CbwfsMount m_;
};

TEST_F(HungTarget, JobCancelEndsTheJobWithinSeconds) {
  auto t0 = Clock::now();
  ASSERT_EQ(m_.Control(R"({"execute":"job-cancel","arguments":{"id":"j"}})"), 0);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 1.0);
  EXPECT_TRUE(m_.WaitJobStatus("j", {"null", "concluded"}, std::chrono::seconds(5)))
      << m_.JobRecord("j");
  EXPECT_EQ(Record(m_, "j").value("result", ""), "cancelled");
  EXPECT_EQ(ReadFileOrDie(dir_ / "src.img"), image_);
}

TEST_F(HungTarget, SigtermExitsWithinFifteenSeconds) {
  auto t0 = Clock::now();
  kill(m_.pid(), SIGTERM);
  ASSERT_TRUE(WaitFor([&] { return !m_.alive(); }, std::chrono::seconds(15)))
      << "still running after SIGTERM";
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 15.0);
  EXPECT_EQ(m_.Stop(SIGTERM), 0) << m_.log();
  EXPECT_EQ(ReadFileOrDie(dir_ / "src.img"), image_);
  std::string rec = ReadFileOrDie(dir_ / "state/j.json");
  EXPECT_EQ(json::parse(rec, nullptr, false).value("result", ""), "cancelled") << rec;
}

}  // namespace
}  // namespace cbw::test
