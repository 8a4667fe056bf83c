#include "cbwctl/wait.h"

#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "cbwctl/render.h"

namespace cbw::ctl {

namespace {

// Without progress output nothing needs a timer: events drive the wait. The
// record is still re-read this often, so a waiter can never hang on an event
// it did not get (e.g. one lost in a daemon restart between reads).
constexpr double kQuietRefreshSeconds = 5.0;

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int TerminalWidth() {
  struct winsize ws {};
  if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 80;
}

void Out(const std::string& s) {
  if (s.empty()) return;
  fputs(s.c_str(), stdout);
  fflush(stdout);
}

int Fail(const Error& e) {
  fprintf(stderr, "cbwctl: %s\n", e.message.c_str());
  return e.exit_code;
}

}  // namespace

int WaitForJob(Mount& mount, EventStream& events, const std::string& id,
               const WaitOptions& options) {
  InstallInterruptHandler();
  ProgressPrinter printer(options.tty);

  auto first = mount.ReadRecord(id);
  if (!first.ok()) return Fail(first.error());
  if (!*first) return Fail(Error{kExitRefused, "no such job: " + id});
  auto parsed = ParseRecord(**first);
  if (!parsed.ok()) return Fail(parsed.error());
  JobView job = std::move(*parsed);
  // A record of another job under the same id (a new job took it) is not
  // the job we were asked about.
  const std::string started = job.started;

  bool events_open = true;
  double last_read = Now();
  const double refresh = options.quiet ? kQuietRefreshSeconds : printer.interval();
  for (;;) {
    if (Interrupted()) {
      if (!options.quiet) Out(printer.Abandon());
      fprintf(stderr, "cbwctl: stopped waiting; job %s keeps running\n", id.c_str());
      return kExitInterrupted;
    }
    if (!options.quiet) Out(printer.Update(job, Now(), TerminalWidth()));
    if (job.ended()) {
      int code = ExitCodeForResult(job.result);
      if (code == kExitOk) {
        if (!options.quiet) Out(OutcomeLine(job) + "\n");
      } else {
        fprintf(stderr, "cbwctl: %s\n", OutcomeLine(job).c_str());
      }
      return code;
    }

    pollfd fds[2] = {{events_open ? events.fd() : -1, POLLIN, 0}, {InterruptFd(), POLLIN, 0}};
    const double left = last_read + refresh - Now();
    const int timeout_ms = left <= 0 ? 0 : static_cast<int>(std::ceil(left * 1000));
    int n = poll(fds, 2, timeout_ms);
    if (n < 0 && errno != EINTR)
      return Fail(Error{kExitMount, "poll: " + std::string(strerror(errno))});
    if (Interrupted()) continue;

    bool relevant = false;
    if (n > 0 && events_open && (fds[0].revents & (POLLIN | POLLHUP | POLLERR))) {
      std::vector<std::string> lines;
      auto more = events.ReadAvailable(&lines);
      if (!more.ok()) return Fail(more.error());
      for (const auto& line : lines) relevant = relevant || EventConcernsJob(line, id);
      if (!*more) {
        // The daemon is stopping: its last events are in; the record tells
        // the rest, while the mount still answers.
        events_open = false;
        relevant = true;
      }
    }
    if (!relevant && Now() - last_read < refresh) continue;

    last_read = Now();
    auto text = mount.ReadRecord(id);
    if (!text.ok()) {
      if (!options.quiet) Out(printer.Abandon());
      if (text.error().exit_code == kExitInterrupted) continue;
      return Fail(
          Error{kExitMount, "lost job " + id + " before it ended: " + text.error().message});
    }
    if (!*text) {
      if (!options.quiet) Out(printer.Abandon());
      return Fail(Error{kExitMount, "the record of job " + id + " vanished before the job ended"});
    }
    auto next = ParseRecord(**text);
    if (!next.ok()) return Fail(next.error());
    if (next->started != started) {
      if (!options.quiet) Out(printer.Abandon());
      return Fail(Error{kExitMount, "job " + id + " was replaced by a new job of the same id"});
    }
    job = std::move(*next);
  }
}

}  // namespace cbw::ctl
