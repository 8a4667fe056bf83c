#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace cbw::qmp {

// Splits a QMP byte stream into top-level JSON values, as QEMU's JSON
// streamer does: stock clients send objects back to back with or without a
// newline (qemu.qmp sends none), so a value ends where its brackets balance,
// not at a line end. Only strings, escapes and bracket depth are tracked;
// full syntax is the parser's job (control::ParseWrite), which also words
// the errors for non-objects and stray characters, each framed as a value of
// its own (a scalar ends at whitespace or a structural character).
//
// A value longer than `max_bytes` keeps only its first max_bytes + 1 bytes
// (enough for the parser to report it as too long) while the rest is counted
// and dropped, so a client cannot make it buffer more.
//
// Not thread-safe (one per connection).
class JsonFramer {
 public:
  explicit JsonFramer(size_t max_bytes) : max_bytes_(max_bytes) {}

  // Appends to `values` every value that `data` completes, in order.
  void Feed(std::string_view data, std::vector<std::string>* values);

 private:
  enum class State { kBetween, kContainer, kString, kScalar };
  void Append(char c);
  void Emit(std::vector<std::string>* values);

  const size_t max_bytes_;
  State state_ = State::kBetween;
  std::string current_;
  size_t depth_ = 0;        // kContainer: open brackets
  bool in_string_ = false;  // kContainer: inside a string
  bool escape_ = false;     // inside a string, after a backslash
};

}  // namespace cbw::qmp
