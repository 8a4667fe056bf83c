// backup_bench SOURCE TARGET [SPEED]: backs SOURCE up to TARGET with the
// engine (sync=full, idle drive) and prints the wall time. Compare with
// `cp SOURCE X && sync X` on the same machine. Not a test: never gates CI.

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "backup/job_registry.h"
#include "backup/log.h"

using namespace cbw::backup;

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s SOURCE TARGET [SPEED]\n", argv[0]);
    return 2;
  }
  SetLogLevel(LogLevel::kWarn);
  auto d = Drive::Open(DriveConfig{"drive0", argv[1], false});
  if (!d.ok()) {
    std::fprintf(stderr, "%s\n", d.status().message().c_str());
    return 1;
  }
  EventBus bus;
  JobRegistry reg({d->get()}, &bus, RegistryOptions{});
  BackupOptions o;
  o.device = "drive0";
  o.target = argv[2];
  if (argc > 3) o.speed = std::strtoull(argv[3], nullptr, 10);
  auto t0 = std::chrono::steady_clock::now();
  Status s = reg.StartBackups({o});
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.message().c_str());
    return 1;
  }
  for (;;) {
    auto i = reg.GetJobFile("drive0");
    if (i && i->result != JobResult::kNone) {
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("%s: %.3f s, %.1f MiB/s, skipped %llu bytes\n", ToString(i->result), secs,
                  static_cast<double>(i->len) / secs / 1048576.0,
                  static_cast<unsigned long long>(i->skipped_bytes));
      return i->result == JobResult::kSuccess ? 0 : 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}
