#include "control/render.h"

#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "control/wire.h"

namespace cbw::control {

using nlohmann::ordered_json;

ordered_json BlockJobInfoJson(const backup::JobInfo& info) {
  ordered_json j;
  j["type"] = "backup";
  j["device"] = info.id;
  j["len"] = info.len;
  j["offset"] = info.offset;
  j["busy"] = info.busy;
  j["paused"] = info.paused;
  j["speed"] = info.speed;
  j["io-status"] = backup::ToString(info.io_status);
  j["ready"] = false;  // backup jobs never become ready
  j["status"] = backup::ToString(info.status);
  j["auto-finalize"] = info.auto_finalize;
  j["auto-dismiss"] = info.auto_dismiss;
  if (info.error) j["error"] = *info.error;
  return j;
}

ordered_json BitmapInfoJson(const backup::BitmapInfo& info) {
  ordered_json j;
  j["name"] = info.name;
  j["count"] = info.count;
  j["granularity"] = info.granularity;
  j["recording"] = info.recording;
  j["busy"] = info.busy;
  j["persistent"] = info.persistent;
  if (info.inconsistent) j["inconsistent"] = true;
  return j;
}

ordered_json JobInfoJson(const backup::JobInfo& info) {
  ordered_json j;
  j["id"] = info.id;
  j["type"] = "backup";
  j["status"] = backup::ToString(info.status);
  j["current-progress"] = info.offset;
  j["total-progress"] = info.len;
  if (info.error) j["error"] = *info.error;
  return j;
}

std::string Rfc3339(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) seconds = 0;
  auto millis_total = static_cast<int64_t>(std::llround(seconds * 1000.0));
  time_t whole = static_cast<time_t>(millis_total / 1000);
  int millis = static_cast<int>(millis_total % 1000);
  struct tm tm;
  gmtime_r(&whole, &tm);
  char buf[64];
  snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
           tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, millis);
  return buf;
}

namespace {

ordered_json Timestamp(int64_t seconds, int64_t microseconds) {
  ordered_json t;
  t["seconds"] = seconds;
  t["microseconds"] = microseconds;
  return t;
}

const char* EventName(backup::EventType type) {
  switch (type) {
    case backup::EventType::kJobStatusChange:
      return "JOB_STATUS_CHANGE";
    case backup::EventType::kBlockJobCompleted:
      return "BLOCK_JOB_COMPLETED";
    case backup::EventType::kBlockJobCancelled:
      return "BLOCK_JOB_CANCELLED";
    case backup::EventType::kBlockJobError:
      return "BLOCK_JOB_ERROR";
    case backup::EventType::kBlockJobPending:
      return "BLOCK_JOB_PENDING";
  }
  return "UNKNOWN";
}

std::string Line(const ordered_json& j) { return ToQmpText(j) + "\n"; }

}  // namespace

std::string RenderJobFile(const backup::JobInfo& info) {
  ordered_json j = BlockJobInfoJson(info);
  j["drive"] = info.drive;
  j["target"] = info.target;
  j["sync"] = backup::ToString(info.sync);
  // Whole bytes and whole seconds: fractions are noise for these estimates.
  j["bytes-per-second"] = static_cast<uint64_t>(std::llround(std::max(0.0, info.bytes_per_second)));
  if (info.eta_seconds && std::isfinite(*info.eta_seconds)) {
    j["eta-seconds"] = static_cast<uint64_t>(std::ceil(std::max(0.0, *info.eta_seconds)));
  } else {
    j["eta-seconds"] = nullptr;
  }
  j["cbw-bytes"] = info.cbw_bytes;
  j["skipped-bytes"] = info.skipped_bytes;
  j["started"] = Rfc3339(info.started);
  if (info.finished) {
    j["finished"] = Rfc3339(*info.finished);
  } else {
    j["finished"] = nullptr;
  }
  if (info.result != backup::JobResult::kNone) j["result"] = backup::ToString(info.result);
  return Line(j);
}

std::string RenderEvent(const backup::Event& event) {
  ordered_json data;
  switch (event.type) {
    case backup::EventType::kJobStatusChange:
      data["id"] = event.job_id;
      data["status"] = backup::ToString(event.status);
      break;
    case backup::EventType::kBlockJobCompleted:
    case backup::EventType::kBlockJobCancelled:
      data["type"] = "backup";
      data["device"] = event.job_id;
      data["len"] = event.len;
      data["offset"] = event.offset;
      data["speed"] = event.speed;
      if (event.type == backup::EventType::kBlockJobCompleted && event.error) {
        data["error"] = *event.error;
      }
      break;
    case backup::EventType::kBlockJobError:
      data["device"] = event.job_id;
      data["operation"] = event.is_read ? "read" : "write";
      data["action"] = event.action;
      break;
    case backup::EventType::kBlockJobPending:
      data["type"] = "backup";
      data["id"] = event.job_id;
      break;
  }
  ordered_json j;
  j["event"] = EventName(event.type);
  j["data"] = std::move(data);
  j["timestamp"] = Timestamp(event.seconds, event.microseconds);
  return Line(j);
}

std::string RenderEventsDropped(uint64_t count) {
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  ordered_json data;
  data["count"] = count;
  ordered_json j;
  j["event"] = "EVENTS_DROPPED";
  j["data"] = std::move(data);
  j["timestamp"] = Timestamp(now.tv_sec, now.tv_nsec / 1000);
  return Line(j);
}

}  // namespace cbw::control
