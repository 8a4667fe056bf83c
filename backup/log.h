#pragma once

#include <string_view>

namespace cbw::backup {

// Process-wide logging: stderr in the foreground, syslog when detached.
// Thread-safe. The sink is chosen once at start by main (SetLogSink) before
// any thread runs; the level may change at any time.
enum class LogLevel { kError = 0, kWarn = 1, kInfo = 2, kDebug = 3 };

void SetLogLevel(LogLevel level);
void SetLogToSyslog(bool on);
void Log(LogLevel level, std::string_view message);

inline void LogError(std::string_view m) { Log(LogLevel::kError, m); }
inline void LogWarn(std::string_view m) { Log(LogLevel::kWarn, m); }
inline void LogInfo(std::string_view m) { Log(LogLevel::kInfo, m); }
inline void LogDebug(std::string_view m) { Log(LogLevel::kDebug, m); }

}  // namespace cbw::backup
