// qmp::Server over a real unix socket, a real registry and bus: the socket
// file's life, negotiation and events on the wire, slow and vanishing
// clients. (The stock QEMU clients are driven against the real daemon by
// tests/qmp/qmp_stock_clients_test.py.)

#include "qmp/server.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "backup/drive.h"
#include "backup/event_bus.h"
#include "backup/job_registry.h"
#include "backup/log.h"
#include "control/dispatcher.h"

namespace cbw::qmp {
namespace {

using nlohmann::json;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/cbw-qmp-test.XXXXXX";
    if (mkdtemp(tmpl) == nullptr) std::abort();
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

bool WaitFor(const std::function<bool()>& cond,
             std::chrono::milliseconds deadline = std::chrono::seconds(20)) {
  auto end = std::chrono::steady_clock::now() + deadline;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

// A drive, the engine and a dispatcher, as the daemon wires them.
class Env {
 public:
  Env() {
    backup::SetLogLevel(backup::LogLevel::kError);
    std::ofstream(dir / "d.img", std::ios::binary) << std::string(1 << 20, 'a');
    auto d = backup::Drive::Open({"drive0", dir / "d.img", false});
    if (!d.ok()) std::abort();
    drive = std::move(*d);
    backup::RegistryOptions o;
    o.mountpoint = dir / "mnt";
    o.base_dir = dir / "";
    registry =
        std::make_unique<backup::JobRegistry>(std::vector<backup::Drive*>{drive.get()}, &bus, o);
    dispatcher = std::make_unique<control::Dispatcher>(registry.get());
  }
  ~Env() {
    dispatcher.reset();
    registry.reset();
  }
  std::unique_ptr<Server> Listen(const std::string& path, ServerOptions options = {}) {
    auto s = Server::Listen(path, dispatcher.get(), &bus, options);
    EXPECT_TRUE(s.ok()) << s.status().message();
    return s.ok() ? std::move(*s) : nullptr;
  }

  TempDir dir;
  std::unique_ptr<backup::Drive> drive;
  backup::EventBus bus;
  std::unique_ptr<backup::JobRegistry> registry;
  std::unique_ptr<control::Dispatcher> dispatcher;
};

// A raw client: lines in, lines out, with deadlines.
class Client {
 public:
  explicit Client(const std::string& path) {
    fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  }
  ~Client() { Close(); }
  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }
  bool connected() const { return connected_; }
  int fd() const { return fd_; }
  void Send(const std::string& text) {
    ASSERT_EQ(send(fd_, text.data(), text.size(), MSG_NOSIGNAL), static_cast<ssize_t>(text.size()));
  }
  // The next line, or "" at end of file / after the deadline.
  std::string Line(std::chrono::milliseconds deadline = std::chrono::seconds(20)) {
    auto end = std::chrono::steady_clock::now() + deadline;
    for (;;) {
      size_t nl = buf_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return line;
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          end - std::chrono::steady_clock::now());
      if (left.count() <= 0) return "";
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left.count())) <= 0) return "";
      char b[4096];
      ssize_t n = read(fd_, b, sizeof b);
      if (n <= 0) return "";
      buf_.append(b, static_cast<size_t>(n));
    }
  }
  json Json() {
    std::string l = Line();
    return l.empty() ? json() : json::parse(l);
  }
  // Reads the greeting and negotiates.
  void Negotiate() {
    json g = Json();
    ASSERT_TRUE(g.contains("QMP")) << g.dump();
    Send("{\"execute\":\"qmp_capabilities\"}");
    ASSERT_EQ(Json(), json::parse("{\"return\": {}}"));
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
  std::string buf_;
};

backup::Event StatusEvent(const std::string& id) {
  backup::Event e;
  e.type = backup::EventType::kJobStatusChange;
  e.job_id = id;
  e.status = backup::JobStatus::kRunning;
  return e;
}

