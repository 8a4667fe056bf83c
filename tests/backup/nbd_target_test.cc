// The NBD target against real servers (nbdkit, started per test): URIs,
// refusals with QEMU's texts, requests split and aligned to the advertised
// block sizes, write-zeroes, dead servers, Close releasing stuck callers; and
// backup jobs to NBD exports through the registry.

#include "backup/nbd_target.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <sstream>
#include <thread>

#include "tests/backup/nbd_test_util.h"
#include "tests/backup/test_util.h"
#include "tests/lib/nbd_server.h"

namespace cbw::backup {
namespace {

using cbw::test::NbdServer;
using testing::EventRecorder;
using testing::NbdJobFixture;
using testing::RandomBytes;
using testing::SameBytes;
using testing::Sanitized;
using testing::TempDir;
using testing::WaitFor;

constexpr uint64_t kMiB = 1024 * 1024;

TargetRequest Request(const std::string& spec, uint64_t size) {
  TargetRequest r;
  r.spec = spec;
  r.base_dir = "/";
  r.mountpoint = "/nonexistent-mnt";
  r.mode = TargetMode::kExisting;
  r.size = size;
  return r;
}

std::shared_ptr<NbdTarget> OpenNbd(const std::string& spec, uint64_t size,
                                   std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  TargetRequest r = Request(spec, size);
  r.io_timeout = timeout;
  auto t = NbdTarget::Open(r);
  if (!t.ok()) {
    ADD_FAILURE() << spec << ": " << t.status().message();
    return nullptr;
  }
  return *t;
}

// The commands of one kind ("Write", "Zero", "Trim", "Flush") an nbdkit log
// filter recorded: (offset, count).
std::vector<std::pair<uint64_t, uint64_t>> Logged(const std::string& logfile,
                                                  const std::string& kind) {
  std::ifstream in(logfile);
  std::string line;
  std::vector<std::pair<uint64_t, uint64_t>> out;
  auto hex_after = [&](const std::string& key) -> uint64_t {
    size_t p = line.find(key);
    return p == std::string::npos ? 0 : std::stoull(line.substr(p + key.size()), nullptr, 16);
  };
  while (std::getline(in, line)) {
    // Calls look like "connection=1 Write id=3 offset=0x0 count=0x40000 ...";
    // their returns like "connection=1 ...Write id=3 return=0".
    if (line.find(" " + kind + " id=") == std::string::npos) continue;
    out.emplace_back(hex_after(" offset=0x"), hex_after(" count=0x"));
  }
  return out;
}

// ---------------------------------------------------------------- URIs

TEST(NbdUriTest, ParsesQemuSpellings) {
  auto u = ParseNbdUri("nbd://Example.COM:10810/my%20disk");
  ASSERT_TRUE(u.ok()) << u.status().message();
  EXPECT_FALSE(u->unix_socket);
  EXPECT_EQ(u->host, "Example.COM");
  EXPECT_EQ(u->port, "10810");
  EXPECT_EQ(u->export_name, "my disk");
  EXPECT_EQ(NbdUriString(*u), "nbd://example.com:10810/my%20disk");

  u = ParseNbdUri("nbd://127.0.0.1");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->port, "10809");
  EXPECT_EQ(u->export_name, "");
  EXPECT_EQ(NbdUriString(*u), "nbd://127.0.0.1:10809/");

  u = ParseNbdUri("nbd://[::1]:999/e");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->host, "::1");
  EXPECT_EQ(NbdUriString(*u), "nbd://[::1]:999/e");

  u = ParseNbdUri("nbd+unix:///exp?socket=/run/my%20nbd.sock");
  ASSERT_TRUE(u.ok());
  EXPECT_TRUE(u->unix_socket);
  EXPECT_EQ(u->socket, "/run/my nbd.sock");
  EXPECT_EQ(u->export_name, "exp");
  EXPECT_EQ(NbdUriString(*u), "nbd+unix:///exp?socket=/run/my%20nbd.sock");

