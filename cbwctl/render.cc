#include "cbwctl/render.h"

#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

namespace cbw::ctl {

namespace {

uint64_t U64(const nlohmann::json& j, const char* key) {
  if (!j.contains(key)) return 0;
  const auto& v = j[key];
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer()) return static_cast<uint64_t>(std::max<int64_t>(0, v.get<int64_t>()));
  if (v.is_number_float()) return static_cast<uint64_t>(std::max(0.0, v.get<double>()));
  return 0;
}

std::string Str(const nlohmann::json& j, const char* key) {
  return j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : "";
}

std::string Printf(const char* fmt, double v, const char* unit) {
  char buf[64];
  snprintf(buf, sizeof buf, fmt, v, unit);
  return buf;
}

std::string PadLeft(std::string s, size_t width) {
  if (s.size() < width) s.insert(0, width - s.size(), ' ');
  return s;
}

// What follows the bar, shared by the terminal and plain forms. `padded`
// right-aligns the numbers in fixed widths so a redrawn bar does not jitter.
std::string Figures(const JobView& job, const char* sep, bool padded) {
  auto pad = [padded](std::string s, size_t width) { return padded ? PadLeft(s, width) : s; };
  std::string s = pad(FormatPercent(job.offset, job.len, job.ended()), 6);
  s += sep;
  s += pad(FormatBytes(job.offset), 10) + "/" + FormatBytes(job.len);
  s += sep;
  s += pad(FormatRate(job.bytes_per_second), 12);
  s += sep;
  if (job.ended()) {
    s += job.result;
  } else {
    if (job.status != "running") s += job.status + std::string(sep);
    s += "ETA " + FormatEta(job.eta_seconds);
  }
  return s;
}

}  // namespace

Result<JobView> ParseRecord(std::string_view text) {
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return Error{kExitMount, "not a job record: " + std::string(text.substr(0, 200))};
  }
  JobView v;
  v.id = Str(j, "device");
  v.drive = Str(j, "drive");
  v.target = Str(j, "target");
  v.sync = Str(j, "sync");
  v.status = Str(j, "status");
  v.result = Str(j, "result");
  v.error = Str(j, "error");
  v.len = U64(j, "len");
  v.offset = U64(j, "offset");
  v.speed = U64(j, "speed");
  v.bytes_per_second = U64(j, "bytes-per-second");
  if (j.contains("eta-seconds") && j["eta-seconds"].is_number()) {
    v.eta_seconds = U64(j, "eta-seconds");
  }
  v.cbw_bytes = U64(j, "cbw-bytes");
  v.skipped_bytes = U64(j, "skipped-bytes");
  v.started = Str(j, "started");
  v.finished = Str(j, "finished");
  v.raw = std::string(text);
  while (!v.raw.empty() && (v.raw.back() == '\n' || v.raw.back() == '\r')) v.raw.pop_back();
  return v;
}

std::string FormatBytes(uint64_t bytes) {
  static const char* const kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes) / 1024;
  size_t u = 0;
  // Switch unit before "1024.0" would show.
  while (v >= 1023.95 && u + 1 < std::size(kUnits)) {
    v /= 1024;
    ++u;
  }
  return Printf("%.1f %s", v, kUnits[u]);
}

std::string FormatRate(uint64_t bytes_per_second) { return FormatBytes(bytes_per_second) + "/s"; }

std::string FormatEta(std::optional<uint64_t> seconds) {
  if (!seconds) return "--:--";
  uint64_t s = *seconds;
  char buf[64];
  if (s >= 3600) {
    snprintf(buf, sizeof buf, "%llu:%02llu:%02llu", static_cast<unsigned long long>(s / 3600),
             static_cast<unsigned long long>(s / 60 % 60), static_cast<unsigned long long>(s % 60));
  } else {
    snprintf(buf, sizeof buf, "%llu:%02llu", static_cast<unsigned long long>(s / 60),
             static_cast<unsigned long long>(s % 60));
  }
  return buf;
}

std::string FormatPercent(uint64_t done, uint64_t total, bool ended) {
  uint64_t tenths;
  if (total == 0) {
    tenths = ended ? 1000 : 0;
  } else {
    done = std::min(done, total);
    // Floor, in integers: 99.96% must not print as 100.0% while running.
    tenths = static_cast<uint64_t>(static_cast<long double>(done) * 1000 / total);
  }
  char buf[32];
  snprintf(buf, sizeof buf, "%llu.%llu%%", static_cast<unsigned long long>(tenths / 10),
           static_cast<unsigned long long>(tenths % 10));
  return buf;
}

std::optional<double> ParseRfc3339(std::string_view text) {
  std::string s(text);
  struct tm tm {};
  int consumed = 0;
  if (sscanf(s.c_str(), "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
             &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &consumed) != 6) {
    return std::nullopt;
  }
  tm.tm_year -= 1900;
  tm.tm_mon -= 1;
  double frac = 0;
  size_t i = static_cast<size_t>(consumed);
  if (i < s.size() && s[i] == '.') {
    size_t start = i;
    ++i;
    while (i < s.size() && isdigit(static_cast<unsigned char>(s[i]))) ++i;
    frac = std::strtod(s.substr(start, i - start).c_str(), nullptr);
  }
  if (i >= s.size() || (s[i] != 'Z' && s[i] != 'z')) return std::nullopt;
  return static_cast<double>(timegm(&tm)) + frac;
}

