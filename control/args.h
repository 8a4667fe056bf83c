#pragma once

#include <cstdint>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <string_view>

namespace cbw::control {

// A QMP error reply and the errno the control write() fails with.
struct QmpError {
  int err = 0;       // SPEC 2.2's errno
  std::string cls;   // "GenericError", "CommandNotFound", "DeviceNotActive"
  std::string desc;  // QEMU's text where QEMU has the same error
};

QmpError GenericError(int err, std::string desc);

// Logs a refused command at error level: "<source>: <command>: <class>: <desc>".
void LogErrorReply(std::string_view source, std::string_view command, const QmpError& e);

// Reads the members of one QMP arguments object the way QEMU's QObject input
// visitor does, so that the first error reported is QEMU's: members are read
// in schema order (the caller's call order); a missing required member, a
// wrong type or a bad enum value is reported as soon as it is read; members
// nobody read are reported by Finish(). Only the first error is kept; every
// accessor returns nullopt once an error is set.
//
// Names in messages are full paths ("actions[0].data.sync") like QEMU's,
// except enum values, which QEMU names by the bare member name.
//
// Not thread-safe; borrows `object`, which must outlive the reader.
class ArgReader {
 public:
  // `object` must be a JSON object; `path` is its full name ("" at the top).
  ArgReader(const nlohmann::ordered_json& object, std::string path);

  std::optional<std::string> String(std::string_view name, bool required);
  std::optional<int64_t> Int(std::string_view name, bool required);
  std::optional<bool> Bool(std::string_view name, bool required);
  // A string that must be one of `values`.
  std::optional<std::string> Enum(std::string_view name, std::initializer_list<const char*> values,
                                  bool required);
  // A member that must be an object / an array; returns it.
  const nlohmann::ordered_json* Object(std::string_view name, bool required);
  const nlohmann::ordered_json* Array(std::string_view name, bool required);

  // Reports the first member that was never read ("Parameter 'x' is
  // unexpected"). Returns ok().
  bool Finish();
  // Records an error found by the caller (the first one wins).
  void SetError(QmpError e) {
    if (!error_) error_ = std::move(e);
  }

  bool ok() const { return !error_.has_value(); }
  const std::optional<QmpError>& error() const { return error_; }
  // The full name of member `name` of this object.
  std::string FullName(std::string_view name) const;

 private:
  // The member, or nullptr when absent (setting "is missing" if required).
  const nlohmann::ordered_json* Member(std::string_view name, bool required);
  void TypeError(std::string_view name, const char* expected);

  const nlohmann::ordered_json& object_;
  std::string path_;
  std::set<std::string, std::less<>> seen_;
  std::optional<QmpError> error_;
};

}  // namespace cbw::control
