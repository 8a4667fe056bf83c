#include "control/wire.h"

#include <cerrno>
#include <cstdint>
#include <set>
#include <string>
#include <utility>

namespace cbw::control {
namespace {

using nlohmann::ordered_json;

ParsedWrite Refuse(int err, std::string message) {
  ParsedWrite out;
  out.error = err;
  out.message = std::move(message);
  return out;
}

bool IsJsonSpace(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// Length of the well-formed UTF-8 sequence at `p` (RFC 3629: no overlongs, no
// surrogates, nothing above U+10FFFF), or 0 if it is not one.
size_t Utf8SequenceLength(const unsigned char* p, size_t avail) {
  const unsigned char c = p[0];
  if (c < 0x80) return 1;
  size_t n;
  unsigned char lo = 0x80, hi = 0xBF;  // bounds of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (avail < n) return 0;
  if (p[1] < lo || p[1] > hi) return 0;
  for (size_t i = 2; i < n; ++i) {
    if (p[i] < 0x80 || p[i] > 0xBF) return 0;
  }
  return n;
}

// The whole write must be UTF-8 without NUL bytes before anything looks at
// its structure; offsets in messages count from the start of the write.
ParsedWrite CheckBytes(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t i = 0;
  while (i < bytes.size()) {
    if (p[i] == 0) {
      return Refuse(EINVAL, "JSON parse error, NUL byte at offset " + std::to_string(i));
    }
    size_t n = Utf8SequenceLength(p + i, bytes.size() - i);
    if (n == 0) {
      return Refuse(EINVAL, "JSON parse error, invalid UTF-8 at offset " + std::to_string(i));
    }
    i += n;
  }
  return {};
}

// Finds the end of the object starting at bytes[start] == '{' by tracking
// strings and bracket depth only; full syntax is nlohmann's job afterwards.
// Sets *end one past its closing brace.
ParsedWrite FindObjectEnd(std::string_view bytes, size_t start, size_t* end) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = start; i < bytes.size(); ++i) {
    if (i - start >= kMaxCommandBytes) {
      return Refuse(EMSGSIZE, "Command at offset " + std::to_string(start) + " exceeds " +
                                  std::to_string(kMaxCommandBytes) + " bytes");
    }
    const char c = bytes[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // the escaped character cannot end the string
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > kMaxNestingDepth) {
        return Refuse(EINVAL, "JSON parse error, nesting deeper than " +
                                  std::to_string(kMaxNestingDepth) + " levels at offset " +
                                  std::to_string(i));
      }
    } else if (c == '}' || c == ']') {
      if (--depth == 0) {
        *end = i + 1;
        return {};
      }
    }
  }
  return Refuse(EINVAL, "JSON parse error, the write ends inside an unfinished JSON value");
}

// Parses one object's text. Duplicate keys and "\u0000" in strings are
// refused: QEMU refuses the former, and the latter would silently cut paths
// and names at the C boundary.
ParsedWrite ParseObject(std::string_view text, size_t offset, ordered_json* out) {
  std::vector<std::set<std::string>> keys;
  const char* problem = nullptr;
  auto callback = [&](int, ordered_json::parse_event_t event, ordered_json& parsed) {
    switch (event) {
      case ordered_json::parse_event_t::object_start:
        keys.emplace_back();
        break;
      case ordered_json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case ordered_json::parse_event_t::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        if (key.find('\0') != std::string::npos) problem = "\\u0000 in a string";
        if (!keys.empty() && !keys.back().insert(key).second && problem == nullptr) {
          problem = "duplicate key";
        }
        break;
      }
      case ordered_json::parse_event_t::value:
        if (parsed.is_string() &&
            parsed.get_ref<const std::string&>().find('\0') != std::string::npos) {
          problem = "\\u0000 in a string";
        }
        break;
      default:
        break;
    }
    return true;
  };
  *out = ordered_json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/false);
  if (out->is_discarded()) {
    return Refuse(
        EINVAL, "JSON parse error, invalid JSON in the object at offset " + std::to_string(offset));
  }
  if (problem != nullptr) {
    return Refuse(EINVAL, std::string("JSON parse error, ") + problem +
                              " in the object at offset " + std::to_string(offset));
  }
  return {};
}

void AppendQmpText(const ordered_json& v, std::string* out) {
  switch (v.type()) {
    case ordered_json::value_t::object: {
      if (v.empty()) {
        out->append("{}");
        return;
      }
      out->push_back('{');
      bool first = true;
      for (const auto& [key, member] : v.items()) {
        if (!first) out->append(", ");
        first = false;
        out->append(ordered_json(key).dump(-1, ' ', false, ordered_json::error_handler_t::replace));
        out->append(": ");
        AppendQmpText(member, out);
      }
      out->push_back('}');
      return;
    }
    case ordered_json::value_t::array: {
      if (v.empty()) {
        out->append("[]");
        return;
      }
      out->push_back('[');
      bool first = true;
      for (const auto& element : v) {
        if (!first) out->append(", ");
        first = false;
        AppendQmpText(element, out);
      }
      out->push_back(']');
      return;
    }
    default:
      out->append(v.dump(-1, ' ', false, ordered_json::error_handler_t::replace));
      return;
  }
}

}  // namespace

ParsedWrite ParseWrite(std::string_view bytes) {
  if (ParsedWrite bad = CheckBytes(bytes); bad.error != 0) return bad;

  // First find every object's extent, then parse them all: nothing runs
  // unless the whole write is well formed.
  std::vector<std::pair<size_t, size_t>> spans;
  size_t i = 0;
  for (;;) {
    while (i < bytes.size() && IsJsonSpace(static_cast<unsigned char>(bytes[i]))) ++i;
    if (i == bytes.size()) break;
    if (bytes[i] != '{') {
      // A JSON value that is not an object gets QEMU's wording; anything
      // else is simply not JSON.
      const char c = bytes[i];
      const bool json_value = c == '[' || c == '"' || c == '-' || (c >= '0' && c <= '9') ||
                              c == 't' || c == 'f' || c == 'n';
      return Refuse(EINVAL, json_value ? "QMP input must be a JSON object"
                                       : "JSON parse error, unexpected character at offset " +
                                             std::to_string(i));
    }
    size_t end = 0;
    if (ParsedWrite bad = FindObjectEnd(bytes, i, &end); bad.error != 0) return bad;
    spans.emplace_back(i, end);
    i = end;
  }

  ParsedWrite out;
  out.commands.reserve(spans.size());
  for (const auto& [start, end] : spans) {
    ordered_json command;
    ParsedWrite bad = ParseObject(bytes.substr(start, end - start), start, &command);
    if (bad.error != 0) return bad;
    out.commands.push_back(std::move(command));
  }
  return out;
}

std::string ToQmpText(const ordered_json& value) {
  std::string out;
  AppendQmpText(value, &out);
  return out;
}

}  // namespace cbw::control
