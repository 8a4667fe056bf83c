// Plain types: QMP spellings and QEMU's state tables.

#include "backup/job_types.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

namespace cbw::backup {
namespace {

TEST(JobTypesTest, QmpSpellings) {
  EXPECT_STREQ(ToString(JobStatus::kConcluded), "concluded");
  EXPECT_STREQ(ToString(JobStatus::kNull), "null");
  EXPECT_STREQ(ToString(JobVerb::kSetSpeed), "set-speed");
  EXPECT_STREQ(ToString(IoStatus::kNoSpace), "nospace");
  EXPECT_STREQ(ToString(CbwErrorPolicy::kBreakGuestWrite), "break-guest-write");
  EXPECT_STREQ(ToString(ErrorPolicy::kEnospc), "enospc");
  EXPECT_STREQ(ToString(SyncMode::kTop), "top");
  EXPECT_STREQ(ToString(JobResult::kCancelled), "cancelled");
}

// QEMU's JobSTT, row by row (job.c).
TEST(JobTypesTest, TransitionTable) {
  using S = JobStatus;
  const S all[] = {S::kUndefined, S::kCreated, S::kRunning,  S::kPaused,    S::kReady, S::kStandby,
                   S::kWaiting,   S::kPending, S::kAborting, S::kConcluded, S::kNull};
  auto allowed = [](S from) -> std::vector<S> {
    switch (from) {
      case S::kUndefined:
        return {S::kCreated};
      case S::kCreated:
        return {S::kRunning, S::kAborting, S::kNull};
      case S::kRunning:
        return {S::kPaused, S::kReady, S::kWaiting, S::kAborting};
      case S::kPaused:
        return {S::kRunning};
      case S::kReady:
        return {S::kStandby, S::kWaiting, S::kAborting};
      case S::kStandby:
        return {S::kReady};
      case S::kWaiting:
        return {S::kPending, S::kAborting};
      case S::kPending:
        return {S::kAborting, S::kConcluded};
      case S::kAborting:
        return {S::kAborting, S::kConcluded};
      case S::kConcluded:
        return {S::kNull};
      case S::kNull:
        return {};
    }
    return {};
  };
  for (S from : all) {
    auto ok = allowed(from);
    for (S to : all) {
      bool want = std::find(ok.begin(), ok.end(), to) != ok.end();
      EXPECT_EQ(TransitionAllowed(from, to), want) << ToString(from) << " -> " << ToString(to);
    }
  }
}

// QEMU's JobVerbTable.
TEST(JobTypesTest, VerbTable) {
  using S = JobStatus;
  EXPECT_TRUE(VerbAllowed(JobVerb::kCancel, S::kPending));
  EXPECT_FALSE(VerbAllowed(JobVerb::kCancel, S::kConcluded));
  EXPECT_FALSE(VerbAllowed(JobVerb::kCancel, S::kAborting));
  EXPECT_TRUE(VerbAllowed(JobVerb::kPause, S::kCreated));
  EXPECT_FALSE(VerbAllowed(JobVerb::kPause, S::kWaiting));
  EXPECT_TRUE(VerbAllowed(JobVerb::kSetSpeed, S::kPaused));
  EXPECT_FALSE(VerbAllowed(JobVerb::kComplete, S::kRunning));
  EXPECT_TRUE(VerbAllowed(JobVerb::kComplete, S::kReady));
  EXPECT_TRUE(VerbAllowed(JobVerb::kFinalize, S::kPending));
  EXPECT_FALSE(VerbAllowed(JobVerb::kFinalize, S::kRunning));
  EXPECT_TRUE(VerbAllowed(JobVerb::kDismiss, S::kConcluded));
  EXPECT_FALSE(VerbAllowed(JobVerb::kDismiss, S::kNull));
}

}  // namespace
}  // namespace cbw::backup
