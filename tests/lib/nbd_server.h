#pragma once

// NBD servers the tests start themselves: nbdkit (memory, full, with
// filters; over a Unix socket or TCP on 127.0.0.1) and qemu-nbd (raw or
// qcow2, persistent). Each runs as a child of the test, in the foreground,
// dies with it (--exit-with-parent / PR_SET_PDEATHSIG) and is killed by the
// destructor. Readiness is the server's pid file, which both write once they
// accept connections. Header-only: used by the backup and the e2e tests.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace cbw::test {

class NbdServer {
 public:
  enum class Transport { kUnix, kTcp };

  // nbdkit -f --exit-with-parent [-U SOCK | -i 127.0.0.1 -p PORT] ARGS...,
  // e.g. {"memory", "64M"} or {"--filter=delay", "memory", "64M",
  // "delay-write=1s"}. nullptr if it does not start.
  static std::unique_ptr<NbdServer> Nbdkit(const std::string& dir,
                                           const std::vector<std::string>& args,
                                           Transport transport = Transport::kUnix) {
    for (int attempt = 0; attempt < 5; ++attempt) {
      std::unique_ptr<NbdServer> s(new NbdServer(dir));
      std::vector<std::string> argv = {"nbdkit", "-f", "--exit-with-parent", "-P", s->pidfile_};
      if (transport == Transport::kUnix) {
        argv.insert(argv.end(), {"-U", s->socket_});
      } else {
        s->port_ = FreePort();
        argv.insert(argv.end(), {"-i", "127.0.0.1", "-p", std::to_string(s->port_)});
      }
      argv.insert(argv.end(), args.begin(), args.end());
      if (s->Spawn(argv)) return s;
      if (transport == Transport::kUnix) break;  // a port clash is the only reason to retry
    }
    return nullptr;
  }

  // qemu-nbd --persistent serving `image` in `format` on a Unix socket.
  static std::unique_ptr<NbdServer> QemuNbd(const std::string& dir, const std::string& image,
                                            const std::string& format) {
    std::unique_ptr<NbdServer> s(new NbdServer(dir));
    if (!s->Spawn({"qemu-nbd", "--persistent", "--pid-file=" + s->pidfile_, "--format=" + format,
                   "--socket=" + s->socket_, "--cache=writeback", image},
                  /*pdeathsig=*/true)) {
      return nullptr;
    }
    return s;
  }

  ~NbdServer() {
    if (pid_ > 0) {
      kill(pid_, SIGCONT);
      kill(pid_, SIGKILL);
      int st;
      waitpid(pid_, &st, 0);
    }
    unlink(socket_.c_str());
    unlink(pidfile_.c_str());
    unlink(log_.c_str());
  }
  NbdServer(const NbdServer&) = delete;
  NbdServer& operator=(const NbdServer&) = delete;

  pid_t pid() const { return pid_; }
  int port() const { return port_; }
  const std::string& socket() const { return socket_; }
  // The URI of the default export.
  std::string uri() const {
    return port_ > 0 ? "nbd://127.0.0.1:" + std::to_string(port_) + "/"
                     : "nbd+unix:///?socket=" + socket_;
  }
  // The server's stderr so far.
  std::string log() const {
    std::ifstream in(log_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  // Stops answering (SIGSTOP) / answers again.
  void Freeze() { kill(pid_, SIGSTOP); }
  void Thaw() { kill(pid_, SIGCONT); }
  void Kill() {
    if (pid_ > 0) {
      kill(pid_, SIGCONT);
      kill(pid_, SIGKILL);
      int st;
      waitpid(pid_, &st, 0);
      pid_ = -1;
    }
  }

  // Reads the whole export (nbdcopy) into a string; empty on failure.
  std::string ReadAll(const std::string& scratch_dir) const {
    const std::string out = scratch_dir + "/export.readback";
    if (Run({"nbdcopy", uri(), out}) != 0) return "";
    std::ifstream in(out, std::ios::binary);
    std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    unlink(out.c_str());
    return data;
  }

  // Runs argv (no shell), stdin/stdout/stderr to /dev/null unless `out`
  // names a file for stdout and stderr; returns the exit status or -1.
  static int Run(const std::vector<std::string>& argv, const std::string& out = "") {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, out.empty() ? "/dev/null" : out.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    pid_t pid;
    int r = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (r != 0) return -1;
    int st;
    while (waitpid(pid, &st, 0) < 0) {
      if (errno != EINTR) return -1;
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  }

  // A TCP port on 127.0.0.1 that nothing listened on a moment ago.
  static int FreePort() {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    int port = 0;
    if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
        getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
      port = ntohs(a.sin_port);
    }
    close(fd);
    return port;
  }

 private:
  explicit NbdServer(const std::string& dir) {
    static int counter = 0;
    const std::string tag = std::to_string(getpid()) + "." + std::to_string(++counter);
    socket_ = dir + "/nbd." + tag + ".sock";
    pidfile_ = dir + "/nbd." + tag + ".pid";
    log_ = dir + "/nbd." + tag + ".log";
  }

  bool Spawn(const std::vector<std::string>& argv, bool pdeathsig = false) {
    unlink(pidfile_.c_str());
    std::vector<std::string> full = argv;
    if (pdeathsig) {
      // qemu-nbd has no --exit-with-parent: setpriv gives it the same.
      full.insert(full.begin(), {"setpriv", "--pdeathsig", "KILL", "--"});
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    std::vector<char*> args;
    for (const auto& a : full) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    int r = posix_spawnp(&pid_, args[0], &fa, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (r != 0) {
      pid_ = -1;
      return false;
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < deadline) {
      struct stat st {};
      if (stat(pidfile_.c_str(), &st) == 0 && st.st_size > 0) return true;
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        fprintf(stderr, "%s did not start: %s\n", argv[0].c_str(), log().c_str());
        pid_ = -1;
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    fprintf(stderr, "%s did not start in time: %s\n", argv[0].c_str(), log().c_str());
    return false;
  }

  pid_t pid_ = -1;
  int port_ = 0;
  std::string socket_, pidfile_, log_;
};

}  // namespace cbw::test
