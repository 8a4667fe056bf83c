#include "backup/threads.h"

#include <exception>
#include <new>

#include "backup/log.h"

namespace cbw::backup {

void RunGuarded(const char* name, const std::function<void()>& body,
                const std::function<void(const std::string& what)>& on_error) {
  std::string what;
  try {
    body();
    return;
  } catch (const std::bad_alloc&) {
    what = "out of memory";
  } catch (const std::exception& e) {
    what = e.what();
  } catch (...) {
    what = "unknown exception";
  }
  // Logging allocates; if even that fails there is nothing left to tell.
  try {
    LogError(std::string(name) + ": " + what);
    if (on_error) on_error(what);
  } catch (...) {
  }
}

}  // namespace cbw::backup
