#pragma once

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace cbw::control {

// Bytes <-> JSON for the control file: splitting one write() into its
// commands, strict parsing, and QMP-style text output. Pure functions,
// thread-safe.

// One command may be at most this many bytes (from its '{' to its '}').
inline constexpr size_t kMaxCommandBytes = 64 * 1024;
// Deepest nesting of objects and arrays accepted in a command (the command
// object itself is level 1). Checked before any recursive code sees the text.
inline constexpr int kMaxNestingDepth = 64;

// The commands of one write, parsed; or why the write is refused as a whole.
struct ParsedWrite {
  int error = 0;                                 // 0, EINVAL or EMSGSIZE
  std::string message;                           // why, when error != 0 (a QMP GenericError text)
  std::vector<nlohmann::ordered_json> commands;  // each an object
};

// Splits `bytes` into top-level JSON objects separated by optional JSON
// whitespace and parses each strictly (RFC 8259, no comments, no duplicate
// keys, no NUL bytes or "\u0000", valid UTF-8 only). Whitespace alone gives no
// commands and no error. Never recurses deeper than kMaxNestingDepth.
// Messages name the byte offset (from 0, within `bytes`) where the problem
// was found; for a duplicate key, "\u0000" or a number beyond double's range,
// the offset of the object holding it.
ParsedWrite ParseWrite(std::string_view bytes);

// One JSON value as QEMU's monitor prints it: one line, ", " and ": "
// separators, keys in insertion order. Invalid UTF-8 in strings (e.g. a
// drive path) is replaced by U+FFFD rather than failing.
std::string ToQmpText(const nlohmann::ordered_json& value);

}  // namespace cbw::control
