#pragma once

// A real single-node Ceph cluster for the tests of RBD targets: one mon, one
// osd on memstore, one mgr, auth off, on 127.0.0.1 (tests/lib/ceph.sh). It is
// started once per test binary, by a GoogleTest environment, in a temp dir,
// and always stopped: by the environment's TearDown, and, should the binary
// die first, by the script's watchdog.

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

#include "tests/fs/mount_fixture.h"

namespace cbw::test {

class CephCluster {
 public:
  // The running cluster (null before the environment's SetUp, or if it
  // failed to start: every test then fails with the reason).
  static CephCluster* Get();

  const std::string& dir() const { return dir_; }
  const std::string& conf() const { return conf_; }
  // "127.0.0.1:PORT" of the mon.
  const std::string& mon_addr() const { return mon_addr_; }

  // `rbd:POOL/IMAGE:conf=CONF` plus `extra` (e.g. ":id=admin").
  std::string Spec(const std::string& image, const std::string& pool = "rbd",
                   const std::string& extra = "") const;

  // Runs `ceph`, `rbd` or `rados` against the cluster (-c conf).
  CommandResult Ceph(const std::vector<std::string>& args,
                     std::chrono::seconds deadline = std::chrono::seconds(60)) const;
  CommandResult Rbd(const std::vector<std::string>& args,
                    std::chrono::seconds deadline = std::chrono::seconds(60)) const;
  CommandResult Rados(const std::vector<std::string>& args,
                      std::chrono::seconds deadline = std::chrono::seconds(60)) const;

  // The image's bytes (`rbd export`), or "" (with a test failure) on error.
  std::string Export(const std::string& image, const std::string& pool = "rbd") const;
  // Whether the image exists.
  bool Exists(const std::string& image, const std::string& pool = "rbd") const;
  // Removes the image, retrying while a closing client still watches it.
  void Remove(const std::string& image, const std::string& pool = "rbd") const;

  // The osd's pid (for SIGSTOP/SIGCONT), or -1.
  pid_t OsdPid() const;

  // Starts and stops (used by the environment).
  ::testing::AssertionResult Start();
  void Stop();

 private:
  std::string dir_;
  std::string conf_;
  std::string mon_addr_;
};

// Sends SIGSTOP to the osd now and SIGCONT when it goes out of scope: a
// cluster that stops answering.
class OsdStopped {
 public:
  OsdStopped();
  ~OsdStopped();
  OsdStopped(const OsdStopped&) = delete;
  OsdStopped& operator=(const OsdStopped&) = delete;
  void Resume();

 private:
  pid_t pid_ = -1;
};

}  // namespace cbw::test
