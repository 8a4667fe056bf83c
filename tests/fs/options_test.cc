#include "fs/options.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace cbw::fs {
namespace {

backup::Result<Options> Parse(std::vector<std::string> args) {
  args.insert(args.begin(), "cbwfs");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return ParseOptions(static_cast<int>(argv.size()), argv.data());
}

TEST(Options, Minimal) {
  auto o = Parse({"--drive", "drive0=/img", "/mnt"});
  ASSERT_TRUE(o.ok()) << o.status().message();
  ASSERT_EQ(o->drives.size(), 1u);
  EXPECT_EQ(o->drives[0].name, "drive0");
  EXPECT_EQ(o->drives[0].path, "/img");
  EXPECT_FALSE(o->drives[0].readonly);
  EXPECT_EQ(o->mountpoint, "/mnt");
  EXPECT_EQ(o->cluster_size, 64u * 1024);
  EXPECT_FALSE(o->foreground);
}

TEST(Options, Everything) {
  auto o = Parse({"-f", "--drive", "a=/x,readonly=on", "--drive=b.2=/y,z", "-o", "allow_other,ro",
                  "-o", "fsname=x", "--cluster-size", "1M", "--state-dir", "/s", "--log-level",
                  "debug", "/m"});
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_TRUE(o->foreground);
  ASSERT_EQ(o->drives.size(), 2u);
  EXPECT_TRUE(o->drives[0].readonly);
  EXPECT_EQ(o->drives[1].name, "b.2");
  EXPECT_EQ(o->drives[1].path, "/y,z");  // commas in paths survive
  EXPECT_EQ(o->mount_options, (std::vector<std::string>{"allow_other", "ro", "fsname=x"}));
  EXPECT_EQ(o->cluster_size, 1u << 20);
  EXPECT_EQ(o->state_dir, "/s");
  EXPECT_EQ(o->log_level, backup::LogLevel::kDebug);
}

TEST(Options, WritebackCacheIsCbwfsOwnMountOption) {
  auto off = Parse({"--drive", "d=/x", "-o", "allow_other", "/m"});
  ASSERT_TRUE(off.ok()) << off.status().message();
  EXPECT_FALSE(off->writeback_cache);
  auto on = Parse({"--drive", "d=/x", "-o", "allow_other,writeback_cache", "-o", "ro", "/m"});
  ASSERT_TRUE(on.ok()) << on.status().message();
  EXPECT_TRUE(on->writeback_cache);
  // Taken out: libfuse's own parser would refuse it.
  EXPECT_EQ(on->mount_options, (std::vector<std::string>{"allow_other", "ro"}));
  auto last = Parse({"--drive", "d=/x", "-o", "writeback_cache,no_writeback_cache", "/m"});
  ASSERT_TRUE(last.ok()) << last.status().message();
  EXPECT_FALSE(last->writeback_cache);
  EXPECT_TRUE(last->mount_options.empty());
}

TEST(Options, ClusterSizes) {
  EXPECT_EQ(Parse({"--drive", "d=/x", "--cluster-size", "4K", "/m"})->cluster_size, 4096u);
  EXPECT_EQ(Parse({"--drive", "d=/x", "--cluster-size", "16M", "/m"})->cluster_size, 16u << 20);
  EXPECT_EQ(Parse({"--drive", "d=/x", "--cluster-size", "131072", "/m"})->cluster_size, 131072u);
  for (const char* bad : {"2K", "32M", "65537", "64G", "x", "", "-4K", "99999999999999999999K"}) {
    auto o = Parse({"--drive", "d=/x", "--cluster-size", bad, "/m"});
    ASSERT_FALSE(o.ok()) << bad;
    EXPECT_NE(o.status().message().find("--cluster-size"), std::string::npos);
  }
}

TEST(Options, UsageErrorsNameTheProblem) {
  struct Case {
    std::vector<std::string> args;
    std::string needle;
  } cases[] = {
      {{"/m"}, "--drive"},
      {{"--drive", "d=/x"}, "MOUNTPOINT"},
      {{"--drive", "d=/x", "/m", "/n"}, "/n"},
      {{"--drive", "nopath", "/m"}, "nopath"},
      {{"--drive", "1d=/x", "/m"}, "invalid drive name '1d'"},
      {{"--drive", "d/e=/x", "/m"}, "invalid drive name"},
      {{"--drive", "control=/x", "/m"}, "reserved"},
      {{"--drive", "jobs=/x", "/m"}, "reserved"},
      {{"--drive", "d=/x", "--drive", "d=/y", "/m"}, "given twice"},
      {{"--drive", "d=/x,readonly=maybe", "/m"}, "readonly"},
      {{"--drive", "d=", "/m"}, "empty PATH"},
      {{"--drive", "d=/x", "--log-level", "loud", "/m"}, "--log-level"},
      {{"--drive", "d=/x", "--bogus", "/m"}, "bogus"},
      {{"--drive", "d=/x", "--cluster-size"}, "cluster-size"},
  };
  for (const auto& c : cases) {
    auto o = Parse(c.args);
    ASSERT_FALSE(o.ok()) << c.needle;
    EXPECT_EQ(o.status().code(), EINVAL);
    EXPECT_NE(o.status().message().find(c.needle), std::string::npos)
        << o.status().message() << " should mention " << c.needle;
  }
  std::string long_name(65, 'a');
  EXPECT_FALSE(Parse({"--drive", long_name + "=/x", "/m"}).ok());
  EXPECT_TRUE(Parse({"--drive", std::string(64, 'a') + "=/x", "/m"}).ok());
}

TEST(Options, HelpAndVersion) {
  EXPECT_TRUE(Parse({"--help"})->help);
  EXPECT_TRUE(Parse({"-V"})->version);
  EXPECT_NE(UsageText().find("--drive"), std::string::npos);
}

}  // namespace
}  // namespace cbw::fs
