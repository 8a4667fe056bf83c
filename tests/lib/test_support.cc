#include "tests/lib/test_support.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <thread>

extern char** environ;

namespace cbw::test {

TempDir::TempDir() {
  const char* base = getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/cbwfs-test.XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) {
    ADD_FAILURE() << "mkdtemp: " << strerror(errno);
    abort();
  }
  path_ = buf.data();
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string RandomBytes(size_t n, uint64_t seed) {
  std::string s(n, '\0');
  std::mt19937_64 rng(seed);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v = rng();
    memcpy(&s[i], &v, 8);
  }
  for (; i < n; ++i) s[i] = static_cast<char>(rng());
  return s;
}

void WriteFileOrDie(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
  if (!f) {
    ADD_FAILURE() << "cannot write " << path;
    abort();
  }
}

void MakeSparseFile(const std::string& path, uint64_t size) {
  int fd = open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
  if (fd < 0 || ftruncate(fd, static_cast<off_t>(size)) != 0) {
    ADD_FAILURE() << "cannot create " << path << ": " << strerror(errno);
    abort();
  }
  close(fd);
}

std::string ReadFileOrDie(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    ADD_FAILURE() << "cannot read " << path << ": " << strerror(errno);
    return "";
  }
  close(fd);
  return ReadFile(path);
}

std::string ReadFile(const std::string& path) {
  // Sized once and read straight in: images of hundreds of MiB are read
  // often, and a stream would copy them several times over.
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "";
  std::string out;
  struct stat st {};
  if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) out.reserve(static_cast<size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    size_t want = out.capacity() > out.size() ? out.capacity() - out.size() : sizeof(buf);
    if (want <= sizeof(buf)) {
      ssize_t n = read(fd, buf, sizeof(buf));
      if (n <= 0) break;
      out.append(buf, static_cast<size_t>(n));
      continue;
    }
    size_t at = out.size();
    out.resize(at + want);
    ssize_t n = read(fd, out.data() + at, want);
    out.resize(at + (n > 0 ? static_cast<size_t>(n) : 0));
    if (n <= 0) break;
  }
  close(fd);
  return out;
}

void WriteAt(const std::string& path, const std::string& data, uint64_t off) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0 || pwrite(fd, data.data(), data.size(), static_cast<off_t>(off)) !=
                    static_cast<ssize_t>(data.size())) {
    ADD_FAILURE() << "cannot write " << path << ": " << strerror(errno);
    abort();
  }
  close(fd);
}

::testing::AssertionResult SameBytes(const std::string& got, const std::string& want) {
  if (got == want) return ::testing::AssertionSuccess();
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  }
  size_t i = 0;
  while (got[i] == want[i]) ++i;
  size_t j = got.size();
  while (got[j - 1] == want[j - 1]) --j;
  return ::testing::AssertionFailure() << "bytes differ in [" << i << ", " << j << ")";
}

uint64_t Checksum(const std::string& data) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : data) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

uint64_t FileChecksum(const std::string& path) { return Checksum(ReadFileOrDie(path)); }

bool WaitFor(const std::function<bool()>& cond, std::chrono::milliseconds deadline) {
  auto end = std::chrono::steady_clock::now() + deadline;
  for (;;) {
    if (cond()) return true;
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

bool WaitFor(const std::function<bool()>& cond, double seconds) {
  return WaitFor(cond, std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
}

CommandResult RunCommand(const std::vector<std::string>& argv, std::chrono::seconds deadline) {
  CommandResult res;
  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) return res;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_adddup2(&fa, err[1], 2);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid;
  int rc = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(out[1]);
  close(err[1]);
  if (rc != 0) {
    close(out[0]);
    close(err[0]);
    res.err = std::string("spawn: ") + strerror(rc);
    return res;
  }
  auto end = std::chrono::steady_clock::now() + deadline;
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  int open_fds = 2;
  bool killed = false;
  while (open_fds > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    end - std::chrono::steady_clock::now())
                    .count();
    if (left <= 0 && !killed) {
      kill(pid, SIGKILL);
      killed = true;
    }
    int n = poll(fds, 2, left > 0 ? static_cast<int>(std::min<long>(left, 1000)) : 1000);
    if (n < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[65536];
      ssize_t r = read(fds[i].fd, buf, sizeof buf);
      if (r <= 0) {
        close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      } else {
        (i == 0 ? res.out : res.err).append(buf, static_cast<size_t>(r));
      }
    }
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  res.exit_code = killed ? -1 : WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return res;
}

CommandResult RunShell(const std::string& script, std::chrono::seconds deadline) {
  return RunCommand({"bash", "-c", script}, deadline);
}

bool UnderSanitizer() {
  const char* m = getenv("CBW_TEST_MODE");
  return m && (std::string(m) == "asan" || std::string(m) == "tsan");
}

}  // namespace cbw::test
