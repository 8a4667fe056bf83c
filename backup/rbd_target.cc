#include "backup/rbd_target.h"

#include <fcntl.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <thread>
#include <unordered_map>

#include "backup/log.h"
#include "backup/mutex.h"
#include "backup/target_path.h"
#include "backup/threads.h"
#include "backup/unique_fd.h"

namespace cbw::backup {

// The handles of one cluster connection. The destructor closes them in
// order (image, io context, cluster); rados_shutdown always runs once
// rados_create succeeded, on every path.
struct RbdTarget::Conn {
  rados_t cluster = nullptr;
  rados_ioctx_t io = nullptr;
  rbd_image_t image = nullptr;
  // Set by Target::Close: I/O fails from then on.
  std::atomic<bool> closed{false};
  // How long one request may take (RbdTuning::timeout).
  std::chrono::milliseconds timeout{30'000};
  // Synchronous calls librbd has not given back yet (some may have timed
  // out for their caller).
  std::shared_ptr<std::atomic<int>> sync_outstanding = std::make_shared<std::atomic<int>>(0);

  Conn() = default;
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;
  ~Conn() {
    CloseImage();
    if (io != nullptr) rados_ioctx_destroy(io);
    if (cluster != nullptr) rados_shutdown(cluster);
  }
  void CloseImage() {
    if (image == nullptr) return;
    if (int r = rbd_close(image); r < 0) {
      LogWarn(std::string("rbd_close: ") + std::strerror(-r));
    }
    image = nullptr;
  }
};

namespace {

constexpr const char* kDefaultConf = "/etc/ceph/ceph.conf";
// The librados options a spec may set (besides conf and id); see RbdSpec.
constexpr const char* kAllowedOptions[] = {"mon_host", "keyring", "auth_client_required"};
// Write-zeroes and writes go to librbd in pieces of at most this: a hole of
// many GiB must not become one request of millions of object operations.
constexpr uint64_t kMaxPiece = 32ull << 20;
// At most this many synchronous calls (CBW copies, view reads) may be in
// librbd at once: on a dead cluster, calls that timed out for their caller
// stay there, and writers must not pile up more of them without end.
constexpr int kMaxSyncCalls = 64;
// How long the process waits at exit for background closes (each is bounded
// by the cluster timeouts; this only stops a wedged librados from keeping a
// finished daemon alive forever).
constexpr auto kExitWait = std::chrono::seconds(75);

// librbd's errno for cbwfs: a pool over its quota is out of space.
int MapErr(int err) { return err == EDQUOT ? ENOSPC : err; }

Status Invalid(const std::string& spec, const std::string& why) {
  return Status::Error(EINVAL, "Invalid RBD target '" + spec + "': " + why);
}

// Splits at the first unescaped `delim` (a backslash escapes the next
// character); *rest gets what follows it, or nullopt when there is none.
std::string NextToken(const std::string& in, char delim, std::optional<std::string>* rest) {
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '\\' && i + 1 < in.size()) {
      ++i;
    } else if (in[i] == delim) {
      std::string head = in.substr(0, i);
      *rest = in.substr(i + 1);  // `in` may be *rest itself
      return head;
    }
  }
  std::string all = in;
  *rest = std::nullopt;
  return all;
}

std::string Unescape(const std::string& in) {
  std::string out;
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '\\' && i + 1 < in.size()) ++i;
    out += in[i];
  }
  return out;
}

bool HasUnescaped(const std::string& in, char c) {
  std::optional<std::string> rest;
  NextToken(in, c, &rest);
  return rest.has_value();
}

// Ceph names (entity ids, pools, namespaces, images) hold no control
// characters; entity ids are letters, digits, '.', '_' and '-'.
bool PrintableName(const std::string& s) {
  return !s.empty() && std::none_of(s.begin(), s.end(), [](unsigned char c) { return c < 0x20; });
}
bool ValidId(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](unsigned char c) {
    return std::isalnum(c) || c == '.' || c == '_' || c == '-';
  });
}

