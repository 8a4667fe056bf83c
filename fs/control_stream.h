#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <string_view>

#include "backup/mutex.h"
#include "backup/status.h"

namespace cbw::fs {

// The last response given on any open of `control`: what an open that has
// had no response of its own reads (SPEC 2.2), so that
// `echo '{...}' > control || cat control` shows why a command failed.
//
// Thread safety: thread-safe (its own mutex, a leaf lock).
class LastReply {
 public:
  void Set(std::string_view reply);
  // At most `size` bytes of the reply from `offset`; "" past its end.
  std::string Read(uint64_t offset, size_t size) const;

 private:
  mutable backup::Mutex mu_;
  std::string reply_ CBW_GUARDED_BY(mu_);
};

// The byte stream that one open of `control` reads back (SPEC 2.2 "Out"):
// the responses to the commands written on that open, in order. Reads and
// writes move one file offset, so a read at file offset p returns the stream
// from position p - w, where w is the number of bytes written on this open so
// far (an offset below w reads from position 0), and end-of-file past its end.
//
// Memory is bounded by what the reader has not read yet: the stream keeps its
// unread bytes and the last kKeepRead bytes of those already read (the
// furthest any read reached), so tools that read ahead and seek back work
// (`head -1 <&3`), and a read further back fails with EINVAL. A read copies
// only the slice it returns. An open with no responses of its own reads the
// LastReply instead.
//
// No FUSE here (unit-tested without a mount). Thread safety: none; the open's
// handle serializes calls.
class ControlStream {
 public:
  static constexpr uint64_t kKeepRead = uint64_t{1} << 20;

  // After one write(): its `responses` join the stream; `written` is the
  // write's byte count when it succeeded (the file offset moved), 0 when it
  // failed (the offset did not move).
  void Record(std::string_view responses, uint64_t written);
  // The read at file offset `offset` of at most `size` bytes: a copy of that
  // slice ("" at or past the end), or EINVAL for a position no longer kept.
  // Before any response was recorded, it reads `last` instead.
  backup::Result<std::string> Read(uint64_t offset, size_t size, const LastReply& last);

  // Bytes of buffer held now (for tests of the bound).
  size_t kept_bytes() const { return chunks_.size() * kChunk; }
  // The oldest stream position a read may still start at.
  uint64_t oldest_readable() const { return floor_; }

 private:
  // The stream is kept in fixed-size chunks: the oldest are dropped as the
  // window moves, with no copying, and the dropped one is reused for the next
  // bytes. (One growing and shifting string fragmented the heap: the daemon
  // grew by megabytes over a million commands though it kept 2 MiB.)
  static constexpr size_t kChunk = 64 * 1024;

  // Drops the chunks that lie wholly below floor_.
  void Trim();

  std::deque<std::string> chunks_;  // each full (kChunk bytes) but the last
  std::string spare_;               // a dropped chunk, kept for its capacity
  uint64_t start_ = 0;              // stream position of chunks_.front()[0]
  uint64_t end_ = 0;                // stream position past the last byte
  uint64_t floor_ = 0;              // reads may start at or after this position
  uint64_t read_end_ = 0;           // the furthest position any read has reached
  uint64_t written_ = 0;            // w: bytes of successful writes on this open
  bool has_responses_ = false;
};

}  // namespace cbw::fs
