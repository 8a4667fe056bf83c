#include "cbwctl/client.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>

#include <cerrno>
#include <csignal>
#include <cstring>

namespace cbw::ctl {

namespace {

// Signal-handler state: a process-wide fact by nature (one SIGINT per process).
volatile sig_atomic_t g_interrupted = 0;
int g_interrupt_pipe[2] = {-1, -1};

void OnInterrupt(int) {
  g_interrupted = 1;
  int saved = errno;
  if (g_interrupt_pipe[1] >= 0) {
    [[maybe_unused]] ssize_t n = write(g_interrupt_pipe[1], "x", 1);
  }
  errno = saved;
}

std::string ErrnoText(const std::string& what, int err) { return what + ": " + strerror(err); }

Error Interruption() { return Error{kExitInterrupted, "interrupted"}; }

// Reads `fd` to end of file (retrying EINTR unless Ctrl-C came).
Result<std::string> ReadAll(int fd, const std::string& what) {
  std::string out;
  char buf[16384];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
    } else if (n == 0) {
      return out;
    } else if (errno == EINTR) {
      if (Interrupted()) return Interruption();
    } else {
      return Error{kExitMount, ErrnoText(what, errno)};
    }
  }
}

}  // namespace

void InstallInterruptHandler() {
  if (g_interrupt_pipe[0] < 0 && pipe2(g_interrupt_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    g_interrupt_pipe[0] = g_interrupt_pipe[1] = -1;
  }
  struct sigaction sa {};
  sa.sa_handler = OnInterrupt;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: a blocked read or poll returns EINTR
  sigaction(SIGINT, &sa, nullptr);
}

bool Interrupted() { return g_interrupted != 0; }

int InterruptFd() { return g_interrupt_pipe[0]; }

Result<Mount> Mount::Open(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) {
    if (errno == ENOTCONN) {
      return Error{kExitMount, path + ": the cbwfs daemon is gone (" + strerror(ENOTCONN) +
                                   "); unmount it with fusermount3 -uz"};
    }
    return Error{kExitMount, ErrnoText(path, errno)};
  }
  if (!S_ISDIR(st.st_mode)) return Error{kExitMount, path + ": not a directory"};
  const std::string control = path + "/control";
  if (stat(control.c_str(), &st) != 0) {
    if (errno == ENOENT) return Error{kExitMount, path + " is not a cbwfs mount (no control file)"};
    return Error{kExitMount, ErrnoText(control, errno)};
  }
  return Mount(path);
}

Result<Reply> Mount::Execute(const OrderedJson& command) {
  const std::string control = path_ + "/control";
  Fd fd(open(control.c_str(), O_RDWR | O_CLOEXEC));
  if (fd.get() < 0) return Error{kExitMount, ErrnoText(control, errno)};
  const std::string id = "cbwctl-" + std::to_string(getpid()) + "-" + std::to_string(++sequence_);
  const std::string text = CommandText(command, id);
  ssize_t n;
  do {
    n = write(fd.get(), text.data(), text.size());
  } while (n < 0 && errno == EINTR && !Interrupted());
  const int write_errno = n < 0 ? errno : 0;
  if (n < 0 && write_errno == EINTR) return Interruption();
  if (n >= 0 && static_cast<size_t>(n) != text.size()) {
    return Error{kExitMount, control + ": short write"};
  }

  // The replies of this open, from its first byte: one line per command.
  auto all = ReadAll(fd.get(), control);
  if (!all.ok()) return all.error();
  std::string_view rest = *all;
  while (!rest.empty()) {
    size_t nl = rest.find('\n');
    std::string_view line = rest.substr(0, nl);
    rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
    auto reply = ParseReply(line);
    // Another open's reply (what a refused write that left none of its own
    // reads back) is not ours to show.
    if (reply.ok() && reply->id == id) return reply;
  }
  if (write_errno != 0) return Error{kExitRefused, ErrnoText(control, write_errno)};
  return Error{kExitMount, control + ": the daemon gave no reply"};
}

Result<std::optional<std::string>> Mount::ReadRecord(const std::string& id) {
  const std::string p = path_ + "/jobs/" + id;
  int raw;
  do {
    raw = open(p.c_str(), O_RDONLY | O_CLOEXEC);
  } while (raw < 0 && errno == EINTR && !Interrupted());
  if (raw < 0) {
    if (errno == ENOENT) return std::optional<std::string>();
    if (errno == EINTR) return Interruption();
    return Error{kExitMount, ErrnoText(p, errno)};
  }
  Fd fd(raw);
  auto text = ReadAll(fd.get(), p);
  if (!text.ok()) return text.error();
  return std::optional<std::string>(std::move(*text));
}

Result<std::vector<std::string>> Mount::JobIds() {
  const std::string p = path_ + "/jobs";
  DIR* d = opendir(p.c_str());
  if (d == nullptr) return Error{kExitMount, ErrnoText(p, errno)};
  std::vector<std::string> ids;
  errno = 0;
  while (dirent* e = readdir(d)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") ids.push_back(std::move(name));
  }
  int err = errno;
  closedir(d);
  if (err != 0) return Error{kExitMount, ErrnoText(p, err)};
  return ids;
}

Result<EventStream> EventStream::Open(const Mount& mount) {
  const std::string p = mount.path() + "/events";
  EventStream s;
  s.fd_ = Fd(open(p.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  if (s.fd_.get() < 0) return Error{kExitMount, ErrnoText(p, errno)};
  return s;
}

Result<bool> EventStream::ReadAvailable(std::vector<std::string>* lines) {
  char buf[16384];
  for (;;) {
    ssize_t n = read(fd_.get(), buf, sizeof buf);
    if (n > 0) {
      partial_.append(buf, static_cast<size_t>(n));
      size_t nl;
      while ((nl = partial_.find('\n')) != std::string::npos) {
        lines->push_back(partial_.substr(0, nl));
        partial_.erase(0, nl + 1);
      }
      continue;
    }
    if (n == 0) return false;
    if (errno == EAGAIN) return true;
    if (errno == EINTR) {
      if (Interrupted()) return Interruption();
      continue;
    }
    return Error{kExitMount, ErrnoText("events", errno)};
  }
}

}  // namespace cbw::ctl
