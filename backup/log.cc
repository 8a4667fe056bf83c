#include "backup/log.h"

#include <syslog.h>

#include <atomic>
#include <cstdio>
#include <mutex>
#include <string>

namespace cbw::backup {
namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<bool> g_syslog{false};
std::mutex g_mu;  // keeps stderr lines whole
const char* const kNames[] = {"error", "warn", "info", "debug"};
const int kSyslogPrio[] = {LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG};
}  // namespace

void SetLogLevel(LogLevel level) { g_level = static_cast<int>(level); }

void SetLogToSyslog(bool on) {
  if (on) openlog("cbwfs", LOG_PID, LOG_DAEMON);
  g_syslog = on;
}

void Log(LogLevel level, std::string_view message) {
  int l = static_cast<int>(level);
  if (l > g_level.load(std::memory_order_relaxed)) return;
  if (g_syslog) {
    syslog(kSyslogPrio[l], "%.*s", static_cast<int>(message.size()), message.data());
    return;
  }
  std::string line = "cbwfs: ";
  line += kNames[l];
  line += ": ";
  line += message;
  line += '\n';
  std::lock_guard lock(g_mu);
  fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace cbw::backup
