#include "qmp/server.h"

#include <limits.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <system_error>
#include <utility>

#include "backup/log.h"
#include "backup/threads.h"
#include "control/qmp_session.h"
#include "control/render.h"
#include "control/wire.h"
#include "qmp/framer.h"

namespace cbw::qmp {

using backup::LogDebug;
using backup::LogError;
using backup::LogInfo;
using backup::LogWarn;
using backup::MutexLock;
using backup::Status;

namespace {

void Signal(int efd) {
  uint64_t one = 1;
  // Only fails when the counter would overflow, and then it is readable anyway.
  (void)!write(efd, &one, sizeof one);
}

void Consume(int efd) {
  uint64_t n;
  (void)!read(efd, &n, sizeof n);
}

std::string Quote(const std::string& path) { return "QMP socket '" + path + "'"; }

bool FillAddress(const std::string& path, sockaddr_un* addr) {
  *addr = {};
  addr->sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr->sun_path)) return false;
  std::memcpy(addr->sun_path, path.c_str(), path.size() + 1);
  return true;
}

}  // namespace

// One connection. The fds are set before its thread starts and closed when
// the last reference goes (its thread's, after it left the server's list).
struct Server::Client {
  uint64_t id = 0;
  backup::UniqueFd fd;    // the connection (non-blocking)
  backup::UniqueFd wake;  // eventfd: events were queued
  std::thread thread;     // guarded by Server::mu_ (set by the acceptor)
  std::atomic<bool> negotiated{false};
  // Bytes queued but not yet sent: events here plus the thread's buffer.
  std::atomic<size_t> unsent{0};

  backup::Mutex mu;
  std::deque<std::shared_ptr<const std::string>> events CBW_GUARDED_BY(mu);
  bool overflow CBW_GUARDED_BY(mu) = false;

  // The publisher's side: queues `line` unless that would pass `limit`,
  // in which case the client is marked for dropping. Never blocks.
  void Push(const std::shared_ptr<const std::string>& line, size_t limit) CBW_EXCLUDES(mu) {
    {
      MutexLock lock(&mu);
      if (overflow) return;
      if (unsent.load() + line->size() > limit) {
        overflow = true;
      } else {
        events.push_back(line);
        unsent += line->size();
      }
    }
    Signal(wake.get());
  }

  // The client thread's side: appends the queued events to `out`; false
  // once the client overflowed.
  bool TakeEvents(std::string* out) CBW_EXCLUDES(mu) {
    MutexLock lock(&mu);
    for (const auto& line : events) *out += *line;
    events.clear();
    return !overflow;
  }
};

Server::Server(std::string path, control::Dispatcher* dispatcher, backup::EventBus* bus,
               ServerOptions options)
    : path_(std::move(path)), dispatcher_(dispatcher), bus_(bus), options_(options) {}

backup::Result<std::unique_ptr<Server>> Server::Listen(const std::string& path_in,
                                                       control::Dispatcher* dispatcher,
                                                       backup::EventBus* bus,
                                                       ServerOptions options) {
  if (path_in.empty()) return Status::Error(EINVAL, "QMP socket: empty path");
  std::string path = path_in;
  if (path[0] != '/') {
    // Absolute, so that Stop() finds it after the daemon's chdir("/").
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) return Status::FromErrno(errno, "QMP socket: getcwd");
    path = std::string(cwd) + "/" + path;
  }
  sockaddr_un addr;
  if (!FillAddress(path, &addr)) {
    return Status::Error(ENAMETOOLONG, Quote(path) + ": the path is longer than the " +
                                           std::to_string(sizeof(addr.sun_path) - 1) +
                                           " bytes a socket address holds");
  }
  struct stat st {};
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status::Error(
          EEXIST, Quote(path) + ": exists and is not a socket (" + std::strerror(EEXIST) + ")");
    }
    // A socket file: in use if someone accepts on it, else left behind by a
    // process that died, and replaced.
    backup::UniqueFd probe(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!probe.valid()) return Status::FromErrno(errno, Quote(path) + ": socket");
    if (connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0) {
      return Status::Error(EADDRINUSE, Quote(path) + ": in use by another process (" +
                                           std::strerror(EADDRINUSE) + ")");
    }
    if (errno != ECONNREFUSED) return Status::FromErrno(errno, Quote(path));
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, Quote(path) + ": removing the stale socket");
    }
    LogInfo(Quote(path) + ": replaced a stale socket file");
  } else if (errno != ENOENT) {
    return Status::FromErrno(errno, Quote(path));
  }

  std::unique_ptr<Server> s(new Server(path, dispatcher, bus, options));
  s->listen_fd_.Reset(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!s->listen_fd_.valid()) return Status::FromErrno(errno, Quote(path) + ": socket");
  if (bind(s->listen_fd_.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    return Status::FromErrno(errno, Quote(path));
  }
  // Not yet listening, so nobody connects before the mode is right.
  if (lstat(path.c_str(), &st) != 0 || chmod(path.c_str(), 0600) != 0) {
    int e = errno;
    unlink(path.c_str());
    return Status::FromErrno(e, Quote(path));
  }
  s->sock_dev_ = st.st_dev;
  s->sock_ino_ = st.st_ino;
  if (listen(s->listen_fd_.get(), 16) != 0) {
    int e = errno;
    unlink(path.c_str());
    return Status::FromErrno(e, Quote(path) + ": listen");
  }
  s->stop_fd_.Reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  s->reap_fd_.Reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!s->stop_fd_.valid() || !s->reap_fd_.valid()) {
    int e = errno;
    unlink(path.c_str());
    return Status::FromErrno(e, Quote(path) + ": eventfd");
  }
  return s;
}

