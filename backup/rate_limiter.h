#pragma once

#include <cstdint>

namespace cbw::backup {

// A token bucket for the background copier: at most `speed` bytes/s on
// average, bursts of at most max(100 ms worth, one chunk).
//
// Not thread-safe: the owning job guards it with its own mutex. Times are
// CLOCK_MONOTONIC nanoseconds supplied by the caller (so tests can drive it).
class RateLimiter {
 public:
  static constexpr uint64_t kSliceNs = 100'000'000;  // burst window: 100 ms

  // speed 0 = unlimited. Dispatches are at most `max_chunk` bytes and
  // multiples of `granularity` (the cluster size).
  RateLimiter(uint64_t speed, uint64_t max_chunk, uint64_t granularity, uint64_t now_ns);

  // Changes the rate; the bucket is clipped to the new burst size, so a lower
  // speed takes effect at once.
  void SetSpeed(uint64_t speed, uint64_t now_ns);
  uint64_t speed() const { return speed_; }
  // The dispatch size for the current speed: about 100 ms worth (so bursts
  // stay near that), at least one granule, at most max_chunk.
  uint64_t ChunkBytes() const;

  // Nanoseconds to wait before `bytes` may be dispatched (0: go now).
  uint64_t DelayNs(uint64_t bytes, uint64_t now_ns);
  // Takes `bytes` from the bucket (call when dispatching after DelayNs == 0).
  void Consume(uint64_t bytes, uint64_t now_ns);

 private:
  void Refill(uint64_t now_ns);
  double Capacity() const;

  uint64_t speed_;
  uint64_t max_chunk_;
  uint64_t granularity_;
  double tokens_;
  uint64_t last_ns_;
};

}  // namespace cbw::backup
