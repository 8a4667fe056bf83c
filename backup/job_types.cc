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
    case SyncMode::kIncremental:
      return "incremental";
    case SyncMode::kBitmap:
      return "bitmap";
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

bool TransitionAllowed(JobStatus from, JobStatus to) {
  using S = JobStatus;
  switch (from) {
    case S::kUndefined:
      return to == S::kCreated;
    case S::kCreated:
      return to == S::kRunning || to == S::kAborting || to == S::kNull;
    case S::kRunning:
      return to == S::kPaused || to == S::kReady || to == S::kWaiting || to == S::kAborting;
    case S::kPaused:
      return to == S::kRunning;
    case S::kReady:
      return to == S::kStandby || to == S::kWaiting || to == S::kAborting;
    case S::kStandby:
      return to == S::kReady;
    case S::kWaiting:
      return to == S::kPending || to == S::kAborting;
    case S::kPending:
      return to == S::kAborting || to == S::kConcluded;
    case S::kAborting:
      return to == S::kAborting || to == S::kConcluded;
    case S::kConcluded:
      return to == S::kNull;
    case S::kNull:
      return false;
  }
  return false;
}

bool VerbAllowed(JobVerb verb, JobStatus s) {
  using S = JobStatus;
  switch (verb) {
    case JobVerb::kCancel:
      return s == S::kCreated || s == S::kRunning || s == S::kPaused || s == S::kReady ||
             s == S::kStandby || s == S::kWaiting || s == S::kPending;
    case JobVerb::kPause:
    case JobVerb::kResume:
    case JobVerb::kSetSpeed:
    case JobVerb::kChange:
      return s == S::kCreated || s == S::kRunning || s == S::kPaused || s == S::kReady ||
             s == S::kStandby;
    case JobVerb::kComplete:
      return s == S::kReady || s == S::kStandby;
    case JobVerb::kFinalize:
      return s == S::kPending;
    case JobVerb::kDismiss:
      return s == S::kConcluded;
  }
  return false;
}

}  // namespace cbw::backup
