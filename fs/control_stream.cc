#include "fs/control_stream.h"

#include <algorithm>
#include <cerrno>

namespace cbw::fs {
namespace {

std::string Slice(std::string_view data, uint64_t offset, size_t size) {
  if (offset >= data.size()) return {};
  return std::string(data.substr(static_cast<size_t>(offset), size));
}

}  // namespace

void LastReply::Set(std::string_view reply) {
  backup::MutexLock lock(&mu_);
  reply_.assign(reply);
}

std::string LastReply::Read(uint64_t offset, size_t size) const {
  backup::MutexLock lock(&mu_);
  return Slice(reply_, offset, size);
}

void ControlStream::Record(std::string_view responses, uint64_t written) {
  if (!responses.empty()) has_responses_ = true;
  written_ += written;
  end_ += responses.size();
  while (!responses.empty()) {
    if (chunks_.empty() || chunks_.back().size() == kChunk) {
      std::string chunk = std::move(spare_);
      spare_ = std::string();
      chunk.clear();
      chunk.reserve(kChunk);
      chunks_.push_back(std::move(chunk));
    }
    std::string& last = chunks_.back();
    size_t n = std::min(kChunk - last.size(), responses.size());
    last.append(responses.substr(0, n));
    responses.remove_prefix(n);
  }
}

backup::Result<std::string> ControlStream::Read(uint64_t offset, size_t size,
                                                const LastReply& last) {
  if (!has_responses_) return last.Read(offset, size);
  uint64_t pos = offset > written_ ? offset - written_ : 0;
  if (pos < floor_) {
    return backup::Status::Error(EINVAL,
                                 "control: the replies before this point are no longer kept");
  }
  std::string out;
  if (pos < end_) {
    out.reserve(static_cast<size_t>(std::min<uint64_t>(size, end_ - pos)));
    uint64_t rel = pos - start_;
    size_t idx = static_cast<size_t>(rel / kChunk);
    size_t in = static_cast<size_t>(rel % kChunk);
    while (out.size() < size && idx < chunks_.size()) {
      std::string_view c(chunks_[idx]);
      std::string_view part = c.substr(in, size - out.size());
      out.append(part);
      ++idx;
      in = 0;
    }
  }
  uint64_t reached = pos + out.size();
  if (reached > read_end_) {
    read_end_ = reached;
    floor_ = std::max(floor_, read_end_ > kKeepRead ? read_end_ - kKeepRead : 0);
    Trim();
  }
  return out;
}

void ControlStream::Trim() {
  // Only full chunks can lie wholly below floor_, which is 1 MiB behind the
  // end at least: the last (partial) chunk is never dropped.
  while (!chunks_.empty() && start_ + kChunk <= floor_) {
    spare_ = std::move(chunks_.front());
    chunks_.pop_front();
    start_ += kChunk;
  }
}

}  // namespace cbw::fs