// Opens a file that librados will read (conf, keyring) without ever looking
// anything up inside the mount; librados then reads it as /proc/self/fd/N,
// so the file checked is the file read.
Result<UniqueFd> OpenConfigFile(const TargetRequest& req, const std::string& path,
                                const std::string& what) {
  Result<ResolvedPath> where = ResolvePath(path, req.base_dir, req.mountpoint, req.mount_dev);
  if (!where.ok()) {
    if (where.status().code() == EINVAL) {
      return Status::Error(EINVAL, "The RBD " + what + " file '" + path +
                                       "' is under the mountpoint '" + req.mountpoint + "'");
    }
    return Status::FromErrno(where.status().code(), "error reading " + what + " file " + path);
  }
  if (!where->exists) return Status::FromErrno(ENOENT, "error reading " + what + " file " + path);
  if (!S_ISREG(where->st.st_mode) && !S_ISCHR(where->st.st_mode)) {  // /dev/null is allowed
    return Status::Error(EINVAL, "The RBD " + what + " file '" + path + "' is not a regular file");
  }
  int fd = openat(where->parent.get(), where->name.c_str(),
                  O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) return Status::FromErrno(errno, "error reading " + what + " file " + path);
  return UniqueFd(fd);
}

std::string FdPath(const UniqueFd& fd) { return "/proc/self/fd/" + std::to_string(fd.get()); }

// Closes connections on threads of their own (see RbdTarget: closing may
// wait for a cluster that stopped answering). Made on first use, after
// librados has loaded, and never destroyed (a stuck thread may still hand
// it a connection while the process exits); an atexit handler, which runs
// before librados's own static destructors, waits for the closes still
// running. Thread-safe; mu_ is a leaf lock.
class Closer {
 public:
  static Closer& Get() {
    static Closer* const closer = [] {
      auto* c = new Closer();
      std::atexit([] {
        if (!Get().Wait(kExitWait)) LogWarn("rbd: exiting with cluster connections still closing");
      });
      return c;
    }();
    return *closer;
  }

  void Close(RbdTarget::Conn* conn) CBW_EXCLUDES(mu_) {
    {
      MutexLock lock(&mu_);
      ++pending_;
    }
    std::unique_ptr<RbdTarget::Conn> owned(conn);
    try {
      std::thread([this, c = std::move(owned)]() mutable {
        RunGuarded("rbd-close", [&] { c.reset(); });
        MutexLock lock(&mu_);
        --pending_;
        cv_.SignalAll();
      }).detach();
    } catch (...) {
      // No thread: the lambda (and the connection with it) is gone, closed
      // on this thread.
      MutexLock lock(&mu_);
      --pending_;
      cv_.SignalAll();
    }
  }

  bool Wait(std::chrono::milliseconds timeout) CBW_EXCLUDES(mu_) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    MutexLock lock(&mu_);
    while (pending_ > 0) {
      if (!cv_.WaitUntil(&lock, deadline)) return pending_ == 0;
    }
    return true;
  }

 private:
  Closer() = default;
  ~Closer() = delete;
  Mutex mu_;
  CondVar cv_;
  unsigned pending_ CBW_GUARDED_BY(mu_) = 0;
};

// What a queue shares with librbd's callback threads: finished pieces and
// the eventfd that says so. Each piece in flight holds a reference, so a
// callback never touches freed memory, whenever it runs.
struct QueueShared {
  Mutex mu;                                                       // a leaf lock
  std::vector<std::pair<uint64_t, int>> done CBW_GUARDED_BY(mu);  // (op id, errno)
  UniqueFd event_fd;

  void Post(uint64_t op, int err) CBW_EXCLUDES(mu) {
    {
      MutexLock lock(&mu);
      done.emplace_back(op, err);
    }
    uint64_t one = 1;
    if (write(event_fd.get(), &one, sizeof one) < 0) { /* the counter cannot overflow here */
    }
  }
};

struct PieceArg {
  std::shared_ptr<QueueShared> shared;
  uint64_t op = 0;
};

// librbd's completion callback for a queue's piece, on one of librbd's
// threads.
void OnPieceDone(rbd_completion_t c, void* arg) {
  std::unique_ptr<PieceArg> p(static_cast<PieceArg*>(arg));
  RunGuarded("rbd-completion", [&] {
    const ssize_t r = rbd_aio_get_return_value(c);
    rbd_aio_release(c);
    p->shared->Post(p->op, r < 0 ? MapErr(static_cast<int>(-r)) : 0);
  });
}

