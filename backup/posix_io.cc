#include "backup/posix_io.h"

#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

namespace cbw::backup {

Result<size_t> PreadFull(int fd, void* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n =
        pread(fd, static_cast<char*>(buf) + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "read");
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

Status PwriteFull(int fd, const void* buf, size_t len, uint64_t off, std::string_view what) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(fd, static_cast<const char*>(buf) + done, len - done,
                       static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, what);
    }
    if (n == 0) return Status::Error(EIO, std::string(what) + ": no progress");
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

const char* ZeroBuffer() {
  static const char* const kZeros = new char[kZeroBufferBytes]();
  return kZeros;
}

Status PwriteZeroes(int fd, uint64_t off, uint64_t len, std::string_view what) {
  while (len > 0) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(len, kZeroBufferBytes));
    if (Status s = PwriteFull(fd, ZeroBuffer(), n, off, what); !s.ok()) return s;
    off += n;
    len -= n;
  }
  return Status::Ok();
}

bool IsZero(const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    uint64_t w[8];
    std::memcpy(w, p + i, sizeof(w));
    if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0) return false;
  }
  for (; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

uint64_t MonoNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

double MonoSeconds() { return static_cast<double>(MonoNs()) / 1e9; }

double RealSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

}  // namespace cbw::backup
