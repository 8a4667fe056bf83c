// Drive: the source behind the CBW interposer. Real files in a temp dir.

#include "backup/drive.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <future>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "tests/backup/test_util.h"

namespace cbw::backup {
namespace {

using testing::RandomBytes;
using testing::ReadAll;
using testing::TempDir;
using testing::WaitFor;

constexpr uint64_t kMiB = 1024 * 1024;

std::unique_ptr<Drive> OpenDrive(const std::string& path, bool readonly = false) {
  auto d = Drive::Open({"drive0", path, readonly});
  EXPECT_TRUE(d.ok()) << d.status().message();
  return d.ok() ? std::move(*d) : nullptr;
}

// Records what it sees; can ask for the slow path or fail.
class RecordingHook : public WriteHook {
 public:
  Status BeforeWrite(uint64_t off, uint64_t len, bool may_block) override {
    std::lock_guard<std::mutex> l(mu);
    calls.push_back({off, len, may_block});
    if (want_slow && !may_block) return Status::Error(EAGAIN, "slow");
    if (fail != 0) return Status::Error(fail, "refused");
    if (throw_it) throw std::bad_alloc();
    return Status::Ok();
  }
  struct Call {
    uint64_t off, len;
    bool may_block;
  };
  std::mutex mu;
  std::vector<Call> calls;
  bool want_slow = false;
  int fail = 0;
  bool throw_it = false;
};

TEST(DriveTest, OpenRefusesWhatIsNotAFileOrDeviceAndASecondOpener) {
  TempDir dir;
  ASSERT_EQ(mkfifo((dir / "fifo").c_str(), 0600), 0);
  auto f = Drive::Open({"d", dir / "fifo", false});
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), EINVAL);
  EXPECT_EQ(f.status().message(), "'" + (dir / "fifo") + "' is not a regular file or block device");
  EXPECT_FALSE(Drive::Open({"d", dir.path(), false}).ok());
  auto missing = Drive::Open({"d", dir / "nope", false});
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), ENOENT);

  testing::MakeSparse(dir / "a.img", kMiB);
  auto first = OpenDrive(dir / "a.img");
  auto second = Drive::Open({"d2", dir / "a.img", false});
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), EBUSY);
  EXPECT_NE(second.status().message().find(dir / "a.img"), std::string::npos);
}

TEST(DriveTest, WritesAreCutAtTheEndAndRefusedPastItAndOnReadOnlyDrives) {
  TempDir dir;
  testing::MakeSparse(dir / "a.img", 10000);
  auto d = OpenDrive(dir / "a.img");
  std::string data = RandomBytes(4096, 1);
  auto r = d->Write(data.data(), data.size(), 8000);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 2000u);
  EXPECT_EQ(d->Write(data.data(), 10, 10000).status().code(), ENOSPC);
  EXPECT_TRUE(d->Write(data.data(), 0, 20000).ok());
  EXPECT_EQ(ReadAll(dir / "a.img").substr(8000), data.substr(0, 2000));
  EXPECT_EQ(ReadAll(dir / "a.img").size(), 10000u);
  d.reset();
  auto ro = OpenDrive(dir / "a.img", true);
  EXPECT_EQ(ro->Write(data.data(), 10, 0).status().code(), EROFS);
  EXPECT_EQ(ro->PunchHole(0, 10).code(), EROFS);
}

TEST(DriveTest, PunchAndZeroReadAsZerosAndAreClipped) {
  TempDir dir;
  std::string data = RandomBytes(kMiB, 2);
  testing::WriteAt(dir / "a.img", data, 0);
  auto d = OpenDrive(dir / "a.img");
  ASSERT_TRUE(d->PunchHole(100, 5000).ok());
  ASSERT_TRUE(d->ZeroRange(kMiB - 10, 100).ok());  // clipped at the end
  std::string want = data;
  want.replace(100, 5000, std::string(5000, '\0'));
  want.replace(kMiB - 10, 10, std::string(10, '\0'));
  EXPECT_TRUE(testing::SameBytes(ReadAll(dir / "a.img"), want));
}

TEST(DriveTest, HooksSeeWritesAfterTheirInstallOnly) {
  TempDir dir;
  testing::MakeSparse(dir / "a.img", kMiB);
  auto d = OpenDrive(dir / "a.img");
  std::string data(512, 'x');
  ASSERT_TRUE(d->Write(data.data(), data.size(), 0).ok());
  auto hook = std::make_shared<RecordingHook>();
  Drive::InstallHooks({{d.get(), hook}});
  ASSERT_TRUE(d->Write(data.data(), data.size(), 4096).ok());
  ASSERT_TRUE(d->ZeroRange(8192, 100).ok());
  ASSERT_EQ(hook->calls.size(), 2u);
  EXPECT_EQ(hook->calls[0].off, 4096u);
  EXPECT_EQ(hook->calls[0].len, 512u);
  EXPECT_FALSE(hook->calls[0].may_block);  // the fast path first
  EXPECT_EQ(hook->calls[1].off, 8192u);
  d->RemoveHook(hook.get());
  ASSERT_TRUE(d->Write(data.data(), data.size(), 0).ok());
  EXPECT_EQ(hook->calls.size(), 2u);
}

