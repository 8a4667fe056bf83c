#include "control/render.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

namespace cbw::control {
namespace {

backup::JobInfo SampleJob() {
  backup::JobInfo info;
  info.id = "job0";
  info.drive = "drive0";
  info.target = "/backups/drive0.img";
  info.sync = backup::SyncMode::kFull;
  info.status = backup::JobStatus::kRunning;
  info.len = 8388608;
  info.offset = 1048576;
  info.busy = true;
  info.paused = false;
  info.speed = 0;
  info.io_status = backup::IoStatus::kOk;
  info.bytes_per_second = 1048575.6;
  info.eta_seconds = 6.2;
  info.cbw_bytes = 65536;
  info.skipped_bytes = 131072;
  info.started = 1795703242.1234;  // 2026-11-26T14:27:22.123Z
  return info;
}

TEST(RenderJobFile, RunningJob) {
  EXPECT_EQ(RenderJobFile(SampleJob()),
            R"({"type": "backup", "device": "job0", "len": 8388608, "offset": 1048576, )"
            R"("busy": true, "paused": false, "speed": 0, "io-status": "ok", "ready": false, )"
            R"("status": "running", "auto-finalize": true, "auto-dismiss": true, )"
            R"("drive": "drive0", "target": "/backups/drive0.img", "sync": "full", )"
            R"("bytes-per-second": 1048576, "eta-seconds": 7, "cbw-bytes": 65536, )"
            R"("skipped-bytes": 131072, "started": "2026-11-26T14:27:22.123Z", "finished": null})"
            "\n");
}

TEST(RenderJobFile, FailedJobHasErrorFinishedAndResult) {
  backup::JobInfo info = SampleJob();
  info.status = backup::JobStatus::kConcluded;
  info.busy = false;
  info.io_status = backup::IoStatus::kFailed;
  info.error = "Input/output error";
  info.eta_seconds.reset();
  info.bytes_per_second = 0;
  info.finished = 1795703250.9996;  // rounds up into the next second
  info.result = backup::JobResult::kFailed;
  info.auto_dismiss = false;
  std::string line = RenderJobFile(info);
  ASSERT_FALSE(line.empty());
  EXPECT_EQ(line.back(), '\n');
  auto j = nlohmann::ordered_json::parse(line);
  EXPECT_EQ(j["error"], "Input/output error");
  EXPECT_EQ(j["io-status"], "failed");
  EXPECT_EQ(j["status"], "concluded");
  EXPECT_EQ(j["auto-dismiss"], false);
  EXPECT_TRUE(j["eta-seconds"].is_null());
  EXPECT_EQ(j["finished"], "2026-11-26T14:27:31.000Z");
  EXPECT_EQ(j["result"], "failed");
  // The BlockJobInfo part keeps QEMU's order, "error" right after auto-dismiss.
  std::vector<std::string> keys;
  for (const auto& [k, v] : j.items()) keys.push_back(k);
  std::vector<std::string> want = {"type",
                                   "device",
                                   "len",
                                   "offset",
                                   "busy",
                                   "paused",
                                   "speed",
                                   "io-status",
                                   "ready",
                                   "status",
                                   "auto-finalize",
                                   "auto-dismiss",
                                   "error",
                                   "drive",
                                   "target",
                                   "sync",
                                   "bytes-per-second",
                                   "eta-seconds",
                                   "cbw-bytes",
                                   "skipped-bytes",
                                   "started",
                                   "finished",
                                   "result"};
  EXPECT_EQ(keys, want);
}

TEST(RenderJobFile, ResultOnlyOnceConcluded) {
  backup::JobInfo info = SampleJob();
  EXPECT_EQ(nlohmann::json::parse(RenderJobFile(info)).count("result"), 0u);
  info.result = backup::JobResult::kCancelled;
  EXPECT_EQ(nlohmann::json::parse(RenderJobFile(info))["result"], "cancelled");
  info.result = backup::JobResult::kSuccess;
  EXPECT_EQ(nlohmann::json::parse(RenderJobFile(info))["result"], "success");
}

TEST(Rfc3339, Formats) {
  EXPECT_EQ(Rfc3339(0), "1970-01-01T00:00:00.000Z");
  EXPECT_EQ(Rfc3339(1795703242.5), "2026-11-26T14:27:22.500Z");
  EXPECT_EQ(Rfc3339(951782400.0006), "2000-02-29T00:00:00.001Z");
}

TEST(QmpLists, BlockJobInfoAndJobInfo) {
  backup::JobInfo info = SampleJob();
  info.error = "No space left on device";
  EXPECT_EQ(BlockJobInfoJson(info).dump(),
            R"({"type":"backup","device":"job0","len":8388608,"offset":1048576,"busy":true,)"
            R"("paused":false,"speed":0,"io-status":"ok","ready":false,"status":"running",)"
            R"("auto-finalize":true,"auto-dismiss":true,"error":"No space left on device"})");
  EXPECT_EQ(JobInfoJson(info).dump(),
            R"({"id":"job0","type":"backup","status":"running","current-progress":1048576,)"
            R"("total-progress":8388608,"error":"No space left on device"})");
}

backup::Event MakeEvent(backup::EventType type) {
  backup::Event e;
  e.type = type;
  e.seconds = 1795703179;
  e.microseconds = 524809;
  e.job_id = "job0";
  return e;
}

TEST(RenderEvent, JobStatusChange) {
  backup::Event e = MakeEvent(backup::EventType::kJobStatusChange);
  e.status = backup::JobStatus::kConcluded;
  EXPECT_EQ(RenderEvent(e),
            R"({"event": "JOB_STATUS_CHANGE", "data": {"id": "job0", "status": "concluded"}, )"
            R"("timestamp": {"seconds": 1795703179, "microseconds": 524809}})"
            "\n");
}

TEST(RenderEvent, CompletedCancelled) {
  backup::Event e = MakeEvent(backup::EventType::kBlockJobCompleted);
  e.len = 1048576;
  e.offset = 1048576;
  e.speed = 100;
  EXPECT_EQ(RenderEvent(e),
            R"({"event": "BLOCK_JOB_COMPLETED", "data": {"type": "backup", "device": "job0", )"
            R"("len": 1048576, "offset": 1048576, "speed": 100}, )"
            R"("timestamp": {"seconds": 1795703179, "microseconds": 524809}})"
            "\n");
  e.error = "Input/output error";
  e.offset = 65536;
  EXPECT_EQ(RenderEvent(e),
            R"({"event": "BLOCK_JOB_COMPLETED", "data": {"type": "backup", "device": "job0", )"
            R"("len": 1048576, "offset": 65536, "speed": 100, "error": "Input/output error"}, )"
            R"("timestamp": {"seconds": 1795703179, "microseconds": 524809}})"
            "\n");
  e.type = backup::EventType::kBlockJobCancelled;
  EXPECT_EQ(RenderEvent(e),
            R"({"event": "BLOCK_JOB_CANCELLED", "data": {"type": "backup", "device": "job0", )"
            R"("len": 1048576, "offset": 65536, "speed": 100}, )"
            R"("timestamp": {"seconds": 1795703179, "microseconds": 524809}})"
            "\n");
}

TEST(RenderEvent, ErrorAndPending) {
  backup::Event e = MakeEvent(backup::EventType::kBlockJobError);
  e.is_read = true;
  e.action = "stop";
  EXPECT_EQ(RenderEvent(e),
            R"({"event": "BLOCK_JOB_ERROR", "data": {"device": "job0", "operation": "read", )"
            R"("action": "stop"}, "timestamp": {"seconds": 1795703179, "microseconds": 524809}})"
            "\n");
  e.is_read = false;
  e.action = "report";
  EXPECT_NE(RenderEvent(e).find(R"("operation": "write", "action": "report")"), std::string::npos);
  e = MakeEvent(backup::EventType::kBlockJobPending);
  EXPECT_EQ(RenderEvent(e),
            R"({"event": "BLOCK_JOB_PENDING", "data": {"type": "backup", "id": "job0"}, )"
            R"("timestamp": {"seconds": 1795703179, "microseconds": 524809}})"
            "\n");
}

TEST(RenderEventsDropped, Shape) {
  std::string line = RenderEventsDropped(42);
  ASSERT_EQ(line.back(), '\n');
  auto j = nlohmann::ordered_json::parse(line);
  EXPECT_EQ(j["event"], "EVENTS_DROPPED");
  EXPECT_EQ(j["data"], nlohmann::ordered_json::parse(R"({"count": 42})"));
  EXPECT_GT(j["timestamp"]["seconds"].get<int64_t>(), 1700000000);
  EXPECT_LT(j["timestamp"]["microseconds"].get<int64_t>(), 1000000);
  EXPECT_EQ(line.rfind(R"({"event": "EVENTS_DROPPED", "data": {"count": 42}, "timestamp": {)", 0),
            0u);
}

}  // namespace
}  // namespace cbw::control
