#include "cbwctl/cli.h"

#include <gtest/gtest.h>

namespace cbw::ctl {
namespace {

Invocation Parse(const std::vector<std::string>& args) {
  auto r = ParseArgs(args);
  EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.error().message);
  return r.ok() ? *r : Invocation{};
}

std::string UsageMessage(const std::vector<std::string>& args) {
  auto r = ParseArgs(args);
  if (r.ok()) return "(accepted)";
  EXPECT_EQ(r.error().exit_code, kExitUsage) << r.error().message;
  return r.error().message;
}

TEST(ParseArgs, BackupDefaults) {
  Invocation inv = Parse({"backup", "drive0", "/b/x.img"});
  EXPECT_EQ(inv.verb, Verb::kBackup);
  EXPECT_EQ(inv.backup.drive, "drive0");
  EXPECT_EQ(inv.backup.target, "/b/x.img");
  EXPECT_EQ(inv.backup.sync, "full");
  EXPECT_FALSE(inv.backup.speed);
  EXPECT_FALSE(inv.backup.job_id);
  EXPECT_FALSE(inv.backup.wait);
  EXPECT_EQ(inv.backup.JobId(), "drive0");
  EXPECT_FALSE(inv.mountpoint);
}

TEST(ParseArgs, BackupOptionsAnywhereAndBothSpellings) {
  Invocation inv = Parse({"-m", "/mnt/cbw", "backup", "--speed=100M", "drive0", "--job-id", "j1",
                          "x.img", "--wait", "--format", "qcow2", "--mode=existing", "-q"});
  EXPECT_EQ(*inv.mountpoint, "/mnt/cbw");
  EXPECT_EQ(*inv.backup.speed, 100u << 20);
  EXPECT_EQ(*inv.backup.job_id, "j1");
  EXPECT_EQ(inv.backup.JobId(), "j1");
  EXPECT_EQ(inv.backup.target, "x.img");
  EXPECT_TRUE(inv.backup.wait);
  EXPECT_TRUE(inv.quiet);
  EXPECT_EQ(*inv.backup.format, "qcow2");
  EXPECT_EQ(*inv.backup.mode, "existing");
  EXPECT_EQ(*Parse({"status", "-m/x"}).mountpoint, "/x");
  EXPECT_EQ(*Parse({"status", "--mount=/y"}).mountpoint, "/y");
}

TEST(ParseArgs, BitmapMakesSyncIncrementalUnlessGiven) {
  EXPECT_EQ(Parse({"backup", "d", "t", "--bitmap", "b0"}).backup.sync, "incremental");
  Invocation inv =
      Parse({"backup", "d", "t", "--bitmap", "b0", "--sync", "full", "--bitmap-mode", "never"});
  EXPECT_EQ(inv.backup.sync, "full");
  EXPECT_EQ(*inv.backup.bitmap, "b0");
  EXPECT_EQ(*inv.backup.bitmap_mode, "never");
}

TEST(ParseArgs, OtherCommands) {
  Invocation s = Parse({"status"});
  EXPECT_EQ(s.verb, Verb::kStatus);
  EXPECT_EQ(s.job, "");
  Invocation sj = Parse({"status", "job1", "--json"});
  EXPECT_EQ(sj.job, "job1");
  EXPECT_TRUE(sj.json);
  Invocation w = Parse({"wait", "job1"});
  EXPECT_EQ(w.verb, Verb::kWait);
  EXPECT_EQ(w.job, "job1");
  Invocation c = Parse({"cancel", "job1"});
  EXPECT_EQ(c.verb, Verb::kCancel);
  EXPECT_EQ(c.job, "job1");
  Invocation b = Parse({"bitmap", "add", "drive0", "b0", "--granularity", "64K", "--persistent"});
  EXPECT_EQ(b.verb, Verb::kBitmap);
  EXPECT_EQ(b.bitmap.op, BitmapOp::kAdd);
  EXPECT_EQ(b.bitmap.drive, "drive0");
  EXPECT_EQ(b.bitmap.name, "b0");
  EXPECT_EQ(*b.bitmap.granularity, 65536u);
  EXPECT_TRUE(b.bitmap.persistent);
  EXPECT_EQ(Parse({"bitmap", "remove", "d", "n"}).bitmap.op, BitmapOp::kRemove);
  EXPECT_EQ(Parse({"bitmap", "clear", "d", "n"}).bitmap.op, BitmapOp::kClear);
  // "--" ends options: a job id may start with a dash only after it.
  EXPECT_EQ(Parse({"wait", "--", "-odd"}).job, "-odd");
}

TEST(ParseArgs, HelpAndVersionWin) {
  EXPECT_EQ(Parse({"--help"}).verb, Verb::kHelp);
  EXPECT_EQ(Parse({"backup", "-h"}).verb, Verb::kHelp);
  EXPECT_EQ(Parse({"help"}).verb, Verb::kHelp);
  EXPECT_EQ(Parse({"-V"}).verb, Verb::kVersion);
}

TEST(ParseArgs, UsageErrorsNameTheBadWord) {
  EXPECT_NE(UsageMessage({}).find("no command"), std::string::npos);
  EXPECT_NE(UsageMessage({"frobnicate"}).find("'frobnicate'"), std::string::npos);
  EXPECT_NE(UsageMessage({"status", "--bogus"}).find("'--bogus'"), std::string::npos);
  EXPECT_NE(UsageMessage({"status", "-x"}).find("'-x'"), std::string::npos);
  EXPECT_NE(UsageMessage({"backup", "drive0"}).find("DRIVE and TARGET"), std::string::npos);
  EXPECT_NE(UsageMessage({"backup", "d", "t", "extra"}).find("DRIVE and TARGET"),
            std::string::npos);
  EXPECT_NE(UsageMessage({"backup", "d", "t", "--speed"}).find("needs a value"), std::string::npos);
  EXPECT_NE(UsageMessage({"backup", "d", "t", "--speed", "10X"}).find("'10X'"), std::string::npos);
  EXPECT_NE(UsageMessage({"backup", "d", "t", "--sync", "fast"}).find("'fast'"), std::string::npos);
  EXPECT_NE(UsageMessage({"backup", "d", "t", "--mode", "new"}).find("'new'"), std::string::npos);
  EXPECT_NE(UsageMessage({"backup", "d", "t", "--bitmap-mode", "x"}).find("'x'"),
            std::string::npos);
  EXPECT_NE(UsageMessage({"backup", "d", "t", "-q"}).find("--wait"), std::string::npos);
  EXPECT_NE(UsageMessage({"backup", "d", "t", "--wait=yes"}).find("takes no value"),
            std::string::npos);
  EXPECT_NE(UsageMessage({"status", "--speed", "1M"}).find("does not apply to 'status'"),
            std::string::npos);
  EXPECT_NE(UsageMessage({"wait", "--json", "j"}).find("--json"), std::string::npos);
  EXPECT_NE(UsageMessage({"status", "a", "b"}).find("at most one JOB"), std::string::npos);
  EXPECT_NE(UsageMessage({"wait"}).find("one JOB"), std::string::npos);
  EXPECT_NE(UsageMessage({"cancel", "a", "b"}).find("one JOB"), std::string::npos);
  EXPECT_NE(UsageMessage({"bitmap", "add", "d"}).find("add|remove|clear"), std::string::npos);
  EXPECT_NE(UsageMessage({"bitmap", "merge", "d", "n"}).find("'merge'"), std::string::npos);
  EXPECT_NE(UsageMessage({"bitmap", "remove", "d", "n", "--persistent"}).find("add"),
            std::string::npos);
  EXPECT_NE(UsageMessage({"wait", "../x"}).find("'../x'"), std::string::npos);
  EXPECT_NE(UsageMessage({"backup", "d", "t", "--job-id", "a/b"}).find("'a/b'"), std::string::npos);
  EXPECT_NE(UsageMessage({"-m", "", "status"}).find("--mount"), std::string::npos);
}

TEST(ParseSize, SuffixesArePowersOf1024) {
  EXPECT_EQ(*ParseSize("0"), 0u);
  EXPECT_EQ(*ParseSize("1048576"), 1048576u);
  EXPECT_EQ(*ParseSize("512K"), 512u * 1024);
  EXPECT_EQ(*ParseSize("512k"), 512u * 1024);
  EXPECT_EQ(*ParseSize("100M"), 100u << 20);
  EXPECT_EQ(*ParseSize("100MiB"), 100u << 20);
  EXPECT_EQ(*ParseSize("100MB"), 100u << 20);
  EXPECT_EQ(*ParseSize("1.5G"), 3u << 29);
  EXPECT_EQ(*ParseSize("2T"), 2ull << 40);
  for (const char* bad : {"", "M", "-1", "1.5", "10X", "1MM", "1 M", "1..2M", "8E", "9000000T",
                          "9223372036854775808"}) {
    EXPECT_FALSE(ParseSize(bad)) << bad;
  }
  EXPECT_EQ(*ParseSize("9223372036854775807"), 9223372036854775807ull);
}

TEST(ResolveTarget, LocalPathsBecomeAbsoluteUrisStay) {
  EXPECT_EQ(ResolveTarget("x.img", "/home/u"), "/home/u/x.img");
  EXPECT_EQ(ResolveTarget("./b/x.img", "/home/u"), "/home/u/b/x.img");
  EXPECT_EQ(ResolveTarget("x.img", "/"), "/x.img");
  EXPECT_EQ(ResolveTarget("../x.img", "/home/u"), "/home/u/../x.img");
  EXPECT_EQ(ResolveTarget("/abs/x.img", "/home/u"), "/abs/x.img");
  EXPECT_EQ(ResolveTarget("nbd://127.0.0.1:10809/exp", "/h"), "nbd://127.0.0.1:10809/exp");
  EXPECT_EQ(ResolveTarget("nbd+unix:///exp?socket=/run/s", "/h"), "nbd+unix:///exp?socket=/run/s");
  EXPECT_EQ(ResolveTarget("rbd:pool/img", "/h"), "rbd:pool/img");
}

TEST(HelpText, DocumentsCommandsAndExitCodes) {
  std::string h = HelpText();
  for (const char* word :
       {"backup DRIVE TARGET", "status [JOB]", "wait JOB", "cancel JOB",
        "bitmap add|remove|clear DRIVE NAME", "--sync", "--speed", "--bitmap", "--wait", "--job-id",
        "--format", "--mode", "--json", "CBWFS_MOUNT", "fuse.cbwfs", "Exit status", "130"}) {
    EXPECT_NE(h.find(word), std::string::npos) << word;
  }
}

}  // namespace
}  // namespace cbw::ctl
