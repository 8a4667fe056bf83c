// The options of SPEC 8 and --config files (fs/options).

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <string>
#include <vector>

#include "fs/options.h"

namespace cbw::fs {
namespace {

backup::Result<Options> Parse(std::vector<std::string> args) {
  args.insert(args.begin(), "cbwfs");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return ParseOptions(static_cast<int>(argv.size()), argv.data());
}

class ConfigFile {
 public:
  explicit ConfigFile(const std::string& text) {
    char tmpl[] = "/tmp/cbwfs-conf.XXXXXX";
    int fd = mkstemp(tmpl);
    EXPECT_GE(fd, 0);
    close(fd);
    path_ = tmpl;
    std::ofstream(path_) << text;
  }
  ~ConfigFile() { unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

TEST(OptionsConfigTest, NewOptions) {
  auto o = Parse({"--drive", "d=/x", "--qmp", "/run/q.sock", "--log-file", "-", "/m"});
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_EQ(o->qmp_path, "/run/q.sock");
  EXPECT_EQ(o->log_file, "-");
  auto m = Parse({"--drive", "d=/x", "--mount-options", "allow_other", "-o", "ro", "/m"});
  ASSERT_TRUE(m.ok()) << m.status().message();
  EXPECT_EQ(m->mount_options, (std::vector<std::string>{"allow_other", "ro"}));
  for (auto args : std::vector<std::vector<std::string>>{
           {"--drive", "d=/x", "--qmp", "", "/m"},
           {"--drive", "d=/x", "--log-file", "", "/m"},
           {"--drive", "metrics=/x", "/m"},
       }) {
    auto bad = Parse(args);
    ASSERT_FALSE(bad.ok()) << args[2];
    EXPECT_EQ(bad.status().code(), EINVAL);
  }
  EXPECT_NE(Parse({"--drive", "metrics=/x", "/m"}).status().message().find("reserved"),
            std::string::npos);
}

TEST(OptionsConfigTest, EverySettingFromAFile) {
  ConfigFile f(
      "# comment\n"
      "drive = a=/img/a\n"
      "drive = b=/img/b,readonly=on\n"
      "mountpoint = /mnt/cbw\n"
      "foreground = true\n"
      "mount-options = allow_other\n"
      "cluster-size = 128K\n"
      "state-dir = /var/lib/cbwfs\n"
      "qmp = /run/cbwfs.qmp\n"
      "log-file = /var/log/cbwfs.log\n"
      "log-level = debug\n");
  auto o = Parse({"--config", f.path()});
  ASSERT_TRUE(o.ok()) << o.status().message();
  ASSERT_EQ(o->drives.size(), 2u);
  EXPECT_EQ(o->drives[0].path, "/img/a");
  EXPECT_TRUE(o->drives[1].readonly);
  EXPECT_EQ(o->mountpoint, "/mnt/cbw");
  EXPECT_TRUE(o->foreground);
  EXPECT_EQ(o->mount_options, (std::vector<std::string>{"allow_other"}));
  EXPECT_EQ(o->cluster_size, 128u * 1024);
  EXPECT_EQ(o->state_dir, "/var/lib/cbwfs");
  EXPECT_EQ(o->qmp_path, "/run/cbwfs.qmp");
  EXPECT_EQ(o->log_file, "/var/log/cbwfs.log");
  EXPECT_EQ(o->log_level, backup::LogLevel::kDebug);
  EXPECT_EQ(o->config_file, f.path());
}

TEST(OptionsConfigTest, TheCommandLineReplacesTheFilesValues) {
  ConfigFile f(
      "drive = a=/img/a\n"
      "drive = b=/img/b\n"
      "mountpoint = /mnt/file\n"
      "log-level = debug\n"
      "qmp = /run/file.qmp\n");
  auto o = Parse({"--config", f.path(), "--drive", "c=/img/c", "--log-level", "warn", "/mnt/cli"});
  ASSERT_TRUE(o.ok()) << o.status().message();
  ASSERT_EQ(o->drives.size(), 1u);  // replaced, not merged
  EXPECT_EQ(o->drives[0].name, "c");
  EXPECT_EQ(o->mountpoint, "/mnt/cli");
  EXPECT_EQ(o->log_level, backup::LogLevel::kWarn);
  EXPECT_EQ(o->qmp_path, "/run/file.qmp");  // not on the command line: the file's
  EXPECT_FALSE(o->foreground);
  EXPECT_TRUE(Parse({"--config", f.path(), "-f"})->foreground);
}

TEST(OptionsConfigTest, BadFilesAreUsageErrorsNamingTheFileUnreadableOnesNot) {
  for (const char* text : {"frobnicate = 1\n", "help = 1\n", "config = /x\n",
                           "cluster-size = 3K\ndrive = a=/x\nmountpoint = /m\n",
                           "drive = a=/x\nmountpoint = /m\nmountpoint = /n\n"}) {
    ConfigFile f(text);
    auto o = Parse({"--config", f.path()});
    ASSERT_FALSE(o.ok()) << text;
    EXPECT_EQ(o.status().code(), EINVAL) << text;
    if (std::string(text).find("cluster-size") == std::string::npos &&
        std::string(text).find("mountpoint = /n") == std::string::npos) {
      EXPECT_NE(o.status().message().find(f.path()), std::string::npos) << o.status().message();
    }
  }
  auto missing = Parse({"--config", "/nonexistent/cbwfs.conf"});
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), ENOENT);
  EXPECT_NE(missing.status().message().find("/nonexistent/cbwfs.conf"), std::string::npos);
  // --help needs no file.
  EXPECT_TRUE(Parse({"--config", "/nonexistent/cbwfs.conf", "--help"})->help);
}

}  // namespace
}  // namespace cbw::fs
