// RenderMetrics: the Prometheus text format of MOUNTPOINT/metrics. (A real
// Prometheus parser reads the daemon's file in tests/fs/metrics_test.py.)

#include "control/metrics.h"

#include <gtest/gtest.h>

#include <map>
#include <sstream>
#include <string>

namespace cbw::control {
namespace {

// "name{labels}" -> value, for every sample line.
std::map<std::string, std::string> Samples(const std::string& text) {
  std::map<std::string, std::string> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    size_t sp = line.rfind(' ');
    out[line.substr(0, sp)] = line.substr(sp + 1);
  }
  return out;
}

DriveMetrics Drive(const std::string& name) {
  DriveMetrics d;
  d.name = name;
  d.size = 1 << 20;
  d.stats.writes = 7;
  d.stats.write_errors = 1;
  d.stats.write_bytes = 6 * 4096;
  d.stats.cbw_copies = 2;
  d.stats.cbw_bytes = 131072;
  d.stats.latency_buckets[0] = 3;      // <= 10 us
  d.stats.latency_buckets[6] = 2;      // <= 1 ms
  d.stats.latency_buckets.back() = 2;  // > 30 s
  d.stats.latency_sum_ns = 61'000'000'000;
  return d;
}

TEST(MetricsTest, DriveCountersAndACumulativeHistogram) {
  std::string text = RenderMetrics({Drive("drive0")}, {});
  auto s = Samples(text);
  EXPECT_EQ(s["cbwfs_drive_writes_total{drive=\"drive0\"}"], "7");
  EXPECT_EQ(s["cbwfs_drive_write_errors_total{drive=\"drive0\"}"], "1");
  EXPECT_EQ(s["cbwfs_drive_written_bytes_total{drive=\"drive0\"}"], "24576");
  EXPECT_EQ(s["cbwfs_drive_cbw_copies_total{drive=\"drive0\"}"], "2");
  EXPECT_EQ(s["cbwfs_drive_cbw_bytes_total{drive=\"drive0\"}"], "131072");
  EXPECT_EQ(s["cbwfs_drive_size_bytes{drive=\"drive0\"}"], "1048576");
  const std::string b = "cbwfs_drive_write_latency_seconds_bucket{drive=\"drive0\",le=";
  EXPECT_EQ(s[b + "\"1e-05\"}"], "3");
  EXPECT_EQ(s[b + "\"0.0005\"}"], "3");
  EXPECT_EQ(s[b + "\"0.001\"}"], "5");
  EXPECT_EQ(s[b + "\"30\"}"], "5");
  EXPECT_EQ(s[b + "\"+Inf\"}"], "7");
  EXPECT_EQ(s["cbwfs_drive_write_latency_seconds_count{drive=\"drive0\"}"], "7");
  EXPECT_EQ(s["cbwfs_drive_write_latency_seconds_sum{drive=\"drive0\"}"], "61");
  EXPECT_NE(text.find("# TYPE cbwfs_drive_writes_total counter\n"), std::string::npos);
  EXPECT_NE(text.find("# TYPE cbwfs_drive_write_latency_seconds histogram\n"), std::string::npos);
  EXPECT_EQ(text.back(), '\n');
}

TEST(MetricsTest, JobsAsGaugesAndEnumSets) {
  backup::JobInfo running;
  running.id = "nightly";
  running.drive = "drive0";
  running.status = backup::JobStatus::kRunning;
  running.len = 1000;
  running.offset = 250;
  running.bytes_per_second = 1234.6;
  running.started = 1700000000.25;
  backup::JobInfo done = running;
  done.id = "old";
  done.status = backup::JobStatus::kConcluded;
  done.result = backup::JobResult::kFailed;
  done.finished = 1700000100.5;
  auto s = Samples(RenderMetrics({Drive("drive0")}, {running, done}));
  const std::string n = "{job=\"nightly\",drive=\"drive0\"";
  EXPECT_EQ(s["cbwfs_job_length_bytes" + n + "}"], "1000");
  EXPECT_EQ(s["cbwfs_job_offset_bytes" + n + "}"], "250");
  EXPECT_EQ(s["cbwfs_job_rate_bytes_per_second" + n + "}"], "1235");
  EXPECT_EQ(s["cbwfs_job_started_timestamp_seconds" + n + "}"], "1700000000.250");
  EXPECT_EQ(s.count("cbwfs_job_finished_timestamp_seconds" + n + "}"), 0u);
  EXPECT_EQ(s["cbwfs_job_state" + n + ",state=\"running\"}"], "1");
  EXPECT_EQ(s["cbwfs_job_state" + n + ",state=\"concluded\"}"], "0");
  EXPECT_EQ(s["cbwfs_job_result" + n + ",result=\"failed\"}"], "0");
  const std::string o = "{job=\"old\",drive=\"drive0\"";
  EXPECT_EQ(s["cbwfs_job_state" + o + ",state=\"concluded\"}"], "1");
  EXPECT_EQ(s["cbwfs_job_state" + o + ",state=\"running\"}"], "0");
  EXPECT_EQ(s["cbwfs_job_result" + o + ",result=\"failed\"}"], "1");
  EXPECT_EQ(s["cbwfs_job_finished_timestamp_seconds" + o + "}"], "1700000100.500");
}

TEST(MetricsTest, LabelValuesAreEscaped) {
  backup::JobInfo j;
  j.id = "a\"b\\c\nd";
  j.drive = "drive0";
  std::string text = RenderMetrics({}, {j});
  EXPECT_NE(text.find("job=\"a\\\"b\\\\c\\nd\""), std::string::npos) << text;
}

}  // namespace
}  // namespace cbw::control
