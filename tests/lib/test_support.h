#pragma once

// Helpers every test binary shares: temp dirs, files with known bytes,
// polling with a deadline, running commands. Every wait polls with a
// deadline; nothing sleeps a fixed time.

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace cbw::test {

// A fresh directory under $TMPDIR (or /tmp), removed with its contents on
// destruction (after any mount in it is gone).
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::string RandomBytes(size_t n, uint64_t seed);
void WriteFileOrDie(const std::string& path, const std::string& data);
// Creates a sparse file of `size` bytes (ftruncate).
void MakeSparseFile(const std::string& path, uint64_t size);
std::string ReadFileOrDie(const std::string& path);
// The whole file, or "" if it cannot be read (no test failure).
std::string ReadFile(const std::string& path);
// Writes `data` at `off` of `path` (created if missing); aborts on failure.
void WriteAt(const std::string& path, const std::string& data, uint64_t off);
// Compares two images; on mismatch says where, without dumping megabytes.
::testing::AssertionResult SameBytes(const std::string& got, const std::string& want);
// Whole-file checksum (FNV-1a 64 over the bytes), for compact oracles.
uint64_t Checksum(const std::string& data);
uint64_t FileChecksum(const std::string& path);

// Polls `cond` every few ms until true or the deadline passes.
bool WaitFor(const std::function<bool()>& cond,
             std::chrono::milliseconds deadline = std::chrono::seconds(20));
bool WaitFor(const std::function<bool()>& cond, double seconds);

struct CommandResult {
  int exit_code = -1;  // -1: killed or timed out
  std::string out;
  std::string err;
};
// Runs argv (no shell) with stdin from /dev/null, capturing output, with a
// deadline after which the child is killed.
CommandResult RunCommand(const std::vector<std::string>& argv,
                         std::chrono::seconds deadline = std::chrono::seconds(60));
// Runs a bash script line (for tests that use shell tools as a user would).
CommandResult RunShell(const std::string& script,
                       std::chrono::seconds deadline = std::chrono::seconds(60));

// True when tests/run.sh built everything with a sanitizer (CBW_TEST_MODE
// asan or tsan): memory figures and exit timing then measure the sanitizer.
bool UnderSanitizer();

}  // namespace cbw::test
