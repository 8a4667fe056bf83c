// EventBus: fan-out, order, unsubscribe.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/fs.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>

#include "backup/rate_limiter.h"
#include "backup/target.h"
#include "tests/backup/test_util.h"

namespace cbw::backup {
namespace {

using testing::EventRecorder;
using testing::Fixture;
using testing::RandomBytes;
using testing::ReadAll;
using testing::WaitFor;

TEST(EventBusTest, FanOutAndUnsubscribe) {
  EventBus bus;
  int a = 0, b = 0;
  uint64_t ta = bus.Subscribe([&](const Event&) { ++a; });
  bus.Subscribe([&](const Event& e) {
    ++b;
    EXPECT_GT(e.seconds, 0);
  });
  bus.Publish(Event{});
  bus.Unsubscribe(ta);
  bus.Publish(Event{});
  EXPECT_EQ(a, 1);
  EXPECT_EQ(b, 2);
}

}  // namespace
}  // namespace cbw::backup
