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

// What nlohmann says went wrong, without its prefix and without the bytes it
// echoes ("; last read: '...'"), which may be the invalid UTF-8 or NUL that
// stopped it: "unexpected '}'; expected string literal", "invalid string:
// ill-formed UTF-8 byte", "invalid literal".
std::string SyntaxReason(const char* what) {
  std::string_view text(what);
  size_t dash = text.find(" - ");
  if (dash == std::string_view::npos) return "invalid JSON";
  text.remove_prefix(dash + 3);
  text = text.substr(0, text.find("; last read: "));
  return std::string(text);
}

// Parses one object's text; `offset` is where it starts in the write, so
// that messages name bytes of the write. nlohmann refuses what RFC 8259
// refuses, invalid UTF-8 and unescaped control characters (NUL included)
// among it, and says at which byte. Duplicate keys and "\u0000" in strings
// are refused here: QEMU refuses the former, and the latter would silently
// cut paths and names at the C boundary; nlohmann does not say where those
// are, so their messages name the object.
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
        if (key.find('\0') != std::string::npos && problem == nullptr) {
          problem = "\\u0000 in a string";
        }
        if (!keys.empty() && !keys.back().insert(key).second && problem == nullptr) {
          problem = "duplicate key";
        }
        break;
      }
      case ordered_json::parse_event_t::value:
        if (parsed.is_string() &&
            parsed.get_ref<const std::string&>().find('\0') != std::string::npos &&
            problem == nullptr) {
          problem = "\\u0000 in a string";
        }
        break;
      default:
        break;
    }
    return true;
  };
  const std::string in_object = " in the object at offset " + std::to_string(offset);
  try {
    *out = ordered_json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true,
                               /*ignore_comments=*/false);
  } catch (const ordered_json::parse_error& e) {
    // `byte` counts from 1: it is the byte the parser stopped at.
    const size_t at = offset + (e.byte > 0 ? e.byte - 1 : 0);
    return Refuse(
        EINVAL, "JSON parse error, " + SyntaxReason(e.what()) + " at offset " + std::to_string(at));
  } catch (const ordered_json::out_of_range&) {
    // A number beyond double's range (out_of_range.406); nlohmann gives no
    // position for it.
    return Refuse(EINVAL, "JSON parse error, number out of range" + in_object);
  } catch (const ordered_json::exception&) {
    return Refuse(EINVAL, "JSON parse error, invalid JSON" + in_object);
  }
  if (problem != nullptr)
    return Refuse(EINVAL, std::string("JSON parse error, ") + problem + in_object);
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
