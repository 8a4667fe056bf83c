#pragma once

#include <string>
#include <vector>

#include "backup/drive.h"
#include "backup/job_types.h"

namespace cbw::control {

// One drive as MOUNTPOINT/metrics shows it.
struct DriveMetrics {
  std::string name;
  uint64_t size = 0;
  backup::DriveStats stats;
};

// MOUNTPOINT/metrics (SPEC 8): the Prometheus text exposition format
// (version 0.0.4), which node_exporter's textfile collector and Prometheus
// itself read. Per drive (label `drive`): counters of writes, write errors,
// bytes written, CBW copies and CBW bytes, and a write latency histogram; per
// job (labels `job`, `drive`): gauges of length, offset, rate, start and end
// times, and its state and result as enum-style sets (one series per value,
// 1 for the current one). Families are sorted as listed here, samples by
// drive and job order as given. Ends with a newline.
//
// Pure function, thread-safe.
std::string RenderMetrics(const std::vector<DriveMetrics>& drives,
                          const std::vector<backup::JobInfo>& jobs);

}  // namespace cbw::control
