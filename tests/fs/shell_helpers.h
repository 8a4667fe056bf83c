#pragma once

// Small helpers shared by the end-to-end tests: QMP
// command text, job records, shell quoting, background shell processes and a
// fixture with one mounted drive. Header-only on top of mount_fixture.h.

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "tests/fs/mount_fixture.h"

extern char** environ;

namespace cbw::test {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

inline std::string Cmd(const std::string& execute, const json& args = json(),
                       const json& id = json()) {
  json c = {{"execute", execute}};
  if (!args.is_null()) c["arguments"] = args;
  if (!id.is_null()) c["id"] = id;
  return c.dump();
}

// A transaction of drive-backup actions (their `data`), one point in time,
// completion-mode grouped.
inline std::string GroupedBackups(const std::vector<json>& backups) {
  json actions = json::array();
  for (const auto& b : backups) actions.push_back({{"type", "drive-backup"}, {"data", b}});
  return Cmd("transaction",
             {{"actions", actions}, {"properties", {{"completion-mode", "grouped"}}}});
}

inline json Record(CbwfsMount& m, const std::string& id) {
  std::string r = m.JobRecord(id);
  return r.empty() ? json() : json::parse(r, nullptr, false);
}

inline bool WaitResult(CbwfsMount& m, const std::string& id,
                       std::chrono::seconds deadline = std::chrono::seconds(60)) {
  return WaitFor([&] { return Record(m, id).contains("result"); }, deadline);
}

// query-block's dirty bitmaps of a drive.
inline json Bitmaps(CbwfsMount& m, const std::string& drive = "drive0") {
  std::string reply;
  EXPECT_EQ(m.Control(Cmd("query-block"), &reply), 0);
  json r = json::parse(reply, nullptr, false);
  for (const auto& d : r["return"]) {
    if (d["device"] == drive) return d["inserted"].value("dirty-bitmaps", json::array());
  }
  return json::array();
}

// One bitmap of query-block (null when there is none by that name).
inline json BitmapInfo(CbwfsMount& m, const std::string& name,
                       const std::string& drive = "drive0") {
  for (const auto& b : Bitmaps(m, drive)) {
    if (b["name"] == name) return b;
  }
  return json();
}

// Single-quotes `s` for bash.
inline std::string Q(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

// Each non-empty line of `text` parsed as JSON (discarded values for bad lines).
inline std::vector<json> JsonLines(const std::string& text) {
  std::vector<json> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    if (nl > pos) out.push_back(json::parse(text.substr(pos, nl - pos), nullptr, false));
    pos = nl + 1;
  }
  return out;
}

inline double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// A bash script run in the background (stdin /dev/null, stdout and stderr to
// `out_path`), e.g. "exec cat events". Killed with SIGKILL on destruction if
// still running.
class Background {
 public:
  Background(const std::string& script, const std::string& out_path) {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    const char* argv[] = {"bash", "-c", script.c_str(), nullptr};
    if (posix_spawnp(&pid_, "bash", &fa, nullptr, const_cast<char**>(argv), environ) != 0) {
      pid_ = -1;
    }
    posix_spawn_file_actions_destroy(&fa);
  }
  ~Background() {
    if (pid_ > 0 && !Reap(false)) {
      kill(pid_, SIGKILL);
      Reap(true);
    }
  }
  Background(const Background&) = delete;
  Background& operator=(const Background&) = delete;

  pid_t pid() const { return pid_; }
  // True once the process has `path` open (readlink of /proc/<pid>/fd/*).
  bool HasOpen(const std::string& path) const {
    for (int fd = 0; fd < 64; ++fd) {
      char link[4096];
      std::string p = "/proc/" + std::to_string(pid_) + "/fd/" + std::to_string(fd);
      ssize_t n = readlink(p.c_str(), link, sizeof link - 1);
      if (n > 0 && std::string(link, static_cast<size_t>(n)) == path) return true;
    }
    return false;
  }
  // /proc/<pid>/stat's state letter ('S', 'D', 'R', ...), or 0 when gone.
  char State() const {
    std::string s = ReadFileOrDie("/proc/" + std::to_string(pid_) + "/stat");
    size_t paren = s.rfind(')');
    return paren != std::string::npos && paren + 2 < s.size() ? s[paren + 2] : 0;
  }
  void Signal(int sig) {
    if (pid_ > 0) kill(pid_, sig);
  }
  // Waits up to `deadline` for exit; returns the wait status, or -1 on timeout.
  int Wait(std::chrono::milliseconds deadline) {
    if (!WaitFor([&] { return Reap(false); }, deadline)) return -1;
    return status_;
  }

 private:
  bool Reap(bool wait) {
    if (pid_ <= 0) return true;
    int st = 0;
    pid_t r;
    do {
      r = waitpid(pid_, &st, wait ? 0 : WNOHANG);
    } while (r < 0 && errno == EINTR);
    if (r == 0) return false;
    status_ = st;
    pid_ = -1;
    return true;
  }
  pid_t pid_ = -1;
  int status_ = 0;
};

// One mounted drive (`drive0`, random bytes) and a scratch directory.
class MountedDrive : public ::testing::Test {
 protected:
  void MountDrive(uint64_t size, std::vector<std::string> extra = {}) {
    image_ = RandomBytes(size, 42);
    WriteFileOrDie(dir_ / "src.img", image_);
    std::vector<std::string> args = {"--drive", "drive0=" + (dir_ / "src.img")};
    args.insert(args.end(), extra.begin(), extra.end());
    ASSERT_TRUE(mount_.Start(args));
  }
  // Runs `script` in bash inside the mountpoint, with $D the scratch dir and
  // $M the mountpoint.
  CommandResult Sh(const std::string& script,
                   std::chrono::seconds deadline = std::chrono::seconds(60)) {
    return RunShell("cd " + Q(mount_.mnt()) + " && D=" + Q(dir_.path()) + " M=" + Q(mount_.mnt()) +
                        " && " + script,
                    deadline);
  }
  // The reply a fresh open of control shows (the last response given).
  json LastReply() { return json::parse(ReadFileOrDie(mount_ / "control"), nullptr, false); }
  // Starts a drive-backup of drive0; asserts success.
  void StartJob(const std::string& id, const std::string& sync, json extra = json::object()) {
    json a = {
        {"device", "drive0"}, {"job-id", id}, {"target", dir_ / (id + ".img")}, {"sync", sync}};
    for (auto& [k, v] : extra.items()) a[k] = v;
    ASSERT_EQ(mount_.Control(Cmd("drive-backup", a)), 0) << ReadFileOrDie(mount_ / "control");
  }

  TempDir dir_;
  CbwfsMount mount_;
  std::string image_;
};

}  // namespace cbw::test
