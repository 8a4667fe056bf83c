#include "cbwctl/render.h"

#include <gtest/gtest.h>

namespace cbw::ctl {
namespace {

// A record as the daemon writes it (SPEC 4).
const char kRunning[] =
    R"({"type": "backup", "device": "job1", "len": 8388608, "offset": 3801088, "busy": true, )"
    R"("paused": false, "speed": 2097152, "io-status": "ok", "ready": false, "status": "running", )"
    R"("auto-finalize": true, "auto-dismiss": true, "drive": "drive0", "target": "/b/x.img", )"
    R"("sync": "full", "bytes-per-second": 2097152, "eta-seconds": 3, "cbw-bytes": 65536, )"
    R"("skipped-bytes": 0, "started": "2026-11-29T19:08:18.643Z", "finished": null})"
    "\n";
const char kFailed[] =
    R"({"type": "backup", "device": "job2", "len": 8388608, "offset": 1048576, "busy": false, )"
    R"("paused": false, "speed": 0, "io-status": "ok", "ready": false, "status": "null", )"
    R"("auto-finalize": true, "auto-dismiss": true, "error": "No space left on device", )"
    R"("drive": "drive0", "target": "/full/x.img", "sync": "full", "bytes-per-second": 0, )"
    R"("eta-seconds": null, "cbw-bytes": 0, "skipped-bytes": 0, )"
    R"("started": "2026-11-29T19:08:18.000Z", "finished": "2026-11-29T19:08:19.500Z", )"
    R"("result": "failed"})";

JobView View(const char* text) {
  auto v = ParseRecord(text);
  EXPECT_TRUE(v.ok());
  return v.ok() ? *v : JobView{};
}

TEST(ParseRecord, ReadsTheFields) {
  JobView v = View(kRunning);
  EXPECT_EQ(v.id, "job1");
  EXPECT_EQ(v.drive, "drive0");
  EXPECT_EQ(v.target, "/b/x.img");
  EXPECT_EQ(v.status, "running");
  EXPECT_EQ(v.len, 8388608u);
  EXPECT_EQ(v.offset, 3801088u);
  EXPECT_EQ(v.speed, 2097152u);
  EXPECT_EQ(v.bytes_per_second, 2097152u);
  EXPECT_EQ(*v.eta_seconds, 3u);
  EXPECT_EQ(v.cbw_bytes, 65536u);
  EXPECT_FALSE(v.ended());
  EXPECT_EQ(v.raw.back(), '}');  // the newline is not part of it
  JobView f = View(kFailed);
  EXPECT_TRUE(f.ended());
  EXPECT_EQ(f.result, "failed");
  EXPECT_EQ(f.error, "No space left on device");
  EXPECT_FALSE(f.eta_seconds);
  EXPECT_FALSE(ParseRecord("").ok());
  EXPECT_FALSE(ParseRecord("[1]").ok());
}

TEST(Format, BytesRatesEtaPercent) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(1023), "1023 B");
  EXPECT_EQ(FormatBytes(1536), "1.5 KiB");
  EXPECT_EQ(FormatBytes(8 << 20), "8.0 MiB");
  EXPECT_EQ(FormatBytes((1ull << 30) - 1), "1.0 GiB");
  EXPECT_EQ(FormatBytes(3ull << 40), "3.0 TiB");
  EXPECT_EQ(FormatRate(2 << 20), "2.0 MiB/s");
  EXPECT_EQ(FormatEta(std::nullopt), "--:--");
  EXPECT_EQ(FormatEta(5), "0:05");
  EXPECT_EQ(FormatEta(754), "12:34");
  EXPECT_EQ(FormatEta(3723), "1:02:03");
  EXPECT_EQ(FormatPercent(0, 100, false), "0.0%");
  EXPECT_EQ(FormatPercent(453, 1000, false), "45.3%");
  EXPECT_EQ(FormatPercent(9999, 10000, false), "99.9%");
  EXPECT_EQ(FormatPercent(10000, 10000, true), "100.0%");
  EXPECT_EQ(FormatPercent(0, 0, false), "0.0%");
  EXPECT_EQ(FormatPercent(0, 0, true), "100.0%");
}

