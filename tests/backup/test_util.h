#pragma once

// Helpers shared by the backup tests: temp dirs, files with known content,
// an event recorder, polling with a deadline.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backup/drive.h"
#include "backup/event_bus.h"
#include "backup/job_registry.h"
#include "backup/log.h"
#include "tests/lib/test_support.h"

namespace cbw::backup::testing {

// Jobs log every start at info; keep test output to warnings.
inline const bool kQuietLogs = (SetLogLevel(LogLevel::kWarn), true);

using cbw::test::RandomBytes;
using cbw::test::SameBytes;
using cbw::test::TempDir;
using cbw::test::WaitFor;
using cbw::test::WriteAt;
inline std::string ReadAll(const std::string& path) { return cbw::test::ReadFile(path); }
inline void MakeSparse(const std::string& path, uint64_t size) {
  cbw::test::MakeSparseFile(path, size);
}

// Records every event in order; thread-safe.
class EventRecorder {
 public:
  explicit EventRecorder(EventBus* bus) : bus_(bus) {
    token_ = bus_->Subscribe([this](const Event& e) {
      std::lock_guard<std::mutex> lock(mu_);
      events_.push_back(e);
    });
  }
  ~EventRecorder() { bus_->Unsubscribe(token_); }
  std::vector<Event> events() const {
    std::lock_guard<std::mutex> lock(mu_);
    return events_;
  }
  // Status changes of one job, as "created,running,...".
  std::string Statuses(const std::string& id) const {
    std::string out;
    for (const auto& e : events()) {
      if (e.type == EventType::kJobStatusChange && e.job_id == id) {
        if (!out.empty()) out += ",";
        out += ToString(e.status);
      }
    }
    return out;
  }
  // Every event of one job, compactly: "S:created", "COMPLETED", "ERROR:read:stop"...
  std::string Sequence(const std::string& id) const {
    std::string out;
    for (const auto& e : events()) {
      if (e.job_id != id) continue;
      if (!out.empty()) out += ",";
      switch (e.type) {
        case EventType::kJobStatusChange:
          out += ToString(e.status);
          break;
        case EventType::kBlockJobCompleted:
          out += e.error ? "COMPLETED(" + *e.error + ")" : "COMPLETED";
          break;
        case EventType::kBlockJobCancelled:
          out += "CANCELLED";
          break;
        case EventType::kBlockJobError:
          out += std::string("ERROR(") + (e.is_read ? "read" : "write") + "," + e.action + ")";
          break;
        case EventType::kBlockJobPending:
          out += "PENDING";
          break;
      }
    }
    return out;
  }
  // Sequence(id) once its last event has arrived (the job's ending status
  // is set before its events are delivered): waits up to `seconds` for the
  // sequence to end with `last`.
  std::string SequenceUntil(const std::string& id, const std::string& last = "null",
                            double seconds = 10) const {
    std::string seq;
    WaitFor(
        [&] {
          seq = Sequence(id);
          return seq.size() >= last.size() &&
                 seq.compare(seq.size() - last.size(), last.size(), last) == 0;
        },
        seconds);
    return seq;
  }
  bool Has(const std::string& id, EventType type) const {
    for (const auto& e : events()) {
      if (e.job_id == id && e.type == type) return true;
    }
    return false;
  }

 private:
  EventBus* bus_;
  uint64_t token_;
  mutable std::mutex mu_;
  std::vector<Event> events_;
};

// One drive plus a registry over it, in a temp dir.
struct Fixture {
  explicit Fixture(uint64_t size, const std::string& content = "", uint64_t cluster = 64 * 1024,
                   const std::string& mountpoint = "") {
    source = dir / "source.img";
    MakeSparse(source, size);
    if (!content.empty()) WriteAt(source, content, 0);
    auto d = Drive::Open(DriveConfig{"drive0", source, false});
    if (!d.ok()) {
      fprintf(stderr, "Drive::Open: %s\n", d.status().message().c_str());
      std::abort();
    }
    drive = std::move(*d);
    RegistryOptions o;
    o.cluster_size = cluster;
    o.base_dir = dir.path();
    o.mountpoint = mountpoint;
    registry = std::make_unique<JobRegistry>(std::vector<Drive*>{drive.get()}, &bus, o);
  }
  BackupOptions Opts(const std::string& target, SyncMode sync = SyncMode::kFull) const {
    BackupOptions o;
    o.device = "drive0";
    o.target = target;
    o.sync = sync;
    return o;
  }
  std::optional<JobInfo> Info(const std::string& id) const { return registry->GetJobFile(id); }
  bool Ended(const std::string& id) const {
    auto i = Info(id);
    return i && i->result != JobResult::kNone;
  }
  bool InStatus(const std::string& id, JobStatus s) const {
    auto i = Info(id);
    return i && i->status == s;
  }

  TempDir dir;
  std::string source;
  EventBus bus;
  std::unique_ptr<Drive> drive;
  std::unique_ptr<JobRegistry> registry;
};

}  // namespace cbw::backup::testing
