#pragma once

#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace cbw::ctl {

// cbwctl's exit codes (documented in --help and the README). Scripts rely on
// them: 0 only for success, and each way of not succeeding has its own code.
enum ExitCode : int {
  kExitOk = 0,
  kExitJobFailed = 1,     // the job ended with result "failed"
  kExitUsage = 2,         // bad command line
  kExitJobCancelled = 3,  // the job ended with result "cancelled"
  kExitRefused = 4,       // the daemon answered a QMP error, or no such job
  kExitMount = 5,         // no usable mount: none found, I/O error, daemon gone, record vanished
  kExitInterrupted = 130  // Ctrl-C while waiting (the job keeps running)
};

// Why something did not work: the exit code it leads to and the message the
// user sees (without the "cbwctl: " prefix).
struct Error {
  int exit_code = kExitMount;
  std::string message;
};

// A value or an Error. A small stand-in for std::expected (C++23), which
// this C++20 build does not have. Not thread-safe; a plain value type.
template <typename T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}      // NOLINT: implicit by design
  Result(Error error) : v_(std::move(error)) {}  // NOLINT: implicit by design

  bool ok() const { return v_.index() == 0; }
  T& value() { return std::get<0>(v_); }
  const T& value() const { return std::get<0>(v_); }
  T& operator*() { return value(); }
  const T& operator*() const { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  const Error& error() const { return std::get<1>(v_); }

 private:
  std::variant<T, Error> v_;
};

inline Error UsageError(std::string message) { return Error{kExitUsage, std::move(message)}; }

}  // namespace cbw::ctl
