// RbdTarget against the real cluster of tests/ceph/ceph_cluster.h: spec
// parsing, creation and removal, size and format checks, synchronous and
// queued I/O, files that may not lead into the mount, timeouts; and the
// engine (BackupJob) on a cluster that stops answering.

#include "backup/rbd_target.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "backup/backup_job.h"
#include "backup/drive.h"
#include "backup/event_bus.h"
#include "backup/log.h"
#include "backup/target.h"
#include "backup/txn.h"
#include "tests/ceph/ceph_cluster.h"
#include "tests/fs/mount_fixture.h"

namespace cbw::test {
namespace {

using backup::BackupJob;
using backup::Drive;
using backup::RbdSpec;
using backup::RbdTarget;
using backup::RbdTuning;
using backup::Result;
using backup::Status;
using backup::Target;
using backup::TargetCompletion;
using backup::TargetMode;
using backup::TargetRequest;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kMiB = 1 << 20;

const bool kQuietLogs = (backup::SetLogLevel(backup::LogLevel::kWarn), true);

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// ---------------------------------------------------------------- specs

TEST(RbdSpecTest, QemuSpellings) {
  Result<RbdSpec> s = backup::ParseRbdSpec("rbd:pool/image");
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->pool, "pool");
  EXPECT_EQ(s->ns, "");
  EXPECT_EQ(s->image, "image");
  EXPECT_FALSE(s->conf);
  EXPECT_FALSE(s->id);

  s = backup::ParseRbdSpec("rbd:pool/ns/image:conf=/etc/ceph/x.conf:id=backup");
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->ns, "ns");
  EXPECT_EQ(s->image, "image");
  EXPECT_EQ(*s->conf, "/etc/ceph/x.conf");
  EXPECT_EQ(*s->id, "backup");

  // Backslash escapes, and librados option names in any of Ceph's spellings.
  s = backup::ParseRbdSpec("rbd:p/a\\:b\\@c:mon-host=[v2\\:127.0.0.1\\:3300]:keyring=/k");
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->image, "a:b@c");
  ASSERT_EQ(s->options.size(), 2u);
  EXPECT_EQ(s->options[0].first, "mon_host");
  EXPECT_EQ(s->options[0].second, "[v2:127.0.0.1:3300]");
  EXPECT_EQ(s->options[1].first, "keyring");
}

TEST(RbdSpecTest, MalformedAndRefusedSpecs) {
  struct Case {
    const char* spec;
    const char* why;  // part of the message
  };
  for (const Case& c : std::vector<Case>{
           {"rbd:pool", "expected rbd:POOL/"},
           {"rbd:/image", "pool name is empty"},
           {"rbd:pool/", "image name is empty"},
           {"rbd:pool/ns/", "image name is empty"},
           {"rbd:pool//image", "namespace name is empty"},
           {"rbd:pool/a/b/c", "too many '/'"},
           {"rbd:pool/image@snap", "snapshot is read-only"},
           {"rbd:pool/image:conf", "conf option conf has no value"},
           {"rbd:pool/image:conf=", "empty path"},
           {"rbd:pool/image:id=a/b", "invalid id"},
           {"rbd:pool/image:key=AQBsecret==", "use a keyring"},
           {"rbd:pool/image:rbd_cache=true", "rbd_cache is not supported"},
           {"rbd:pool/image:admin_socket=/x", "admin_socket is not supported"},
           {"rbd:pool/image:log_file=/x", "log_file is not supported"},
           {"rbd:pool/image:rados_osd_op_timeout=0", "not supported"},
       }) {
    Result<RbdSpec> s = backup::ParseRbdSpec(c.spec);
    ASSERT_FALSE(s.ok()) << c.spec;
    EXPECT_EQ(s.status().code(), EINVAL) << c.spec;
    EXPECT_NE(s.status().message().find(c.why), std::string::npos)
        << c.spec << ": " << s.status().message();
    EXPECT_NE(s.status().message().find(c.spec), std::string::npos) << "names the target";
  }
}

// ---------------------------------------------------------------- targets

class RbdTargetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cluster_ = CephCluster::Get();
    ASSERT_NE(cluster_, nullptr) << "no Ceph cluster";
    image_ = std::string("t-") + ::testing::UnitTest::GetInstance()->current_test_info()->name();
  }
  void TearDown() override {
    if (cluster_ == nullptr) return;
    EXPECT_TRUE(RbdTarget::WaitClosed(std::chrono::seconds(60)));
    for (const auto& img : cleanup_) cluster_->Remove(img);
  }

  TargetRequest Req(const std::string& spec, uint64_t size,
                    TargetMode mode = TargetMode::kAbsolutePaths) {
    TargetRequest r;
    r.spec = spec;
    r.base_dir = dir_.path();
    r.mountpoint = dir_ / "mnt";  // no mount is there: refused by path
    r.mode = mode;
    r.size = size;
    return r;
  }
  std::shared_ptr<Target> Open(const TargetRequest& r, const RbdTuning& tuning = {}) {
    auto t = RbdTarget::Open(r, tuning);
    EXPECT_TRUE(t.ok()) << r.spec << ": " << t.status().message();
    if (!t.ok()) return nullptr;
    return *t;
  }
  // An existing image of `size` bytes holding `data` at 0.
  void MakeImage(const std::string& name, uint64_t size, const std::string& data = "") {
    CommandResult r = cluster_->Rbd({"create", "--size", std::to_string(size) + "B", name});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    cleanup_.push_back(name);
    if (data.empty()) return;
    auto t = Open(Req(cluster_->Spec(name), 0, TargetMode::kExisting));
    ASSERT_TRUE(t);
    ASSERT_TRUE(t->Write(data.data(), data.size(), 0).ok());
    ASSERT_TRUE(t->Flush().ok());
  }

  CephCluster* cluster_ = nullptr;
  TempDir dir_;
  std::string image_;
  std::vector<std::string> cleanup_;
};

TEST_F(RbdTargetTest, CreatedOnlyByPrepareAndRemovedByDiscard) {
  auto t = Open(Req(cluster_->Spec(image_), 5 * kMiB + 512));
  ASSERT_TRUE(t);
  EXPECT_FALSE(cluster_->Exists(image_)) << "nothing is created before the transaction is valid";
  EXPECT_EQ(t->size(), 5 * kMiB + 512);
  EXPECT_EQ(t->display(), cluster_->Spec(image_));
  EXPECT_NE(t->identity().find("/" + image_), std::string::npos) << t->identity();
  ASSERT_TRUE(t->Prepare().ok());
  EXPECT_TRUE(t->zeroed()) << "a fresh image may keep zero ranges as holes";
  CommandResult info = cluster_->Rbd({"info", "--format", "json", image_});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_NE(info.out.find("\"size\":5243392"), std::string::npos) << info.out;
  t->Discard();
  t.reset();
  EXPECT_FALSE(cluster_->Exists(image_)) << "Discard removes the image it created";
}

TEST_F(RbdTargetTest, ExistingImageIsReusedNeverShrunkAndMustBeBigEnough) {
  MakeImage(image_, 8 * kMiB, "stale data");
  auto t = Open(Req(cluster_->Spec(image_), 4 * kMiB));
  ASSERT_TRUE(t);
  EXPECT_EQ(t->size(), 8 * kMiB);
  ASSERT_TRUE(t->Prepare().ok());
  EXPECT_FALSE(t->zeroed()) << "an existing image may hold older data";
  t->Discard();
  t.reset();
  ASSERT_TRUE(cluster_->Exists(image_)) << "Discard keeps an image it did not create";

  for (TargetMode mode : {TargetMode::kAbsolutePaths, TargetMode::kExisting}) {
    auto small = RbdTarget::Open(Req(cluster_->Spec(image_), 8 * kMiB + 1, mode));
    ASSERT_FALSE(small.ok());
    EXPECT_EQ(small.status().code(), EINVAL);
    EXPECT_EQ(small.status().message(),
              "Target '" + cluster_->Spec(image_) +
                  "' is smaller than the drive (8388608 < 8388609 bytes)");
  }
}

