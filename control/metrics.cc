#include "control/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string_view>

namespace cbw::control {
namespace {

// Label values may hold any UTF-8; the format escapes these three.
std::string Escape(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string Uint(uint64_t v) { return std::to_string(v); }

// Shortest round-trip-safe form is not needed: %.9g keeps bucket bounds
// ("2.5e-05") and rates exact enough and readable.
std::string Float(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

// Seconds since the epoch with milliseconds (%.9g would round them away).
std::string Timestamp(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3f", v);
  return buf;
}

class Writer {
 public:
  void Family(std::string_view name, std::string_view type, std::string_view help) {
    out_ += "# HELP ";
    out_ += name;
    out_ += ' ';
    out_ += help;
    out_ += "\n# TYPE ";
    out_ += name;
    out_ += ' ';
    out_ += type;
    out_ += '\n';
  }
  // `labels` is already rendered: `drive="d0",le="1"`.
  void Sample(std::string_view name, const std::string& labels, const std::string& value) {
    out_ += name;
    if (!labels.empty()) {
      out_ += '{';
      out_ += labels;
      out_ += '}';
    }
    out_ += ' ';
    out_ += value;
    out_ += '\n';
  }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

std::string DriveLabel(const DriveMetrics& d) { return "drive=\"" + Escape(d.name) + "\""; }

std::string JobLabels(const backup::JobInfo& j) {
  return "job=\"" + Escape(j.id) + "\",drive=\"" + Escape(j.drive) + "\"";
}

constexpr backup::JobStatus kStates[] = {
    backup::JobStatus::kCreated, backup::JobStatus::kRunning,  backup::JobStatus::kPaused,
    backup::JobStatus::kReady,   backup::JobStatus::kStandby,  backup::JobStatus::kWaiting,
    backup::JobStatus::kPending, backup::JobStatus::kAborting, backup::JobStatus::kConcluded,
    backup::JobStatus::kNull,
};

constexpr backup::JobResult kResults[] = {
    backup::JobResult::kSuccess,
    backup::JobResult::kFailed,
    backup::JobResult::kCancelled,
};

}  // namespace

std::string RenderMetrics(const std::vector<DriveMetrics>& drives,
                          const std::vector<backup::JobInfo>& jobs) {
  Writer w;
  w.Family("cbwfs_build_info", "gauge", "cbwfs version (always 1).");
  w.Sample("cbwfs_build_info", "version=\"" + Escape(CBWFS_VERSION) + "\"", "1");

  w.Family("cbwfs_drive_size_bytes", "gauge", "Size of the drive.");
  for (const auto& d : drives) w.Sample("cbwfs_drive_size_bytes", DriveLabel(d), Uint(d.size));

  struct Counter {
    const char* name;
    const char* help;
    uint64_t backup::DriveStats::*field;
  };
  const Counter counters[] = {
      {"cbwfs_drive_writes_total", "write() requests on the drive that completed.",
       &backup::DriveStats::writes},
      {"cbwfs_drive_write_errors_total", "write() requests on the drive that failed.",
       &backup::DriveStats::write_errors},
      {"cbwfs_drive_written_bytes_total", "Bytes written to the drive by successful writes.",
       &backup::DriveStats::write_bytes},
      {"cbwfs_drive_cbw_copies_total",
       "Copy-before-write copies made on the drive's write path by backup jobs.",
       &backup::DriveStats::cbw_copies},
      {"cbwfs_drive_cbw_bytes_total", "Bytes preserved by copy-before-write copies.",
       &backup::DriveStats::cbw_bytes},
  };
  for (const Counter& c : counters) {
    w.Family(c.name, "counter", c.help);
    for (const auto& d : drives) w.Sample(c.name, DriveLabel(d), Uint(d.stats.*c.field));
  }

  const char* hist = "cbwfs_drive_write_latency_seconds";
  w.Family(hist, "histogram",
           "Time from a write's arrival at the drive to its completion (copy-before-write "
           "waits included).");
  for (const auto& d : drives) {
    // The +Inf bucket and the count are the same sum, so they always agree
    // even though the counters were read one by one.
    uint64_t cumulative = 0;
    const std::string label = DriveLabel(d);
    for (size_t i = 0; i < backup::kWriteLatencyBounds.size(); ++i) {
      cumulative += d.stats.latency_buckets[i];
      w.Sample("cbwfs_drive_write_latency_seconds_bucket",
               label + ",le=\"" + Float(backup::kWriteLatencyBounds[i]) + "\"", Uint(cumulative));
    }
    cumulative += d.stats.latency_buckets.back();
    w.Sample("cbwfs_drive_write_latency_seconds_bucket", label + ",le=\"+Inf\"", Uint(cumulative));
    w.Sample("cbwfs_drive_write_latency_seconds_sum", label,
             Float(static_cast<double>(d.stats.latency_sum_ns) * 1e-9));
    w.Sample("cbwfs_drive_write_latency_seconds_count", label, Uint(cumulative));
  }

  w.Family("cbwfs_job_length_bytes", "gauge", "Bytes the job has to copy (QMP len).");
  for (const auto& j : jobs) w.Sample("cbwfs_job_length_bytes", JobLabels(j), Uint(j.len));
  w.Family("cbwfs_job_offset_bytes", "gauge", "Bytes the job has done so far (QMP offset).");
  for (const auto& j : jobs) w.Sample("cbwfs_job_offset_bytes", JobLabels(j), Uint(j.offset));
  w.Family("cbwfs_job_rate_bytes_per_second", "gauge",
           "Copy rate over the recent past, copy-before-write copies included.");
  for (const auto& j : jobs) {
    w.Sample("cbwfs_job_rate_bytes_per_second", JobLabels(j),
             Uint(static_cast<uint64_t>(std::llround(std::max(0.0, j.bytes_per_second)))));
  }
  w.Family("cbwfs_job_started_timestamp_seconds", "gauge", "When the job started (Unix time).");
  for (const auto& j : jobs) {
    w.Sample("cbwfs_job_started_timestamp_seconds", JobLabels(j), Timestamp(j.started));
  }
  w.Family("cbwfs_job_finished_timestamp_seconds", "gauge",
           "When the job ended (Unix time); absent while it runs.");
  for (const auto& j : jobs) {
    if (j.finished) {
      w.Sample("cbwfs_job_finished_timestamp_seconds", JobLabels(j), Timestamp(*j.finished));
    }
  }
  w.Family("cbwfs_job_state", "gauge", "The job's QMP status: 1 for the current one.");
  for (const auto& j : jobs) {
    const std::string labels = JobLabels(j);
    for (backup::JobStatus s : kStates) {
      w.Sample("cbwfs_job_state", labels + ",state=\"" + backup::ToString(s) + "\"",
               j.status == s ? "1" : "0");
    }
  }
  w.Family("cbwfs_job_result", "gauge",
           "How the job ended: 1 for its result, all 0 while it runs.");
  for (const auto& j : jobs) {
    const std::string labels = JobLabels(j);
    for (backup::JobResult r : kResults) {
      w.Sample("cbwfs_job_result", labels + ",result=\"" + backup::ToString(r) + "\"",
               j.result == r ? "1" : "0");
    }
  }
  return w.Take();
}

}  // namespace cbw::control
