// faultfs: a passthrough FUSE filesystem over a backing directory that
// injects I/O faults on request, for testing the backup engine's error
// paths through its real code (io_uring and plain syscalls alike).
//
//   faultfs BACKING_DIR MOUNTPOINT
//
// Runs in the foreground (multithreaded) until unmounted. Every file is
// opened with direct_io, so each read/write reaches this process. Faults are
// set by writing rules to MOUNTPOINT/.faults (each write replaces all rules;
// reading it shows them), one per line:
//
//   NAME OP KIND [LO HI [COUNT]]
//
//   NAME   file name in the backing directory (no subdirectories)
//   OP     read | write | fsync | fallocate | any
//   KIND   eio | enospc | edquot | erofs | short (half the bytes, at least 1) | slow=MS |
//          hang (blocks until the rules are next written, the fs is
//          unmounted, or the request is interrupted (EINTR): a server that
//          stopped answering but, like an NFS `intr` mount, still honours
//          interrupts, so the kernel can end a process stuck on it)
//   LO HI  byte range the request must overlap (default: everything)
//   COUNT  how many times the rule fires (default: always)
//
// MOUNTPOINT/.status (read-only) tells tests what happened, so they wait on
// it rather than sleep and assume: `waiting N` (requests held right now by a
// slow or hang rule), then `fired I N` for each rule I (0-based) that fired.
//
// Test tool only: no attention to permissions or to anything but regular
// files in one flat directory.

#define FUSE_USE_VERSION 314

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse3/fuse.h>
#include <fuse3/fuse_lowlevel.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr const char* kControl = "/.faults";
constexpr const char* kStatus = "/.status";

struct Rule {
  std::string name;
  std::string op;
  std::string kind;
  int delay_ms = 0;
  uint64_t lo = 0, hi = UINT64_MAX;
  long count = -1;
  uint64_t fired = 0;
};

std::string g_backing;
std::mutex g_mu;
std::vector<Rule> g_rules;
std::string g_rules_text;
uint64_t g_generation = 0;  // bumped by every write of the rules
uint64_t g_waiting = 0;     // requests held by slow/hang rules right now

std::string StatusText() {
  std::lock_guard<std::mutex> lock(g_mu);
  std::string out = "waiting " + std::to_string(g_waiting) + "\n";
  for (size_t i = 0; i < g_rules.size(); ++i) {
    if (g_rules[i].fired) {
      out += "fired " + std::to_string(i) + " " + std::to_string(g_rules[i].fired) + "\n";
    }
  }
  return out;
}

// Counts a request as held by a slow or hang rule for its scope.
struct Waiting {
  Waiting() {
    std::lock_guard<std::mutex> lock(g_mu);
    ++g_waiting;
  }
  ~Waiting() {
    std::lock_guard<std::mutex> lock(g_mu);
    --g_waiting;
  }
};

std::string Backing(const char* path) { return g_backing + path; }

void SetRules(const std::string& text) {
  std::vector<Rule> rules;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    Rule r;
    if (!(ls >> r.name >> r.op >> r.kind)) continue;
    if (r.kind.rfind("slow=", 0) == 0) {
      r.delay_ms = std::stoi(r.kind.substr(5));
      r.kind = "slow";
    }
    uint64_t lo, hi;
    if (ls >> lo >> hi) {
      r.lo = lo;
      r.hi = hi;
      long c;
      if (ls >> c) r.count = c;
    }
    rules.push_back(r);
  }
  std::lock_guard<std::mutex> lock(g_mu);
  g_rules = std::move(rules);
  g_rules_text = text;
  ++g_generation;
}

// Blocks while the rules that said "hang" are in force.
int Hang(uint64_t generation) {
  fuse_session* se = fuse_get_session(fuse_get_context()->fuse);
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(g_mu);
      if (g_generation != generation) return 0;
    }
    if (fuse_interrupted()) return -EINTR;
    if (fuse_session_exited(se)) return -EIO;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