TEST(QmpServerTest, SocketIsPrivateAndRemovedAtStop) {
  Env env;
  const std::string path = env.dir / "q.sock";
  auto s = env.Listen(path);
  ASSERT_TRUE(s);
  struct stat st {};
  ASSERT_EQ(lstat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  s->Start();
  s->Stop();
  EXPECT_NE(access(path.c_str(), F_OK), 0);
}

TEST(QmpServerTest, ASocketInUseIsRefusedAStaleOneReplacedAnythingElseKept) {
  Env env;
  const std::string path = env.dir / "q.sock";
  auto first = env.Listen(path);
  ASSERT_TRUE(first);
  first->Start();
  auto second = Server::Listen(path, env.dispatcher.get(), &env.bus);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), EADDRINUSE);
  EXPECT_NE(second.status().message().find(path), std::string::npos);
  first->Stop();

  // A socket file nobody listens on (its daemon was killed).
  {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    close(fd);
  }
  auto third = env.Listen(path);
  ASSERT_TRUE(third);
  third->Start();
  Client c(path);
  ASSERT_TRUE(c.connected());
  EXPECT_TRUE(c.Json().contains("QMP"));
  third->Stop();

  // A regular file is somebody's data: never replaced.
  std::ofstream(env.dir / "file") << "data";
  auto fourth = Server::Listen(env.dir / "file", env.dispatcher.get(), &env.bus);
  ASSERT_FALSE(fourth.ok());
  EXPECT_EQ(fourth.status().code(), EEXIST);
  std::ifstream in(env.dir / "file");
  std::string data;
  in >> data;
  EXPECT_EQ(data, "data");

  auto long_path = Server::Listen(env.dir / std::string(120, 'x'), env.dispatcher.get(), &env.bus);
  ASSERT_FALSE(long_path.ok());
  EXPECT_EQ(long_path.status().code(), ENAMETOOLONG);
}

TEST(QmpServerTest, StopLeavesASocketThatReplacedOursAlone) {
  Env env;
  const std::string path = env.dir / "q.sock";
  auto s = env.Listen(path);
  ASSERT_TRUE(s);
  ASSERT_EQ(unlink(path.c_str()), 0);
  std::ofstream(path) << "someone else's";
  s->Stop();
  EXPECT_EQ(access(path.c_str(), F_OK), 0);
}

TEST(QmpServerTest, EventsGoOnlyToNegotiatedClientsInOrderWithTimestamps) {
  Env env;
  auto s = env.Listen(env.dir / "q.sock");
  ASSERT_TRUE(s);
  s->Start();
  Client waiting(env.dir / "q.sock"), a(env.dir / "q.sock"), b(env.dir / "q.sock");
  ASSERT_TRUE(waiting.Json().contains("QMP"));
  a.Negotiate();
  b.Negotiate();
  for (int i = 0; i < 50; ++i) env.bus.Publish(StatusEvent("j" + std::to_string(i)));
  for (Client* c : {&a, &b}) {
    for (int i = 0; i < 50; ++i) {
      json e = c->Json();
      ASSERT_EQ(e.value("event", ""), "JOB_STATUS_CHANGE") << e.dump();
      EXPECT_EQ(e["data"]["id"], "j" + std::to_string(i));
      EXPECT_TRUE(e["timestamp"]["seconds"].is_number_integer());
      EXPECT_TRUE(e["timestamp"]["microseconds"].is_number_integer());
    }
  }
  // The client that never negotiated got nothing but its greeting.
  EXPECT_EQ(waiting.Line(std::chrono::milliseconds(200)), "");
  waiting.Send("{\"execute\":\"query-jobs\",\"id\":\"q\"}");
  json r = waiting.Json();
  EXPECT_EQ(r["error"]["class"], "CommandNotFound");
  EXPECT_EQ(r["error"]["desc"], "Expecting capabilities negotiation with 'qmp_capabilities'");
  EXPECT_EQ(r["id"], "q");
}