  EXPECT_TRUE(IsNbdSpec("nbd://x"));
  EXPECT_TRUE(IsNbdSpec("NBD+unix:///?socket=x"));
  EXPECT_TRUE(IsNbdSpec("nbds://x"));
  EXPECT_FALSE(IsNbdSpec("nbd.img"));
  EXPECT_FALSE(IsNbdSpec("/tmp/nbd://x"));
}

TEST(NbdUriTest, RefusesMalformedWithQemusText) {
  for (const char* bad :
       {"nbd:localhost:10809", "nbd://", "nbd:///x", "nbds://host/x", "nbd+vsock:///",
        "nbd+unix:///x", "nbd+unix://host/?socket=/s", "nbd://host/?socket=/s", "nbd://host:99999/",
        "nbd://host:12a/", "nbd://user@host/", "nbd://[::1/",
        "nbd+unix:///?socket=", "nbd+unix:///?socket=/a&socket=/b", "nbd://h/x%zz",
        "nbd+unix:///?socket=/s&tls-certificates=/c", "nbd://h/#frag"}) {
    auto u = ParseNbdUri(bad);
    EXPECT_FALSE(u.ok()) << bad;
    EXPECT_EQ(u.status().code(), EINVAL) << bad;
    EXPECT_EQ(u.status().message(), "No valid URL specified") << bad;
  }
}

// ---------------------------------------------------------------- refusals

TEST(NbdTargetTest, RefusesBeforeWritingWithQemusTexts) {
  TempDir dir;
  auto expect = [](const TargetRequest& r, int err, const std::string& msg) {
    auto t = OpenTarget(r, {});
    ASSERT_FALSE(t.ok()) << r.spec;
    EXPECT_EQ(t.status().code(), err) << r.spec << ": " << t.status().message();
    EXPECT_EQ(t.status().message(), msg) << r.spec;
  };
  expect(Request("nbd+unix:///?socket=/run/x.sock", kMiB), ENOENT,
         "Failed to connect to '/run/x.sock': No such file or directory");
  expect(Request("nbd://127.0.0.1:1/", kMiB), ECONNREFUSED,
         "Failed to connect to '127.0.0.1:1': Connection refused");
  expect(Request("nbd:localhost:10809", kMiB), EINVAL, "No valid URL specified");
  TargetRequest q = Request("nbd://127.0.0.1:1/", kMiB);
  q.format = "qcow2";
  expect(q, EINVAL,
         "Format 'qcow2' is not supported for NBD target 'nbd://127.0.0.1:1/' (NBD exports are "
         "written as raw)");
  // A socket under the mount is refused before anything is looked up in it,
  // by path and through a symlink.
  expect(Request("nbd+unix:///?socket=/nonexistent-mnt/s.sock", kMiB), EINVAL,
         "Target '/nonexistent-mnt/s.sock' is under the mountpoint '/nonexistent-mnt'");
  ASSERT_EQ(symlink("/nonexistent-mnt/s.sock", (dir / "link.sock").c_str()), 0);
  auto t = OpenTarget(Request("nbd+unix:///?socket=" + (dir / "link.sock"), kMiB), {});
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), EINVAL) << t.status().message();

  auto ro = NbdServer::Nbdkit(dir.path(), {"-r", "memory", "4M"});
  ASSERT_TRUE(ro);
  expect(Request(ro->uri(), kMiB), EROFS, "NBD export is read-only");
  auto small = NbdServer::Nbdkit(dir.path(), {"memory", "1M"});
  ASSERT_TRUE(small);
  expect(Request(small->uri(), 2 * kMiB), EINVAL,
         "Target '" + small->uri() + "' is smaller than the drive (1048576 < 2097152 bytes)");
  // An export that does not exist: the server's refusal, as an open error.
  auto strict = NbdServer::Nbdkit(dir.path(), {"--filter=exportname", "memory", "4M",
                                               "exportname=a", "exportname-strict=true"});
  ASSERT_TRUE(strict);
  const std::string nosuch = "nbd+unix:///nosuch?socket=" + strict->socket();
  expect(Request(nosuch, kMiB), ENOENT,
         "Could not open '" + nosuch +
             "': handshake: server has no export named 'nosuch': No such file or directory");
  auto named = OpenTarget(Request("nbd+unix:///a?socket=" + strict->socket(), kMiB), {});
  EXPECT_TRUE(named.ok()) << named.status().message();
}

