#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace cbw::backup {

// Plain value types shared by the engine and its callers (control/, fs/).

enum class SyncMode { kFull, kTop, kNone, kIncremental, kBitmap };
enum class TargetMode { kAbsolutePaths, kExisting };
enum class ErrorPolicy { kReport, kIgnore, kStop, kEnospc };
enum class CbwErrorPolicy { kBreakSnapshot, kBreakGuestWrite };
enum class CompletionMode { kIndividual, kGrouped };

// QEMU's JobStatus, in QEMU's order.
enum class JobStatus {
  kUndefined,
  kCreated,
  kRunning,
  kPaused,
  kReady,
  kStandby,
  kWaiting,
  kPending,
  kAborting,
  kConcluded,
  kNull,
};

// QEMU's JobVerb.
enum class JobVerb { kCancel, kPause, kResume, kSetSpeed, kComplete, kFinalize, kDismiss, kChange };

enum class IoStatus { kOk, kFailed, kNoSpace };
enum class JobResult { kNone, kSuccess, kFailed, kCancelled };

// QMP spellings: "running", "set-speed", "break-snapshot", ...
const char* ToString(SyncMode v);
const char* ToString(JobStatus v);
const char* ToString(JobVerb v);
const char* ToString(IoStatus v);
const char* ToString(JobResult v);
const char* ToString(ErrorPolicy v);
const char* ToString(CbwErrorPolicy v);

// QEMU's job state tables: JobSTT (may a job go from `from` to `to`?) and
// JobVerbTable (does a job in state `s` accept `verb`?).
bool TransitionAllowed(JobStatus from, JobStatus to);
bool VerbAllowed(JobVerb verb, JobStatus s);

// Arguments of one drive-backup, already validated for type and shape by
// control/. The engine validates what needs the world (drive, target, ids).
struct BackupOptions {
  std::string job_id;  // empty: defaults to `device`
  std::string device;  // drive name
  std::string target;  // path
  TargetMode mode = TargetMode::kAbsolutePaths;
  SyncMode sync = SyncMode::kFull;
  uint64_t speed = 0;  // bytes/s, 0 = unlimited
  ErrorPolicy on_source_error = ErrorPolicy::kReport;
  ErrorPolicy on_target_error = ErrorPolicy::kReport;
  CbwErrorPolicy on_cbw_error = CbwErrorPolicy::kBreakSnapshot;
  bool auto_finalize = true;
  bool auto_dismiss = true;
  // `format` as given: "raw" or "qcow2" (control/ refuses others). Unset:
  // raw, except that with mode existing the target's magic is probed (a
  // qcow2 image is written as qcow2, other image formats are refused).
  std::optional<std::string> format;
  // A dirty bitmap of the drive and what to do with it (SPEC 7), as given;
  // the registry checks them (BitmapCatalog::UseForBackup).
  std::optional<std::string> bitmap;
  std::optional<std::string> bitmap_mode;
};

// A consistent copy of one job's state (SPEC section 4), taken under the
// job's lock. Times are seconds since the Unix epoch (UTC), with fractions.
struct JobInfo {
  std::string id;
  std::string drive;
  std::string target;
  SyncMode sync = SyncMode::kFull;
  JobStatus status = JobStatus::kCreated;
  uint64_t len = 0;
  uint64_t offset = 0;
  bool busy = false;
  bool paused = false;
  uint64_t speed = 0;
  IoStatus io_status = IoStatus::kOk;
  bool auto_finalize = true;
  bool auto_dismiss = true;
  std::optional<std::string> error;   // strerror text (or message) when failed
  double bytes_per_second = 0;        // measured over the recent past
  std::optional<double> eta_seconds;  // unknown: nullopt
  uint64_t cbw_bytes = 0;             // copied on the drive write path
  uint64_t skipped_bytes = 0;         // holes and zeros not copied
  double started = 0;
  std::optional<double> finished;
  JobResult result = JobResult::kNone;  // set once concluded
  // True while QMP lists it (query-block-jobs / query-jobs): not yet dismissed.
  bool listed = true;
};

}  // namespace cbw::backup
