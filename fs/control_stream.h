#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>

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
  mutable std::mutex mu_;
  std::string reply_;  // guarded by mu_
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

  // Bytes held in memory now (for tests of the bound).
  size_t kept_bytes() const { return buf_.size(); }
  // The oldest stream position a read may still start at.
  uint64_t oldest_readable() const { return floor_; }

 private:
  // Drops what lies below floor_ once that is worth a copy: at least 64 KiB
  // and at least as much as would be kept, so each byte is moved O(1) times.
  void Trim();

  std::string buf_;        // stream positions [start_, start_ + buf_.size())
  uint64_t start_ = 0;     // stream position of buf_[0]
  uint64_t floor_ = 0;     // reads may start at or after this position
  uint64_t read_end_ = 0;  // the furthest position any read has reached
  uint64_t written_ = 0;   // w: bytes of successful writes on this open
  bool has_responses_ = false;
};

}  // namespace cbw::fs