// The copier's queue on an RBD image: rbd_aio_write / rbd_aio_write_zeroes,
// at most `depth` pieces in flight; what does not fit waits here and goes
// out as pieces finish (in Reap).
//
// Deadlines: a request not done within the timeout completes with ETIMEDOUT
// (librados's own timeouts apply to each operation, but librbd queues the
// requests of an image behind one exclusive-lock acquisition, so on a dead
// cluster its Nth request fails only after N timeouts). Its pieces stay
// counted against the depth until librbd gives them back, so a dead cluster
// never holds more than `depth` of them. poll_fd is an epoll set of the
// completion eventfd and a timerfd armed for the oldest deadline.
//
// Not thread-safe (the copier's thread); callbacks only touch QueueShared.
class RbdQueue : public TargetQueue {
 public:
  RbdQueue(std::shared_ptr<RbdTarget::Conn> conn, unsigned depth,
           std::shared_ptr<QueueShared> shared, UniqueFd timer_fd, UniqueFd epoll_fd)
      : conn_(std::move(conn)),
        depth_(std::max(1u, depth)),
        shared_(std::move(shared)),
        timer_fd_(std::move(timer_fd)),
        epoll_fd_(std::move(epoll_fd)) {}

  int poll_fd() const override { return epoll_fd_.get(); }
  unsigned in_flight() const override { return static_cast<unsigned>(ops_.size()); }

  void SubmitWrite(const char* buf, size_t len, uint64_t off, uint64_t tag) override {
    Add(tag, buf, off, len);
  }
  void SubmitZeroes(uint64_t off, uint64_t len, uint64_t tag) override {
    Add(tag, nullptr, off, len);
  }

  void Reap(std::vector<TargetCompletion>* out) override {
    uint64_t v;
    if (read(shared_->event_fd.get(), &v, sizeof v) < 0) { /* nothing new */
    }
    if (read(timer_fd_.get(), &v, sizeof v) < 0) { /* not expired */
    }
    std::vector<std::pair<uint64_t, int>> done;
    {
      MutexLock lock(&shared_->mu);
      done.swap(shared_->done);
    }
    for (const auto& [id, err] : done) {
      --pieces_in_flight_;  // a late piece of an expired request, too
      auto it = ops_.find(id);
      if (it == ops_.end()) continue;
      Op& op = it->second;
      --op.pending;
      if (err != 0 && op.error == 0) op.error = err;
      if (op.issued == op.len && op.pending == 0) {
        out->push_back({op.tag, op.error});
        ops_.erase(it);
      }
    }
    Expire(out);
    Pump();
    ArmTimer();
  }

 private:
  struct Op {
    uint64_t tag = 0;
    const char* buf = nullptr;  // null: write zeroes
    uint64_t off = 0, len = 0;
    uint64_t issued = 0;   // bytes handed to librbd (or failed at once)
    unsigned pending = 0;  // pieces not yet reaped
    int error = 0;         // the first error
    std::chrono::steady_clock::time_point deadline;
  };

  void Add(uint64_t tag, const char* buf, uint64_t off, uint64_t len) {
    const uint64_t id = next_id_++;
    Op op;
    op.tag = tag;
    op.buf = buf;
    op.off = off;
    op.len = len;
    op.deadline = std::chrono::steady_clock::now() + conn_->timeout;
    order_.push_back(id);
    if (len == 0) {
      // Nothing to send: complete it through the same path as the others.
      op.pending = 1;
      ++pieces_in_flight_;
      ops_.emplace(id, op);
      shared_->Post(id, 0);
    } else {
      ops_.emplace(id, op);
      waiting_.push_back(id);
      Pump();
    }
    ArmTimer();
  }

  void Pump() {
    while (pieces_in_flight_ < depth_ && !waiting_.empty()) {
      const uint64_t id = waiting_.front();
      auto it = ops_.find(id);
      if (it == ops_.end()) {  // expired before all of it went out
        waiting_.pop_front();
        continue;
      }
      Op& op = it->second;
      const uint64_t n = std::min(kMaxPiece, op.len - op.issued);
      const uint64_t off = op.off + op.issued;
      const char* buf = op.buf == nullptr ? nullptr : op.buf + op.issued;
      op.issued += n;
      ++op.pending;
      ++pieces_in_flight_;
      if (op.issued == op.len) waiting_.pop_front();
      Issue(id, buf, off, n);
    }
  }

