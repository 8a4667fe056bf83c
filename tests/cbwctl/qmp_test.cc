#include "cbwctl/qmp.h"

#include <gtest/gtest.h>

namespace cbw::ctl {
namespace {

TEST(BackupCommand, OnlyWhatWasGiven) {
  auto inv = ParseArgs({"backup", "drive0", "/b/x.img"});
  ASSERT_TRUE(inv.ok());
  EXPECT_EQ(BackupCommand(inv->backup).dump(),
            R"({"execute":"drive-backup","arguments":{"device":"drive0","target":"/b/x.img",)"
            R"("sync":"full"}})");
}

TEST(BackupCommand, EveryOption) {
  auto inv = ParseArgs({"backup", "drive0", "/b/x.qcow2", "--sync", "bitmap", "--speed", "2M",
                        "--bitmap", "b0", "--bitmap-mode", "always", "--job-id", "j1", "--format",
                        "qcow2", "--mode", "existing", "--wait"});
  ASSERT_TRUE(inv.ok());
  EXPECT_EQ(BackupCommand(inv->backup).dump(),
            R"({"execute":"drive-backup","arguments":{"device":"drive0","job-id":"j1",)"
            R"("target":"/b/x.qcow2","format":"qcow2","mode":"existing","sync":"bitmap",)"
            R"("bitmap":"b0","bitmap-mode":"always","speed":2097152}})");
}

TEST(CancelCommand, IsJobCancel) {
  EXPECT_EQ(CancelCommand("j1").dump(), R"({"execute":"job-cancel","arguments":{"id":"j1"}})");
}

TEST(BitmapCommand, AddRemoveClearUseNodeAndName) {
  auto add = ParseArgs({"bitmap", "add", "drive0", "b0"});
  ASSERT_TRUE(add.ok());
  EXPECT_EQ(BitmapCommand(add->bitmap).dump(),
            R"({"execute":"block-dirty-bitmap-add","arguments":{"node":"drive0","name":"b0"}})");
  auto add_all = ParseArgs(
      {"bitmap", "add", "drive0", "b0", "--granularity", "128K", "--persistent", "--disabled"});
  ASSERT_TRUE(add_all.ok());
  EXPECT_EQ(BitmapCommand(add_all->bitmap).dump(),
            R"({"execute":"block-dirty-bitmap-add","arguments":{"node":"drive0","name":"b0",)"
            R"("granularity":131072,"persistent":true,"disabled":true}})");
  auto rm = ParseArgs({"bitmap", "remove", "drive1", "nightly"});
  ASSERT_TRUE(rm.ok());
  EXPECT_EQ(
      BitmapCommand(rm->bitmap).dump(),
      R"({"execute":"block-dirty-bitmap-remove","arguments":{"node":"drive1","name":"nightly"}})");
  auto clear = ParseArgs({"bitmap", "clear", "drive1", "nightly"});
  ASSERT_TRUE(clear.ok());
  EXPECT_EQ(
      BitmapCommand(clear->bitmap).dump(),
      R"({"execute":"block-dirty-bitmap-clear","arguments":{"node":"drive1","name":"nightly"}})");
}

TEST(CommandText, OneLineWithId) {
  EXPECT_EQ(CommandText(CancelCommand("j1"), "cbwctl-7-1"),
            "{\"execute\":\"job-cancel\",\"arguments\":{\"id\":\"j1\"},\"id\":\"cbwctl-7-1\"}\n");
}

TEST(ParseReply, ReturnErrorAndGarbage) {
  auto ok = ParseReply(R"({"return": {}, "id": "x"})");
  ASSERT_TRUE(ok.ok());
  EXPECT_TRUE(ok->ok);
  EXPECT_EQ(ok->id, "x");
  auto err = ParseReply(
      R"({"error": {"class": "CommandNotFound", "desc": "The command foo has not been found"}})");
  ASSERT_TRUE(err.ok());
  EXPECT_FALSE(err->ok);
  EXPECT_EQ(err->error_class, "CommandNotFound");
  EXPECT_EQ(err->desc, "The command foo has not been found");
  EXPECT_TRUE(err->id.is_null());
  for (const char* bad : {"", "nonsense", "[]", R"({"event": "X"})"}) {
    auto r = ParseReply(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().exit_code, kExitMount);
  }
}

TEST(EventConcernsJob, MatchesOnlyTheJobsEndingEvents) {
  const char* ts = R"(, "timestamp": {"seconds": 1, "microseconds": 2}})";
  auto ev = [&](const std::string& name, const std::string& data) {
    return R"({"event": ")" + name + R"(", "data": )" + data + ts;
  };
  EXPECT_TRUE(
      EventConcernsJob(ev("JOB_STATUS_CHANGE", R"({"id": "j1", "status": "concluded"})"), "j1"));
  EXPECT_FALSE(
      EventConcernsJob(ev("JOB_STATUS_CHANGE", R"({"id": "j2", "status": "concluded"})"), "j1"));
  EXPECT_TRUE(EventConcernsJob(
      ev("BLOCK_JOB_COMPLETED", R"({"type": "backup", "device": "j1", "len": 1, "offset": 1})"),
      "j1"));
  EXPECT_TRUE(
      EventConcernsJob(ev("BLOCK_JOB_CANCELLED", R"({"type": "backup", "device": "j1"})"), "j1"));
  EXPECT_FALSE(
      EventConcernsJob(ev("BLOCK_JOB_CANCELLED", R"({"type": "backup", "device": "j10"})"), "j1"));
  EXPECT_TRUE(EventConcernsJob(
      ev("BLOCK_JOB_ERROR", R"({"device": "j1", "operation": "write", "action": "stop"})"), "j1"));
  EXPECT_TRUE(EventConcernsJob(ev("BLOCK_JOB_PENDING", R"({"type": "backup", "id": "j1"})"), "j1"));
  EXPECT_TRUE(EventConcernsJob(ev("EVENTS_DROPPED", R"({"count": 3})"), "j1"));
  EXPECT_FALSE(EventConcernsJob(ev("SOMETHING_ELSE", R"({"id": "j1"})"), "j1"));
  EXPECT_FALSE(EventConcernsJob("not json", "j1"));
  EXPECT_FALSE(EventConcernsJob(R"({"event": "JOB_STATUS_CHANGE", "data": {"id": 1}})", "j1"));
}

}  // namespace
}  // namespace cbw::ctl
