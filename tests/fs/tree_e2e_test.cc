// End-to-end tests of the tree's shape (SPEC 2) through a real mount, with
// the shell tools a user would reach for: the tree is fixed, so new names,
// links and renames are refused with a clear errno (never ENOSYS).
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "tests/fs/shell_helpers.h"

namespace cbw::test {
namespace {

class TreeE2E : public MountedDrive {
 protected:
  void SetUp() override { MountDrive(1 << 20); }
};

// Issue 12 item 7: jobs/ and snapshots/ are read-only trees (apart from
// `rm jobs/<id>`): a new name there fails with EROFS. Elsewhere in the mount
// (the root) it fails with EPERM: the filesystem is not read-only (the
// drives are written), but its names are fixed.
TEST_F(TreeE2E, NewNamesLinksAndRenamesAreRefusedWithErofsOrEperm) {
  StartJob("j", "none");
  ASSERT_EQ(access((mount_ / "snapshots/j").c_str(), F_OK), 0);
  WriteFileOrDie(dir_ / "f", "x");
  const std::string kRofs = strerror(EROFS), kPerm = strerror(EPERM);
  struct Case {
    std::string script;
    std::string error;
  };
  const std::vector<Case> cases = {
      {"touch jobs/x", kRofs},
      {"mkdir jobs/d", kRofs},
      {"mkfifo jobs/p", kRofs},
      {"ln -s drive0 jobs/l", kRofs},
      {"ln drive0 jobs/h", kRofs},
      {"mv jobs/j jobs/k", kRofs},
      {"mv drive0 jobs/d0", kRofs},
      {"cp $D/f jobs/", kRofs},
      {"echo x > jobs/new", kRofs},
      {"touch snapshots/x", kRofs},
      {"mkdir snapshots/d", kRofs},
      {"ln -s drive0 snapshots/l", kRofs},
      {"mv snapshots/j snapshots/k", kRofs},
      {"rm -f snapshots/j", kRofs},
      {"touch x", kPerm},
      {"mkdir d", kPerm},
      {"mkfifo p", kPerm},
      {"ln -s drive0 l", kPerm},
      {"ln drive0 h", kPerm},
      {"mv drive0 d1", kPerm},
      {"mv control c", kPerm},
      {"mv jobs js", kPerm},
      {"cp $D/f .", kPerm},
      {"rmdir jobs", kPerm},
      {"rm -f drive0", kPerm},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.script);
    CommandResult r = Sh(c.script);
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find(c.error), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find(strerror(ENOSYS)), std::string::npos) << r.err;
  }
  // Nothing changed, and what may be done still works.
  CommandResult ls = Sh("ls -A . jobs snapshots");
  EXPECT_EQ(ls.out,
            ".:\ncontrol\ndrive0\nevents\njobs\nmetrics\nsnapshots\n\njobs:\nj\n\nsnapshots:\nj\n")
      << ls.out;
  EXPECT_EQ(ReadFileOrDie(mount_ / "drive0"), image_);
  CommandResult ok =
      Sh("touch drive0 jobs/j && echo " + Q(Cmd("job-cancel", {{"id", "j"}})) + " > control");
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  ASSERT_TRUE(WaitResult(mount_, "j"));
  EXPECT_EQ(Sh("rm jobs/j && ls -A jobs").out, "");
}

}  // namespace
}  // namespace cbw::test