  void Issue(uint64_t id, const char* buf, uint64_t off, uint64_t len) {
    if (conn_->closed.load() || conn_->image == nullptr) return shared_->Post(id, EIO);
    auto arg = std::make_unique<PieceArg>();
    arg->shared = shared_;
    arg->op = id;
    rbd_completion_t c = nullptr;
    int r = rbd_aio_create_completion(arg.get(), OnPieceDone, &c);
    if (r < 0) return shared_->Post(id, -r);
    // librbd copies the data here (rbd_disable_zero_copy_writes), so the
    // copier's buffer is free again even if this request outlives its
    // deadline.
    r = buf != nullptr ? rbd_aio_write(conn_->image, off, len, buf, c)
                       : rbd_aio_write_zeroes(conn_->image, off, len, c, 0, 0);
    if (r < 0) {
      rbd_aio_release(c);
      return shared_->Post(id, MapErr(-r));
    }
    arg.release();  // OnPieceDone owns it now
  }

  // Completes the requests whose deadline passed with ETIMEDOUT. All share
  // one timeout, so deadlines grow in submission order.
  void Expire(std::vector<TargetCompletion>* out) {
    const auto now = std::chrono::steady_clock::now();
    while (!order_.empty()) {
      auto it = ops_.find(order_.front());
      if (it == ops_.end()) {
        order_.pop_front();
        continue;
      }
      if (it->second.deadline > now) break;
      out->push_back({it->second.tag, ETIMEDOUT});
      ops_.erase(it);
      order_.pop_front();
    }
  }

  void ArmTimer() {
    while (!order_.empty() && ops_.count(order_.front()) == 0) order_.pop_front();
    itimerspec its{};
    if (!order_.empty()) {
      auto left = ops_.at(order_.front()).deadline - std::chrono::steady_clock::now();
      auto ns =
          std::max<int64_t>(1, std::chrono::duration_cast<std::chrono::nanoseconds>(left).count());
      its.it_value.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
      its.it_value.tv_nsec = static_cast<long>(ns % 1'000'000'000);
    }
    timerfd_settime(timer_fd_.get(), 0, &its, nullptr);  // all zero: disarmed
  }

  const std::shared_ptr<RbdTarget::Conn> conn_;
  const unsigned depth_;
  const std::shared_ptr<QueueShared> shared_;
  const UniqueFd timer_fd_;
  const UniqueFd epoll_fd_;
  uint64_t next_id_ = 1;
  unsigned pieces_in_flight_ = 0;         // issued to librbd, not yet given back
  std::unordered_map<uint64_t, Op> ops_;  // submitted, not yet completed
  std::deque<uint64_t> waiting_;          // ops with pieces not yet issued
  std::deque<uint64_t> order_;            // ops by submission (deadline) order
};

// One synchronous call (the CBW path, snapshot views, the final flush):
// an aio request waited for with the connection's timeout. A call that
// times out stays in librbd and finishes there; it holds this state (and
// the bytes a read lands in) until then, so nothing it touches goes away.
struct SyncCall {
  Mutex mu;  // a leaf lock
  CondVar cv;
  bool done CBW_GUARDED_BY(mu) = false;
  ssize_t result CBW_GUARDED_BY(mu) = 0;
  std::vector<char> buf;  // a read's bytes
  std::shared_ptr<std::atomic<int>> outstanding;
};

void OnSyncDone(rbd_completion_t c, void* arg) {
  std::unique_ptr<std::shared_ptr<SyncCall>> call(static_cast<std::shared_ptr<SyncCall>*>(arg));
  RunGuarded("rbd-completion", [&] {
    const ssize_t r = rbd_aio_get_return_value(c);
    rbd_aio_release(c);
    (*call)->outstanding->fetch_sub(1);
    MutexLock lock(&(*call)->mu);
    (*call)->result = r;
    (*call)->done = true;
    (*call)->cv.SignalAll();
  });
}

}  // namespace