// Returns 0 (no fault), a negative errno, or for "short" a positive 1.
int Fault(const char* path, const char* op, uint64_t off, uint64_t len) {
  int delay = 0;
  int result = 0;
  bool hang = false;
  uint64_t generation = 0;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    std::string name = path[0] == '/' ? path + 1 : path;
    for (auto& r : g_rules) {
      if (r.name != name || (r.op != "any" && r.op != op) || r.count == 0) continue;
      if (!(off < r.hi && r.lo < off + std::max<uint64_t>(len, 1))) continue;
      if (r.count > 0) --r.count;
      ++r.fired;
      if (r.kind == "slow") {
        delay = std::max(delay, r.delay_ms);
      } else if (r.kind == "hang") {
        hang = true;
        generation = g_generation;
        break;
      } else if (r.kind == "eio") {
        result = -EIO;
      } else if (r.kind == "enospc") {
        result = -ENOSPC;
      } else if (r.kind == "edquot") {
        result = -EDQUOT;
      } else if (r.kind == "erofs") {
        result = -EROFS;
      } else if (r.kind == "short") {
        result = 1;
      }
      if (result != 0) break;
    }
  }
  if (hang) {
    Waiting w;
    return Hang(generation);
  }
  if (delay > 0) {
    Waiting w;
    std::this_thread::sleep_for(std::chrono::milliseconds(delay));
  }
  return result;
}

void* Init(fuse_conn_info*, fuse_config* cfg) {
  cfg->use_ino = 1;
  cfg->entry_timeout = 0;
  cfg->attr_timeout = 0;
  cfg->negative_timeout = 0;
  cfg->direct_io = 1;
  return nullptr;
}

int GetAttr(const char* path, struct stat* st, fuse_file_info* fi) {
  if (std::strcmp(path, kStatus) == 0) {
    std::memset(st, 0, sizeof(*st));
    st->st_mode = S_IFREG | 0444;
    st->st_nlink = 1;
    st->st_size = 4096;  // read with direct_io: the real length comes from read
    return 0;
  }
  if (std::strcmp(path, kControl) == 0) {
    std::memset(st, 0, sizeof(*st));
    st->st_mode = S_IFREG | 0600;
    st->st_nlink = 1;
    std::lock_guard<std::mutex> lock(g_mu);
    st->st_size = static_cast<off_t>(g_rules_text.size());
    return 0;
  }
  int r = fi != nullptr ? fstat(static_cast<int>(fi->fh), st) : lstat(Backing(path).c_str(), st);
  return r == 0 ? 0 : -errno;
}

int ReadDir(const char* path, void* buf, fuse_fill_dir_t fill, off_t, fuse_file_info*,
            fuse_readdir_flags) {
  DIR* d = opendir(Backing(path).c_str());
  if (d == nullptr) return -errno;
  while (dirent* e = readdir(d))
    fill(buf, e->d_name, nullptr, 0, static_cast<fuse_fill_dir_flags>(0));
  closedir(d);
  return 0;
}

int Open(const char* path, fuse_file_info* fi) {
  fi->direct_io = 1;
  if (std::strcmp(path, kControl) == 0) {
    fi->fh = UINT64_MAX;
    return 0;
  }
  if (std::strcmp(path, kStatus) == 0) {
    fi->fh = UINT64_MAX - 1;
    return 0;
  }
  int fd = open(Backing(path).c_str(), fi->flags & ~O_DIRECT);
  if (fd < 0) return -errno;
  fi->fh = static_cast<uint64_t>(fd);
  return 0;
}

int Create(const char* path, mode_t mode, fuse_file_info* fi) {
  fi->direct_io = 1;
  int fd = open(Backing(path).c_str(), fi->flags & ~O_DIRECT, mode);
  if (fd < 0) return -errno;
  fi->fh = static_cast<uint64_t>(fd);
  return 0;
}

int Read(const char* path, char* buf, size_t size, off_t off, fuse_file_info* fi) {
  if (fi->fh == UINT64_MAX - 1) {
    std::string text = StatusText();
    if (static_cast<size_t>(off) >= text.size()) return 0;
    size_t n = std::min(size, text.size() - static_cast<size_t>(off));
    std::memcpy(buf, text.data() + off, n);
    return static_cast<int>(n);
  }
  if (fi->fh == UINT64_MAX) {
    std::lock_guard<std::mutex> lock(g_mu);
    if (static_cast<size_t>(off) >= g_rules_text.size()) return 0;
    size_t n = std::min(size, g_rules_text.size() - static_cast<size_t>(off));
    std::memcpy(buf, g_rules_text.data() + off, n);
    return static_cast<int>(n);
  }
  int f = Fault(path, "read", static_cast<uint64_t>(off), size);
  if (f < 0) return f;
  if (f == 1) size = std::max<size_t>(1, size / 2);
  ssize_t n = pread(static_cast<int>(fi->fh), buf, size, off);
  return n < 0 ? -errno : static_cast<int>(n);
}

