// The --state-dir record format: jobs/<id> files, read back strictly; and a
// registry that persists through it, across a restart.

#include "control/job_record_codec.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "backup/drive.h"
#include "backup/event_bus.h"
#include "backup/job_registry.h"
#include "backup/log.h"
#include "control/render.h"

namespace cbw::control {
namespace {

using backup::JobInfo;
using nlohmann::json;
using nlohmann::ordered_json;

const JsonJobRecordCodec kCodec;

JobInfo Everything() {
  JobInfo i;
  i.id = "job0";
  i.drive = "drive0";
  i.target = "/backups/a b\n\"c\"\\d\te\x01 \xc3\xa9t\xc3\xa9.img";
  i.sync = backup::SyncMode::kTop;
  i.status = backup::JobStatus::kConcluded;
  i.len = 8388608;
  i.offset = 1048576;
  i.busy = true;
  i.paused = true;
  i.speed = 123456789;
  i.io_status = backup::IoStatus::kNoSpace;
  i.auto_finalize = false;
  i.auto_dismiss = false;
  i.error = "No space left on device";
  i.bytes_per_second = 1048576;
  i.eta_seconds = 7;
  i.cbw_bytes = 65536;
  i.skipped_bytes = 131072;
  i.started = 1795703242.125;
  i.finished = 1795703250.5;
  i.result = backup::JobResult::kFailed;
  i.listed = false;
  return i;
}

void ExpectSame(const JobInfo& a, const JobInfo& b) {
  EXPECT_EQ(a.id, b.id);
  EXPECT_EQ(a.drive, b.drive);
  EXPECT_EQ(a.target, b.target);
  EXPECT_EQ(a.sync, b.sync);
  EXPECT_EQ(a.status, b.status);
  EXPECT_EQ(a.len, b.len);
  EXPECT_EQ(a.offset, b.offset);
  EXPECT_EQ(a.busy, b.busy);
  EXPECT_EQ(a.paused, b.paused);
  EXPECT_EQ(a.speed, b.speed);
  EXPECT_EQ(a.io_status, b.io_status);
  EXPECT_EQ(a.auto_finalize, b.auto_finalize);
  EXPECT_EQ(a.auto_dismiss, b.auto_dismiss);
  EXPECT_EQ(a.error, b.error);
  EXPECT_DOUBLE_EQ(a.bytes_per_second, b.bytes_per_second);
  EXPECT_EQ(a.eta_seconds, b.eta_seconds);
  EXPECT_EQ(a.cbw_bytes, b.cbw_bytes);
  EXPECT_EQ(a.skipped_bytes, b.skipped_bytes);
  EXPECT_DOUBLE_EQ(a.started, b.started);
  EXPECT_EQ(a.finished.has_value(), b.finished.has_value());
  if (a.finished && b.finished) {
    EXPECT_DOUBLE_EQ(*a.finished, *b.finished);
  }
  EXPECT_EQ(a.result, b.result);
  EXPECT_EQ(a.listed, b.listed);
}

TEST(JsonJobRecordCodec, EncodesTheJobsFile) {
  EXPECT_EQ(kCodec.FileSuffix(), ".json");
  JobInfo i = Everything();
  EXPECT_EQ(kCodec.Encode(i), RenderJobFile(i));
  i.error.reset();
  i.finished.reset();
  i.eta_seconds.reset();
  i.result = backup::JobResult::kNone;
  EXPECT_EQ(kCodec.Encode(i), RenderJobFile(i));
}

TEST(JsonJobRecordCodec, RoundTripsEveryField) {
  const JobInfo i = Everything();
  auto back = kCodec.Decode(kCodec.Encode(i));
  ASSERT_TRUE(back.ok()) << back.status().message();
  ExpectSame(*back, i);
}

TEST(JsonJobRecordCodec, RoundTripsUnsetOptionals) {
  JobInfo i = Everything();
  i.status = backup::JobStatus::kRunning;
  i.error.reset();
  i.eta_seconds.reset();
  i.finished.reset();
  i.result = backup::JobResult::kNone;
  std::string text = kCodec.Encode(i);
  ASSERT_EQ(json::parse(text).count("error"), 0u);
  ASSERT_EQ(json::parse(text).count("result"), 0u);
  auto back = kCodec.Decode(text);
  ASSERT_TRUE(back.ok()) << back.status().message();
  ExpectSame(*back, i);
}

TEST(JsonJobRecordCodec, ListedIsNotInTheFileAndComesBackFalse) {
  JobInfo i = Everything();
  i.listed = true;
  std::string text = kCodec.Encode(i);
  EXPECT_EQ(json::parse(text).count("listed"), 0u);
  auto back = kCodec.Decode(text);
  ASSERT_TRUE(back.ok());
  EXPECT_FALSE(back->listed);
}

TEST(JsonJobRecordCodec, RoundTripsEveryEnumValue) {
  JobInfo i = Everything();
  for (auto v : {backup::SyncMode::kFull, backup::SyncMode::kTop, backup::SyncMode::kNone}) {
    i.sync = v;
    auto back = kCodec.Decode(kCodec.Encode(i));
    ASSERT_TRUE(back.ok()) << back.status().message();
    EXPECT_EQ(back->sync, v) << backup::ToString(v);
  }
  for (int s = 0; s <= static_cast<int>(backup::JobStatus::kNull); ++s) {
    i.status = static_cast<backup::JobStatus>(s);
    auto back = kCodec.Decode(kCodec.Encode(i));
    ASSERT_TRUE(back.ok()) << back.status().message();
    EXPECT_EQ(back->status, i.status) << backup::ToString(i.status);
  }
  for (auto v : {backup::IoStatus::kOk, backup::IoStatus::kFailed, backup::IoStatus::kNoSpace}) {
    i.io_status = v;
    auto back = kCodec.Decode(kCodec.Encode(i));
    ASSERT_TRUE(back.ok()) << back.status().message();
    EXPECT_EQ(back->io_status, v) << backup::ToString(v);
  }
  for (auto v : {backup::JobResult::kNone, backup::JobResult::kSuccess, backup::JobResult::kFailed,
                 backup::JobResult::kCancelled}) {
    i.result = v;
    auto back = kCodec.Decode(kCodec.Encode(i));
    ASSERT_TRUE(back.ok()) << back.status().message();
    EXPECT_EQ(back->result, v) << backup::ToString(v);
  }
}

TEST(JsonJobRecordCodec, KeepsWhatJobsFilesRound) {
  // jobs/ files show milliseconds, whole bytes/s and whole ETA seconds: a
  // record read back shows the same text again.
  JobInfo i = Everything();
  i.started = 1795703242.1234;
  i.finished = 1795703250.9996;
  i.bytes_per_second = 1048575.6;
  i.eta_seconds = 6.2;
  const std::string text = kCodec.Encode(i);
  auto back = kCodec.Decode(text);
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(kCodec.Encode(*back), text);
  EXPECT_NEAR(back->started, 1795703242.123, 1e-6);
  EXPECT_NEAR(*back->finished, 1795703251.0, 1e-6);
  EXPECT_EQ(back->bytes_per_second, 1048576);
  EXPECT_EQ(back->eta_seconds, 7);
}

TEST(JsonJobRecordCodec, IgnoresMembersItDoesNotKnow) {
  ordered_json j = ordered_json::parse(kCodec.Encode(Everything()));
  j["future-field"] = {{"nested", {1, 2, 3}}};
  j["another"] = nullptr;
  j.erase("type");
  j.erase("ready");
  auto back = kCodec.Decode(j.dump());
  ASSERT_TRUE(back.ok()) << back.status().message();
  ExpectSame(*back, Everything());
  // Member order and whitespace are free, as in any JSON.
  back = kCodec.Decode(json::parse(kCodec.Encode(Everything())).dump(4));
  ASSERT_TRUE(back.ok()) << back.status().message();
  ExpectSame(*back, Everything());
}

const char* const kRequired[] = {"device",        "len",
                                 "offset",        "busy",
                                 "paused",        "speed",
                                 "io-status",     "status",
                                 "auto-finalize", "auto-dismiss",
                                 "drive",         "target",
                                 "sync",          "bytes-per-second",
                                 "eta-seconds",   "cbw-bytes",
                                 "skipped-bytes", "started",
                                 "finished"};

TEST(JsonJobRecordCodec, AMissingRequiredMemberIsCorrupt) {
  const ordered_json whole = ordered_json::parse(kCodec.Encode(Everything()));
  for (const char* key : kRequired) {
    ordered_json j = whole;
    ASSERT_EQ(j.erase(key), 1u) << key;
    auto back = kCodec.Decode(j.dump());
    ASSERT_FALSE(back.ok()) << key;
    EXPECT_EQ(back.status().code(), EINVAL);
    EXPECT_EQ(back.status().message(), std::string("'") + key + "' is missing");
  }
  // error and result are optional: absent means none.
  for (const char* key : {"error", "result"}) {
    ordered_json j = whole;
    j.erase(key);
    EXPECT_TRUE(kCodec.Decode(j.dump()).ok()) << key;
  }
}

TEST(JsonJobRecordCodec, AWrongTypeOrValueIsCorrupt) {
  const ordered_json whole = ordered_json::parse(kCodec.Encode(Everything()));
  const std::vector<std::pair<std::string, ordered_json>> cases = {
      {"device", 5},
      {"len", -1},
      {"len", 1.5},
      {"len", "8"},
      {"offset", nullptr},
      {"busy", 1},
      {"paused", "false"},
      {"speed", true},
      {"io-status", "sideways"},
      {"status", "done"},
      {"status", 3},
      {"auto-finalize", nullptr},
      {"auto-dismiss", ordered_json::array()},
      {"error", nullptr},
      {"error", 5},
      {"drive", ordered_json::object()},
      {"target", nullptr},
      {"sync", "incremental-ish"},
      {"bytes-per-second", -5},
      {"bytes-per-second", nullptr},
      {"eta-seconds", "7"},
      {"eta-seconds", -1},
      {"cbw-bytes", -65536},
      {"skipped-bytes", 1e3},
      {"started", 1795703242},
      {"started", "2026-11-26 14:27:22Z"},
      {"started", nullptr},
      {"finished", "yesterday"},
      {"result", "maybe"},
      {"result", nullptr},
  };
  for (const auto& [key, value] : cases) {
    ordered_json j = whole;
    j[key] = value;
    auto back = kCodec.Decode(j.dump());
    ASSERT_FALSE(back.ok()) << key << " = " << value.dump();
    EXPECT_EQ(back.status().code(), EINVAL);
    EXPECT_EQ(back.status().message().rfind("'" + key + "' ", 0), 0u) << back.status().message();
  }
}

TEST(JsonJobRecordCodec, NotARecordIsCorrupt) {
  const std::string whole = kCodec.Encode(Everything());
  for (const std::string& text :
       {std::string(), std::string("\n"), whole.substr(0, whole.size() / 2), std::string("[1]"),
        std::string("\"job0\""), std::string("null"), whole + whole,
        std::string("cbwfs-job 1\nid=job0\nend\n"), std::string("{\"device\": \"a\xff\"}")}) {
    auto back = kCodec.Decode(text);
    EXPECT_FALSE(back.ok()) << text;
    EXPECT_EQ(back.status().code(), EINVAL) << text;
  }
  // The one trailing newline of a jobs/ file is optional.
  EXPECT_TRUE(kCodec.Decode(whole.substr(0, whole.size() - 1)).ok());
}

TEST(ParseRfc3339, ReadsWhatRfc3339Writes) {
  for (double t : {0.0, 1.0, 951782400.0 /* 2000-02-29 */, 1795703242.123, 4102444799.999}) {
    std::optional<double> back = ParseRfc3339(Rfc3339(t));
    ASSERT_TRUE(back.has_value()) << Rfc3339(t);
    EXPECT_NEAR(*back, t, 1e-6) << Rfc3339(t);
  }
  EXPECT_EQ(ParseRfc3339("2026-11-26T14:27:22Z"), 1795703242.0);
  EXPECT_NEAR(*ParseRfc3339("2026-11-26T14:27:22.5Z"), 1795703242.5, 1e-9);
  EXPECT_NEAR(*ParseRfc3339("2026-11-26T14:27:22.123456789Z"), 1795703242.123456789, 1e-6);
}

TEST(ParseRfc3339, RefusesAnythingElse) {
  for (const char* bad : {"",
                          "2026-11-26",
                          "2026-11-26T14:27:22",
                          "2026-11-26T14:27:22.Z",
                          "2026-11-26T14:27:22.1234567890Z",
                          "2026-11-26T14:27:22+00:00",
                          "2026-11-26t14:27:22Z",
                          "2026-11-26T14:27:22z",
                          "2026-11-26 14:27:22Z",
                          "2026-02-30T00:00:00Z",
                          "2025-02-29T00:00:00Z",
                          "2026-13-01T00:00:00Z",
                          "2026-00-01T00:00:00Z",
                          "2026-11-00T00:00:00Z",
                          "2026-11-26T24:00:00Z",
                          "2026-11-26T14:60:00Z",
                          "2026-11-26T14:27:60Z",
                          "1969-12-31T23:59:59Z",
                          "+026-11-26T14:27:22Z",
                          "2026-11-26T14:27:22Zx",
                          "2026-1-26T14:27:22Z"}) {
    EXPECT_FALSE(ParseRfc3339(bad).has_value()) << bad;
  }
}

// A registry persisting through this codec: each record is the job's jobs/
// file, and after a restart the job's jobs/ file is what it was.
class PersistedRegistry : public ::testing::Test {
 protected:
  void SetUp() override {
    backup::SetLogLevel(backup::LogLevel::kError);
    char tmpl[] = "/tmp/cbw-codec-test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    std::string data(4 << 20, '\0');
    for (size_t off = 0; off < data.size(); ++off) data[off] = static_cast<char>(1 + off % 251);
    std::ofstream(dir_ + "/src.img", std::ios::binary) << data;
    Open();
  }
  void TearDown() override {
    registry_.reset();
    drive_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  void Open() {
    registry_.reset();
    drive_.reset();
    auto d = backup::Drive::Open({"drive0", dir_ + "/src.img", false});
    ASSERT_TRUE(d.ok()) << d.status().message();
    drive_ = std::move(*d);
    backup::RegistryOptions o;
    o.base_dir = dir_;
    o.mountpoint = dir_ + "/mnt";
    o.state_dir = dir_ + "/state";
    o.record_codec = std::make_shared<JsonJobRecordCodec>();
    auto r = backup::JobRegistry::Open({drive_.get()}, &bus_, o);
    ASSERT_TRUE(r.ok()) << r.status().message();
    registry_ = std::move(*r);
    registry_->StartBackgroundThreads();
  }
  std::string Record(const std::string& id) {
    std::ifstream in(dir_ + "/state/" + id + ".json", std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
  bool WaitFor(const std::function<bool()>& pred) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(15);
    while (!pred()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return true;
  }

  std::string dir_;
  backup::EventBus bus_;
  std::unique_ptr<backup::Drive> drive_;
  std::unique_ptr<backup::JobRegistry> registry_;
};

TEST_F(PersistedRegistry, RecordsAreJobsFilesAndSurviveARestart) {
  backup::BackupOptions o;
  o.device = "drive0";
  o.job_id = "j1";
  o.target = "j1.img";
  ASSERT_TRUE(registry_->StartBackups({o}).ok());
  ASSERT_TRUE(WaitFor([&] {
    auto f = registry_->GetJobFile("j1");
    return f && f->result != backup::JobResult::kNone;
  }));
  // The persister writes the last state shortly after the last change.
  std::string shown;
  ASSERT_TRUE(WaitFor([&] {
    shown = RenderJobFile(*registry_->GetJobFile("j1"));
    return Record("j1") == shown;
  })) << Record("j1")
      << shown;
  EXPECT_EQ(json::parse(shown).value("result", ""), "success");
  Open();
  auto loaded = registry_->GetJobFile("j1");
  ASSERT_TRUE(loaded.has_value());
  EXPECT_EQ(RenderJobFile(*loaded), shown);
  EXPECT_FALSE(loaded->listed);
  EXPECT_EQ(Record("j1"), shown);
  // A corrupt record is skipped (and kept); the others load.
  registry_.reset();
  std::ofstream(dir_ + "/state/bad.json") << R"({"device": "bad"})"
                                          << "\n";
  Open();
  EXPECT_FALSE(registry_->GetJobFile("bad").has_value());
  EXPECT_TRUE(registry_->GetJobFile("j1").has_value());
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/state/bad.json"));
}

}  // namespace
}  // namespace cbw::control
