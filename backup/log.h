#pragma once

#include <string>
#include <string_view>

#include "backup/status.h"

namespace cbw::backup {

// Process-wide logging (SPEC 8 "Logs"). Where messages go, first match:
//   1. a log file (SetLogFile): one line each, "TIME cbwfs[PID]: LEVEL: text";
//      while SetLogCopyToStderr is on, also to stderr;
//   2. syslog (SetLogToSyslog, when detached);
//   3. stderr, "cbwfs: LEVEL: text" (the default).
// Thread-safe. Sinks are chosen at start by main (and Session::Daemonize)
// before any other thread runs; the level may change at any time.
enum class LogLevel { kError = 0, kWarn = 1, kInfo = 2, kDebug = 3 };

void SetLogLevel(LogLevel level);
void SetLogToSyslog(bool on);
// Appends messages to `path` (created 0640 if missing). "-" is the stderr of
// now, kept even after daemonizing points fd 2 at /dev/null. A file is
// reopened (at most once a second, before a message) when `path` no longer
// names it, so rotating by rename or removal needs no signal; a failed
// reopen keeps the old file. `path` must be absolute, or "-".
Status SetLogFile(const std::string& path);
// While on (and a log file other than stderr is set), messages also go to
// stderr: main keeps it on until the daemon detaches or the mount is live,
// so a failing start is seen where it was started.
void SetLogCopyToStderr(bool on);
// Whether a syslog daemon listens on /dev/log (what syslog(3) writes to).
bool SyslogSocketAvailable();
void Log(LogLevel level, std::string_view message);

inline void LogError(std::string_view m) { Log(LogLevel::kError, m); }
inline void LogWarn(std::string_view m) { Log(LogLevel::kWarn, m); }
inline void LogInfo(std::string_view m) { Log(LogLevel::kInfo, m); }
inline void LogDebug(std::string_view m) { Log(LogLevel::kDebug, m); }

}  // namespace cbw::backup