std::string ProgressBar(const JobView& job, int width) {
  const size_t room = static_cast<size_t>(std::max(width, 20) - 1);
  const std::string figures = Figures(job, "  ", true);
  const std::string id = job.id + " ";
  // "[" bar "]" and two spaces around it; a bar under 10 cells says little.
  const size_t fixed = id.size() + 4 + figures.size();
  if (fixed + 10 > room) {
    std::string line = id + figures;
    if (line.size() > room) line.resize(room);
    return line;
  }
  const size_t cells = std::min<size_t>(room - fixed, 50);
  size_t full = job.len == 0
                    ? (job.ended() ? cells : 0)
                    : static_cast<size_t>(static_cast<long double>(std::min(job.offset, job.len)) *
                                          cells / job.len);
  std::string bar(full, '=');
  if (full < cells) {
    bar += '>';
    bar.append(cells - full - 1, ' ');
  }
  return id + "[" + bar + "]  " + figures;
}

std::string ProgressLine(const JobView& job) {
  std::string s = job.id + ": ";
  if (!job.ended()) s += job.status + " ";
  return s + Figures(job, " ", false);
}

std::string OutcomeLine(const JobView& job) {
  if (job.result == "success") {
    std::string s = job.id + ": success, " + FormatBytes(job.len);
    auto t0 = ParseRfc3339(job.started);
    auto t1 = ParseRfc3339(job.finished);
    if (t0 && t1 && *t1 >= *t0) {
      double secs = *t1 - *t0;
      s += Printf(" in %.1f %s", secs, "s");
      if (secs > 0) {
        s += " (" + FormatRate(static_cast<uint64_t>(static_cast<double>(job.len) / secs)) + ")";
      }
    }
    return s;
  }
  if (job.result == "cancelled") {
    return "job " + job.id + " was cancelled at " + FormatBytes(job.offset) + " of " +
           FormatBytes(job.len);
  }
  return "job " + job.id + " " + job.result + ": " +
         (job.error.empty() ? "no reason given" : job.error);
}

int ExitCodeForResult(const std::string& result) {
  if (result == "success") return kExitOk;
  if (result == "cancelled") return kExitJobCancelled;
  return kExitJobFailed;
}

std::string StatusTable(const std::vector<JobView>& jobs) {
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"JOB", "DRIVE", "SYNC", "STATUS", "DONE", "SIZE", "PROGRESS", "RATE", "ETA",
                  "TARGET", "RESULT"});
  for (const auto& j : jobs) {
    std::string result = j.ended() ? j.result : "-";
    if (!j.error.empty()) result += ": " + j.error;
    rows.push_back({j.id, j.drive, j.sync, j.status, FormatBytes(j.offset), FormatBytes(j.len),
                    FormatPercent(j.offset, j.len, j.ended()), FormatRate(j.bytes_per_second),
                    j.ended() ? "-" : FormatEta(j.eta_seconds), j.target, result});
  }
  std::vector<size_t> w(rows[0].size(), 0);
  for (const auto& r : rows) {
    for (size_t c = 0; c < r.size(); ++c) w[c] = std::max(w[c], r[c].size());
  }
  std::string out;
  for (const auto& r : rows) {
    std::string line;
    for (size_t c = 0; c < r.size(); ++c) {
      line += r[c];
      if (c + 1 < r.size()) line.append(w[c] - r[c].size() + 2, ' ');
    }
    out += line + "\n";
  }
  return out;
}

std::string StatusDetail(const JobView& j) {
  auto field = [](const char* name, const std::string& value) {
    std::string s = name;
    s += ':';
    s.append(s.size() < 10 ? 10 - s.size() : 1, ' ');
    return s + value + "\n";
  };
  std::string out;
  out += field("job", j.id);
  out += field("drive", j.drive);
  out += field("target", j.target);
  out += field("sync", j.sync);
  out += field("status", j.status);
  out += field("progress", FormatPercent(j.offset, j.len, j.ended()) + " (" +
                               FormatBytes(j.offset) + " of " + FormatBytes(j.len) + ")");
  out += field("rate", FormatRate(j.bytes_per_second) +
                           (j.speed ? " (limit " + FormatRate(j.speed) + ")" : " (no limit)"));
  if (!j.ended()) out += field("eta", FormatEta(j.eta_seconds));
  out += field("cbw", FormatBytes(j.cbw_bytes) + " copied before drive writes");
  out += field("skipped", FormatBytes(j.skipped_bytes) + " of holes and zeros");
  out += field("started", j.started);
  out += field("finished", j.finished.empty() ? "-" : j.finished);
  out += field("result", j.ended() ? j.result : "-");
  if (!j.error.empty()) out += field("error", j.error);
  return out;
}

std::string ProgressPrinter::Update(const JobView& job, double now, int width) {
  if (finished_) return "";
  const bool status_changed = job.status != last_status_;
  last_status_ = job.status;
  if (job.ended()) {
    finished_ = true;
    if (tty_) return "\r" + ProgressBar(job, width) + "\x1b[K\n";
    return ProgressLine(job) + "\n";
  }
  // Due a little early too: the waiter's timer runs from its last record
  // read, which comes just before this call, so an exact comparison would
  // skip every other tick.
  const double due = (tty_ ? tty_interval_ : line_interval_) * 0.95;
  if (drawn_ && now - last_ < due && !(status_changed && !tty_)) return "";
  drawn_ = true;
  last_ = now;
  if (tty_) return "\r" + ProgressBar(job, width) + "\x1b[K";
  return ProgressLine(job) + "\n";
}

std::string ProgressPrinter::Abandon() {
  if (!tty_ || !drawn_ || finished_) return "";
  finished_ = true;
  return "\n";
}

}  // namespace cbw::ctl
