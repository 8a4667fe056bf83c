#pragma once

// A drive and a registry for jobs to NBD and qcow2 targets (a configurable
// target timeout), and a look for leftover qemu-nbd processes.

#include <dirent.h>

#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "tests/backup/test_util.h"

namespace cbw::backup::testing {

// One drive and a registry with a short target timeout.
struct NbdJobFixture {
  explicit NbdJobFixture(uint64_t size, uint32_t target_timeout_ms = 30'000) {
    image = RandomBytes(size, 77);
    source = dir / "source.img";
    testing::WriteAt(source, image, 0);
    auto d = Drive::Open(DriveConfig{"drive0", source, false});
    if (!d.ok()) std::abort();
    drive = std::move(*d);
    RegistryOptions o;
    o.base_dir = dir.path();
    o.target_timeout_ms = target_timeout_ms;
    registry = std::make_unique<JobRegistry>(std::vector<Drive*>{drive.get()}, &bus, o);
  }
  BackupOptions Opts(const std::string& target) const {
    BackupOptions o;
    o.device = "drive0";
    o.target = target;
    o.mode = TargetMode::kExisting;
    return o;
  }
  bool Ended(const std::string& id) const {
    auto i = registry->GetJobFile(id);
    return i && i->result != JobResult::kNone;
  }
  JobInfo Info(const std::string& id) const { return *registry->GetJobFile(id); }

  TempDir dir;
  std::string image, source;
  EventBus bus;
  std::unique_ptr<Drive> drive;
  std::unique_ptr<JobRegistry> registry;
};

// True when tests/run.sh built everything with a sanitizer: timings then
// measure the sanitizer, and are not checked.
inline bool Sanitized() {
  const char* m = std::getenv("CBW_TEST_MODE");
  return m != nullptr && (std::string(m) == "asan" || std::string(m) == "tsan");
}

// Live (not zombie) processes whose command line holds every one of
// `needles`, e.g. {"qemu-nbd", "/tmp/x/t.qcow2"}.
inline std::vector<pid_t> ProcessesWith(const std::vector<std::string>& needles) {
  std::vector<pid_t> out;
  DIR* d = opendir("/proc");
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    long pid = std::strtol(e->d_name, &end, 10);
    if (pid <= 0 || *end != '\0') continue;
    const std::string base = std::string("/proc/") + e->d_name;
    std::string cmd = ReadAll(base + "/cmdline");
    for (char& c : cmd) {
      if (c == '\0') c = ' ';
    }
    bool all = !cmd.empty();
    for (const auto& n : needles) all = all && cmd.find(n) != std::string::npos;
    if (!all) continue;
    std::string stat = ReadAll(base + "/stat");
    size_t paren = stat.rfind(')');
    if (paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] == 'Z') continue;
    out.push_back(static_cast<pid_t>(pid));
  }
  closedir(d);
  return out;
}

}  // namespace cbw::backup::testing