// ---------------------------------------------------------------- I/O

TEST(NbdTargetTest, WritesAndReadsBackOverUnixAndTcp) {
  TempDir dir;
  for (auto transport : {NbdServer::Transport::kUnix, NbdServer::Transport::kTcp}) {
    auto s = NbdServer::Nbdkit(dir.path(), {"memory", "8M"}, transport);
    ASSERT_TRUE(s);
    auto t = OpenNbd(s->uri(), 8 * kMiB);
    ASSERT_TRUE(t);
    EXPECT_FALSE(t->zeroed());
    EXPECT_EQ(t->size(), 8 * kMiB);
    std::string want(8 * kMiB, '\0');
    std::string a = RandomBytes(3 * kMiB + 123, 1);
    ASSERT_TRUE(t->Write(a.data(), a.size(), 4096).ok());
    want.replace(4096, a.size(), a);
    std::string b = RandomBytes(70000, 2);  // unaligned both ends
    ASSERT_TRUE(t->Write(b.data(), b.size(), 5 * kMiB + 17).ok());
    want.replace(5 * kMiB + 17, b.size(), b);
    ASSERT_TRUE(t->Flush().ok());
    std::string got(8 * kMiB, 'x');
    ASSERT_TRUE(t->Read(got.data(), got.size(), 0).ok());
    EXPECT_TRUE(SameBytes(got, want));
    std::string tail(100, 'x');
    ASSERT_TRUE(t->Read(tail.data(), tail.size(), 5 * kMiB + 10).ok());
    EXPECT_TRUE(SameBytes(tail, want.substr(5 * kMiB + 10, 100)));
    ASSERT_TRUE(t->Close().ok());
    EXPECT_TRUE(SameBytes(s->ReadAll(dir.path()), want)) << "read back with nbdcopy";
    EXPECT_FALSE(t->Write(a.data(), 4096, 0).ok()) << "a closed target refuses I/O";
  }
}

