#include "control/args.h"

#include <cerrno>
#include <limits>
#include <utility>

#include "backup/log.h"

namespace cbw::control {

using nlohmann::ordered_json;

QmpError GenericError(int err, std::string desc) {
  return QmpError{err, "GenericError", std::move(desc)};
}

void LogErrorReply(std::string_view source, std::string_view command, const QmpError& e) {
  std::string m(source);
  m += ": ";
  m += command.empty() ? "(no command)" : command;
  m += ": ";
  m += e.cls;
  m += ": ";
  m += e.desc;
  backup::LogError(m);
}

ArgReader::ArgReader(const ordered_json& object, std::string path)
    : object_(object), path_(std::move(path)) {}

std::string ArgReader::FullName(std::string_view name) const {
  if (path_.empty()) return std::string(name);
  return path_ + "." + std::string(name);
}

const ordered_json* ArgReader::Member(std::string_view name, bool required) {
  if (!ok()) return nullptr;
  seen_.emplace(name);
  auto it = object_.find(std::string(name));
  if (it == object_.end()) {
    if (required) error_ = GenericError(EINVAL, "Parameter '" + FullName(name) + "' is missing");
    return nullptr;
  }
  return &*it;
}

void ArgReader::TypeError(std::string_view name, const char* expected) {
  error_ = GenericError(
      EINVAL, "Invalid parameter type for '" + FullName(name) + "', expected: " + expected);
}

std::optional<std::string> ArgReader::String(std::string_view name, bool required) {
  const ordered_json* v = Member(name, required);
  if (v == nullptr) return std::nullopt;
  if (!v->is_string()) {
    TypeError(name, "string");
    return std::nullopt;
  }
  return v->get<std::string>();
}

std::optional<int64_t> ArgReader::Int(std::string_view name, bool required) {
  const ordered_json* v = Member(name, required);
  if (v == nullptr) return std::nullopt;
  // Like QEMU, an integer beyond int64 (parsed as unsigned or as a double)
  // and any number with a fraction or exponent are the wrong type.
  if (v->is_number_unsigned()) {
    uint64_t u = v->get<uint64_t>();
    if (u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return static_cast<int64_t>(u);
    }
  } else if (v->is_number_integer()) {
    return v->get<int64_t>();
  }
  TypeError(name, "integer");
  return std::nullopt;
}

std::optional<bool> ArgReader::Bool(std::string_view name, bool required) {
  const ordered_json* v = Member(name, required);
  if (v == nullptr) return std::nullopt;
  if (!v->is_boolean()) {
    TypeError(name, "boolean");
    return std::nullopt;
  }
  return v->get<bool>();
}

std::optional<std::string> ArgReader::Enum(std::string_view name,
                                           std::initializer_list<const char*> values,
                                           bool required) {
  std::optional<std::string> s = String(name, required);
  if (!s) return std::nullopt;
  for (const char* value : values) {
    if (*s == value) return s;
  }
  error_ = GenericError(EINVAL,
                        "Parameter '" + std::string(name) + "' does not accept value '" + *s + "'");
  return std::nullopt;
}

const ordered_json* ArgReader::Object(std::string_view name, bool required) {
  const ordered_json* v = Member(name, required);
  if (v == nullptr) return nullptr;
  if (!v->is_object()) {
    TypeError(name, "object");
    return nullptr;
  }
  return v;
}

const ordered_json* ArgReader::Array(std::string_view name, bool required) {
  const ordered_json* v = Member(name, required);
  if (v == nullptr) return nullptr;
  if (!v->is_array()) {
    TypeError(name, "array");
    return nullptr;
  }
  return v;
}

bool ArgReader::Finish() {
  if (!ok()) return false;
  for (const auto& [key, value] : object_.items()) {
    if (seen_.find(key) == seen_.end()) {
      error_ = GenericError(EINVAL, "Parameter '" + FullName(key) + "' is unexpected");
      return false;
    }
  }
  return true;
}

}  // namespace cbw::control