TEST_F(RbdTargetTest, RefusalsNameTheProblemWithQemusTexts) {
  auto missing = RbdTarget::Open(Req(cluster_->Spec("nosuch"), kMiB, TargetMode::kExisting));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), ENOENT);
  EXPECT_EQ(missing.status().message(),
            "error reading header from nosuch: No such file or directory");
  EXPECT_FALSE(cluster_->Exists("nosuch"));

  auto pool = RbdTarget::Open(Req(cluster_->Spec("img", "nopool"), kMiB));
  ASSERT_FALSE(pool.ok());
  EXPECT_EQ(pool.status().code(), ENOENT);
  EXPECT_EQ(pool.status().message(), "error opening pool nopool: No such file or directory");

  auto ns = RbdTarget::Open(Req("rbd:rbd/nons/img:conf=" + cluster_->conf(), kMiB));
  ASSERT_FALSE(ns.ok());
  EXPECT_EQ(ns.status().code(), ENOENT);
  EXPECT_EQ(ns.status().message(), "error opening namespace nons: No such file or directory");

  TargetRequest q = Req(cluster_->Spec(image_), kMiB);
  q.format = "qcow2";
  auto qcow = RbdTarget::Open(q);
  ASSERT_FALSE(qcow.ok());
  EXPECT_EQ(qcow.status().code(), EINVAL);
  EXPECT_NE(qcow.status().message().find("not supported"), std::string::npos);
  // Through the dispatcher too, and nothing was created.
  auto via = backup::OpenTarget(q, {});
  ASSERT_FALSE(via.ok());
  EXPECT_EQ(via.status().message(), qcow.status().message());
  EXPECT_FALSE(cluster_->Exists(image_));
}

TEST_F(RbdTargetTest, ExistingModeProbesForeignFormatsLikeFiles) {
  MakeImage(image_, 4 * kMiB, std::string("QFI\xfb\0\0\0\3", 8));
  auto t = RbdTarget::Open(Req(cluster_->Spec(image_), 4 * kMiB, TargetMode::kExisting));
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), EINVAL);
  EXPECT_NE(t.status().message().find("is a qcow2 image"), std::string::npos)
      << t.status().message();
  TargetRequest raw = Req(cluster_->Spec(image_), 4 * kMiB, TargetMode::kExisting);
  raw.format = "raw";
  EXPECT_TRUE(Open(raw)) << "format raw overrides the probe";
}

TEST_F(RbdTargetTest, SyncWritesZeroesReadsAndFlush) {
  auto t = Open(Req(cluster_->Spec(image_), 8 * kMiB));
  ASSERT_TRUE(t);
  ASSERT_TRUE(t->Prepare().ok());
  cleanup_.push_back(image_);
  std::string want(8 * kMiB, '\0');
  std::string data = RandomBytes(3 * kMiB + 123, 1);
  ASSERT_TRUE(t->Write(data.data(), data.size(), kMiB + 7).ok());
  want.replace(kMiB + 7, data.size(), data);
  ASSERT_TRUE(t->WriteZeroes(2 * kMiB + 5, kMiB).ok());
  std::memset(want.data() + 2 * kMiB + 5, 0, kMiB);
  ASSERT_TRUE(t->Flush().ok());
  std::string back(8 * kMiB + 4096, 'x');
  ASSERT_TRUE(t->Read(back.data(), back.size(), 0).ok());
  EXPECT_TRUE(back.substr(0, 8 * kMiB) == want);
  EXPECT_EQ(back.substr(8 * kMiB), std::string(4096, '\0')) << "zeros past the end";
  EXPECT_TRUE(cluster_->Export(image_) == want);

  ASSERT_TRUE(t->Close().ok());
  Status s = t->Write(data.data(), 10, 0);
  EXPECT_EQ(s.code(), EIO) << "a closed target refuses I/O";
  EXPECT_EQ(t->Read(back.data(), 10, 0).code(), EIO);
}