TEST(NbdTargetTest, RequestsAreSplitAndAlignedToTheAdvertisedBlockSizes) {
  TempDir dir;
  const std::string log = dir / "requests.log";
  // The log filter sits above the policy filter, so it sees what the client
  // sent; the policy filter fails anything misaligned or too big.
  auto s = NbdServer::Nbdkit(
      dir.path(), {"--filter=log", "--filter=blocksize-policy", "memory", "16M",
                   "blocksize-minimum=4096", "blocksize-preferred=65536", "blocksize-maximum=256K",
                   "blocksize-error-policy=error", "logfile=" + log});
  ASSERT_TRUE(s);
  auto t = OpenNbd(s->uri(), 16 * kMiB);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->min_block(), 4096u);
  EXPECT_EQ(t->max_request(), 256u * 1024);
  std::string want(16 * kMiB, '\0');
  std::string a = RandomBytes(kMiB, 3);
  ASSERT_TRUE(t->Write(a.data(), a.size(), 0).ok());  // four requests
  want.replace(0, a.size(), a);
  // Unaligned both ends: read-modify-write of the edge blocks.
  std::string b = RandomBytes(10000, 4);
  ASSERT_TRUE(t->Write(b.data(), b.size(), 2 * kMiB + 1000).ok());
  want.replace(2 * kMiB + 1000, b.size(), b);
  // Inside one block.
  std::string c = RandomBytes(10, 5);
  ASSERT_TRUE(t->Write(c.data(), c.size(), 3 * kMiB + 4000).ok());
  want.replace(3 * kMiB + 4000, c.size(), c);
  ASSERT_TRUE(t->WriteZeroes(100, 5000).ok());
  want.replace(100, 5000, 5000, '\0');
  // Through the copier's queue too.
  {
    auto q = t->OpenQueue(8);
    ASSERT_TRUE(q.ok());
    std::string d = RandomBytes(2 * kMiB, 6);
    (*q)->SubmitWrite(d.data(), d.size(), 4 * kMiB, 7);
    (*q)->SubmitZeroes(8 * kMiB, 3 * kMiB, 8);
    std::vector<TargetCompletion> done;
    ASSERT_TRUE(WaitFor([&] {
      (*q)->Reap(&done);
      return done.size() == 2;
    }));
    for (const auto& cpl : done) EXPECT_EQ(cpl.error, 0) << cpl.tag;
    EXPECT_EQ((*q)->in_flight(), 0u);
    want.replace(4 * kMiB, d.size(), d);
  }
  std::string got(want.size(), 'x');
  ASSERT_TRUE(t->Read(got.data(), got.size(), 0).ok());
  EXPECT_TRUE(SameBytes(got, want));
  std::string odd(3, 'x');
  ASSERT_TRUE(t->Read(odd.data(), odd.size(), 2 * kMiB + 999).ok());
  EXPECT_EQ(odd, want.substr(2 * kMiB + 999, 3));
  auto writes = Logged(log, "Write");
  ASSERT_GE(writes.size(), 4u + 8u);
  for (auto [off, len] : writes) {
    EXPECT_EQ(off % 4096, 0u) << off;
    EXPECT_EQ(len % 4096, 0u) << len;
    EXPECT_LE(len, 256u * 1024);
  }
  for (auto [off, len] : Logged(log, "Zero")) {
    EXPECT_EQ(off % 4096, 0u) << off;
    EXPECT_LE(len, 256u * 1024);
  }
  EXPECT_TRUE(Logged(log, "Trim").empty()) << "zeroes are never trimmed";
}

TEST(NbdTargetTest, ZeroRangesAreWrittenNeverSkipped) {
  TempDir dir;
  // With write-zeroes: NBD_CMD_WRITE_ZEROES; without (nozero filter): zeros
  // written as data. Either way old data is gone.
  for (bool nozero : {false, true}) {
    const std::string log = dir / (nozero ? "nozero.log" : "zero.log");
    std::vector<std::string> args = {"--filter=log"};
    if (nozero) args.push_back("--filter=nozero");
    args.insert(args.end(), {"memory", "8M", "logfile=" + log});
    auto s = NbdServer::Nbdkit(dir.path(), args);
    ASSERT_TRUE(s);
    auto t = OpenNbd(s->uri(), 8 * kMiB);
    ASSERT_TRUE(t);
    EXPECT_EQ(t->can_zero(), !nozero);
    std::string old = RandomBytes(8 * kMiB, 7);
    ASSERT_TRUE(t->Write(old.data(), old.size(), 0).ok());
    ASSERT_TRUE(t->WriteZeroes(kMiB, 5 * kMiB).ok());
    ASSERT_TRUE(t->Flush().ok());
    std::string want = old;
    want.replace(kMiB, 5 * kMiB, 5 * kMiB, '\0');
    std::string got(8 * kMiB, 'x');
    ASSERT_TRUE(t->Read(got.data(), got.size(), 0).ok());
    EXPECT_TRUE(SameBytes(got, want));
    t->Close();
    EXPECT_EQ(Logged(log, "Zero").empty(), nozero);
    EXPECT_TRUE(Logged(log, "Trim").empty());
    EXPECT_EQ(Logged(log, "Flush").size(), 1u);
  }
}

