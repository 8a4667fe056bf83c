#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cbwctl/outcome.h"

namespace cbw::ctl {

// Job records (MOUNTPOINT/jobs/<id>, SPEC 4) read into a plain struct, and
// everything cbwctl prints about them: pure functions, thread-safe.

struct JobView {
  std::string id;
  std::string drive;
  std::string target;
  std::string sync;
  std::string status;
  std::string result;  // "" while the job has not ended
  std::string error;
  uint64_t len = 0;
  uint64_t offset = 0;
  uint64_t speed = 0;             // limit, 0 = none
  uint64_t bytes_per_second = 0;  // measured
  std::optional<uint64_t> eta_seconds;
  uint64_t cbw_bytes = 0;
  uint64_t skipped_bytes = 0;
  std::string started;   // RFC 3339
  std::string finished;  // RFC 3339, "" while running
  std::string raw;       // the record's text, for --json

  bool ended() const { return !result.empty(); }
};

// Parses one record; missing fields keep their defaults. Fails (kExitMount)
// when the text is not a JSON object.
Result<JobView> ParseRecord(std::string_view text);

// "0 B", "512 B", "1.5 KiB", "8.0 MiB", "1.2 TiB".
std::string FormatBytes(uint64_t bytes);
// "2.0 MiB/s".
std::string FormatRate(uint64_t bytes_per_second);
// "0:05", "12:34", "1:02:03"; "--:--" when unknown.
std::string FormatEta(std::optional<uint64_t> seconds);
// Done share with one decimal, never rounded up to 100.0% before the end:
// "45.3%".
std::string FormatPercent(uint64_t done, uint64_t total, bool ended);

// Seconds since the epoch of an RFC 3339 UTC time ("2026-11-29T19:08:18.643Z").
std::optional<double> ParseRfc3339(std::string_view text);

// The terminal line: "ID [=====>    ]  45.3%  3.6 MiB/8.0 MiB  2.0 MiB/s  ETA 0:02",
// fitted to `width` columns minus one (so it never wraps, which would break
// redrawing in place); the bar shrinks first, then goes. Once the job has
// ended the ETA is replaced by its result. No "\r" or newline.
std::string ProgressBar(const JobView& job, int width);

// The plain line for logs and pipes:
// "ID: running 45.3% 3.6 MiB/8.0 MiB 2.0 MiB/s ETA 0:02".
std::string ProgressLine(const JobView& job);

// What is said when a waited-for job has ended, without newline:
// "ID: success, 8.0 MiB in 4.0 s (2.0 MiB/s)", "job ID failed: ERROR",
// "job ID was cancelled at 3.6 MiB of 8.0 MiB".
std::string OutcomeLine(const JobView& job);
// The exit code for an ended job's result (kExitOk for "success").
int ExitCodeForResult(const std::string& result);

// `status`: a header and one row per job, columns aligned.
std::string StatusTable(const std::vector<JobView>& jobs);
// `status JOB`: one "field: value" line per field.
std::string StatusDetail(const JobView& job);

// Decides when a waiter prints: on a terminal at most every `tty_interval`
// (a redraw in place), otherwise a line every `line_interval`, on a status
// change, and at the end. Not thread-safe; one per wait.
class ProgressPrinter {
 public:
  ProgressPrinter(bool tty, double tty_interval = 0.25, double line_interval = 5.0)
      : tty_(tty), tty_interval_(tty_interval), line_interval_(line_interval) {}

  // The bytes to write for `job` seen at `now` (seconds, any monotonic
  // origin), or "" when nothing is due. A terminal gets "\r" + bar + erase to
  // end of line, and a final newline once the job has ended (the last bar is
  // kept on screen). `width` is the terminal's.
  std::string Update(const JobView& job, double now, int width);
  // What ends an unfinished bar when waiting stops early (Ctrl-C): "\n" on a
  // terminal after a bar was drawn, else "".
  std::string Abandon();
  // Seconds until the next refresh is due (how long a waiter may sleep).
  double interval() const { return tty_ ? tty_interval_ : line_interval_; }

 private:
  bool tty_;
  double tty_interval_;
  double line_interval_;
  bool drawn_ = false;
  bool finished_ = false;
  double last_ = 0;
  std::string last_status_;
};

}  // namespace cbw::ctl