bool IsRbdSpec(const std::string& spec) { return spec.rfind("rbd:", 0) == 0; }

Result<RbdSpec> ParseRbdSpec(const std::string& text) {
  if (!IsRbdSpec(text)) return Invalid(text, "it must start with 'rbd:'");
  RbdSpec s;
  std::optional<std::string> rest;
  // POOL / [NAMESPACE /] IMAGE [@SNAP] [: options]
  std::string pool = NextToken(text.substr(4), '/', &rest);
  if (!rest) return Invalid(text, "expected rbd:POOL/[NAMESPACE/]IMAGE");
  std::optional<std::string> opts;
  std::string name = NextToken(*rest, ':', &opts);
  if (HasUnescaped(name, '@')) {
    return Invalid(text, "a snapshot is read-only and cannot be a backup target");
  }
  std::optional<std::string> after_ns;
  std::string first = NextToken(name, '/', &after_ns);
  if (after_ns) {
    if (HasUnescaped(*after_ns, '/')) return Invalid(text, "too many '/' in the image name");
    s.ns = Unescape(first);
    s.image = Unescape(*after_ns);
    if (s.ns.empty()) return Invalid(text, "the namespace name is empty");
  } else {
    s.image = Unescape(first);
  }
  s.pool = Unescape(pool);
  if (s.pool.empty()) return Invalid(text, "the pool name is empty");
  if (s.image.empty()) return Invalid(text, "the image name is empty");
  for (const std::string* n : {&s.pool, &s.ns, &s.image}) {
    if (!n->empty() && !PrintableName(*n)) return Invalid(text, "control character in a name");
  }
  while (opts) {
    std::string kv = NextToken(*opts, ':', &opts);
    std::optional<std::string> value;
    std::string key = Unescape(NextToken(kv, '=', &value));
    if (key.empty()) return Invalid(text, "empty option");
    if (!value) return Invalid(text, "conf option " + key + " has no value");
    std::string v = Unescape(*value);
    std::replace(key.begin(), key.end(), '-', '_');
    std::replace(key.begin(), key.end(), ' ', '_');
    if (key == "conf") {
      if (v.empty()) return Invalid(text, "conf has an empty path");
      s.conf = v;
    } else if (key == "id") {
      if (!ValidId(v)) return Invalid(text, "invalid id '" + v + "'");
      s.id = v;
    } else if (key == "key") {
      return Invalid(text, "a key in the target name would show in job records; use a keyring");
    } else if (std::find_if(std::begin(kAllowedOptions), std::end(kAllowedOptions),
                            [&](const char* a) { return key == a; }) != std::end(kAllowedOptions)) {
      if (v.empty() || !PrintableName(v)) return Invalid(text, "bad value for " + key);
      s.options.emplace_back(key, v);
    } else {
      return Invalid(text, "conf option " + key +
                               " is not supported (cbwfs accepts conf, id, mon_host, keyring, "
                               "auth_client_required)");
    }
  }
  return s;
}