TEST(NbdTargetTest, FullExportFailsWithEnospc) {
  TempDir dir;
  auto s = NbdServer::Nbdkit(dir.path(), {"full", "4M"});
  ASSERT_TRUE(s);
  auto t = OpenNbd(s->uri(), 4 * kMiB);
  ASSERT_TRUE(t);
  std::string a = RandomBytes(kMiB, 8);
  Status st = t->Write(a.data(), a.size(), 0);
  EXPECT_EQ(st.code(), ENOSPC) << st.message();
  EXPECT_FALSE(t->dead()) << "an error reply is not a dead connection";
}

TEST(NbdTargetTest, ASlowServerIsNotDeadAndSeesAtMostSixteenRequests) {
  TempDir dir;
  const std::string log = dir / "slow.log";
  // Each write takes 150 ms; the server would take 64 at once.
  auto s = NbdServer::Nbdkit(dir.path(), {"--threads=64", "--filter=log", "--filter=delay",
                                          "memory", "8M", "delay-write=150ms", "logfile=" + log});
  ASSERT_TRUE(s);
  auto t = OpenNbd(s->uri(), 8 * kMiB, std::chrono::milliseconds(2000));
  ASSERT_TRUE(t);
  auto q = t->OpenQueue(64);
  ASSERT_TRUE(q.ok());
  std::string d = RandomBytes(48 * 65536, 12);
  for (uint64_t i = 0; i < 48; ++i) {
    (*q)->SubmitWrite(d.data() + i * 65536, 65536, i * 65536, i);
  }
  std::vector<TargetCompletion> done;
  ASSERT_TRUE(WaitFor([&] {
    (*q)->Reap(&done);
    return done.size() == 48;
  }));
  for (const auto& c : done) EXPECT_EQ(c.error, 0) << c.tag;
  EXPECT_FALSE(t->dead()) << "slow, but answering: not dead after 2 s";
  ASSERT_TRUE(t->Close().ok());
  // Requests outstanding at the server, from the log's calls and returns.
  std::ifstream in(log);
  std::string line;
  int outstanding = 0, peak = 0;
  while (std::getline(in, line)) {
    if (line.find(" Write id=") != std::string::npos) peak = std::max(peak, ++outstanding);
    if (line.find(" ...Write id=") != std::string::npos) --outstanding;
  }
  EXPECT_EQ(peak, 16);
  EXPECT_EQ(s->ReadAll(dir.path()).substr(0, d.size()), d);
}

// ---------------------------------------------------------------- dead servers

TEST(NbdTargetTest, ServerThatStopsAnsweringFailsAfterTheTimeout) {
  TempDir dir;
  auto s = NbdServer::Nbdkit(dir.path(), {"memory", "8M"});
  ASSERT_TRUE(s);
  auto t = OpenNbd(s->uri(), 8 * kMiB, std::chrono::milliseconds(500));
  ASSERT_TRUE(t);
  std::string a = RandomBytes(kMiB, 9);
  ASSERT_TRUE(t->Write(a.data(), a.size(), 0).ok());
  s->Freeze();
  auto t0 = std::chrono::steady_clock::now();
  Status st = t->Write(a.data(), a.size(), kMiB);
  double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(st.code(), ETIMEDOUT) << st.message();
  EXPECT_NE(st.message().find("did not answer for 500 ms"), std::string::npos) << st.message();
  if (!Sanitized()) {
    EXPECT_LT(waited, 10.0);
  }
  EXPECT_TRUE(t->dead());
  // From then on, at once.
  t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(t->Flush().code(), ETIMEDOUT);
  EXPECT_EQ(t->Write(a.data(), 4096, 0).code(), ETIMEDOUT);
  if (!Sanitized()) {
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1.0);
  }
  s->Thaw();
  EXPECT_TRUE(t->Close().ok());
}