// Waits on the queue's fd, as the copier does, until `n` completions came.
std::vector<TargetCompletion> ReapAll(backup::TargetQueue* q, size_t n) {
  std::vector<TargetCompletion> got;
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (got.size() < n && Clock::now() < deadline) {
    pollfd p{q->poll_fd(), POLLIN, 0};
    poll(&p, 1, 100);
    q->Reap(&got);
  }
  return got;
}

TEST_F(RbdTargetTest, QueueCompletesEveryRequestOnceThroughItsFd) {
  // An existing image with stale bytes where zeroes go: they must really be
  // written.
  const uint64_t size = 48 * kMiB;
  MakeImage(image_, size);
  auto t = Open(Req(cluster_->Spec(image_), size, TargetMode::kExisting));
  ASSERT_TRUE(t);
  std::string want(size, '\0');
  for (uint64_t off : {13 * kMiB, 30 * kMiB + 5, 46 * kMiB}) {
    std::string stale = RandomBytes(kMiB, off);
    ASSERT_TRUE(t->Write(stale.data(), stale.size(), off).ok());
    want.replace(off, stale.size(), stale);
  }
  // Depth 2 with far more requests: the rest wait in the queue. One
  // write-zeroes spans two of the pieces librbd gets at most.
  auto q = t->OpenQueue(2);
  ASSERT_TRUE(q.ok()) << q.status().message();
  std::vector<std::string> bufs;
  std::map<uint64_t, int> expect;
  for (uint64_t i = 0; i < 12; ++i) {
    bufs.push_back(RandomBytes(256 * 1024, 100 + i));
    const uint64_t off = i * kMiB + 4096;
    (*q)->SubmitWrite(bufs.back().data(), bufs.back().size(), off, i);
    want.replace(off, bufs.back().size(), bufs.back());
    expect[i] = 0;
  }
  const uint64_t zlen = 47 * kMiB + 3 - 12 * kMiB;  // > 32 MiB
  (*q)->SubmitZeroes(12 * kMiB, zlen, 100);
  std::memset(want.data() + 12 * kMiB, 0, zlen);
  (*q)->SubmitZeroes(size - 1, 0, 101);  // empty: completes too
  expect[100] = expect[101] = 0;
  EXPECT_EQ((*q)->in_flight(), 14u);
  std::vector<TargetCompletion> got = ReapAll(q->get(), expect.size());
  std::map<uint64_t, int> seen;
  for (const auto& c : got) {
    EXPECT_EQ(seen.count(c.tag), 0u) << "tag " << c.tag << " completed twice";
    seen[c.tag] = c.error;
  }
  EXPECT_EQ(seen, expect);
  EXPECT_EQ((*q)->in_flight(), 0u);
  ASSERT_TRUE(t->Flush().ok());
  EXPECT_TRUE(cluster_->Export(image_) == want);
}

TEST_F(RbdTargetTest, QueuedRequestsOnAStoppedClusterTimeOutTogether) {
  MakeImage(image_, 16 * kMiB);
  auto t = Open(Req(cluster_->Spec(image_), 16 * kMiB, TargetMode::kExisting),
                RbdTuning{std::chrono::seconds(2)});
  ASSERT_TRUE(t);
  auto q = t->OpenQueue(4);
  ASSERT_TRUE(q.ok());
  std::string buf = RandomBytes(kMiB, 1);
  OsdStopped stopped;
  const auto t0 = Clock::now();
  // librbd would fail these one lock attempt (one timeout) after another.
  for (uint64_t i = 0; i < 8; ++i) (*q)->SubmitWrite(buf.data(), buf.size(), i * kMiB, i);
  std::vector<TargetCompletion> got = ReapAll(q->get(), 8);
  const double took = Seconds(Clock::now() - t0);
  ASSERT_EQ(got.size(), 8u);
  for (const auto& c : got) EXPECT_EQ(c.error, ETIMEDOUT) << c.tag;
  EXPECT_GE(took, 1.9);
  EXPECT_LT(took, 8.0) << "every request fails at its own deadline (librbd alone: 8 x 2 s)";
  // A synchronous call too, and the queue takes no more than its depth to
  // librbd meanwhile.
  auto s0 = Clock::now();
  Status s = t->Write(buf.data(), 4096, 0);
  EXPECT_EQ(s.code(), ETIMEDOUT) << s.message();
  EXPECT_LT(Seconds(Clock::now() - s0), 6.0);
  stopped.Resume();
  q->reset();
}

