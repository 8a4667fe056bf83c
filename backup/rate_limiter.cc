#include "backup/rate_limiter.h"

#include <algorithm>
#include <cmath>

namespace cbw::backup {

RateLimiter::RateLimiter(uint64_t speed, uint64_t max_chunk, uint64_t granularity, uint64_t now_ns)
    : speed_(speed),
      max_chunk_(std::max<uint64_t>(max_chunk, 1)),
      granularity_(std::max<uint64_t>(granularity, 1)),
      tokens_(0),
      last_ns_(now_ns) {
  // The first chunk goes at once, as in QEMU (iotest 185 sees exactly one
  // chunk done half a second into a job limited to one chunk per second).
  tokens_ = static_cast<double>(ChunkBytes());
}

uint64_t RateLimiter::ChunkBytes() const {
  if (speed_ == 0) return max_chunk_;
  uint64_t slice = speed_ / (1'000'000'000ull / kSliceNs) / granularity_ * granularity_;
  return std::clamp<uint64_t>(slice, granularity_, std::max(granularity_, max_chunk_));
}

double RateLimiter::Capacity() const {
  double slice = static_cast<double>(speed_) * (static_cast<double>(kSliceNs) / 1e9);
  return std::max(slice, static_cast<double>(ChunkBytes()));
}

void RateLimiter::Refill(uint64_t now_ns) {
  if (now_ns > last_ns_) {
    tokens_ += static_cast<double>(speed_) * static_cast<double>(now_ns - last_ns_) / 1e9;
    tokens_ = std::min(tokens_, Capacity());
  }
  last_ns_ = std::max(last_ns_, now_ns);
}

void RateLimiter::SetSpeed(uint64_t speed, uint64_t now_ns) {
  Refill(now_ns);
  speed_ = speed;
  if (speed_ != 0) tokens_ = std::min(tokens_, Capacity());
}

uint64_t RateLimiter::DelayNs(uint64_t bytes, uint64_t now_ns) {
  if (speed_ == 0) return 0;
  Refill(now_ns);
  double need = std::min(static_cast<double>(bytes), Capacity());
  if (tokens_ >= need) return 0;
  double ns = (need - tokens_) * 1e9 / static_cast<double>(speed_);
  return std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(ns)));
}

void RateLimiter::Consume(uint64_t bytes, uint64_t now_ns) {
  if (speed_ == 0) return;
  Refill(now_ns);
  tokens_ -= static_cast<double>(bytes);
}

}  // namespace cbw::backup
