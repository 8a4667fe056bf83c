#include "tests/ceph/ceph_cluster.h"

#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <thread>

namespace cbw::test {
namespace {

CephCluster* g_cluster = nullptr;

// Starts the cluster before the first test and stops it after the last.
class CephEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    cluster_ = std::make_unique<CephCluster>();
    ::testing::AssertionResult r = cluster_->Start();
    if (!r) {
      cluster_->Stop();
      cluster_.reset();
      GTEST_FAIL() << "cannot start the test Ceph cluster: " << r.message();
    }
    g_cluster = cluster_.get();
  }
  void TearDown() override {
    g_cluster = nullptr;
    if (cluster_) cluster_->Stop();
    cluster_.reset();
  }

 private:
  std::unique_ptr<CephCluster> cluster_;
};

[[maybe_unused]] ::testing::Environment* const kEnvironment =
    ::testing::AddGlobalTestEnvironment(new CephEnvironment);

std::string Script() { return std::string(CBW_SOURCE_DIR) + "/tests/lib/ceph.sh"; }

}  // namespace

CephCluster* CephCluster::Get() { return g_cluster; }

::testing::AssertionResult CephCluster::Start() {
  const char* base = getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/cbwfs-ceph.XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) return ::testing::AssertionFailure() << "mkdtemp";
  dir_ = buf.data();
  CommandResult r =
      RunCommand({Script(), "start", dir_, std::to_string(getpid())}, std::chrono::seconds(120));
  if (r.exit_code != 0) {
    return ::testing::AssertionFailure() << "tests/lib/ceph.sh start: exit " << r.exit_code << "\n"
                                         << r.out << r.err;
  }
  conf_ = dir_ + "/ceph.conf";
  std::string text = ReadFileOrDie(conf_);
  const std::string key = "mon host = v2:";
  size_t p = text.find(key);
  if (p == std::string::npos) return ::testing::AssertionFailure() << "no mon host in " << conf_;
  mon_addr_ = text.substr(p + key.size(), text.find('\n', p) - p - key.size());
  std::cerr << r.out;
  return ::testing::AssertionSuccess();
}

void CephCluster::Stop() {
  if (dir_.empty()) return;
  RunCommand({Script(), "stop", dir_}, std::chrono::seconds(60));
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
  dir_.clear();
}

std::string CephCluster::Spec(const std::string& image, const std::string& pool,
                              const std::string& extra) const {
  return "rbd:" + pool + "/" + image + ":conf=" + conf_ + extra;
}

CommandResult CephCluster::Ceph(const std::vector<std::string>& args,
                                std::chrono::seconds deadline) const {
  std::vector<std::string> argv = {"ceph", "-c", conf_};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunCommand(argv, deadline);
}

CommandResult CephCluster::Rbd(const std::vector<std::string>& args,
                               std::chrono::seconds deadline) const {
  std::vector<std::string> argv = {"rbd", "-c", conf_};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunCommand(argv, deadline);
}

CommandResult CephCluster::Rados(const std::vector<std::string>& args,
                                 std::chrono::seconds deadline) const {
  std::vector<std::string> argv = {"rados", "-c", conf_};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunCommand(argv, deadline);
}

std::string CephCluster::Export(const std::string& image, const std::string& pool) const {
  TempDir tmp;
  CommandResult r = Rbd({"export", "--no-progress", pool + "/" + image, tmp / "image"});
  if (r.exit_code != 0) {
    ADD_FAILURE() << "rbd export " << pool << "/" << image << ": " << r.err;
    return "";
  }
  return ReadFileOrDie(tmp / "image");
}

bool CephCluster::Exists(const std::string& image, const std::string& pool) const {
  return Rbd({"info", pool + "/" + image}).exit_code == 0;
}

void CephCluster::Remove(const std::string& image, const std::string& pool) const {
  // A client that closed its image a moment ago may still be unwatching it.
  CommandResult r;
  bool gone = WaitFor(
      [&] {
        r = Rbd({"rm", "--no-progress", pool + "/" + image});
        return r.exit_code == 0 || r.err.find("No such file") != std::string::npos;
      },
      std::chrono::seconds(30));
  EXPECT_TRUE(gone) << "rbd rm " << pool << "/" << image << ": " << r.err;
}

pid_t CephCluster::OsdPid() const {
  std::string s = ReadFileOrDie(dir_ + "/run/osd.0.pid");
  return s.empty() ? -1 : static_cast<pid_t>(std::atoi(s.c_str()));
}

OsdStopped::OsdStopped() {
  if (CephCluster* c = CephCluster::Get()) pid_ = c->OsdPid();
  if (pid_ > 0) kill(pid_, SIGSTOP);
}

OsdStopped::~OsdStopped() { Resume(); }

void OsdStopped::Resume() {
  if (pid_ > 0) kill(pid_, SIGCONT);
  pid_ = -1;
}

}  // namespace cbw::test