Result<std::shared_ptr<RbdTarget>> RbdTarget::Open(const TargetRequest& req,
                                                   const RbdTuning& tuning) {
  Result<RbdSpec> parsed = ParseRbdSpec(req.spec);
  if (!parsed.ok()) return parsed.status();
  if (req.format && *req.format != "raw") {
    return Status::Error(EINVAL, "Format '" + *req.format + "' is not supported for RBD target '" +
                                     req.spec + "' (RBD images are written as raw)");
  }
  std::shared_ptr<RbdTarget> t(new RbdTarget());
  t->spec_ = std::move(*parsed);
  t->spec_text_ = req.spec;
  t->display_ = req.spec;
  const RbdSpec& s = t->spec_;

  // Files librados reads, opened outside the mount first. Without conf=,
  // librados would look in $CEPH_CONF, then /etc/ceph/ceph.conf: the same
  // files are checked and read here, and, as QEMU does, a missing default
  // file is no error.
  UniqueFd conf_fd;  // invalid: no conf file
  std::string conf_path;
  if (s.conf) {
    conf_path = *s.conf;
    Result<UniqueFd> fd = OpenConfigFile(req, conf_path, "conf");
    if (!fd.ok()) return fd.status();
    conf_fd = std::move(*fd);
  } else {
    const char* env = std::getenv("CEPH_CONF");
    for (std::string path : {std::string(env != nullptr ? env : ""), std::string(kDefaultConf)}) {
      if (path.empty()) continue;
      Result<UniqueFd> fd = OpenConfigFile(req, path, "conf");
      if (!fd.ok() && fd.status().code() == ENOENT) continue;
      if (!fd.ok()) return fd.status();
      conf_path = path;
      conf_fd = std::move(*fd);
      break;
    }
  }
  std::vector<UniqueFd> option_fds;  // keyrings, open until connected

  // Every handle from here on is closed by `conn` on any return.
  auto conn = std::make_unique<Conn>();
  if (int r = rados_create(&conn->cluster, s.id ? s.id->c_str() : nullptr); r < 0) {
    conn->cluster = nullptr;
    return Status::FromErrno(-r, "error initializing");
  }
  if (conf_fd.valid()) {
    if (int r = rados_conf_read_file(conn->cluster, FdPath(conf_fd).c_str()); r < 0) {
      return Status::FromErrno(-r, "error reading conf file " + conf_path);
    }
  }
  for (const auto& [key, value] : s.options) {
    std::string v = value;
    if (key == "keyring") {
      Result<UniqueFd> fd = OpenConfigFile(req, value, "keyring");
      if (!fd.ok()) return fd.status();
      v = FdPath(*fd);
      option_fds.push_back(std::move(*fd));
    }
    if (rados_conf_set(conn->cluster, key.c_str(), v.c_str()) < 0) {
      return Status::Error(EINVAL, "invalid conf option " + key);
    }
  }
  // Last, so that no conf file can undo them: bounded waits on a dead
  // cluster; no client cache (write errors must reach the job, and a write
  // that returned must be on the OSDs); librbd copies write buffers.
  const std::string secs = std::to_string(std::max<int64_t>(1, tuning.timeout.count()));
  const std::pair<const char*, std::string> ours[] = {
      {"rados_osd_op_timeout", secs},           {"rados_mon_op_timeout", secs},
      {"client_mount_timeout", secs},           {"rbd_cache", "false"},
      {"rbd_disable_zero_copy_writes", "true"},
  };
  for (const auto& [key, value] : ours) {
    if (int r = rados_conf_set(conn->cluster, key, value.c_str()); r < 0) {
      return Status::FromErrno(-r, std::string("error setting ") + key);
    }
  }
  if (int r = rados_connect(conn->cluster); r < 0) {
    return Status::FromErrno(-r, "error connecting");
  }
  option_fds.clear();
  conf_fd.Reset();
  char fsid[64] = {};
  if (int r = rados_cluster_fsid(conn->cluster, fsid, sizeof fsid - 1); r < 0) {
    return Status::FromErrno(-r, "error reading the cluster's fsid");
  }
  if (int r = rados_ioctx_create(conn->cluster, s.pool.c_str(), &conn->io); r < 0) {
    conn->io = nullptr;
    return Status::FromErrno(-r, "error opening pool " + s.pool);
  }
  // A full pool (over its quota) or cluster answers writes with EDQUOT or
  // ENOSPC (the enospc policy) instead of librados holding them, and even
  // the image's open (its watch), until there is room: that would only end
  // in a timeout.
  rados_set_pool_full_try(conn->io);
  if (!s.ns.empty()) {
    bool exists = false;
    if (int r = rbd_namespace_exists(conn->io, s.ns.c_str(), &exists); r < 0 || !exists) {
      return Status::FromErrno(r < 0 ? -r : ENOENT, "error opening namespace " + s.ns);
    }
    rados_ioctx_set_namespace(conn->io, s.ns.c_str());
  }
  t->identity_ = "rbd:" + std::string(fsid) + "/" + std::to_string(rados_ioctx_get_id(conn->io)) +
                 "/" + s.ns + "/" + s.image;

  int r = rbd_open(conn->io, s.image.c_str(), &conn->image, nullptr);
  if (r == -ENOENT && req.mode == TargetMode::kAbsolutePaths) {
    conn->image = nullptr;
    t->create_size_ = req.size;
    t->size_ = req.size;
  } else if (r < 0) {
    conn->image = nullptr;
    return Status::FromErrno(-r, "error reading header from " + s.image);
  } else {
    uint64_t size = 0;
    if (int e = rbd_get_size(conn->image, &size); e < 0) {
      return Status::FromErrno(-e, "error reading header from " + s.image);
    }
    if (size < req.size) {
      return Status::Error(EINVAL, "Target '" + req.spec + "' is smaller than the drive (" +
                                       std::to_string(size) + " < " + std::to_string(req.size) +
                                       " bytes)");
    }
    if (req.mode == TargetMode::kExisting && !req.format) {
      // As for files: an image that holds another format is never
      // overwritten as raw unless the user says format raw.
      char head[512] = {};
      ssize_t n = rbd_read(conn->image, 0, std::min<uint64_t>(sizeof head, size), head);
      if (n < 0) return Status::FromErrno(static_cast<int>(-n), "read from target");
      if (auto fmt =
              ProbeImageFormat(reinterpret_cast<unsigned char*>(head), static_cast<size_t>(n))) {
        return Status::Error(EINVAL, "Target '" + req.spec + "' is a " + *fmt +
                                         " image; refusing to overwrite it as raw "
                                         "(give format 'raw' to force)");
      }
    }
    t->size_ = size;
  }
  // From here on the connection closes in the background (see the header).
  conn->timeout = std::chrono::duration_cast<std::chrono::milliseconds>(tuning.timeout);
  t->conn_ = std::shared_ptr<Conn>(conn.release(), [](Conn* c) { Closer::Get().Close(c); });
  return t;
}