TEST_F(RbdTargetTest, ConfAndKeyringMayNotLeadIntoTheMount) {
  mkdir((dir_ / "mnt").c_str(), 0755);
  RunCommand({"cp", cluster_->conf(), dir_ / "mnt/ceph.conf"});
  symlink((dir_ / "mnt/ceph.conf").c_str(), (dir_ / "link.conf").c_str());
  for (const std::string& spec :
       {"rbd:rbd/x:conf=" + (dir_ / "mnt/ceph.conf"), "rbd:rbd/x:conf=" + (dir_ / "link.conf"),
        std::string("rbd:rbd/x:conf=link.conf"),  // relative to base_dir
        "rbd:rbd/x:conf=" + cluster_->conf() + ":keyring=" + (dir_ / "mnt/ceph.conf")}) {
    auto t = RbdTarget::Open(Req(spec, kMiB));
    ASSERT_FALSE(t.ok()) << spec;
    EXPECT_EQ(t.status().code(), EINVAL) << spec;
    EXPECT_NE(t.status().message().find("is under the mountpoint"), std::string::npos)
        << t.status().message();
  }
  auto missing = RbdTarget::Open(Req("rbd:rbd/x:conf=" + (dir_ / "none.conf"), kMiB));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), ENOENT);
  EXPECT_EQ(missing.status().message(),
            "error reading conf file " + (dir_ / "none.conf") + ": No such file or directory");
  EXPECT_FALSE(cluster_->Exists("x"));
}

TEST_F(RbdTargetTest, MonHostOptionWithoutConfAndIdentityAcrossSpellings) {
  MakeImage(image_, 4 * kMiB);
  std::string addr = cluster_->mon_addr();
  std::string escaped;
  for (char c : addr) escaped += c == ':' ? std::string("\\:") : std::string(1, c);
  std::string spec = "rbd:rbd/" + image_ + ":conf=/dev/null:mon_host=[v2\\:" + escaped +
                     "]:auth_client_required=none:id=admin";
  auto a = Open(Req(spec, 4 * kMiB));
  auto b = Open(Req(cluster_->Spec(image_), 4 * kMiB));
  auto other = Open(Req(cluster_->Spec(image_ + "-other"), 4 * kMiB));
  ASSERT_TRUE(a && b && other);
  EXPECT_EQ(a->identity(), b->identity()) << "one image, however it is spelled";
  EXPECT_NE(a->identity(), other->identity());
  std::string data = RandomBytes(4096, 5);
  ASSERT_TRUE(a->Write(data.data(), data.size(), 0).ok());
  ASSERT_TRUE(a->Flush().ok());
  EXPECT_TRUE(cluster_->Export(image_).substr(0, 4096) == data);
  other->Discard();
}

TEST_F(RbdTargetTest, WithoutConfTheDefaultConfIsReadAndChecked) {
  // As librados would: $CEPH_CONF, then /etc/ceph/ceph.conf.
  struct Env {
    std::string old;
    bool had;
    explicit Env(const std::string& v) : had(getenv("CEPH_CONF") != nullptr) {
      if (had) old = getenv("CEPH_CONF");
      setenv("CEPH_CONF", v.c_str(), 1);
    }
    ~Env() {
      if (had) {
        setenv("CEPH_CONF", old.c_str(), 1);
      } else {
        unsetenv("CEPH_CONF");
      }
    }
  };
  {
    Env env(cluster_->conf());
    auto t = Open(Req("rbd:rbd/" + image_, kMiB));
    ASSERT_TRUE(t);
    EXPECT_NE(t->identity().find("/" + image_), std::string::npos);
  }
  mkdir((dir_ / "mnt").c_str(), 0755);
  RunCommand({"cp", cluster_->conf(), dir_ / "mnt/ceph.conf"});
  Env env(dir_ / "mnt/ceph.conf");
  auto t = RbdTarget::Open(Req("rbd:rbd/" + image_, kMiB));
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), EINVAL);
  EXPECT_NE(t.status().message().find("is under the mountpoint"), std::string::npos);
}

