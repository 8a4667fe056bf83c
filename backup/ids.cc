#include "backup/ids.h"

namespace cbw::backup {
namespace {

// Not std::isalpha/isalnum: those follow the C locale, in which a byte of a
// UTF-8 letter may count as a letter.
constexpr bool IsAsciiLetter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
constexpr bool IsAsciiDigit(char c) { return c >= '0' && c <= '9'; }

}  // namespace

bool IsValidId(std::string_view id) {
  if (id.empty() || id.size() > 64 || !IsAsciiLetter(id.front())) return false;
  for (char c : id) {
    if (!IsAsciiLetter(c) && !IsAsciiDigit(c) && c != '-' && c != '.' && c != '_') return false;
  }
  return true;
}

}  // namespace cbw::backup