TEST(QmpServerTest, ASlowClientIsDroppedWithoutStallingThePublisherOrOthers) {
  Env env;
  ServerOptions o;
  o.max_unsent_bytes = 256 * 1024;
  auto s = env.Listen(env.dir / "q.sock", o);
  ASSERT_TRUE(s);
  s->Start();
  Client slow(env.dir / "q.sock"), fast(env.dir / "q.sock");
  slow.Negotiate();
  fast.Negotiate();
  // `slow` never reads again: once the socket buffer and its queue are
  // full, it is dropped. Publishing never waits for it. The publisher keeps
  // within 1000 events of `fast`, well inside its bound.
  constexpr int kEvents = 20000;
  std::atomic<int> fast_read{0};
  std::thread reader([&] {
    for (int i = 0; i < kEvents; ++i) {
      if (fast.Json().value("event", "") != "JOB_STATUS_CHANGE") {
        ADD_FAILURE() << "fast client missed event " << i;
        fast_read = kEvents;
        return;
      }
      ++fast_read;
    }
  });
  for (int i = 0; i < kEvents; ++i) {
    ASSERT_TRUE(WaitFor([&] { return fast_read.load() >= i - 1000; }));
    env.bus.Publish(StatusEvent("job" + std::to_string(i)));
  }
  reader.join();
  EXPECT_TRUE(WaitFor([&] { return s->clients() == 1; }));
  // Its connection was closed: after what was buffered, end of file.
  size_t lines = 0;
  while (!slow.Line(std::chrono::seconds(5)).empty()) ++lines;
  EXPECT_LT(lines, static_cast<size_t>(kEvents));
}

TEST(QmpServerTest, ClientsThatVanishMidCommandOrMidEventsLeaveNothingBehind) {
  Env env;
  auto s = env.Listen(env.dir / "q.sock");
  ASSERT_TRUE(s);
  s->Start();
  for (int round = 0; round < 20; ++round) {
    Client c(env.dir / "q.sock");
    c.Negotiate();
    // A backup command (which does real work) and a query, then gone before
    // any reply is read; events keep coming meanwhile.
    c.Send("{\"execute\":\"drive-backup\",\"arguments\":{\"device\":\"drive0\",\"job-id\":\"j" +
           std::to_string(round) + "\",\"target\":\"" + env.dir / ("t" + std::to_string(round)) +
           "\",\"sync\":\"full\"}}{\"execute\":\"query-jobs\"}");
    env.bus.Publish(StatusEvent("x"));
    c.Close();
  }
  EXPECT_TRUE(WaitFor([&] { return s->clients() == 0; }));
  // Still serving.
  Client last(env.dir / "q.sock");
  last.Negotiate();
  last.Send("{\"execute\":\"query-version\",\"id\":1}");
  json r;
  do {
    r = last.Json();  // past the events of the jobs still running
  } while (r.is_object() && r.contains("event"));
  EXPECT_EQ(r["return"]["package"], "cbwfs " CBWFS_VERSION) << r.dump();
  s->Stop();
}

TEST(QmpServerTest, TooManyClientsAreToldSo) {
  Env env;
  ServerOptions o;
  o.max_clients = 2;
  auto s = env.Listen(env.dir / "q.sock", o);
  ASSERT_TRUE(s);
  s->Start();
  Client a(env.dir / "q.sock"), b(env.dir / "q.sock");
  ASSERT_TRUE(a.Json().contains("QMP"));
  ASSERT_TRUE(b.Json().contains("QMP"));
  Client c(env.dir / "q.sock");
  json r = c.Json();
  EXPECT_EQ(r["error"]["desc"], "Too many QMP clients (2)") << r.dump();
  EXPECT_EQ(c.Line(std::chrono::seconds(5)), "");  // closed
}

TEST(QmpServerTest, StopLetsClientsReadWhatIsQueuedThenCloses) {
  Env env;
  auto s = env.Listen(env.dir / "q.sock");
  ASSERT_TRUE(s);
  s->Start();
  Client c(env.dir / "q.sock");
  c.Negotiate();
  env.bus.Publish(StatusEvent("last"));
  s->Stop();
  json e = c.Json();
  EXPECT_EQ(e["data"]["id"], "last") << e.dump();
  EXPECT_EQ(c.Line(std::chrono::seconds(5)), "");
}

}  // namespace
}  // namespace cbw::qmp
