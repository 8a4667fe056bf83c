#include "qmp/framer.h"

namespace cbw::qmp {
namespace {

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
bool IsStructural(char c) {
  return c == '{' || c == '}' || c == '[' || c == ']' || c == ',' || c == ':' || c == '"';
}

}  // namespace

void JsonFramer::Append(char c) {
  if (current_.size() <= max_bytes_) current_.push_back(c);
}

void JsonFramer::Emit(std::vector<std::string>* values) {
  values->push_back(std::move(current_));
  current_.clear();
  state_ = State::kBetween;
}

void JsonFramer::Feed(std::string_view data, std::vector<std::string>* values) {
  for (size_t i = 0; i < data.size();) {
    const char c = data[i];
    switch (state_) {
      case State::kBetween:
        ++i;
        if (IsSpace(c)) break;
        Append(c);
        if (c == '{' || c == '[') {
          state_ = State::kContainer;
          depth_ = 1;
          in_string_ = false;
          escape_ = false;
        } else if (c == '"') {
          state_ = State::kString;
          escape_ = false;
        } else if (IsStructural(c)) {
          Emit(values);  // a stray '}', ']', ',' or ':' alone
        } else {
          state_ = State::kScalar;
        }
        break;
      case State::kContainer:
        ++i;
        Append(c);
        if (in_string_) {
          if (escape_) {
            escape_ = false;
          } else if (c == '\\') {
            escape_ = true;
          } else if (c == '"') {
            in_string_ = false;
          }
        } else if (c == '"') {
          in_string_ = true;
        } else if (c == '{' || c == '[') {
          ++depth_;
        } else if ((c == '}' || c == ']') && --depth_ == 0) {
          Emit(values);
        }
        break;
      case State::kString:
        ++i;
        Append(c);
        if (escape_) {
          escape_ = false;
        } else if (c == '\\') {
          escape_ = true;
        } else if (c == '"') {
          Emit(values);
        }
        break;
      case State::kScalar:
        // Ends before whitespace or structure, which is then read afresh.
        if (IsSpace(c) || IsStructural(c)) {
          Emit(values);
        } else {
          Append(c);
          ++i;
        }
        break;
    }
  }
}

}  // namespace cbw::qmp
