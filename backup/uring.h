#pragma once

#include <liburing.h>

// Setting up and tearing down an io_uring ring, for every ring in cbwfs.
//
// liburing maps and unmaps a ring's memory with raw system calls, which
// ThreadSanitizer does not see: a new ring mapped where an earlier one was
// (another job's copier, another target's queue) looks to it like memory
// written by two threads at once. Under TSan these tell it that a ring's
// teardown happens before any later ring's setup; elsewhere they are plain
// calls.

#if defined(__SANITIZE_THREAD__)
#define CBW_URING_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CBW_URING_TSAN 1
#endif
#endif

#ifdef CBW_URING_TSAN
#include <sanitizer/tsan_interface.h>
#endif

namespace cbw::backup {

#ifdef CBW_URING_TSAN
inline char uring_lifetimes_tag;  // the one address TSan orders ring lifetimes by
#endif

// io_uring_queue_init: 0 or -errno.
inline int InitRing(unsigned entries, io_uring* ring) {
  int r = io_uring_queue_init(entries, ring, 0);
#ifdef CBW_URING_TSAN
  __tsan_acquire(&uring_lifetimes_tag);
#endif
  return r;
}

// io_uring_queue_exit of a ring InitRing set up.
inline void ExitRing(io_uring* ring) {
#ifdef CBW_URING_TSAN
  __tsan_release(&uring_lifetimes_tag);
#endif
  io_uring_queue_exit(ring);
}

}  // namespace cbw::backup
