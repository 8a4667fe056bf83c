#include "backup/log.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>

#include "backup/posix_io.h"
#include "backup/unique_fd.h"

namespace cbw::backup {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<bool> g_syslog{false};
std::atomic<bool> g_copy_to_stderr{false};
const char* const kNames[] = {"error", "warn", "info", "debug"};
const int kSyslogPrio[] = {LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG};

// The log file; g_mu also keeps stderr lines whole.
std::mutex g_mu;
UniqueFd g_file;            // guarded by g_mu
std::string g_file_path;    // "" = no file, "-" = stderr; set before threads run
uint64_t g_next_check = 0;  // MonoNs of the next "was it rotated?" check; g_mu

constexpr uint64_t kRotationCheckNs = 1'000'000'000;

int OpenLogFile(const std::string& path) {
  return open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0640);
}

// With g_mu held: reopens the file if its path now names another file or
// none (logrotate renamed or removed it).
void ReopenIfRotated() {
  if (g_file_path.empty() || g_file_path == "-") return;
  const uint64_t now = MonoNs();
  if (now < g_next_check) return;
  g_next_check = now + kRotationCheckNs;
  struct stat by_path {
  }, open_file{};
  if (stat(g_file_path.c_str(), &by_path) == 0 && fstat(g_file.get(), &open_file) == 0 &&
      by_path.st_dev == open_file.st_dev && by_path.st_ino == open_file.st_ino) {
    return;
  }
  int fd = OpenLogFile(g_file_path);
  if (fd >= 0) g_file.Reset(fd);
}

// "2026-11-29T19:16:00.123Z": UTC, as the events' timestamps.
std::string Now() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm {};
  gmtime_r(&ts.tv_sec, &tm);
  char buf[40];
  size_t n = strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  std::snprintf(buf + n, sizeof buf - n, ".%03ldZ", ts.tv_nsec / 1'000'000);
  return buf;
}

void WriteAll(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // nowhere left to say so
    done += static_cast<size_t>(n);
  }
}

}  // namespace

void SetLogLevel(LogLevel level) { g_level = static_cast<int>(level); }

void SetLogToSyslog(bool on) {
  if (on) openlog("cbwfs", LOG_PID, LOG_DAEMON);
  g_syslog = on;
}

Status SetLogFile(const std::string& path) {
  int fd = path == "-" ? fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3) : OpenLogFile(path);
  if (fd < 0) return Status::FromErrno(errno, "log file '" + path + "'");
  std::lock_guard lock(g_mu);
  g_file.Reset(fd);
  g_file_path = path;
  g_next_check = MonoNs() + kRotationCheckNs;
  return Status::Ok();
}

void SetLogCopyToStderr(bool on) { g_copy_to_stderr = on; }

bool SyslogSocketAvailable() {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, "/dev/log");
  // syslog(3) tries a datagram socket, then a stream one.
  for (int type : {SOCK_DGRAM, SOCK_STREAM}) {
    UniqueFd fd(socket(AF_UNIX, type | SOCK_CLOEXEC, 0));
    if (fd.valid() && connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
      return true;
    }
  }
  return false;
}

void Log(LogLevel level, std::string_view message) {
  int l = static_cast<int>(level);
  if (l > g_level.load(std::memory_order_relaxed)) return;
  std::string line = "cbwfs: ";
  line += kNames[l];
  line += ": ";
  line += message;
  line += '\n';
  std::unique_lock lock(g_mu);
  if (g_file.valid()) {
    ReopenIfRotated();
    std::string stamped = Now() + " cbwfs[" + std::to_string(getpid()) + "]: " + line.substr(7);
    WriteAll(g_file.get(), stamped);
    if (g_file_path != "-" && g_copy_to_stderr) WriteAll(STDERR_FILENO, line);
    return;
  }
  if (g_syslog) {
    lock.unlock();  // syslog(3) has its own lock
    syslog(kSyslogPrio[l], "%.*s", static_cast<int>(message.size()), message.data());
    return;
  }
  WriteAll(STDERR_FILENO, line);
}

}  // namespace cbw::backup
