#include "cbwctl/mounts.h"

#include <gtest/gtest.h>

namespace cbw::ctl {
namespace {

const char kTwo[] =
    "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
    "41 26 0:38 / /tmp/cbwx/mnt rw,nosuid,nodev,relatime - fuse.cbwfs cbwfs "
    "rw,user_id=0,group_id=0,default_permissions\n"
    "42 26 0:39 / /mnt/with\\040space rw,relatime shared:5 master:1 - fuse.cbwfs cbwfs rw\n"
    "43 26 0:40 / /mnt/other rw,relatime - fuse.sshfs host:/ rw\n"
    "44 26 0:41 / /mnt/fake\\040-\\040fuse.cbwfs rw,relatime - tmpfs tmpfs rw\n";

TEST(CbwfsMounts, FindsOnlyCbwfsAndUnescapes) {
  EXPECT_EQ(CbwfsMounts(kTwo), (std::vector<std::string>{"/tmp/cbwx/mnt", "/mnt/with space"}));
  EXPECT_TRUE(CbwfsMounts("").empty());
  EXPECT_TRUE(CbwfsMounts("garbage line\n- fuse.cbwfs\n").empty());
}

TEST(ChooseMountpoint, FlagThenEnvThenTheOnlyMount) {
  const std::string one = "41 26 0:38 / /m1 rw - fuse.cbwfs cbwfs rw\n";
  EXPECT_EQ(*ChooseMountpoint(std::string("/flag"), "/env", kTwo), "/flag");
  EXPECT_EQ(*ChooseMountpoint(std::nullopt, "/env", kTwo), "/env");
  EXPECT_EQ(*ChooseMountpoint(std::nullopt, "", one), "/m1");
  EXPECT_EQ(*ChooseMountpoint(std::nullopt, nullptr, one), "/m1");

  auto none = ChooseMountpoint(std::nullopt, nullptr, "");
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.error().exit_code, kExitMount);
  EXPECT_NE(none.error().message.find("-m MOUNTPOINT"), std::string::npos);

  auto several = ChooseMountpoint(std::nullopt, nullptr, kTwo);
  ASSERT_FALSE(several.ok());
  EXPECT_EQ(several.error().exit_code, kExitMount);
  EXPECT_NE(several.error().message.find("/tmp/cbwx/mnt, /mnt/with space"), std::string::npos);
  EXPECT_NE(several.error().message.find("-m MOUNTPOINT"), std::string::npos);
}

}  // namespace
}  // namespace cbw::ctl
