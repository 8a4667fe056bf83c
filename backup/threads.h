#pragma once

#include <functional>
#include <string>
#include <thread>

namespace cbw::backup {

// Runs `body` so that no exception escapes a thread entry: std::bad_alloc and
// anything else are caught and logged with `name`, and `on_error` (if given)
// runs, e.g. to fail the job the thread worked for. Every thread the daemon
// starts runs its body through this (an escaping exception would call
// std::terminate and take the mount down).
void RunGuarded(const char* name, const std::function<void()>& body,
                const std::function<void(const std::string& what)>& on_error = nullptr);

// std::thread whose body runs under RunGuarded.
template <class F>
std::thread GuardedThread(const char* name, F&& body) {
  return std::thread(
      [name, body = std::forward<F>(body)]() mutable { RunGuarded(name, [&] { body(); }); });
}

}  // namespace cbw::backup