RbdTarget::~RbdTarget() = default;

Status RbdTarget::Prepare() {
  if (create_size_ == 0 || created_) return Status::Ok();
  rbd_image_options_t opts;
  rbd_image_options_create(&opts);
  int r = rbd_create4(conn_->io, spec_.image.c_str(), create_size_, opts);
  rbd_image_options_destroy(opts);
  if (r < 0) return Status::FromErrno(MapErr(-r), "error rbd create");
  created_ = true;
  r = rbd_open(conn_->io, spec_.image.c_str(), &conn_->image, nullptr);
  if (r < 0) {
    conn_->image = nullptr;
    return Status::FromErrno(-r, "error reading header from " + spec_.image);
  }
  zeroed_ = true;  // nothing was ever written to it
  return Status::Ok();
}

void RbdTarget::Discard() {
  conn_->CloseImage();
  if (!created_) return;
  created_ = false;
  if (int r = rbd_remove(conn_->io, spec_.image.c_str()); r < 0) {
    LogWarn("could not remove the RBD image created for '" + spec_text_ +
            "': " + std::strerror(-r));
  }
}

Status RbdTarget::Usable() const {
  if (conn_->closed.load()) return Status::Error(EIO, "target '" + spec_text_ + "' is closed");
  if (conn_->image == nullptr) return Status::Error(EIO, "target '" + spec_text_ + "' is not open");
  return Status::Ok();
}