Server::~Server() { Stop(); }

void Server::Start() {
  if (started_ || stopped_) return;
  started_ = true;
  subscription_ = bus_->Subscribe([this](const backup::Event& e) { OnEvent(e); });
  acceptor_ = std::thread([this] { backup::RunGuarded("QMP acceptor", [this] { AcceptLoop(); }); });
}

void Server::Stop() {
  if (stopped_) return;
  stopped_ = true;
  if (started_) {
    // No callback runs once Unsubscribe returns (they run under the bus lock).
    bus_->Unsubscribe(subscription_);
    Signal(stop_fd_.get());
    acceptor_.join();
    {
      MutexLock lock(&mu_);
      while (!clients_.empty()) cv_.Wait(&lock);
    }
    JoinFinished();
  }
  listen_fd_.Reset();
  // Only the file this server created: another may have replaced it since.
  struct stat st {};
  if (lstat(path_.c_str(), &st) == 0 && st.st_dev == sock_dev_ && st.st_ino == sock_ino_) {
    if (unlink(path_.c_str()) != 0) {
      LogWarn(Quote(path_) + ": removing it: " + std::strerror(errno));
    }
  }
}

size_t Server::clients() const {
  MutexLock lock(&mu_);
  return clients_.size();
}

void Server::JoinFinished() {
  std::vector<std::thread> done;
  {
    MutexLock lock(&mu_);
    done.swap(finished_);
  }
  for (auto& t : done) t.join();
}

void Server::AcceptLoop() {
  bool backoff = false;  // out of fds or memory: retry a little later
  for (;;) {
    pollfd fds[3] = {{listen_fd_.get(), static_cast<short>(backoff ? 0 : POLLIN), 0},
                     {stop_fd_.get(), POLLIN, 0},
                     {reap_fd_.get(), POLLIN, 0}};
    int r = poll(fds, 3, backoff ? 200 : -1);
    if (r < 0) {
      if (errno == EINTR) continue;
      LogError(Quote(path_) + ": poll: " + std::strerror(errno));
      return;
    }
    backoff = false;
    if (fds[1].revents) return;
    if (fds[2].revents) {
      Consume(reap_fd_.get());
      JoinFinished();
    }
    if (fds[0].revents & POLLIN) {
      int fd = accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) {
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          LogWarn(Quote(path_) + ": accept: " + std::strerror(errno));
          backoff = true;
        }
        continue;
      }
      backup::UniqueFd conn(fd);
      backup::RunGuarded("QMP accept", [&] { Accept(std::move(conn)); });
    }
  }
}

void Server::Accept(backup::UniqueFd conn) {
  ucred cred{};
  socklen_t len = sizeof cred;
  std::string who = "?";
  if (getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
    who = "pid " + std::to_string(cred.pid) + ", uid " + std::to_string(cred.uid);
  }
  auto c = std::make_shared<Client>();
  c->fd = std::move(conn);
  c->wake.Reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!c->wake.valid()) {
    LogWarn(Quote(path_) + ": eventfd: " + std::strerror(errno));
    return;
  }
  MutexLock lock(&mu_);
  if (clients_.size() >= options_.max_clients) {
    lock.Unlock();
    const std::string refusal = "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Too many " +
                                std::string("QMP clients (") +
                                std::to_string(options_.max_clients) + ")\"}}\n";
    (void)!send(c->fd.get(), refusal.data(), refusal.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    LogWarn(Quote(path_) + ": refused a client (" + who +
            "): " + std::to_string(options_.max_clients) + " are connected");
    return;
  }
  c->id = next_client_++;
  clients_[c->id] = c;
  try {
    // Under mu_: the thread's exit (which takes mu_) finds its handle set.
    c->thread = std::thread([this, c] { Serve(c); });
  } catch (const std::system_error& e) {
    clients_.erase(c->id);
    LogWarn(Quote(path_) + ": cannot serve a client: " + e.what());
    return;
  }
  LogDebug("qmp: client " + std::to_string(c->id) + " connected (" + who + ")");
}

