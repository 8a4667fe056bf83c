// cbwctl: a client of a mounted cbwfs (SPEC 8). It only uses the mount's
// files; see `cbwctl --help` for commands and exit codes.

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cbwctl/cli.h"
#include "cbwctl/client.h"
#include "cbwctl/mounts.h"
#include "cbwctl/qmp.h"
#include "cbwctl/render.h"
#include "cbwctl/wait.h"

namespace cbw::ctl {
namespace {

int Fail(const Error& e) {
  fprintf(stderr, "cbwctl: %s\n", e.message.c_str());
  if (e.exit_code == kExitUsage) fprintf(stderr, "Try 'cbwctl --help'.\n");
  return e.exit_code;
}

std::string ReadMountinfo() {
  std::ifstream f("/proc/self/mountinfo");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Sends `command`; a QMP error is printed with its desc (kExitRefused).
int Run(Mount& mount, const OrderedJson& command) {
  auto reply = mount.Execute(command);
  if (!reply.ok()) return Fail(reply.error());
  if (!reply->ok) {
    return Fail(Error{kExitRefused, reply->desc.empty() ? reply->error_class : reply->desc});
  }
  return kExitOk;
}

WaitOptions WaitOpts(const Invocation& inv) {
  return WaitOptions{inv.quiet, isatty(STDOUT_FILENO) == 1};
}

int Backup(Mount& mount, const Invocation& inv) {
  BackupArgs args = inv.backup;
  std::vector<char> cwd(4096);
  if (getcwd(cwd.data(), cwd.size()) == nullptr) {
    return Fail(Error{kExitMount, "cannot tell the working directory"});
  }
  args.target = ResolveTarget(args.target, cwd.data());
  // Open events before the job exists, so none of its events can be missed.
  std::optional<EventStream> events;
  if (args.wait) {
    auto e = EventStream::Open(mount);
    if (!e.ok()) return Fail(e.error());
    events = std::move(*e);
  }
  if (int rc = Run(mount, BackupCommand(args)); rc != kExitOk) return rc;
  if (!args.wait) {
    printf("started job %s\n", args.JobId().c_str());
    return kExitOk;
  }
  return WaitForJob(mount, *events, args.JobId(), WaitOpts(inv));
}

int Status(Mount& mount, const Invocation& inv) {
  std::vector<JobView> jobs;
  if (!inv.job.empty()) {
    auto text = mount.ReadRecord(inv.job);
    if (!text.ok()) return Fail(text.error());
    if (!*text) return Fail(Error{kExitRefused, "no such job: " + inv.job});
    auto v = ParseRecord(**text);
    if (!v.ok()) return Fail(v.error());
    fputs(inv.json ? (v->raw + "\n").c_str() : StatusDetail(*v).c_str(), stdout);
    return kExitOk;
  }
  auto ids = mount.JobIds();
  if (!ids.ok()) return Fail(ids.error());
  for (const auto& id : *ids) {
    auto text = mount.ReadRecord(id);
    if (!text.ok()) return Fail(text.error());
    if (!*text) continue;  // ended and removed since the listing
    auto v = ParseRecord(**text);
    if (!v.ok()) return Fail(v.error());
    jobs.push_back(std::move(*v));
  }
  // Oldest first, as a log reads (RFC 3339 UTC strings sort by time).
  std::sort(jobs.begin(), jobs.end(), [](const JobView& a, const JobView& b) {
    return a.started != b.started ? a.started < b.started : a.id < b.id;
  });
  if (inv.json) {
    for (const auto& j : jobs) printf("%s\n", j.raw.c_str());
  } else {
    fputs(StatusTable(jobs).c_str(), stdout);
  }
  return kExitOk;
}

int Wait(Mount& mount, const Invocation& inv) {
  auto events = EventStream::Open(mount);
  if (!events.ok()) return Fail(events.error());
  return WaitForJob(mount, *events, inv.job, WaitOpts(inv));
}

int Main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  auto inv = ParseArgs(args);
  if (!inv.ok()) return Fail(inv.error());
  if (inv->verb == Verb::kHelp) {
    fputs(HelpText().c_str(), stdout);
    return kExitOk;
  }
  if (inv->verb == Verb::kVersion) {
    printf("cbwctl %s\n", CBWFS_VERSION);
    return kExitOk;
  }
  auto where = ChooseMountpoint(inv->mountpoint, getenv("CBWFS_MOUNT"), ReadMountinfo());
  if (!where.ok()) return Fail(where.error());
  auto mount = Mount::Open(*where);
  if (!mount.ok()) return Fail(mount.error());
  switch (inv->verb) {
    case Verb::kBackup:
      return Backup(*mount, *inv);
    case Verb::kStatus:
      return Status(*mount, *inv);
    case Verb::kWait:
      return Wait(*mount, *inv);
    case Verb::kCancel:
      return Run(*mount, CancelCommand(inv->job));
    case Verb::kBitmap:
      return Run(*mount, BitmapCommand(inv->bitmap));
    case Verb::kHelp:
    case Verb::kVersion:
      break;
  }
  return kExitOk;
}

}  // namespace
}  // namespace cbw::ctl

int main(int argc, char** argv) { return cbw::ctl::Main(argc, argv); }
