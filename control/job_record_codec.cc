#include "control/job_record_codec.h"

#include <time.h>

#include <cerrno>
#include <cmath>
#include <nlohmann/json.hpp>
#include <utility>

#include "control/render.h"

namespace cbw::control {
namespace {

using backup::JobInfo;
using backup::Result;
using backup::Status;
using nlohmann::json;

// Reads `n` decimal digits at text[*pos]; false if any is not a digit.
bool Digits(std::string_view text, size_t* pos, size_t n, int* out) {
  if (text.size() - *pos < n) return false;
  int v = 0;
  for (size_t i = 0; i < n; ++i) {
    const char c = text[*pos + i];
    if (c < '0' || c > '9') return false;
    v = v * 10 + (c - '0');
  }
  *pos += n;
  *out = v;
  return true;
}

bool Expect(std::string_view text, size_t* pos, char c) {
  if (*pos >= text.size() || text[*pos] != c) return false;
  ++*pos;
  return true;
}

// The value of an enum from its QMP spelling. Scans past the enum's last
// value on purpose, so that values added later are found without a table
// here: ToString of an out-of-range value returns an in-range value's
// spelling, which the scan has met first. (Scoped enums take any int.)
template <class E>
bool ParseEnum(const std::string& s, E* v) {
  for (int i = 0; i < 64; ++i) {
    if (s == backup::ToString(static_cast<E>(i))) {
      *v = static_cast<E>(i);
      return true;
    }
  }
  return false;
}

// Reads members of the record object, keeping the first problem.
class Fields {
 public:
  explicit Fields(const json& object) : object_(object) {}

  const std::string& problem() const { return problem_; }

  std::string String(const char* key) {
    const json* v = Get(key);
    if (v == nullptr) return {};
    if (!v->is_string()) {
      Fail(key, "is not a string");
      return {};
    }
    return v->get<std::string>();
  }
  std::optional<std::string> OptionalString(const char* key) {
    if (!object_.contains(key)) return std::nullopt;
    return String(key);
  }
  uint64_t U64(const char* key) {
    const json* v = Get(key);
    if (v == nullptr) return 0;
    // nlohmann reads every non-negative integer that fits as unsigned.
    if (!v->is_number_unsigned()) {
      Fail(key, "is not a non-negative integer");
      return 0;
    }
    return v->get<uint64_t>();
  }
  bool Bool(const char* key) {
    const json* v = Get(key);
    if (v == nullptr) return false;
    if (!v->is_boolean()) {
      Fail(key, "is not a boolean");
      return false;
    }
    return v->get<bool>();
  }
  // A number >= 0 (integer or not); null allowed when `nullable`.
  std::optional<double> Number(const char* key, bool nullable) {
    const json* v = Get(key);
    if (v == nullptr) return std::nullopt;
    if (nullable && v->is_null()) return std::nullopt;
    if (!v->is_number() || !(v->get<double>() >= 0) || !std::isfinite(v->get<double>())) {
      Fail(key, nullable ? "is neither null nor a number >= 0" : "is not a number >= 0");
      return std::nullopt;
    }
    return v->get<double>();
  }
  std::optional<double> Time(const char* key, bool nullable) {
    const json* v = Get(key);
    if (v == nullptr) return std::nullopt;
    if (nullable && v->is_null()) return std::nullopt;
    std::optional<double> t;
    if (v->is_string()) t = ParseRfc3339(v->get_ref<const std::string&>());
    if (!t) Fail(key, "is not an RFC 3339 UTC time");
    return t;
  }
  template <class E>
  E Enum(const char* key, E fallback) {
    std::string s = String(key);
    if (!problem_.empty()) return fallback;
    E v = fallback;
    if (!ParseEnum(s, &v)) Fail(key, "has an unknown value '" + s + "'");
    return v;
  }
  template <class E>
  E OptionalEnum(const char* key, E fallback) {
    if (!object_.contains(key)) return fallback;
    return Enum(key, fallback);
  }