TEST(ParseRfc3339, Utc) {
  EXPECT_DOUBLE_EQ(*ParseRfc3339("1970-01-01T00:00:01.500Z"), 1.5);
  EXPECT_DOUBLE_EQ(*ParseRfc3339("2026-11-29T19:08:19Z") - *ParseRfc3339("2026-11-29T19:08:18Z"),
                   1.0);
  EXPECT_FALSE(ParseRfc3339(""));
  EXPECT_FALSE(ParseRfc3339("2026-11-29 19:08:19"));
}

TEST(ProgressBar, ShowsPercentBytesRateEtaAndFitsTheWidth) {
  JobView v = View(kRunning);
  for (int width : {20, 40, 60, 80, 132, 400}) {
    std::string bar = ProgressBar(v, width);
    EXPECT_LT(bar.size(), static_cast<size_t>(std::max(width, 20))) << bar;
    EXPECT_EQ(bar.find('\n'), std::string::npos);
    EXPECT_EQ(bar.find('\r'), std::string::npos);
  }
  std::string bar = ProgressBar(v, 100);
  EXPECT_NE(bar.find("job1 ["), std::string::npos) << bar;
  EXPECT_NE(bar.find("45.3%"), std::string::npos) << bar;
  EXPECT_NE(bar.find("3.6 MiB/8.0 MiB"), std::string::npos) << bar;
  EXPECT_NE(bar.find("2.0 MiB/s"), std::string::npos) << bar;
  EXPECT_NE(bar.find("ETA 0:03"), std::string::npos) << bar;
  // The bar is filled in proportion.
  size_t open = bar.find('['), close = bar.find(']');
  std::string cells = bar.substr(open + 1, close - open - 1);
  size_t filled = cells.find('>');
  ASSERT_NE(filled, std::string::npos);
  EXPECT_NEAR(static_cast<double>(filled) / cells.size(), 0.453, 0.05) << bar;
  // Narrow: the bar goes, the figures stay.
  std::string narrow = ProgressBar(v, 60);
  EXPECT_EQ(narrow.find('['), std::string::npos) << narrow;
  EXPECT_NE(narrow.find("45.3%"), std::string::npos) << narrow;

  JobView paused = v;
  paused.status = "paused";
  EXPECT_NE(ProgressBar(paused, 120).find("paused"), std::string::npos);
  JobView done = v;
  done.offset = done.len;
  done.result = "success";
  std::string end = ProgressBar(done, 100);
  EXPECT_NE(end.find("100.0%"), std::string::npos) << end;
  EXPECT_NE(end.find("success"), std::string::npos) << end;
  EXPECT_EQ(end.find("ETA"), std::string::npos) << end;
  EXPECT_EQ(end.find('>'), std::string::npos) << end;
}

TEST(ProgressLine, PlainText) {
  EXPECT_EQ(ProgressLine(View(kRunning)), "job1: running 45.3% 3.6 MiB/8.0 MiB 2.0 MiB/s ETA 0:03");
  EXPECT_EQ(ProgressLine(View(kFailed)), "job2: 12.5% 1.0 MiB/8.0 MiB 0 B/s failed");
}

TEST(Outcome, LinesAndExitCodes) {
  JobView ok = View(kFailed);
  ok.result = "success";
  ok.error.clear();
  ok.offset = ok.len;
  EXPECT_EQ(OutcomeLine(ok), "job2: success, 8.0 MiB in 1.5 s (5.3 MiB/s)");
  EXPECT_EQ(OutcomeLine(View(kFailed)), "job job2 failed: No space left on device");
  JobView c = View(kFailed);
  c.result = "cancelled";
  EXPECT_EQ(OutcomeLine(c), "job job2 was cancelled at 1.0 MiB of 8.0 MiB");
  EXPECT_EQ(ExitCodeForResult("success"), kExitOk);
  EXPECT_EQ(ExitCodeForResult("failed"), kExitJobFailed);
  EXPECT_EQ(ExitCodeForResult("cancelled"), kExitJobCancelled);
}