TEST(NbdTargetTest, CloseReleasesCallersStuckOnADeadServer) {
  TempDir dir;
  auto s = NbdServer::Nbdkit(dir.path(), {"memory", "64M"});
  ASSERT_TRUE(s);
  auto t = OpenNbd(s->uri(), 64 * kMiB);  // the default 30 s timeout
  ASSERT_TRUE(t);
  s->Freeze();
  std::atomic<int> failed{0};
  std::vector<std::thread> users;
  std::string a = RandomBytes(4 * kMiB, 10);
  for (int i = 0; i < 24; ++i) {  // more than the 16 in flight
    users.emplace_back([&, i] {
      if (!t->Write(a.data(), a.size(), static_cast<uint64_t>(i % 16) * 4 * kMiB).ok()) ++failed;
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // let them get stuck
  auto q = t->OpenQueue(4);
  ASSERT_TRUE(q.ok());
  (*q)->SubmitWrite(a.data(), a.size(), 0, 1);
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(t->Close().ok());
  for (auto& u : users) u.join();
  std::vector<TargetCompletion> done;
  ASSERT_TRUE(WaitFor(
      [&] {
        (*q)->Reap(&done);
        return !done.empty();
      },
      5));
  double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(failed.load(), 24);
  EXPECT_NE(done[0].error, 0);
  if (!Sanitized()) {
    EXPECT_LT(took, 5.0);
  }
  q->reset();
  s->Thaw();
}

TEST(NbdTargetTest, ServerGoneFailsRequestsAtOnce) {
  TempDir dir;
  auto s = NbdServer::Nbdkit(dir.path(), {"memory", "8M"});
  ASSERT_TRUE(s);
  auto t = OpenNbd(s->uri(), 8 * kMiB);
  ASSERT_TRUE(t);
  s->Kill();
  std::string a = RandomBytes(kMiB, 11);
  auto t0 = std::chrono::steady_clock::now();
  Status st = t->Write(a.data(), a.size(), 0);
  EXPECT_FALSE(st.ok());
  if (!Sanitized()) {
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
  }
  EXPECT_TRUE(WaitFor([&] { return t->dead(); }, 5));
}

// ---------------------------------------------------------------- jobs

TEST(NbdJobTest, FullBackupEqualsTheDriveOverwritingOldData) {
  NbdJobFixture f(6 * kMiB + 4097);  // an unaligned tail: read-modify-write
  // A sparse stretch in the drive, over old data in the export.
  f.image.replace(kMiB, 2 * kMiB, 2 * kMiB, '\0');
  testing::WriteAt(f.source, f.image, 0);
  auto s = NbdServer::Nbdkit(f.dir.path(), {"memory", "8M"});
  ASSERT_TRUE(s);
  {
    auto t = OpenNbd(s->uri(), 8 * kMiB);
    ASSERT_TRUE(t);
    std::string junk = RandomBytes(8 * kMiB, 5);
    ASSERT_TRUE(t->Write(junk.data(), junk.size(), 0).ok());
  }
  EventRecorder events(&f.bus);
  ASSERT_TRUE(f.registry->StartBackups({f.Opts(s->uri())}).ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }, 30));
  EXPECT_EQ(f.Info("drive0").result, JobResult::kSuccess) << f.Info("drive0").error.value_or("");
  EXPECT_EQ(f.Info("drive0").target, s->uri());
  std::string back = s->ReadAll(f.dir.path());
  ASSERT_EQ(back.size(), 8 * kMiB);
  EXPECT_TRUE(SameBytes(back.substr(0, f.image.size()), f.image));
}

TEST(NbdJobTest, SameExportTwiceIsRefusedAsInUse) {
  NbdJobFixture f(kMiB);
  auto s = NbdServer::Nbdkit(f.dir.path(), {"memory", "4M"});
  ASSERT_TRUE(s);
  BackupOptions a = f.Opts(s->uri());
  a.sync = SyncMode::kNone;
  ASSERT_TRUE(f.registry->StartBackups({a}).ok());
  // The same export by another spelling of its socket path.
  BackupOptions b = f.Opts("nbd+unix:///?socket=" + f.dir.path() + "/./" +
                           s->socket().substr(f.dir.path().size() + 1));
  b.job_id = "other";
  Status st = f.registry->StartBackups({b});
  EXPECT_EQ(st.code(), EBUSY) << st.message();
  ASSERT_TRUE(f.registry->Cancel("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }));
}

TEST(NbdJobTest, ServerThatStopsAnsweringFailsTheJobAsATargetError) {
  NbdJobFixture f(16 * kMiB, /*target_timeout_ms=*/700);
  auto s = NbdServer::Nbdkit(f.dir.path(), {"memory", "16M"});
  ASSERT_TRUE(s);
  EventRecorder events(&f.bus);
  BackupOptions o = f.Opts(s->uri());
  o.speed = 4 * kMiB;  // several seconds: the server stops mid-way
  ASSERT_TRUE(f.registry->StartBackups({o}).ok());
  ASSERT_TRUE(WaitFor([&] { return f.Info("drive0").offset > 0; }));
  s->Freeze();
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }, 15));
  JobInfo i = f.Info("drive0");
  EXPECT_EQ(i.result, JobResult::kFailed);
  EXPECT_EQ(i.error.value_or(""), std::strerror(ETIMEDOUT));
  EXPECT_NE(events.Sequence("drive0").find("ERROR(write,report)"), std::string::npos)
      << events.Sequence("drive0");
  s->Thaw();
}

