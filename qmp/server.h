#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "backup/event_bus.h"
#include "backup/mutex.h"
#include "backup/status.h"
#include "backup/unique_fd.h"
#include "control/dispatcher.h"

namespace cbw::qmp {

struct ServerOptions {
  // Connections served at once; one more is told so and closed.
  size_t max_clients = 64;
  // Replies and events a client may leave unread (bytes, beyond what the
  // socket buffers). Past half of it the client's commands are not read
  // until it reads; an event that would pass it drops the client, so a slow
  // client never holds up the publisher or costs unbounded memory.
  size_t max_unsent_bytes = 1 << 20;
  // At Stop, how long each client gets to read what is queued for it.
  std::chrono::milliseconds drain_timeout = std::chrono::seconds(1);
};

// The QMP socket (SPEC 8): a unix stream socket (mode 0600) where each
// connection gets QEMU's greeting, negotiates capabilities and then sends
// the control file's commands (control::QmpSession over the shared
// control::Dispatcher) and receives every event with its timestamp.
//
// Thread model: Start() runs an acceptor thread and one thread per client.
// A client's thread reads, frames and runs its commands (a slow command
// holds up only that client) and writes its replies and events with
// non-blocking sends. Events come from one EventBus subscription: the
// callback renders each event once and queues it on every negotiated client
// (bounded, see ServerOptions), then wakes the client's thread through its
// eventfd; it never blocks on a socket. Every thread body runs under
// backup::RunGuarded.
//
// Lock order: EventBus::mu_ -> Server::mu_ -> Client::mu (the "subscriber
// locks" of backup/mutex.h). No lock is held across a socket call or a
// command.
//
// Ownership: borrows the dispatcher and the bus, which must outlive Stop().
// Owns the socket file: removed at Stop() if it is still the one created.
class Server {
 public:
  // Creates the socket at `path` (made absolute against the current
  // directory) and listens; no thread runs yet. A stale socket file (nobody
  // accepts on it) is replaced. Fails with EADDRINUSE if a process accepts
  // connections on it, EEXIST if `path` is something other than a socket,
  // ENAMETOOLONG past the 107 bytes a socket address holds; messages name
  // the path.
  static backup::Result<std::unique_ptr<Server>> Listen(const std::string& path,
                                                        control::Dispatcher* dispatcher,
                                                        backup::EventBus* bus,
                                                        ServerOptions options = {});
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Subscribes to the bus and starts serving (call in the process that
  // serves, after daemonizing: fork keeps no threads).
  void Start() CBW_EXCLUDES(mu_);
  // Stops accepting, lets each client read what is queued for it (bounded by
  // drain_timeout), closes every connection, joins every thread and removes
  // the socket file. Idempotent.
  void Stop() CBW_EXCLUDES(mu_);

  const std::string& path() const { return path_; }
  // Connections open now (for tests and logs).
  size_t clients() const CBW_EXCLUDES(mu_);

 private:
  struct Client;
  Server(std::string path, control::Dispatcher* dispatcher, backup::EventBus* bus,
         ServerOptions options);

  void AcceptLoop() CBW_EXCLUDES(mu_);
  void Accept(backup::UniqueFd conn) CBW_EXCLUDES(mu_);
  // A client's thread: serves it, then takes it out of the list.
  void Serve(const std::shared_ptr<Client>& client) CBW_EXCLUDES(mu_);
  void ServeLoop(Client* client);
  // Flushes `out` for at most the drain timeout (at stop).
  void Drain(Client* client, std::string* out, size_t* sent);
  void OnEvent(const backup::Event& event) CBW_EXCLUDES(mu_);
  void JoinFinished() CBW_EXCLUDES(mu_);

  const std::string path_;
  control::Dispatcher* const dispatcher_;
  backup::EventBus* const bus_;
  const ServerOptions options_;
  backup::UniqueFd listen_fd_;
  backup::UniqueFd stop_fd_;  // eventfd: readable once Stop() began (never drained)
  backup::UniqueFd reap_fd_;  // eventfd: a client thread finished
  dev_t sock_dev_ = 0;        // the socket file as created, to remove only ours
  ino_t sock_ino_ = 0;
  uint64_t subscription_ = 0;
  bool started_ = false;  // Start/Stop run on one thread (main's)
  bool stopped_ = false;
  std::thread acceptor_;

  mutable backup::Mutex mu_;
  backup::CondVar cv_;  // signalled when a client leaves clients_
  std::map<uint64_t, std::shared_ptr<Client>> clients_ CBW_GUARDED_BY(mu_);
  std::vector<std::thread> finished_ CBW_GUARDED_BY(mu_);  // ended, not yet joined
  uint64_t next_client_ CBW_GUARDED_BY(mu_) = 1;
};

}  // namespace cbw::qmp
