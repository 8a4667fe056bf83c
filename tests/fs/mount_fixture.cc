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

std::string CbwfsBinary() {
  const char* env = getenv("CBWFS_BINARY");
  return env && *env ? env : CBWFS_BINARY_PATH;
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
