#pragma once

#include <functional>
#include <string>
#include <string_view>

namespace cbw::backup {

// Runs `body` so that no exception escapes a thread entry: std::bad_alloc and
// anything else are caught and logged with `name`, and `on_error` (if given)
// runs, e.g. to fail the job the thread worked for. Every thread the daemon
// starts runs its body through this (an escaping exception would call
// std::terminate and take the mount down).
void RunGuarded(std::string_view name, const std::function<void()>& body,
                const std::function<void(const std::string& what)>& on_error = nullptr) noexcept;
// Logs that an exception was stopped at `where` (for catch blocks that
// cannot use RunGuarded). Never throws.
void LogStoppedException(std::string_view where, const char* what) noexcept;

}  // namespace cbw::backup
