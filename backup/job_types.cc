#include "backup/job_types.h"

namespace cbw::backup {

const char* ToString(SyncMode v) {
  switch (v) {
    case SyncMode::kFull:
      return "full";
    case SyncMode::kTop:
      return "top";
    case SyncMode::kNone:
      return "none";
  }
  return "full";
}

const char* ToString(JobStatus v) {
  switch (v) {
    case JobStatus::kUndefined:
      return "undefined";
    case JobStatus::kCreated:
      return "created";
    case JobStatus::kRunning:
      return "running";
    case JobStatus::kPaused:
      return "paused";
    case JobStatus::kReady:
      return "ready";
    case JobStatus::kStandby:
      return "standby";
    case JobStatus::kWaiting:
      return "waiting";
    case JobStatus::kPending:
      return "pending";
    case JobStatus::kAborting:
      return "aborting";
    case JobStatus::kConcluded:
      return "concluded";
    case JobStatus::kNull:
      return "null";
  }
  return "undefined";
}

const char* ToString(JobVerb v) {
  switch (v) {
    case JobVerb::kCancel:
      return "cancel";
    case JobVerb::kPause:
      return "pause";
    case JobVerb::kResume:
      return "resume";
    case JobVerb::kSetSpeed:
      return "set-speed";
    case JobVerb::kComplete:
      return "complete";
    case JobVerb::kFinalize:
      return "finalize";
    case JobVerb::kDismiss:
      return "dismiss";
    case JobVerb::kChange:
      return "change";
  }
  return "cancel";
}

const char* ToString(IoStatus v) {
  switch (v) {
    case IoStatus::kOk:
      return "ok";
    case IoStatus::kFailed:
      return "failed";
    case IoStatus::kNoSpace:
      return "nospace";
  }
  return "ok";
}

const char* ToString(JobResult v) {
  switch (v) {
    case JobResult::kNone:
      return "none";
    case JobResult::kSuccess:
      return "success";
    case JobResult::kFailed:
      return "failed";
    case JobResult::kCancelled:
      return "cancelled";
  }
  return "none";
}

const char* ToString(ErrorPolicy v) {
  switch (v) {
    case ErrorPolicy::kReport:
      return "report";
    case ErrorPolicy::kIgnore:
      return "ignore";
    case ErrorPolicy::kStop:
      return "stop";
    case ErrorPolicy::kEnospc:
      return "enospc";
  }
  return "report";
}

const char* ToString(CbwErrorPolicy v) {
  switch (v) {
    case CbwErrorPolicy::kBreakSnapshot:
      return "break-snapshot";
    case CbwErrorPolicy::kBreakGuestWrite:
      return "break-guest-write";
  }
  return "break-snapshot";
}

}  // namespace cbw::backup