TEST(DriveTest, AHookThatMustWaitMovesTheWriteToTheSlowPathWithItsOwnCopyOfTheData) {
  TempDir dir;
  testing::MakeSparse(dir / "a.img", kMiB);
  auto d = OpenDrive(dir / "a.img");
  auto hook = std::make_shared<RecordingHook>();
  hook->want_slow = true;
  Drive::InstallHooks({{d.get(), hook}});
  std::string data = RandomBytes(8192, 3);
  std::promise<Result<size_t>> done;
  std::thread::id caller = std::this_thread::get_id(), completer;
  {
    std::string scratch = data;  // the caller's buffer dies when Submit returns
    d->Submit({Drive::OpKind::kWrite, scratch.data(), scratch.size(), 4096}, [&](Result<size_t> r) {
      completer = std::this_thread::get_id();
      done.set_value(std::move(r));
    });
    scratch.assign(scratch.size(), 'Z');
  }
  Result<size_t> r = done.get_future().get();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, data.size());
  EXPECT_NE(completer, caller);
  ASSERT_EQ(hook->calls.size(), 2u);
  EXPECT_FALSE(hook->calls[0].may_block);
  EXPECT_TRUE(hook->calls[1].may_block);
  EXPECT_EQ(ReadAll(dir / "a.img").substr(4096, data.size()), data);
}

TEST(DriveTest, AHookErrorFailsTheWriteAndLeavesTheSourceAlone) {
  TempDir dir;
  std::string data = RandomBytes(kMiB, 4);
  testing::WriteAt(dir / "a.img", data, 0);
  auto d = OpenDrive(dir / "a.img");
  auto hook = std::make_shared<RecordingHook>();
  hook->fail = EIO;
  Drive::InstallHooks({{d.get(), hook}});
  std::string junk(4096, 'j');
  EXPECT_EQ(d->Write(junk.data(), junk.size(), 0).status().code(), EIO);
  EXPECT_EQ(d->PunchHole(0, 4096).code(), EIO);
  hook->fail = 0;
  hook->want_slow = true;
  hook->throw_it = true;
  // An exception on the slow path is contained: the write fails with EIO.
  EXPECT_EQ(d->Write(junk.data(), junk.size(), 0).status().code(), EIO);
  EXPECT_EQ(ReadAll(dir / "a.img"), data);
}

TEST(DriveTest, AtPointInTimeWaitsForWritesInFlightAndHoldsNewOnes) {
  TempDir dir;
  testing::MakeSparse(dir / "a.img", kMiB);
  auto d = OpenDrive(dir / "a.img");
  // A hook that blocks the first write until released.
  struct Gate : WriteHook {
    std::promise<void> entered, release;
    std::shared_future<void> go = release.get_future().share();
    std::atomic<int> n{0};
    Status BeforeWrite(uint64_t, uint64_t, bool) override {
      if (n++ == 0) {
        entered.set_value();
        go.wait();
      }
      return Status::Ok();
    }
  };
  auto gate = std::make_shared<Gate>();
  Drive::InstallHooks({{d.get(), gate}});
  std::string data(512, 'a');
  std::thread writer([&] { ASSERT_TRUE(d->Write(data.data(), data.size(), 0).ok()); });
  gate->entered.get_future().wait();
  std::atomic<bool> changed{false};
  std::thread installer([&] { Drive::AtPointInTime({d.get()}, [&] { changed = true; }); });
  // The point in time cannot be fixed while a write is inside.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(changed.load());
  gate->release.set_value();
  writer.join();
  installer.join();
  EXPECT_TRUE(changed.load());
}

TEST(DriveTest, SeekFindsDataAndHoles) {
  TempDir dir;
  testing::MakeSparse(dir / "a.img", 8 * kMiB);
  testing::WriteAt(dir / "a.img", RandomBytes(kMiB, 5), 4 * kMiB);
  auto d = OpenDrive(dir / "a.img");
  auto data = d->Seek(0, SEEK_DATA);
  ASSERT_TRUE(data.ok());
  EXPECT_EQ(*data, 4 * kMiB);
  auto hole = d->Seek(4 * kMiB, SEEK_HOLE);
  ASSERT_TRUE(hole.ok());
  EXPECT_EQ(*hole, 5 * kMiB);
  EXPECT_EQ(d->Seek(6 * kMiB, SEEK_DATA).status().code(), ENXIO);
  EXPECT_EQ(d->Seek(8 * kMiB, SEEK_DATA).status().code(), ENXIO);
}

}  // namespace
}  // namespace cbw::backup
