#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "backup/job_types.h"

namespace cbw::backup {

enum class EventType {
  kJobStatusChange,    // {id, status}
  kBlockJobCompleted,  // {type, device, len, offset, speed, error?}
  kBlockJobCancelled,  // {type, device, len, offset, speed}
  kBlockJobError,      // {device, operation, action}
  kBlockJobPending,    // {type, id}
};

// One event, in engine terms; control/ renders it as QMP JSON.
struct Event {
  EventType type = EventType::kJobStatusChange;
  int64_t seconds = 0;  // CLOCK_REALTIME at emission
  int64_t microseconds = 0;
  std::string job_id;                        // id / device
  JobStatus status = JobStatus::kUndefined;  // kJobStatusChange
  uint64_t len = 0, offset = 0, speed = 0;   // completed / cancelled
  std::optional<std::string> error;          // completed, when failed
  bool is_read = false;                      // kBlockJobError: operation read|write
  std::string action;                        // kBlockJobError: ignore|report|stop
};

// Fan-out of job events to subscribers (the events file's opens).
//
// Thread safety: all methods are thread-safe. Callbacks run on the publishing
// thread, in publication order, with the bus's mutex held: they must be quick
// and must not call back into the bus or the job registry (queue and return).
// Lock order: job locks -> EventBus::mu_ -> subscriber locks.
class EventBus {
 public:
  using Subscriber = std::function<void(const Event&)>;

  // Returns a token for Unsubscribe. Sees only events published after this.
  uint64_t Subscribe(Subscriber fn);
  void Unsubscribe(uint64_t token);
  // Stamps the time and delivers to every subscriber.
  void Publish(Event event);

 private:
  std::mutex mu_;
  uint64_t next_token_ = 1;
  std::map<uint64_t, Subscriber> subscribers_;
};

}  // namespace cbw::backup
