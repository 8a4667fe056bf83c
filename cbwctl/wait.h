#pragma once

#include <string>

#include "cbwctl/client.h"

namespace cbw::ctl {

struct WaitOptions {
  bool quiet = false;  // no progress output; the outcome of a failed job still shows
  bool tty = false;    // stdout is a terminal: a bar redrawn in place
};

// Follows job `id` until its record has a `result` and returns the exit code
// for it (or for why waiting stopped: kExitRefused when there is no such job,
// kExitMount when its record vanishes or the daemon goes, kExitInterrupted on
// Ctrl-C, which leaves the job running). `events` must have been opened
// before the job's state was last changed by this process (e.g. before its
// drive-backup), so that no event of interest can fall between. Sleeps in
// poll() on events between refreshes: no busy polling. Prints progress to
// stdout and errors to stderr.
int WaitForJob(Mount& mount, EventStream& events, const std::string& id,
               const WaitOptions& options);

}  // namespace cbw::ctl