TEST(NbdJobTest, CancelEndsAJobOnADeadServerWithinFiveSeconds) {
  NbdJobFixture f(16 * kMiB);  // the default 30 s timeout
  auto s = NbdServer::Nbdkit(f.dir.path(), {"memory", "16M"});
  ASSERT_TRUE(s);
  BackupOptions o = f.Opts(s->uri());
  o.speed = 4 * kMiB;
  ASSERT_TRUE(f.registry->StartBackups({o}).ok());
  ASSERT_TRUE(WaitFor([&] { return f.Info("drive0").offset > 0; }));
  s->Freeze();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // requests now hang
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(f.registry->Cancel("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }, 10));
  double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(f.Info("drive0").result, JobResult::kCancelled);
  if (!Sanitized()) {
    EXPECT_LT(took, 5.0);
  }
  s->Thaw();
}

TEST(NbdJobTest, FullExportUnderEachPolicy) {
  // The error filter fails writes with ENOSPC while its file exists.
  NbdJobFixture f(4 * kMiB);
  const std::string toggle = f.dir / "full";
  auto s = NbdServer::Nbdkit(
      f.dir.path(), {"--filter=error", "memory", "4M", "error=ENOSPC", "error-pwrite-rate=100%",
                     "error-zero-rate=100%", "error-file=" + toggle});
  ASSERT_TRUE(s);
  testing::WriteAt(toggle, "x", 0);
  // report: fails.
  ASSERT_TRUE(f.registry->StartBackups({f.Opts(s->uri())}).ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }));
  EXPECT_EQ(f.Info("drive0").result, JobResult::kFailed);
  EXPECT_EQ(f.Info("drive0").error.value_or(""), std::strerror(ENOSPC));
  // enospc: pauses with io-status nospace; room again, resume: success.
  BackupOptions o = f.Opts(s->uri());
  o.on_target_error = ErrorPolicy::kEnospc;
  ASSERT_TRUE(f.registry->StartBackups({o}).ok());
  ASSERT_TRUE(WaitFor([&] {
    JobInfo i = f.Info("drive0");
    return i.status == JobStatus::kPaused && i.io_status == IoStatus::kNoSpace;
  }));
  unlink(toggle.c_str());
  ASSERT_TRUE(f.registry->Resume("drive0").ok());
  ASSERT_TRUE(WaitFor([&] { return f.Ended("drive0"); }));
  EXPECT_EQ(f.Info("drive0").result, JobResult::kSuccess);
  EXPECT_TRUE(SameBytes(s->ReadAll(f.dir.path()), f.image));
}

}  // namespace
}  // namespace cbw::backup