 private:
  const json* Get(const char* key) {
    if (!problem_.empty()) return nullptr;
    auto it = object_.find(key);
    if (it == object_.end()) {
      problem_ = std::string("'") + key + "' is missing";
      return nullptr;
    }
    return &*it;
  }
  void Fail(const char* key, const std::string& what) {
    if (problem_.empty()) problem_ = std::string("'") + key + "' " + what;
  }

  const json& object_;
  std::string problem_;
};

}  // namespace

std::optional<double> ParseRfc3339(std::string_view text) {
  size_t pos = 0;
  struct tm tm {};
  int year, month, day, hour, minute, second;
  if (!Digits(text, &pos, 4, &year) || !Expect(text, &pos, '-') || !Digits(text, &pos, 2, &month) ||
      !Expect(text, &pos, '-') || !Digits(text, &pos, 2, &day) || !Expect(text, &pos, 'T') ||
      !Digits(text, &pos, 2, &hour) || !Expect(text, &pos, ':') ||
      !Digits(text, &pos, 2, &minute) || !Expect(text, &pos, ':') ||
      !Digits(text, &pos, 2, &second)) {
    return std::nullopt;
  }
  double fraction = 0;
  if (pos < text.size() && text[pos] == '.') {
    ++pos;
    size_t n = 0;
    double scale = 1;
    int64_t value = 0;
    while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9' && n < 9) {
      value = value * 10 + (text[pos++] - '0');
      scale *= 10;
      ++n;
    }
    if (n == 0) return std::nullopt;
    fraction = static_cast<double>(value) / scale;
  }
  if (!Expect(text, &pos, 'Z') || pos != text.size()) return std::nullopt;
  if (month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 || second > 59) {
    return std::nullopt;
  }
  tm.tm_year = year - 1900;
  tm.tm_mon = month - 1;
  tm.tm_mday = day;
  tm.tm_hour = hour;
  tm.tm_min = minute;
  tm.tm_sec = second;
  const time_t t = timegm(&tm);
  // timegm normalises (Feb 30 becomes Mar 2): a date that moved is not one.
  if (t < 0 || tm.tm_mday != day || tm.tm_mon != month - 1) return std::nullopt;
  return static_cast<double>(t) + fraction;
}

std::string JsonJobRecordCodec::Encode(const JobInfo& info) const { return RenderJobFile(info); }

Result<JobInfo> JsonJobRecordCodec::Decode(std::string_view bytes) const {
  auto bad = [](const std::string& why) { return Status::Error(EINVAL, why); };
  json j;
  try {
    j = json::parse(bytes.begin(), bytes.end());
  } catch (const json::parse_error& e) {
    return bad("not JSON (error at byte " + std::to_string(e.byte > 0 ? e.byte - 1 : 0) + ")");
  } catch (const json::exception&) {
    return bad("not JSON");
  }
  if (!j.is_object()) return bad("not a JSON object");

  Fields f(j);
  JobInfo i;
  // In RenderJobFile's order, so that the first problem named is the first
  // in the file.
  i.id = f.String("device");
  i.len = f.U64("len");
  i.offset = f.U64("offset");
  i.busy = f.Bool("busy");
  i.paused = f.Bool("paused");
  i.speed = f.U64("speed");
  i.io_status = f.Enum("io-status", backup::IoStatus::kOk);
  i.status = f.Enum("status", backup::JobStatus::kUndefined);
  i.auto_finalize = f.Bool("auto-finalize");
  i.auto_dismiss = f.Bool("auto-dismiss");
  i.error = f.OptionalString("error");
  i.drive = f.String("drive");
  i.target = f.String("target");
  i.sync = f.Enum("sync", backup::SyncMode::kFull);
  i.bytes_per_second = f.Number("bytes-per-second", false).value_or(0);
  i.eta_seconds = f.Number("eta-seconds", true);
  i.cbw_bytes = f.U64("cbw-bytes");
  i.skipped_bytes = f.U64("skipped-bytes");
  i.started = f.Time("started", false).value_or(0);
  i.finished = f.Time("finished", true);
  i.result = f.OptionalEnum("result", backup::JobResult::kNone);
  if (!f.problem().empty()) return bad(f.problem());
  i.listed = false;
  return i;
}

}  // namespace cbw::control
