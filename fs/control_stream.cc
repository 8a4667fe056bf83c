#include "fs/control_stream.h"

#include <algorithm>
#include <cerrno>

namespace cbw::fs {
namespace {

constexpr uint64_t kTrimAtLeast = 64 * 1024;

std::string Slice(std::string_view data, uint64_t offset, size_t size) {
  if (offset >= data.size()) return {};
  return std::string(data.substr(static_cast<size_t>(offset), size));
}

}  // namespace

void LastReply::Set(std::string_view reply) {
  std::lock_guard lock(mu_);
  reply_.assign(reply);
}

std::string LastReply::Read(uint64_t offset, size_t size) const {
  std::lock_guard lock(mu_);
  return Slice(reply_, offset, size);
}

void ControlStream::Record(std::string_view responses, uint64_t written) {
  buf_.append(responses);
  if (!responses.empty()) has_responses_ = true;
  written_ += written;
}

backup::Result<std::string> ControlStream::Read(uint64_t offset, size_t size,
                                                const LastReply& last) {
  if (!has_responses_) return last.Read(offset, size);
  uint64_t pos = offset > written_ ? offset - written_ : 0;
  if (pos < floor_) {
    return backup::Status::Error(EINVAL,
                                 "control: the replies before this point are no longer kept");
  }
  std::string out = Slice(buf_, pos - start_, size);
  uint64_t reached = pos + out.size();
  if (reached > read_end_) {
    read_end_ = reached;
    floor_ = std::max(floor_, read_end_ > kKeepRead ? read_end_ - kKeepRead : 0);
    Trim();
  }
  return out;
}

void ControlStream::Trim() {
  uint64_t drop = floor_ - start_;
  if (drop < kTrimAtLeast || drop < buf_.size() - drop) return;
  // A fresh string (not erase) so its capacity follows what is kept.
  buf_ = buf_.substr(static_cast<size_t>(drop));
  start_ = floor_;
}

}  // namespace cbw::fs