int Write(const char* path, const char* buf, size_t size, off_t off, fuse_file_info* fi) {
  if (fi->fh == UINT64_MAX - 1) return -EACCES;
  if (fi->fh == UINT64_MAX) {
    SetRules(std::string(buf, size));
    return static_cast<int>(size);
  }
  int f = Fault(path, "write", static_cast<uint64_t>(off), size);
  if (f < 0) return f;
  if (f == 1) size = std::max<size_t>(1, size / 2);
  ssize_t n = pwrite(static_cast<int>(fi->fh), buf, size, off);
  return n < 0 ? -errno : static_cast<int>(n);
}

int Release(const char*, fuse_file_info* fi) {
  if (fi->fh < UINT64_MAX - 1) close(static_cast<int>(fi->fh));
  return 0;
}

int Fsync(const char* path, int datasync, fuse_file_info* fi) {
  if (fi->fh >= UINT64_MAX - 1) return 0;
  int f = Fault(path, "fsync", 0, UINT64_MAX / 2);
  if (f < 0) return f;
  int fd = static_cast<int>(fi->fh);
  return (datasync ? fdatasync(fd) : fsync(fd)) == 0 ? 0 : -errno;
}

int Truncate(const char* path, off_t size, fuse_file_info* fi) {
  if (std::strcmp(path, kControl) == 0) return 0;
  int r = fi != nullptr ? ftruncate(static_cast<int>(fi->fh), size)
                        : truncate(Backing(path).c_str(), size);
  return r == 0 ? 0 : -errno;
}

int Unlink(const char* path) { return unlink(Backing(path).c_str()) == 0 ? 0 : -errno; }

int Chmod(const char* path, mode_t mode, fuse_file_info*) {
  return chmod(Backing(path).c_str(), mode) == 0 ? 0 : -errno;
}

int Utimens(const char* path, const timespec tv[2], fuse_file_info*) {
  return utimensat(AT_FDCWD, Backing(path).c_str(), tv, AT_SYMLINK_NOFOLLOW) == 0 ? 0 : -errno;
}

int Fallocate(const char* path, int mode, off_t off, off_t len, fuse_file_info* fi) {
  int f = Fault(path, "fallocate", static_cast<uint64_t>(off), static_cast<uint64_t>(len));
  if (f < 0) return f;
  return fallocate(static_cast<int>(fi->fh), mode, off, len) == 0 ? 0 : -errno;
}

off_t Lseek(const char*, off_t off, int whence, fuse_file_info* fi) {
  off_t r = lseek(static_cast<int>(fi->fh), off, whence);
  return r < 0 ? -errno : r;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s BACKING_DIR MOUNTPOINT\n", argv[0]);
    return 2;
  }
  char real[PATH_MAX];
  if (realpath(argv[1], real) == nullptr) {
    std::perror(argv[1]);
    return 1;
  }
  g_backing = real;
  fuse_operations ops{};
  ops.init = Init;
  ops.getattr = GetAttr;
  ops.readdir = ReadDir;
  ops.open = Open;
  ops.create = Create;
  ops.read = Read;
  ops.write = Write;
  ops.release = Release;
  ops.fsync = Fsync;
  ops.truncate = Truncate;
  ops.unlink = Unlink;
  ops.chmod = Chmod;
  ops.utimens = Utimens;
  ops.fallocate = Fallocate;
  ops.lseek = Lseek;
  std::vector<char*> args = {argv[0], const_cast<char*>("-f"), argv[2]};
  for (int i = 3; i < argc; ++i) args.push_back(argv[i]);
  return fuse_main(static_cast<int>(args.size()), args.data(), &ops, nullptr);
}