void Server::Serve(const std::shared_ptr<Client>& client) {
  backup::RunGuarded("QMP client", [&] { ServeLoop(client.get()); });
  {
    MutexLock lock(&mu_);
    clients_.erase(client->id);
    finished_.push_back(std::move(client->thread));
    cv_.SignalAll();
  }
  Signal(reap_fd_.get());
  LogDebug("qmp: client " + std::to_string(client->id) + " disconnected");
}

void Server::ServeLoop(Client* c) {
  control::QmpSession session(dispatcher_);
  JsonFramer framer(control::kMaxCommandBytes);
  std::string out;  // what is still to send is out.substr(sent)
  size_t sent = 0;
  auto queue = [&](std::string text) {
    c->unsent += text.size();
    out += text;
  };
  auto dropped = [&] {
    LogWarn("qmp: dropped client " + std::to_string(c->id) + ": it left more than " +
            std::to_string(options_.max_unsent_bytes) + " bytes of events unread");
  };
  queue(session.Greeting());
  std::vector<char> buf(64 * 1024);
  std::vector<std::string> values;
  for (;;) {
    const size_t pending = out.size() - sent;
    // A client that does not read its replies is not read either.
    const bool take_input = pending < options_.max_unsent_bytes / 2;
    pollfd fds[3] = {
        {c->fd.get(), static_cast<short>((take_input ? POLLIN : 0) | (pending ? POLLOUT : 0)), 0},
        {c->wake.get(), POLLIN, 0},
        {stop_fd_.get(), POLLIN, 0}};
    if (poll(fds, 3, -1) < 0) {
      if (errno == EINTR) continue;
      LogError("qmp: poll: " + std::string(std::strerror(errno)));
      return;
    }
    if (fds[2].revents) return Drain(c, &out, &sent);
    if (fds[1].revents) {
      Consume(c->wake.get());
      if (!c->TakeEvents(&out)) return dropped();
    }
    const short re = fds[0].revents;
    if (re & POLLIN) {
      ssize_t n = recv(c->fd.get(), buf.data(), buf.size(), MSG_DONTWAIT);
      if (n == 0) return Drain(c, &out, &sent);  // the client is done sending: answer, then close
      if (n < 0 && errno != EAGAIN && errno != EINTR) return;
      if (n > 0) {
        values.clear();
        framer.Feed(std::string_view(buf.data(), static_cast<size_t>(n)), &values);
        for (const std::string& v : values) {
          std::string reply = session.Handle(v);
          if (session.negotiated()) c->negotiated.store(true);
          // Events the command caused come before its reply, as in QEMU.
          if (!c->TakeEvents(&out)) return dropped();
          queue(std::move(reply));
        }
      }
    } else if (re & (POLLHUP | POLLERR | POLLNVAL)) {
      return;
    }
    while (sent < out.size()) {
      ssize_t n =
          send(c->fd.get(), out.data() + sent, out.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) break;
        return;  // gone (EPIPE, ECONNRESET)
      }
      sent += static_cast<size_t>(n);
      c->unsent -= static_cast<size_t>(n);
    }
    if (sent == out.size()) {
      out.clear();
      sent = 0;
    } else if (sent > out.size() / 2) {
      out.erase(0, sent);
      sent = 0;
    }
  }
}

void Server::Drain(Client* c, std::string* out, size_t* sent) {
  c->TakeEvents(out);
  const auto deadline = std::chrono::steady_clock::now() + options_.drain_timeout;
  while (*sent < out->size()) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return;
    pollfd pfd = {c->fd.get(), POLLOUT, 0};
    int r = poll(&pfd, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0 || (pfd.revents & (POLLERR | POLLHUP | POLLNVAL))) return;
    ssize_t n =
        send(c->fd.get(), out->data() + *sent, out->size() - *sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return;
    }
    *sent += static_cast<size_t>(n);
  }
}

void Server::OnEvent(const backup::Event& event) {
  // Runs on the publisher's thread under the bus lock: render once, queue,
  // never touch a socket. An exception must not reach the publisher.
  backup::RunGuarded("QMP events", [&] {
    auto line = std::make_shared<const std::string>(control::RenderEvent(event));
    MutexLock lock(&mu_);
    for (auto& [id, c] : clients_) {
      if (c->negotiated.load()) c->Push(line, options_.max_unsent_bytes);
    }
  });
}

}  // namespace cbw::qmp