Status RbdTarget::Sync(Call kind, uint64_t off, uint64_t len, const char* wbuf, char* rbuf) {
  if (Status s = Usable(); !s.ok()) return s;
  const char* what = kind == Call::kWrite  ? "write to target"
                     : kind == Call::kZero ? "zero target"
                     : kind == Call::kRead ? "read from target"
                                           : "flush of target";
  if (conn_->sync_outstanding->load() >= kMaxSyncCalls) {
    return Status::Error(ETIMEDOUT, std::string(what) + ": target not answering");
  }
  auto call = std::make_shared<SyncCall>();
  call->outstanding = conn_->sync_outstanding;
  if (kind == Call::kRead) call->buf.resize(len);
  auto arg = std::make_unique<std::shared_ptr<SyncCall>>(call);
  rbd_completion_t c = nullptr;
  if (int r = rbd_aio_create_completion(arg.get(), OnSyncDone, &c); r < 0) {
    return Status::FromErrno(-r, what);
  }
  call->outstanding->fetch_add(1);
  int r = 0;
  switch (kind) {
    case Call::kWrite:  // librbd copies the bytes now (see Open)
      r = rbd_aio_write(conn_->image, off, len, wbuf, c);
      break;
    case Call::kZero:
      r = rbd_aio_write_zeroes(conn_->image, off, len, c, 0, 0);
      break;
    case Call::kRead:
      r = rbd_aio_read(conn_->image, off, len, call->buf.data(), c);
      break;
    case Call::kFlush:
      r = rbd_aio_flush(conn_->image, c);
      break;
  }
  if (r < 0) {
    call->outstanding->fetch_sub(1);
    rbd_aio_release(c);
    return Status::FromErrno(MapErr(-r), what);
  }
  arg.release();  // OnSyncDone owns it now
  ssize_t result;
  {
    const auto deadline = std::chrono::steady_clock::now() + conn_->timeout;
    MutexLock lock(&call->mu);
    while (!call->done) {
      if (!call->cv.WaitUntil(&lock, deadline) && !call->done) {
        return Status::FromErrno(ETIMEDOUT, what);
      }
    }
    result = call->result;
  }
  if (result < 0) return Status::FromErrno(MapErr(static_cast<int>(-result)), what);
  if (kind == Call::kRead) {
    const size_t n = std::min<size_t>(static_cast<size_t>(result), len);
    std::memcpy(rbuf, call->buf.data(), n);
    std::memset(rbuf + n, 0, len - n);
  }
  return Status::Ok();
}

Status RbdTarget::Write(const char* buf, size_t len, uint64_t off) {
  for (uint64_t done = 0; done < len;) {
    const uint64_t n = std::min<uint64_t>(len - done, kMaxPiece);
    if (Status s = Sync(Call::kWrite, off + done, n, buf + done, nullptr); !s.ok()) return s;
    done += n;
  }
  return Status::Ok();
}

Status RbdTarget::WriteZeroes(uint64_t off, uint64_t len) {
  for (uint64_t done = 0; done < len;) {
    const uint64_t n = std::min<uint64_t>(len - done, kMaxPiece);
    if (Status s = Sync(Call::kZero, off + done, n, nullptr, nullptr); !s.ok()) return s;
    done += n;
  }
  return Status::Ok();
}

Status RbdTarget::Read(char* buf, size_t len, uint64_t off) {
  if (Status s = Usable(); !s.ok()) return s;
  // The image is at least the drive's size, but read as Target promises:
  // zeros past its end.
  const uint64_t have = off >= size_ ? 0 : std::min<uint64_t>(len, size_ - off);
  for (uint64_t done = 0; done < have;) {
    const uint64_t n = std::min<uint64_t>(have - done, kMaxPiece);
    if (Status s = Sync(Call::kRead, off + done, n, nullptr, buf + done); !s.ok()) return s;
    done += n;
  }
  if (have < len) std::memset(buf + have, 0, len - have);
  return Status::Ok();
}

Status RbdTarget::Flush() { return Sync(Call::kFlush, 0, 0, nullptr, nullptr); }

Result<std::unique_ptr<TargetQueue>> RbdTarget::OpenQueue(unsigned depth) {
  if (Status s = Usable(); !s.ok()) return s;
  auto shared = std::make_shared<QueueShared>();
  shared->event_fd.Reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!shared->event_fd.valid()) return Status::FromErrno(errno, "eventfd");
  UniqueFd timer(timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
  if (!timer.valid()) return Status::FromErrno(errno, "timerfd_create");
  UniqueFd ep(epoll_create1(EPOLL_CLOEXEC));
  if (!ep.valid()) return Status::FromErrno(errno, "epoll_create1");
  for (int fd : {shared->event_fd.get(), timer.get()}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (epoll_ctl(ep.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
      return Status::FromErrno(errno, "epoll_ctl");
  }
  return std::unique_ptr<TargetQueue>(
      new RbdQueue(conn_, depth, std::move(shared), std::move(timer), std::move(ep)));
}

Status RbdTarget::Close() {
  conn_->closed.store(true);
  return Status::Ok();
}

bool RbdTarget::WaitClosed(std::chrono::milliseconds timeout) {
  return Closer::Get().Wait(timeout);
}

}  // namespace cbw::backup