TEST(StatusTable, AlignedColumns) {
  std::string t = StatusTable({View(kRunning), View(kFailed)});
  std::vector<std::string> lines;
  size_t pos = 0, nl;
  while ((nl = t.find('\n', pos)) != std::string::npos) {
    lines.push_back(t.substr(pos, nl - pos));
    pos = nl + 1;
  }
  ASSERT_EQ(lines.size(), 3u) << t;
  EXPECT_EQ(lines[0].rfind("JOB ", 0), 0u) << t;
  EXPECT_EQ(lines[1].rfind("job1 ", 0), 0u) << t;
  EXPECT_EQ(lines[2].rfind("job2 ", 0), 0u) << t;
  // Every column starts at the same place on each line.
  for (const char* col : {"STATUS", "PROGRESS", "TARGET"}) {
    size_t at = lines[0].find(col);
    ASSERT_NE(at, std::string::npos);
    EXPECT_NE(lines[1][at], ' ') << col << "\n" << t;
    EXPECT_EQ(lines[1][at - 1], ' ') << col << "\n" << t;
  }
  EXPECT_NE(lines[1].find("running"), std::string::npos);
  EXPECT_NE(lines[1].find("45.3%"), std::string::npos);
  EXPECT_NE(lines[2].find("failed: No space left on device"), std::string::npos);
  EXPECT_EQ(StatusTable({}).find('\n'), StatusTable({}).size() - 1);  // the header alone
}

TEST(StatusDetail, OneFieldPerLine) {
  std::string d = StatusDetail(View(kFailed));
  EXPECT_NE(d.find("job:      job2\n"), std::string::npos) << d;
  EXPECT_NE(d.find("result:   failed\n"), std::string::npos) << d;
  EXPECT_NE(d.find("error:    No space left on device\n"), std::string::npos) << d;
  EXPECT_NE(StatusDetail(View(kRunning)).find("eta:      0:03\n"), std::string::npos);
}

TEST(ProgressPrinter, TerminalRedrawsInPlaceAtItsRate) {
  ProgressPrinter p(/*tty=*/true, 0.25, 5.0);
  JobView v = View(kRunning);
  std::string first = p.Update(v, 100.0, 100);
  EXPECT_EQ(first.rfind("\rjob1 [", 0), 0u) << first;
  EXPECT_EQ(first.find('\n'), std::string::npos);
  EXPECT_EQ(p.Update(v, 100.1, 100), "");  // too soon
  v.offset += 1 << 20;
  std::string second = p.Update(v, 100.3, 100);
  EXPECT_EQ(second[0], '\r');
  EXPECT_NE(second.find("57.8%"), std::string::npos) << second;
  v.offset = v.len;
  v.result = "success";
  std::string last = p.Update(v, 100.31, 100);  // the end is never held back
  EXPECT_EQ(last[0], '\r');
  EXPECT_EQ(last.back(), '\n');
  EXPECT_NE(last.find("100.0%"), std::string::npos);
  EXPECT_EQ(p.Update(v, 200, 100), "");
  EXPECT_EQ(p.Abandon(), "");
}

TEST(ProgressPrinter, PlainLinesEverySoOftenOnChangeAndAtTheEnd) {
  ProgressPrinter p(/*tty=*/false, 0.25, 5.0);
  JobView v = View(kRunning);
  std::string first = p.Update(v, 0, 80);
  EXPECT_EQ(first, ProgressLine(v) + "\n");
  EXPECT_EQ(p.Update(v, 1, 80), "");
  EXPECT_EQ(p.Update(v, 4.7, 80), "");
  EXPECT_EQ(p.Update(v, 4.99, 80), ProgressLine(v) + "\n");  // a timer a hair early
  EXPECT_EQ(p.Update(v, 9.0, 80), "");
  EXPECT_EQ(p.Update(v, 10.0, 80), ProgressLine(v) + "\n");
  v.status = "paused";
  EXPECT_EQ(p.Update(v, 10.1, 80), ProgressLine(v) + "\n");  // a status change shows at once
  v.result = "cancelled";
  std::string end = p.Update(v, 10.2, 80);
  EXPECT_EQ(end, ProgressLine(v) + "\n");
  EXPECT_EQ(end.find('\r'), std::string::npos);
}

TEST(ProgressPrinter, AbandonEndsTheBarLine) {
  ProgressPrinter tty(true);
  EXPECT_EQ(tty.Abandon(), "");  // nothing drawn yet
  ProgressPrinter tty2(true);
  tty2.Update(View(kRunning), 0, 80);
  EXPECT_EQ(tty2.Abandon(), "\n");
  ProgressPrinter plain(false);
  plain.Update(View(kRunning), 0, 80);
  EXPECT_EQ(plain.Abandon(), "");
}

}  // namespace
}  // namespace cbw::ctl
