#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backup/drive.h"
#include "backup/event_bus.h"
#include "backup/job_registry.h"
#include "control/dispatcher.h"

namespace cbw::control::testing {

// A real engine over temp files for dispatcher tests: a scratch directory,
// drives drive0 and drive1 (8 MiB each, patterned, so nothing is skipped as
// zero), an event bus and a JobRegistry, and a Dispatcher on top.
//
// Not thread-safe; one per test. The destructor shuts the registry down and
// removes the directory.
class ControlEnv {
 public:
  static constexpr uint64_t kDriveSize = 8 << 20;

  ControlEnv();
  ~ControlEnv();

  const std::string& dir() const { return dir_; }
  backup::JobRegistry& registry() { return *registry_; }
  Dispatcher& dispatcher() { return *dispatcher_; }
  backup::Drive& drive(int i) { return *drives_[i]; }
  std::string drive_path(int i) const { return dir_ + "/drive" + std::to_string(i) + ".img"; }

  WriteOutcome Run(const std::string& bytes) { return dispatcher_->Execute(bytes); }

  // The listed (QMP) job with this id, if any.
  std::optional<backup::JobInfo> FindJob(const std::string& id);
  // Polls until pred() holds or 15 s pass; returns pred().
  bool WaitFor(const std::function<bool()>& pred);
  bool WaitForStatus(const std::string& id, backup::JobStatus status);
  // Until the job is no longer listed and its record says it ended.
  bool WaitForEnd(const std::string& id);

 private:
  std::string dir_;
  std::vector<std::unique_ptr<backup::Drive>> drives_;
  std::unique_ptr<backup::EventBus> bus_;
  std::unique_ptr<backup::JobRegistry> registry_;
  std::unique_ptr<Dispatcher> dispatcher_;
};

// The text of examples/commands/NAME, unchanged.
std::string ReadExample(const std::string& name);
// The example with every "target" path moved into `dir` (same file name) and
// each key of `overrides` set in every command's arguments (and every
// transaction action's data). Re-serialised only when something changed.
std::string Example(const std::string& name, const std::string& dir,
                    const std::string& overrides_json = "{}");
std::string ReadFile(const std::string& path);
bool FileExists(const std::string& path);

}  // namespace cbw::control::testing
