#pragma once

// The point-in-time oracle of the end-to-end tests: writer threads that log
// every drive operation with its start and end time, and the check that a
// target equals the drive as it was at the point in time (some prefix of
// each writer's operations, allowing one torn operation in flight at T).

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tests/lib/test_support.h"

namespace cbw::test {

using Clock = std::chrono::steady_clock;

// One writer thread that owns [base, base+span) of the drive and logs every
// operation with its start and end time, so the target can be checked
// against the exact set of writes that completed before the point in time.
struct Op {
  uint64_t off;
  std::string data;  // empty data + len: a punch/zero of `len` bytes
  uint64_t len;
  Clock::time_point start, end;
};

class Writer {
 public:
  Writer(std::string path, uint64_t base, uint64_t span, uint64_t seed)
      : path_(std::move(path)), base_(base), span_(span), rng_(seed) {}
  ~Writer() { Stop(); }  // a failed assertion must not leave the thread running
  void Start() {
    thread_ = std::thread([this] { Run(); });
  }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  // The operations logged so far. Only once Stop() has returned; while the
  // thread runs, use WithOps (it appends under a lock) or op_count.
  const std::vector<Op>& ops() const { return ops_; }
  // Runs f(ops) with the log locked: the writer waits meanwhile.
  template <class F>
  auto WithOps(F&& f) const {
    std::lock_guard<std::mutex> lock(mu_);
    return f(ops_);
  }
  size_t op_count() const {
    std::lock_guard<std::mutex> lock(mu_);
    return ops_.size();
  }
  uint64_t base() const { return base_; }
  uint64_t span() const { return span_; }
  int errors() const { return errors_; }

 private:
  void Run() {
    int fd = open(path_.c_str(), O_RDWR);
    if (fd < 0) {
      ++errors_;
      return;
    }
    while (!stop_) {
      uint64_t len = 512 + rng_() % (256 * 1024);
      len = std::min(len, span_);
      uint64_t off = base_ + rng_() % (span_ - len + 1);
      Op op{off, {}, len, Clock::now(), {}};
      int kind = static_cast<int>(rng_() % 10);
      int r;
      if (kind == 0) {
        r = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                      static_cast<off_t>(len));
      } else if (kind == 1) {
        r = fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                      static_cast<off_t>(len));
      } else {
        op.data = RandomBytes(len, rng_());
        r = pwrite(fd, op.data.data(), len, static_cast<off_t>(off)) == static_cast<ssize_t>(len)
                ? 0
                : -1;
      }
      op.end = Clock::now();
      if (r != 0) {
        ++errors_;
        continue;
      }
      std::lock_guard<std::mutex> lock(mu_);
      ops_.push_back(std::move(op));
    }
    close(fd);
  }

  std::string path_;
  uint64_t base_, span_;
  std::mt19937_64 rng_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  mutable std::mutex mu_;
  std::vector<Op> ops_;  // appended under mu_
  std::atomic<int> errors_{0};
};

inline void Apply(std::string* image, const Op& op) {
  if (op.data.empty()) {
    std::memset(image->data() + op.off, 0, op.len);
  } else {
    image->replace(op.off, op.len, op.data);
  }
}

// The writer's slice of `target` must equal the initial slice with the
// writer's first k operations applied, for some k between the operations that
// ended before the command was issued and those that started before it returned.
inline ::testing::AssertionResult SliceMatchesPointInTime(const std::string& initial,
                                                          const std::string& target,
                                                          const Writer& w, Clock::time_point issued,
                                                          Clock::time_point returned) {
  // The writer may still be running: its log is read under its lock.
  return w.WithOps([&](const std::vector<Op>& ops) -> ::testing::AssertionResult {
    // Everything works on the writer's slice only (copies of whole images per
    // candidate made this quadratic in the operations in flight at T).
    const uint64_t base = w.base();
    std::string cur = initial.substr(base, w.span());
    const std::string want = target.substr(base, w.span());
    auto apply = [&](const Op& op) {
      if (op.data.empty()) {
        std::memset(cur.data() + (op.off - base), 0, op.len);
      } else {
        cur.replace(op.off - base, op.len, op.data);
      }
    };
    size_t k = 0;
    while (k < ops.size() && ops[k].end < issued) apply(ops[k++]);
    for (;;) {
      if (cur == want) return ::testing::AssertionSuccess();
      if (k >= ops.size() || ops[k].start > returned) break;
      // An operation in flight at T may be torn: the kernel splits one write()
      // into several FUSE requests (e.g. at a partial first page), and T may
      // fall between them, as when a block device is snapshotted mid-write.
      // Requests go out in ascending order, so the target then holds a prefix
      // of the new data and the old data after it.
      const Op& op = ops[k];
      const size_t lo = op.off - base, hi = lo + op.len;
      if (cur.compare(0, lo, want, 0, lo) == 0 &&
          cur.compare(hi, std::string::npos, want, hi) == 0) {
        size_t p = lo;
        while (p < hi && want[p] == (op.data.empty() ? '\0' : op.data[p - lo])) ++p;
        if (cur.compare(p, hi - p, want, p, hi - p) == 0) return ::testing::AssertionSuccess();
      }
      apply(op);
      ++k;
    }
    // Diagnose against the last candidate: where it differs, and which
    // operations touched those bytes when.
    auto fail = ::testing::AssertionFailure();
    fail << "slice at " << w.base() << " matches no point-in-time state (" << ops.size() << " ops, "
         << k << " applied)";
    const std::string& got = cur;
    size_t first = 0;
    while (first < got.size() && got[first] == want[first]) ++first;
    size_t last = got.size();
    while (last > first && got[last - 1] == want[last - 1]) --last;
    uint64_t a = w.base() + first, b = w.base() + last;
    fail << "; differs in [" << a << ", " << b << ") (clusters " << a / 65536 << ".."
         << (b - 1) / 65536 << ")";
    auto ms = [&](Clock::time_point t) {
      return std::chrono::duration_cast<std::chrono::microseconds>(t - issued).count() / 1000.0;
    };
    fail << "; command returned at +" << ms(returned) << " ms";
    for (size_t i = 0; i < ops.size(); ++i) {
      const Op& op = ops[i];
      if (op.off < b && op.off + op.len > a) {
        fail << "\n  op " << i << (op.data.empty() ? " zero" : " write") << " [" << op.off << ", "
             << op.off + op.len << ") start " << ms(op.start) << " end " << ms(op.end)
             << (i < k ? " (applied)" : "");
      }
    }
    // Does the target hold the initial data there (op lost), or later data?
    fail << "\n  target==initial there: "
         << (want.substr(first, last - first) == initial.substr(a, b - a));
    return fail;
  });
}

}  // namespace cbw::test
