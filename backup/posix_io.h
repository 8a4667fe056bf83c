#pragma once

// The POSIX I/O helpers every part of the engine shares: whole reads and
// writes that retry EINTR and short transfers, zero detection, and clocks.
// Thread-safe (they keep no state).

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "backup/status.h"

namespace cbw::backup {

// Reads up to len bytes at off, retrying EINTR and short reads; fewer only at
// end of file. Fails with the errno of pread.
Result<size_t> PreadFull(int fd, void* buf, size_t len, uint64_t off);
// Writes all len bytes at off (EINTR and short writes retried). `what` names
// the file in the error message ("write to target: No space left on device").
Status PwriteFull(int fd, const void* buf, size_t len, uint64_t off, std::string_view what);
// Writes `len` zero bytes at off with pwrite (for files and devices that
// cannot punch or zero a range).
Status PwriteZeroes(int fd, uint64_t off, uint64_t len, std::string_view what);
// True when all n bytes are zero.
bool IsZero(const void* p, size_t n);
// A static, never-written buffer of zeros of at least kZeroBufferBytes.
inline constexpr size_t kZeroBufferBytes = 1 << 20;
const char* ZeroBuffer();

// CLOCK_MONOTONIC in nanoseconds / seconds, CLOCK_REALTIME in seconds.
uint64_t MonoNs();
double MonoSeconds();
double RealSeconds();

}  // namespace cbw::backup
