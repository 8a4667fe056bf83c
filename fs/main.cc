// cbwfs: the composition root. Parses the command line, opens the drives,
// wires engine, control plane and FUSE edge together, mounts, optionally
// detaches, runs the multithreaded FUSE loop, and tears down in order.
#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "backup/drive.h"
#include "backup/event_bus.h"
#include "backup/job_registry.h"
#include "backup/log.h"
#include "control/dispatcher.h"
#include "control/job_record_codec.h"
#include "fs/cbw_fs.h"
#include "fs/options.h"
#include "fs/session.h"
#include "qmp/server.h"

namespace {

using cbw::backup::LogError;
using cbw::backup::LogInfo;

int Fail(const std::string& msg) {
  LogError(msg);
  return 1;
}

// A path as given, made absolute against the start directory (the daemon
// later runs in "/").
std::string Absolute(const std::string& path, const char* cwd) {
  if (path.empty() || path[0] == '/') return path;
  return std::string(cwd) + "/" + path;
}

int Run(int argc, char** argv) {
  auto parsed = cbw::fs::ParseOptions(argc, argv);
  if (!parsed.ok()) {
    std::cerr << "cbwfs: " << parsed.status().message() << "\n";
    // A config file that cannot be read is not a usage error.
    if (parsed.status().code() != EINVAL) return 1;
    std::cerr << "Try 'cbwfs --help' for more information.\n";
    return 2;
  }
  cbw::fs::Options opts = std::move(parsed).value();
  if (opts.help) {
    std::cout << cbw::fs::UsageText();
    return 0;
  }
  if (opts.version) {
    std::cout << "cbwfs " << CBWFS_VERSION << " (libfuse " << fuse_pkgversion() << ")\n";
    return 0;
  }
  cbw::backup::SetLogLevel(opts.log_level);
  // systemd's readiness protocol (Type=notify; sd_notify is a no-op unless
  // NOTIFY_SOCKET is set): READY=1 at FUSE init, STOPPING=1 once, whichever
  // way the stop began.
  std::atomic<bool> said_stopping{false};
  auto notify_stopping = [&said_stopping] {
    if (!said_stopping.exchange(true)) sd_notify(0, "STOPPING=1");
  };
  char cwd[PATH_MAX];
  if (!getcwd(cwd, sizeof cwd)) return Fail(std::string("getcwd: ") + std::strerror(errno));
  if (!opts.log_file.empty()) {
    cbw::backup::Status ls =
        cbw::backup::SetLogFile(opts.log_file == "-" ? "-" : Absolute(opts.log_file, cwd));
    if (!ls.ok()) return Fail(ls.message());
    // Until the daemon detaches (or, in the foreground, until the mount is
    // live) messages also reach the terminal, so a failed start is seen.
    cbw::backup::SetLogCopyToStderr(true);
  } else if (!opts.foreground && !cbw::backup::SyslogSocketAvailable()) {
    cbw::backup::LogWarn(
        "no syslog socket (/dev/log): messages are on stderr until cbwfs detaches and lost "
        "after that; use --log-file PATH to keep them");
  }

  // The mountpoint, resolved now: targets under it are refused by path.
  // statfs always asks the filesystem (stat may answer from a dead FUSE
  // mount's attribute cache), so it is what tells a leftover mount apart.
  struct statfs mfs {};
  struct stat mst {};
  if (statfs(opts.mountpoint.c_str(), &mfs) != 0 || stat(opts.mountpoint.c_str(), &mst) != 0) {
    int e = errno;
    if (e == ENOTCONN) {
      return Fail("mountpoint '" + opts.mountpoint + "': a dead cbwfs left its mount behind (" +
                  std::strerror(e) + "); run 'fusermount3 -uz " + opts.mountpoint + "' first");
    }
    return Fail("mountpoint '" + opts.mountpoint + "': " + std::strerror(e));
  }
  if (!S_ISDIR(mst.st_mode)) {
    return Fail("mountpoint '" + opts.mountpoint + "': " + std::strerror(ENOTDIR));
  }
  char real[PATH_MAX];
  if (!realpath(opts.mountpoint.c_str(), real)) {
    return Fail("mountpoint '" + opts.mountpoint + "': " + std::strerror(errno));
  }

  std::vector<std::unique_ptr<cbw::backup::Drive>> drives;
  std::vector<cbw::backup::Drive*> drive_ptrs;
  for (cbw::backup::DriveConfig dc : opts.drives) {
    // SPEC 8: a cbwfs still exiting (flushing) holds the source a moment
    // after its unmount; a restart waits for it rather than failing.
    dc.lock_wait = std::chrono::seconds(10);
    auto d = cbw::backup::Drive::Open(dc);
    if (!d.ok()) return Fail("drive '" + dc.name + "': " + d.status().message());
    drive_ptrs.push_back(d->get());
    drives.push_back(std::move(d).value());
  }

  cbw::backup::EventBus bus;
  cbw::backup::RegistryOptions ropts;
  // The FUSE edge exists only after the registry: the hook reaches it
  // through this pointer, set once it does (and cleared before it goes).
  std::atomic<cbw::fs::CbwFs*> edge{nullptr};
  if (opts.writeback_cache) {
    // SPEC 9: the kernel's dirty pages of the drives reach cbwfs before the
    // point in time is fixed (called with no registry lock held).
    ropts.before_point_in_time = [&edge](const std::vector<cbw::backup::Drive*>& ds) {
      if (cbw::fs::CbwFs* f = edge.load()) f->WriteBackDrives(ds);
    };
  }
  ropts.cluster_size = opts.cluster_size;
  ropts.cbw_buffer_bytes = opts.cbw_buffer_bytes;
  ropts.mountpoint = real;
  ropts.base_dir = cwd;
  ropts.state_dir = opts.state_dir;
  ropts.record_codec = std::make_shared<cbw::control::JsonJobRecordCodec>();
  if (!ropts.state_dir.empty() && ropts.state_dir[0] != '/') {
    ropts.state_dir = std::string(cwd) + "/" + ropts.state_dir;
  }
  // Job records of earlier runs are loaded here; an unusable state dir ends
  // the start, before anything is mounted.
  auto opened = cbw::backup::JobRegistry::Open(drive_ptrs, &bus, ropts);
  if (!opened.ok()) return Fail(opened.status().message());
  cbw::backup::JobRegistry& registry = **opened;
  cbw::control::Dispatcher dispatcher(&registry);
  cbw::fs::CbwFs::Config fcfg;
  fcfg.uid = getuid();
  fcfg.gid = getgid();
  fcfg.cluster_size = opts.cluster_size;
  fcfg.writeback_cache = opts.writeback_cache;
  cbw::fs::CbwFs fs(&registry, &bus, &dispatcher, fcfg);
  edge = &fs;
  struct ClearEdge {
    std::atomic<cbw::fs::CbwFs*>* edge;
    ~ClearEdge() { edge->store(nullptr); }
  } clear_edge{&edge};

  // The QMP socket exists before the mount is announced live, so a client
  // started right after cbwfs returns finds it.
  std::unique_ptr<cbw::qmp::Server> qmp;
  if (!opts.qmp_path.empty()) {
    auto listening = cbw::qmp::Server::Listen(Absolute(opts.qmp_path, cwd), &dispatcher, &bus);
    if (!listening.ok()) return Fail(listening.status().message());
    qmp = std::move(listening).value();
  }
  if (opts.foreground) {
    const std::string status = std::string("STATUS=serving ") + real;
    fs.SetOnInit([status] {
      cbw::backup::SetLogCopyToStderr(false);
      sd_notify(0, ("READY=1\n" + status).c_str());
    });
  }

  cbw::fs::Session session(&fs, opts.mount_options);
  // A control write that fixes a point in time in writeback-cache mode holds
  // its worker while the kernel's write-back of the drives needs others:
  // leave room for many such commands at once (workers start on demand).
  if (opts.writeback_cache) session.set_max_threads(64);
  cbw::backup::Status s = session.Mount(real);
  if (!s.ok()) return Fail(s.message());
  // Targets on the mount are refused by its device number, which mountinfo
  // tells without asking the (not yet serving) filesystem.
  if (auto dev = cbw::fs::MountDevice(real)) {
    registry.SetMountDevice(*dev);
  } else {
    cbw::backup::LogWarn(std::string("could not find the mount of '") + real +
                         "' in /proc/self/mountinfo; targets are refused by path only");
  }

  if (!opts.foreground) {
    s = session.Daemonize();
    if (!s.ok()) return Fail(s.message());
    // Only the detached child gets here; the parent exited in Daemonize.
    // Its stderr is /dev/null now.
    cbw::backup::SetLogCopyToStderr(false);
  }
  // Threads start here, in the process that serves (fork keeps none).
  registry.StartBackgroundThreads();
  fs.Start();
  if (qmp) qmp->Start();
  LogInfo(std::string("mounted on ") + real);
  s = session.Loop([&] {
    // A signal: cancel the jobs while the mount still serves, so events
    // readers get BLOCK_JOB_CANCELLED and then end-of-file.
    notify_stopping();
    registry.Shutdown();
    fs.StopEvents(std::chrono::seconds(2));
  });
  // Teardown order: stop jobs (their events still reach open readers and QMP
  // clients), end parked reads and QMP connections, unmount, then the drives
  // are flushed and closed as they go out of scope.
  notify_stopping();
  registry.Shutdown();
  if (qmp) qmp->Stop();
  fs.Shutdown();
  session.Unmount();
  for (auto* d : drive_ptrs) {
    if (!d->Quiesce(std::chrono::seconds(35))) {
      LogError("drive '" + d->name() + "': writes still in flight at stop");
    }
    auto fr = d->Flush(false);
    if (!fr.ok()) LogError(fr.message());
  }
  // No write can come any more: persistent bitmaps are saved with the
  // sources' final state (a clean stop, SPEC 7).
  registry.SaveBitmapsAtStop();
  if (registry.LeftJobsBehind()) {
    // A job stuck on its target still runs and uses the drives, the bus and
    // the registry: end here, before their destructors run under it.
    // Everything that must last is done (records and bitmaps saved, sources
    // flushed); the kernel closes the rest.
    if (!s.ok()) LogError(s.message());
    LogInfo("unmounted; a job stuck on its target was left behind");
    std::_Exit(s.ok() ? 0 : 1);
  }
  if (!s.ok()) return Fail(s.message());
  LogInfo("unmounted cleanly");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "cbwfs: " << e.what() << "\n";
    return 1;
  }
}
