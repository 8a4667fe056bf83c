// libFuzzer target: one input = the bytes of one write() on the control file,
// run through the parser and the dispatcher against a real JobRegistry over
// two small temp images. Every drive-backup target is confined to a handful
// of files in the scratch directory, so no input can touch anything else or
// grow the disk without bound. Checks the WriteOutcome's invariants.

#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "backup/drive.h"
#include "backup/event_bus.h"
#include "backup/job_registry.h"
#include "backup/log.h"
#include "control/dispatcher.h"

namespace {

using namespace cbw;

constexpr uint64_t kDriveSize = 256 * 1024;
constexpr int kTargets = 4;

struct World {
  std::string dir;
  std::vector<std::unique_ptr<backup::Drive>> drives;
  std::vector<backup::Drive*> raw;
  backup::EventBus bus;
};

World* world = nullptr;

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

backup::Status Confine(backup::BackupOptions* o) {
  // Keep the shape of the request (mode, sizes) but pick one of a few fixed
  // files; existing mode sometimes finds the file from an earlier input.
  size_t slot = std::hash<std::string>{}(o->target) % kTargets;
  o->target = world->dir + "/target" + std::to_string(slot) + ".img";
  return backup::Status::Ok();
}

// At exit (libFuzzer exits normally at the end of a bounded run): drop the
// scratch directory. Drives stay open; unlinking them is fine.
void RemoveScratch() {
  std::error_code ec;
  std::filesystem::remove_all(world->dir, ec);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Error replies are logged at error level; below the lowest level nothing
  // is printed, which keeps the fuzzer's output readable and fast.
  backup::SetLogLevel(static_cast<backup::LogLevel>(-1));
  world = new World;
  char tmpl[] = "/tmp/cbw-control-fuzz.XXXXXX";
  Check(mkdtemp(tmpl) != nullptr);
  world->dir = tmpl;
  atexit(RemoveScratch);
  for (int i = 0; i < 2; ++i) {
    std::string name = "drive" + std::to_string(i);
    std::string path = world->dir + "/" + name + ".img";
    std::string data(kDriveSize, static_cast<char>(0x40 + i));
    std::ofstream(path, std::ios::binary) << data;
    auto drive = backup::Drive::Open({name, path, false});
    Check(drive.ok());
    world->raw.push_back(drive->get());
    world->drives.push_back(std::move(*drive));
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  backup::RegistryOptions options;
  options.mountpoint = world->dir + "/mnt";
  options.base_dir = world->dir;
  // A fresh registry per input: inputs stay independent, and its destructor
  // cancels whatever the input started (rate-limited jobs included).
  backup::JobRegistry registry(world->raw, &world->bus, options);
  control::DispatcherOptions dispatcher_options;
  dispatcher_options.vet_backup = Confine;
  control::Dispatcher dispatcher(&registry, dispatcher_options);

  control::WriteOutcome out =
      dispatcher.Execute(std::string_view(reinterpret_cast<const char*>(data), size));

  // Invariants: every response is one JSON object per line, "return" or
  // "error"; only the last may be an error, and only when the write failed.
  size_t lines = 0, errors = 0;
  size_t start = 0;
  while (start < out.responses.size()) {
    size_t end = out.responses.find('\n', start);
    Check(end != std::string::npos);
    auto j = nlohmann::json::parse(out.responses.substr(start, end - start), nullptr, false);
    Check(j.is_object());
    Check(j.contains("return") != j.contains("error"));
    if (j.contains("error")) {
      ++errors;
      Check(end + 1 == out.responses.size());
    }
    ++lines;
    start = end + 1;
  }
  Check(errors == (out.error != 0 && lines > 0 ? 1u : 0u));
  if (out.error != 0) {
    Check(!out.last_reply.empty());
    Check(out.last_reply.find("\"error\"") != std::string::npos);
  }
  if (lines > 0) Check(out.responses.size() >= out.last_reply.size());
  return 0;
}
