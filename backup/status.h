#pragma once

#include <cerrno>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace cbw::backup {

// The outcome of an operation: OK, or an errno number with a human message.
// Used on every I/O path instead of exceptions. The errno travels to the FUSE
// edge (fuse_reply_err) and to control/, which picks a QMP class from it.
// Immutable value type; safe to copy between threads.
class Status {
 public:
  Status() = default;  // OK

  static Status Ok() { return Status(); }
  // `err` must be > 0. The message is shown to users as is.
  static Status Error(int err, std::string message) { return Status(err, std::move(message)); }
  // "context: strerror(err)", e.g. "Could not open '/x': No such file or directory".
  static Status FromErrno(int err, std::string_view context);

  bool ok() const { return code_ == 0; }
  // The errno number (0 when OK). Not named errno(): that is a macro.
  int code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  Status(int code, std::string message) : code_(code), message_(std::move(message)) {}
  int code_ = 0;
  std::string message_;
};

// A value or a failed Status.
template <class T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}         // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {}  // NOLINT: must not be OK

  bool ok() const { return v_.index() == 0; }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<1>(v_);
  }
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace cbw::backup