TEST_F(RbdTargetTest, UnreachableClusterFailsAfterTheTimeout) {
  // A mon address where nothing listens (a port just released).
  std::string conf = ReadFileOrDie(cluster_->conf());
  size_t p = conf.find(cluster_->mon_addr());
  ASSERT_NE(p, std::string::npos);
  conf.replace(p, cluster_->mon_addr().size(), "127.0.0.1:1");
  WriteFileOrDie(dir_ / "dead.conf", conf);
  auto t0 = Clock::now();
  auto t = RbdTarget::Open(Req("rbd:rbd/x:conf=" + (dir_ / "dead.conf"), kMiB),
                           RbdTuning{std::chrono::seconds(2)});
  const double took = Seconds(Clock::now() - t0);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), ETIMEDOUT) << t.status().message();
  EXPECT_EQ(t.status().message(), "error connecting: Connection timed out");
  EXPECT_GE(took, 1.5);
  EXPECT_LT(took, 15.0);
}

// ---------------------------------------------------------------- engine

// One drive and one job built by hand (as JobRegistry does), so that the
// target can have a short timeout.
class RbdEngineTest : public RbdTargetTest {
 protected:
  void MakeDrive(uint64_t size) {
    source_ = RandomBytes(size, 9);
    WriteFileOrDie(dir_ / "src.img", source_);
    auto d = Drive::Open({"drive0", dir_ / "src.img", false});
    ASSERT_TRUE(d.ok()) << d.status().message();
    drive_ = std::move(*d);
  }
  void StartJob(std::shared_ptr<Target> target, backup::BackupOptions o,
                std::chrono::milliseconds cbw_timeout = std::chrono::seconds(30)) {
    backup::JobParams p;
    o.job_id = "job";
    o.device = "drive0";
    o.target = target->display();
    p.options = o;
    p.drive = drive_.get();
    p.target = std::move(target);
    p.bus = &bus_;
    auto txn = std::make_shared<backup::Txn>(backup::CompletionMode::kIndividual);
    p.txn = txn;
    p.cbw_timeout = cbw_timeout;
    job_ = std::make_shared<BackupJob>(std::move(p));
    txn->Add(job_);
    job_->Announce();
    Drive::InstallHooks({{drive_.get(), job_->hook()}});
    job_->Start();
  }
  bool Concluded(std::chrono::seconds deadline) {
    return WaitFor([&] { return job_->ended(); }, deadline);
  }
  void TearDown() override {
    if (job_) {
      job_->CancelInternal();
      job_->Join();
    }
    RbdTargetTest::TearDown();
  }

  std::string source_;
  std::unique_ptr<Drive> drive_;
  backup::EventBus bus_;
  std::shared_ptr<BackupJob> job_;
};

TEST_F(RbdEngineTest, StoppedClusterFailsTheJobAfterTheTimeout) {
  MakeDrive(16 * kMiB);
  auto t = Open(Req(cluster_->Spec(image_), drive_->size()), RbdTuning{std::chrono::seconds(3)});
  ASSERT_TRUE(t);
  ASSERT_TRUE(t->Prepare().ok());
  cleanup_.push_back(image_);
  OsdStopped stopped;
  const auto t0 = Clock::now();
  StartJob(t, {});
  t.reset();
  ASSERT_TRUE(Concluded(std::chrono::seconds(30))) << "the job must not hang on a dead cluster";
  const double took = Seconds(Clock::now() - t0);
  backup::JobInfo info = job_->Info();
  EXPECT_EQ(info.result, backup::JobResult::kFailed);
  ASSERT_TRUE(info.error);
  EXPECT_EQ(*info.error, "Connection timed out");
  EXPECT_GE(took, 2.5) << "not before the timeout";
  EXPECT_LT(took, 15.0);
}

