#pragma once

#include <exception>
#include <string>
#include <string_view>

#include "backup/log.h"

namespace cbw::fs {

// Logs that an exception was stopped at `where`. Never throws (if even the
// message cannot be built, nothing is logged).
inline void LogStoppedException(std::string_view where, const char* what) noexcept {
  try {
    backup::LogError(std::string(where) + ": stopped an exception: " + what);
  } catch (...) {
  }
}

// Runs `body` so that no exception leaves it: for thread entries and for
// callbacks from C (libfuse), where an escaping exception would end the
// process. What it stops is logged.
template <class F>
void RunGuarded(std::string_view where, F&& body) noexcept {
  try {
    body();
  } catch (const std::exception& e) {
    LogStoppedException(where, e.what());
  } catch (...) {
    LogStoppedException(where, "unknown exception");
  }
}

}  // namespace cbw::fs
