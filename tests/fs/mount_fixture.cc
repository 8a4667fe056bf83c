#include "tests/fs/mount_fixture.h"

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
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    ADD_FAILURE() << "cannot read " << path;
    return "";
  }
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
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

std::string CbwfsBinary() {
  const char* env = getenv("CBWFS_BINARY");
  return env && *env ? env : CBWFS_BINARY_PATH;
}

bool UnderSanitizer() {
  const char* m = getenv("CBW_TEST_MODE");
  return m && (std::string(m) == "asan" || std::string(m) == "tsan");
}

CbwfsMount::CbwfsMount() : mnt_(dir_ / "mnt"), log_path_(dir_ / "cbwfs.log") {
  mkdir(mnt_.c_str(), 0755);
}

CbwfsMount::~CbwfsMount() {
  RunCommand({"fusermount3", "-uz", mnt_}, std::chrono::seconds(10));
  if (pid_ > 0 && !Reap(false)) {
    kill(pid_, SIGKILL);
    Reap(true);
  }
}

bool CbwfsMount::Reap(bool wait) {
  if (pid_ <= 0) return true;
  int status = 0;
  pid_t r;
  do {
    r = waitpid(pid_, &status, wait ? 0 : WNOHANG);
  } while (r < 0 && errno == EINTR);
  if (r == 0) return false;
  exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  pid_ = -1;
  return true;
}

bool CbwfsMount::alive() { return pid_ > 0 && !Reap(false); }

::testing::AssertionResult CbwfsMount::Start(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {CbwfsBinary(), "-f"};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.push_back(mnt_);
  struct stat before {};
  stat(mnt_.c_str(), &before);

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  std::vector<char*> cargs;
  for (auto& a : argv) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  int rc = posix_spawn(&pid_, cargs[0], &fa, nullptr, cargs.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return ::testing::AssertionFailure() << "spawn cbwfs: " << strerror(rc);

  bool up = WaitFor([&] {
    if (!alive()) return true;
    struct stat st {};
    return stat(mnt_.c_str(), &st) == 0 && st.st_dev != before.st_dev &&
           stat((mnt_ + "/control").c_str(), &st) == 0;
  });
  if (!alive()) {
    return ::testing::AssertionFailure()
           << "cbwfs exited with " << exit_status_ << " before mounting:\n"
           << log();
  }
  if (!up) return ::testing::AssertionFailure() << "mount did not come up in time:\n" << log();
  return ::testing::AssertionSuccess();
}

int CbwfsMount::Stop(int sig) {
  if (pid_ <= 0) return exit_status_;
  kill(pid_, sig);
  auto end = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!Reap(false)) {
    if (std::chrono::steady_clock::now() > end) {
      kill(pid_, SIGKILL);
      Reap(true);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return exit_status_;
}

int CbwfsMount::Unmount() {
  CommandResult r = RunCommand({"fusermount3", "-u", mnt_}, std::chrono::seconds(30));
  if (r.exit_code != 0) ADD_FAILURE() << "fusermount3 -u: " << r.err;
  auto end = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!Reap(false)) {
    if (std::chrono::steady_clock::now() > end) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return exit_status_;
}

std::string CbwfsMount::log() const {
  std::ifstream f(log_path_);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

int CbwfsMount::Control(const std::string& json, std::string* reply) {
  int fd = open((mnt_ + "/control").c_str(), O_WRONLY);
  if (fd < 0) return errno;
  ssize_t n = write(fd, json.data(), json.size());
  int err = n < 0 ? errno : (static_cast<size_t>(n) == json.size() ? 0 : EIO);
  close(fd);
  if (reply) *reply = ReadFileOrDie(mnt_ + "/control");
  return err;
}

std::string CbwfsMount::JobRecord(const std::string& id) {
  std::string p = mnt_ + "/jobs/" + id;
  int fd = open(p.c_str(), O_RDONLY);
  if (fd < 0) return "";
  std::string out;
  char buf[8192];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

bool CbwfsMount::WaitJobStatus(const std::string& id, const std::vector<std::string>& statuses,
                               std::chrono::milliseconds deadline) {
  return WaitFor(
      [&] {
        std::string rec = JobRecord(id);
        if (rec.empty()) return false;
        auto j = nlohmann::json::parse(rec, nullptr, false);
        if (j.is_discarded() || !j.contains("status")) return false;
        for (const auto& s : statuses) {
          if (j["status"] == s) return true;
        }
        return false;
      },
      deadline);
}

}  // namespace cbw::test
