#include "backup/threads.h"

#include <exception>
#include <new>

#include "backup/log.h"

namespace cbw::backup {

void LogStoppedException(std::string_view where, const char* what) noexcept {
  try {
    LogError(std::string(where) + ": stopped an exception: " + what);
  } catch (...) {
  }
}

void RunGuarded(std::string_view name, const std::function<void()>& body,
                const std::function<void(const std::string& what)>& on_error) noexcept {
  const char* what;
  std::string text;
  try {
    body();
    return;
  } catch (const std::bad_alloc&) {
    what = "out of memory";
  } catch (const std::exception& e) {
    what = e.what();
    try {
      text = what;  // e dies with the handler
      what = text.c_str();
    } catch (...) {
      what = "an exception";
    }
  } catch (...) {
    what = "unknown exception";
  }
  LogStoppedException(name, what);
  // The handler may allocate too; if even that fails there is nothing left.
  try {
    if (on_error) on_error(what);
  } catch (...) {
  }
}

}  // namespace cbw::backup