TEST_F(RbdEngineTest, CancelOnAStoppedClusterIsPromptAndDriveWritesAreBounded) {
  MakeDrive(32 * kMiB);
  std::weak_ptr<Target> weak;
  {
    // A long timeout: what ends this job is the cancel, not librados.
    auto t = Open(Req(cluster_->Spec(image_), drive_->size()), RbdTuning{std::chrono::seconds(20)});
    ASSERT_TRUE(t);
    ASSERT_TRUE(t->Prepare().ok());
    cleanup_.push_back(image_);
    weak = t;
    backup::BackupOptions o;
    o.speed = 2 * kMiB;
    o.on_cbw_error = backup::CbwErrorPolicy::kBreakGuestWrite;
    StartJob(std::move(t), o, std::chrono::seconds(2));
  }
  ASSERT_TRUE(WaitFor([&] { return job_->Info().offset >= 2 * kMiB; }));
  OsdStopped stopped;
  // The copier's next chunk goes out and hangs.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  // A drive write to a cluster not yet copied waits for its copy no longer
  // than the CBW timeout, then (break-guest-write) fails with EIO.
  std::string junk = RandomBytes(4096, 11);
  auto w0 = Clock::now();
  Result<size_t> w = drive_->Write(junk.data(), junk.size(), 30 * kMiB);
  const double wrote = Seconds(Clock::now() - w0);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), EIO);
  EXPECT_LT(wrote, 10.0) << "bounded by the CBW timeout (2 s), not the target's (20 s)";
  EXPECT_TRUE(ReadFileOrDie(dir_ / "src.img") == source_) << "a refused write leaves the source";
  EXPECT_EQ(job_->Info().status, backup::JobStatus::kRunning);

  auto c0 = Clock::now();
  ASSERT_TRUE(job_->Cancel(false).ok());
  ASSERT_TRUE(Concluded(std::chrono::seconds(10)));
  EXPECT_LT(Seconds(Clock::now() - c0), 5.0) << "job-cancel ends a stuck job within 5 s";
  EXPECT_EQ(job_->Info().result, backup::JobResult::kCancelled);
  // Once the cluster answers again, the stuck requests return and the last
  // user closes the target.
  stopped.Resume();
  EXPECT_TRUE(WaitFor([&] { return weak.expired(); }, std::chrono::seconds(40)));
}

TEST_F(RbdEngineTest, StaleImageGetsZerosWhereTheDriveIsZero) {
  // Through OpenTarget, as the registry does: an existing image bigger than
  // the drive, full of stale bytes; the drive is half holes, half data.
  MakeImage(image_, 16 * kMiB, RandomBytes(16 * kMiB, 21));
  source_ = std::string(8 * kMiB, '\0');
  std::string data = RandomBytes(3 * kMiB, 22);
  source_.replace(kMiB, data.size(), data);
  MakeSparseFile(dir_ / "src.img", 8 * kMiB);
  {
    int fd = open((dir_ / "src.img").c_str(), O_WRONLY);
    ASSERT_EQ(pwrite(fd, data.data(), data.size(), kMiB), static_cast<ssize_t>(data.size()));
    close(fd);
  }
  auto d = Drive::Open({"drive0", dir_ / "src.img", false});
  ASSERT_TRUE(d.ok());
  drive_ = std::move(*d);
  const std::string before = cluster_->Export(image_);
  {
    auto t = backup::OpenTarget(Req(cluster_->Spec(image_), 8 * kMiB, TargetMode::kExisting),
                                {drive_.get()});
    ASSERT_TRUE(t.ok()) << t.status().message();
    ASSERT_TRUE((*t)->Prepare().ok());
    StartJob(*t, {});
  }
  ASSERT_TRUE(Concluded(std::chrono::seconds(60)));
  EXPECT_EQ(job_->Info().result, backup::JobResult::kSuccess) << job_->Info().error.value_or("");
  const std::string after = cluster_->Export(image_);
  ASSERT_EQ(after.size(), 16 * kMiB);
  EXPECT_TRUE(after.substr(0, 8 * kMiB) == source_) << "zeros written over stale data";
  EXPECT_TRUE(after.substr(8 * kMiB) == before.substr(8 * kMiB)) << "past the drive: untouched";
}

}  // namespace
}  // namespace cbw::test
