#include "backup/nbd_target.h"

#include <libnbd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>

#include "backup/log.h"
#include "backup/posix_io.h"
#include "backup/target_path.h"
#include "backup/threads.h"

namespace cbw::backup {
namespace {

constexpr const char* kDefaultPort = "10809";
// When the server advertises no maximum: what QEMU and most servers accept.
constexpr uint64_t kDefaultMaxRequest = 32ull << 20;
// libnbd refuses larger reads and writes.
constexpr uint64_t kLibnbdMaxRequest = 64ull << 20;
// Write-zeroes pieces when the server advertises no maximum (NBD lengths
// are 32-bit).
constexpr uint64_t kMaxZeroRequest = 1ull << 30;
// How long Close() lets requests in flight finish before dropping them.
constexpr auto kCloseGrace = std::chrono::milliseconds(500);
// How long a disconnect waits for the server to hang up.
constexpr auto kDisconnectWait = std::chrono::seconds(2);

Status BadUri() { return Status::Error(EINVAL, "No valid URL specified"); }

bool StartsWithNoCase(std::string_view s, std::string_view prefix) {
  if (s.size() < prefix.size()) return false;
  for (size_t i = 0; i < prefix.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(s[i])) != prefix[i]) return false;
  }
  return true;
}

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool PercentDecode(std::string_view in, std::string* out) {
  out->clear();
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '%') {
      out->push_back(in[i]);
      continue;
    }
    if (i + 2 >= in.size() || !std::isxdigit(static_cast<unsigned char>(in[i + 1])) ||
        !std::isxdigit(static_cast<unsigned char>(in[i + 2]))) {
      return false;
    }
    out->push_back(static_cast<char>(std::stoi(std::string(in.substr(i + 1, 2)), nullptr, 16)));
    i += 2;
  }
  return true;
}

std::string PercentEncode(std::string_view in) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : in) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~' || c == '/') {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

// libnbd's messages start with the function name ("nbd_aio_connect_uri: ").
std::string StripFunction(std::string msg) {
  if (msg.rfind("nbd_", 0) == 0) {
    size_t colon = msg.find(": ");
    if (colon != std::string::npos) msg = msg.substr(colon + 2);
  }
  return msg;
}

std::string Seconds(std::chrono::milliseconds t) {
  const auto ms = t.count();
  return ms % 1000 == 0 ? std::to_string(ms / 1000) + " s" : std::to_string(ms) + " ms";
}

uint64_t RoundDown(uint64_t v, uint64_t a) { return v / a * a; }
uint64_t RoundUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// The copier's queue on an NBD target: completions arrive on the target's
// loop thread, wait in a list and signal an eventfd.
class NbdQueue : public TargetQueue {
 public:
  explicit NbdQueue(std::shared_ptr<NbdTarget> target) : target_(std::move(target)) {}
  ~NbdQueue() override {
    // The loop may still call back into this queue: wait for every request
    // (the target's timeout and Close bound this).
    MutexLock lock(&mu_);
    while (outstanding_ > 0) cv_.Wait(&lock);
  }

  Status Init() {
    efd_.Reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!efd_.valid()) return Status::FromErrno(errno, "eventfd");
    return Status::Ok();
  }

  int poll_fd() const override { return efd_.get(); }
  unsigned in_flight() const override { return in_flight_; }

  void SubmitWrite(const char* buf, size_t len, uint64_t off, uint64_t tag) override {
    Submit(NbdTarget::Kind::kWrite, const_cast<char*>(buf), off, len, tag);
  }
  void SubmitZeroes(uint64_t off, uint64_t len, uint64_t tag) override {
    Submit(NbdTarget::Kind::kZero, nullptr, off, len, tag);
  }

  void Reap(std::vector<TargetCompletion>* out) override {
    uint64_t v;
    if (read(efd_.get(), &v, sizeof v) < 0) { /* nothing signalled */
    }
    std::vector<TargetCompletion> done;
    {
      MutexLock lock(&mu_);
      done.swap(done_);
    }
    in_flight_ -= static_cast<unsigned>(done.size());
    out->insert(out->end(), done.begin(), done.end());
  }

 private:
  void Submit(NbdTarget::Kind kind, char* buf, uint64_t off, uint64_t len, uint64_t tag) {
    ++in_flight_;
    if (!target_->Aligned(off, len)) {
      // Unaligned edges need read-modify-write: rare (a drive's tail, or
      // clusters smaller than the server's block), done synchronously.
      Status s = kind == NbdTarget::Kind::kWrite ? target_->Write(buf, len, off)
                                                 : target_->WriteZeroes(off, len);
      {
        MutexLock lock(&mu_);
        ++outstanding_;
      }
      Push(tag, s.code());
      return;
    }
    {
      MutexLock lock(&mu_);
      ++outstanding_;
    }
    target_->SubmitAligned(kind, buf, off, len, [this, tag](int err) { Push(tag, err); });
  }

  void Push(uint64_t tag, int err) {
    MutexLock lock(&mu_);
    done_.push_back({tag, err});
    uint64_t one = 1;
    if (write(efd_.get(), &one, sizeof one) < 0) { /* the counter cannot overflow here */
    }
    --outstanding_;
    cv_.SignalAll();
  }

  const std::shared_ptr<NbdTarget> target_;
  UniqueFd efd_;
  unsigned in_flight_ = 0;  // the copier's thread only
  Mutex mu_;                // a leaf, taken on the loop thread
  CondVar cv_;
  std::vector<TargetCompletion> done_ CBW_GUARDED_BY(mu_);
  unsigned outstanding_ CBW_GUARDED_BY(mu_) = 0;
};

// Waits for one synchronous operation.
struct Waiter {
  Mutex mu;
  CondVar cv;
  bool done CBW_GUARDED_BY(mu) = false;
  int err CBW_GUARDED_BY(mu) = 0;
};

}  // namespace

// One NBD command of an operation.
struct NbdTarget::Part {
  NbdTarget* target = nullptr;
  Op* op = nullptr;
  Kind kind = Kind::kWrite;
  char* buf = nullptr;
  uint64_t off = 0, len = 0;
};

// One request of a caller: its parts, and the callback when all are done.
// Owned by the target from submission until the callback has run.
struct NbdTarget::Op {
  std::function<void(int)> done;
  std::vector<Part> parts;  // never resized once submitted: parts point into it
  size_t remaining = 0;     // guarded by the target's mu_
  int error = 0;            // first error; guarded by the target's mu_
};

// ---------------------------------------------------------------- URIs

bool IsNbdSpec(std::string_view spec) {
  return StartsWithNoCase(spec, "nbd:") || StartsWithNoCase(spec, "nbd+") ||
         StartsWithNoCase(spec, "nbds:") || StartsWithNoCase(spec, "nbds+");
}

Result<NbdUri> ParseNbdUri(const std::string& spec) {
  const size_t sep = spec.find("://");
  if (sep == std::string::npos) return BadUri();
  const std::string scheme = Lower(spec.substr(0, sep));
  NbdUri uri;
  if (scheme == "nbd" || scheme == "nbd+tcp") {
    uri.unix_socket = false;
  } else if (scheme == "nbd+unix") {
    uri.unix_socket = true;
  } else {
    return BadUri();  // TLS (nbds), vsock and anything else
  }
  std::string rest = spec.substr(sep + 3);
  if (rest.find('#') != std::string::npos) return BadUri();
  std::string query;
  if (size_t q = rest.find('?'); q != std::string::npos) {
    query = rest.substr(q + 1);
    rest.resize(q);
  }
  const size_t slash = rest.find('/');
  const std::string authority = rest.substr(0, slash);
  const std::string path = slash == std::string::npos ? "" : rest.substr(slash);
  if (!PercentDecode(path.empty() ? path : path.substr(1), &uri.export_name)) return BadUri();
  // Query parameters: only the Unix socket.
  bool have_socket = false;
  size_t i = 0;
  while (i < query.size()) {
    size_t j = query.find('&', i);
    if (j == std::string::npos) j = query.size();
    const std::string kv = query.substr(i, j - i);
    i = j + 1;
    if (kv.empty()) continue;
    const size_t eq = kv.find('=');
    if (eq == std::string::npos || kv.substr(0, eq) != "socket" || have_socket) return BadUri();
    if (!PercentDecode(kv.substr(eq + 1), &uri.socket) || uri.socket.empty()) return BadUri();
    have_socket = true;
  }
  if (uri.unix_socket) {
    if (!authority.empty() || !have_socket) return BadUri();
    return uri;
  }
  if (have_socket || authority.empty() || authority.find('@') != std::string::npos) {
    return BadUri();
  }
  std::string host = authority, port;
  if (host[0] == '[') {
    const size_t close = host.find(']');
    if (close == std::string::npos) return BadUri();
    std::string after = host.substr(close + 1);
    host = host.substr(1, close - 1);
    if (!after.empty()) {
      if (after[0] != ':') return BadUri();
      port = after.substr(1);
    }
  } else if (size_t colon = host.find(':'); colon != std::string::npos) {
    port = host.substr(colon + 1);
    host.resize(colon);
  }
  if (host.empty()) return BadUri();
  if (port.empty()) {
    port = kDefaultPort;
  } else {
    if (port.size() > 5 || !std::all_of(port.begin(), port.end(), [](char c) {
          return std::isdigit(static_cast<unsigned char>(c));
        })) {
      return BadUri();
    }
    const int n = std::stoi(port);
    if (n < 1 || n > 65535) return BadUri();
    port = std::to_string(n);
  }
  uri.host = host;
  uri.port = port;
  return uri;
}

std::string NbdUriString(const NbdUri& uri) {
  if (uri.unix_socket) {
    return "nbd+unix:///" + PercentEncode(uri.export_name) + "?socket=" + PercentEncode(uri.socket);
  }
  const std::string host =
      uri.host.find(':') != std::string::npos ? "[" + uri.host + "]" : Lower(uri.host);
  return "nbd://" + host + ":" + uri.port + "/" + PercentEncode(uri.export_name);
}

// ---------------------------------------------------------------- opening

Result<std::shared_ptr<NbdTarget>> NbdTarget::Open(const TargetRequest& req) {
  if (req.format && *req.format != "raw") {
    return Status::Error(EINVAL, "Format '" + *req.format + "' is not supported for NBD target '" +
                                     req.spec + "' (NBD exports are written as raw)");
  }
  Result<NbdUri> uri = ParseNbdUri(req.spec);
  if (!uri.ok()) return uri.status();
  NbdOptions options;
  options.timeout = req.io_timeout;
  if (!uri->unix_socket) return Connect(*uri, "", req.spec, req.size, options);
  // The socket is looked up a component at a time, refusing the mount
  // before anything inside it is touched; connect() then goes through the
  // directory already resolved, so the lookup cannot be redirected.
  Result<ResolvedPath> where =
      ResolvePath(uri->socket, req.base_dir, req.mountpoint, req.mount_dev);
  auto unreachable = [&](int err) {
    return Status::FromErrno(err, "Failed to connect to '" + uri->socket + "'");
  };
  if (!where.ok()) {
    if (where.status().code() == EINVAL) return where.status();
    return unreachable(where.status().code() == EISDIR ? ECONNREFUSED : where.status().code());
  }
  if (!where->exists) return unreachable(ENOENT);
  std::string connect_path =
      "/proc/self/fd/" + std::to_string(where->parent.get()) + "/" + where->name;
  if (connect_path.size() >= sizeof(sockaddr_un::sun_path)) connect_path = where->path;
  if (connect_path.size() >= sizeof(sockaddr_un::sun_path)) return unreachable(ENAMETOOLONG);
  NbdUri normal = *uri;
  normal.socket = where->path;
  auto t = Connect(*uri, connect_path, req.spec, req.size, options);
  if (t.ok()) (*t)->identity_ = NbdUriString(normal);
  return t;
}

Result<std::shared_ptr<NbdTarget>> NbdTarget::OpenPrivate(const std::string& socket_path,
                                                          const std::string& display,
                                                          const std::string& identity,
                                                          uint64_t min_size, NbdOptions options) {
  NbdUri uri;
  uri.unix_socket = true;
  uri.socket = socket_path;
  auto t = Connect(uri, socket_path, display, min_size, options);
  if (t.ok()) (*t)->identity_ = identity;
  return t;
}

Result<std::shared_ptr<NbdTarget>> NbdTarget::Connect(const NbdUri& uri,
                                                      const std::string& connect_path,
                                                      const std::string& spec, uint64_t min_size,
                                                      NbdOptions options) {
  std::shared_ptr<NbdTarget> t(new NbdTarget());
  t->display_ = spec;
  t->identity_ = NbdUriString(uri);
  t->options_ = options;
  t->h_ = nbd_create();
  if (t->h_ == nullptr) return Status::Error(ENOMEM, nbd_get_error());
  if (nbd_supports_uri(t->h_) != 1) {
    return Status::Error(ENOTSUP, "This libnbd cannot parse NBD URIs");
  }
  nbd_set_uri_allow_transports(t->h_, LIBNBD_ALLOW_TRANSPORT_TCP | LIBNBD_ALLOW_TRANSPORT_UNIX);
  nbd_set_uri_allow_tls(t->h_, LIBNBD_TLS_DISABLE);
  NbdUri dial = uri;
  if (uri.unix_socket) dial.socket = connect_path;
  const std::string where = uri.unix_socket ? uri.socket : uri.host + ":" + uri.port;
  // QEMU's texts for an unreachable server; libnbd's for the rest.
  auto failed = [&](int err, std::string msg) -> Status {
    msg = StripFunction(std::move(msg));
    if (msg.find("getaddrinfo") != std::string::npos) {
      const size_t colon = msg.rfind(": ");
      return Status::Error(err != 0 ? err : EHOSTUNREACH,
                           "address resolution failed for " + uri.host + ":" + uri.port + ": " +
                               (colon == std::string::npos ? msg : msg.substr(colon + 2)));
    }
    if (err != 0 && (msg.rfind("connect", 0) == 0 || msg.empty())) {
      return Status::FromErrno(err, "Failed to connect to '" + where + "'");
    }
    return Status::Error(err != 0 ? err : EIO, "Could not open '" + spec + "': " + msg);
  };
  if (nbd_aio_connect_uri(t->h_, NbdUriString(dial).c_str()) == -1) {
    return failed(nbd_get_errno(), nbd_get_error());
  }
  // The handshake, with the same deadline as any request.
  const auto deadline = std::chrono::steady_clock::now() + options.timeout;
  while (nbd_aio_is_ready(t->h_) != 1) {
    if (nbd_aio_is_dead(t->h_) == 1 || nbd_aio_is_closed(t->h_) == 1) {
      return failed(ECONNRESET, "the server closed the connection during the handshake");
    }
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return failed(ETIMEDOUT, "");
    pollfd p{nbd_aio_get_fd(t->h_), 0, 0};
    const unsigned dir = nbd_aio_get_direction(t->h_);
    if (dir & LIBNBD_AIO_DIRECTION_READ) p.events |= POLLIN;
    if (dir & LIBNBD_AIO_DIRECTION_WRITE) p.events |= POLLOUT;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now);
    if (poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count() + 1, 1000))) < 0 &&
        errno != EINTR) {
      return failed(errno, std::string("poll: ") + std::strerror(errno));
    }
    int r = 0;
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
      r = nbd_aio_notify_read(t->h_);
    } else if (p.revents & POLLOUT) {
      r = nbd_aio_notify_write(t->h_);
    }
    if (r == -1) return failed(nbd_get_errno(), nbd_get_error());
  }
  if (nbd_is_read_only(t->h_) == 1) return Status::Error(EROFS, "NBD export is read-only");
  const int64_t size = nbd_get_size(t->h_);
  if (size < 0) return failed(nbd_get_errno(), nbd_get_error());
  t->size_ = static_cast<uint64_t>(size);
  if (t->size_ < min_size) {
    return Status::Error(EINVAL, "Target '" + spec + "' is smaller than the drive (" +
                                     std::to_string(t->size_) + " < " + std::to_string(min_size) +
                                     " bytes)");
  }
  // Block sizes: as advertised; without a minimum, QEMU's rule (sectors,
  // unless the size itself is not a multiple of one).
  const int64_t min = nbd_get_block_size(t->h_, LIBNBD_SIZE_MINIMUM);
  const int64_t max = nbd_get_block_size(t->h_, LIBNBD_SIZE_MAXIMUM);
  t->min_block_ = min > 0 ? static_cast<uint64_t>(min) : (t->size_ % 512 == 0 ? 512 : 1);
  uint64_t max_req = max > 0 ? static_cast<uint64_t>(max) : kDefaultMaxRequest;
  max_req = std::min(max_req, kLibnbdMaxRequest);
  max_req = std::max(RoundDown(max_req, t->min_block_), t->min_block_);
  t->max_request_ = max_req;
  t->max_zero_ = max > 0 ? max_req : RoundDown(kMaxZeroRequest, t->min_block_);
  t->can_zero_ = nbd_can_zero(t->h_) == 1;
  t->can_flush_ = nbd_can_flush(t->h_) == 1;
  t->zeroed_ = false;  // an export may hold older data
  t->fd_ = nbd_aio_get_fd(t->h_);
  if (!uri.unix_socket) {
    // Small commands (zero, flush) must not wait for Nagle's delayed ACK.
    int one = 1;
    setsockopt(t->fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  t->wake_.Reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!t->wake_.valid()) return Status::FromErrno(errno, "eventfd");
  try {
    t->loop_ = std::thread([raw = t.get()] { raw->Loop(); });
  } catch (...) {
    return Status::Error(EAGAIN, "could not start the NBD thread");
  }
  LogDebug("NBD target '" + spec + "': " + std::to_string(t->size_) + " bytes, blocks " +
           std::to_string(t->min_block_) + ".." + std::to_string(t->max_request_) +
           (t->can_zero_ ? ", write-zeroes" : "") + (t->can_flush_ ? ", flush" : ""));
  return t;
}

NbdTarget::~NbdTarget() {
  Close();
  if (h_ != nullptr) nbd_close(h_);
}

bool NbdTarget::dead() const {
  MutexLock lock(&mu_);
  return dead_err_ != 0;
}

// ---------------------------------------------------------------- requests

void NbdTarget::SubmitAligned(Kind kind, char* buf, uint64_t off, uint64_t len,
                              std::function<void(int)> done) {
  if (kind != Kind::kFlush && len == 0) {
    done(0);
    return;
  }
  auto op = std::make_unique<Op>();
  op->done = std::move(done);
  uint64_t step = kind == Kind::kZero ? max_zero_ : max_request_;
  Kind part_kind = kind;
  if (kind == Kind::kZero && !can_zero_) {
    // No write-zeroes: write zeros (never skip: the export may hold data).
    part_kind = Kind::kWrite;
    buf = const_cast<char*>(ZeroBuffer());
    step = std::min<uint64_t>(max_request_, kZeroBufferBytes);
  }
  if (kind == Kind::kFlush) {
    op->parts.push_back(Part{this, op.get(), Kind::kFlush, nullptr, 0, 0});
  } else {
    op->parts.reserve(static_cast<size_t>((len + step - 1) / step));
    for (uint64_t pos = 0; pos < len; pos += step) {
      const uint64_t n = std::min(step, len - pos);
      char* p = buf == nullptr ? nullptr : (part_kind == kind ? buf + pos : buf);
      op->parts.push_back(Part{this, op.get(), part_kind, p, off + pos, n});
    }
  }
  op->remaining = op->parts.size();
  int refuse = 0;
  {
    MutexLock lock(&mu_);
    if (dead_err_ != 0) {
      refuse = dead_err_;
    } else if (closing_) {
      refuse = ESHUTDOWN;
    } else {
      for (Part& p : op->parts) pending_.push_back(&p);
    }
  }
  if (refuse != 0) {
    op->done(refuse);
    return;
  }
  op.release();  // owned by its parts until the last completes
  Wake();
}

Status NbdTarget::RunSync(Kind kind, char* buf, uint64_t off, uint64_t len) {
  auto w = std::make_shared<Waiter>();
  SubmitAligned(kind, buf, off, len, [w](int err) {
    MutexLock lock(&w->mu);
    w->done = true;
    w->err = err;
    w->cv.SignalAll();
  });
  int err;
  {
    MutexLock lock(&w->mu);
    while (!w->done) w->cv.Wait(&lock);
    err = w->err;
  }
  if (err == 0) return Status::Ok();
  {
    MutexLock lock(&mu_);
    if (dead_err_ == err && !dead_why_.empty()) return Status::Error(err, dead_why_);
  }
  const char* what = kind == Kind::kRead    ? "read from NBD target"
                     : kind == Kind::kFlush ? "flush of NBD target"
                                            : "write to NBD target";
  return Status::FromErrno(err, what);
}

Status NbdTarget::Write(const char* buf, size_t len, uint64_t off) {
  if (len == 0) return Status::Ok();
  if (off + len > size_) return Status::Error(ENOSPC, "write past the end of the NBD export");
  if (Aligned(off, len)) return RunSync(Kind::kWrite, const_cast<char*>(buf), off, len);
  return WriteUnaligned(buf, off, len);
}

Status NbdTarget::WriteZeroes(uint64_t off, uint64_t len) {
  if (len == 0) return Status::Ok();
  if (off + len > size_) return Status::Error(ENOSPC, "write past the end of the NBD export");
  if (Aligned(off, len)) return RunSync(Kind::kZero, nullptr, off, len);
  return WriteUnaligned(nullptr, off, len);
}

Status NbdTarget::WriteUnaligned(const char* buf, uint64_t off, uint64_t len) {
  const uint64_t end = off + len;
  const uint64_t a0 = RoundUp(off, min_block_);
  const uint64_t a1 = RoundDown(end, min_block_);
  if (a0 >= a1) {
    // Within one block, or across one boundary with no whole block.
    const uint64_t cut = std::min(end, a0);
    if (Status s = PatchBlock(buf, off, cut - off); !s.ok()) return s;
    if (cut < end) return PatchBlock(buf == nullptr ? nullptr : buf + (cut - off), cut, end - cut);
    return Status::Ok();
  }
  if (off < a0) {
    if (Status s = PatchBlock(buf, off, a0 - off); !s.ok()) return s;
  }
  Status s = buf == nullptr
                 ? RunSync(Kind::kZero, nullptr, a0, a1 - a0)
                 : RunSync(Kind::kWrite, const_cast<char*>(buf + (a0 - off)), a0, a1 - a0);
  if (!s.ok()) return s;
  if (a1 < end) return PatchBlock(buf == nullptr ? nullptr : buf + (a1 - off), a1, end - a1);
  return Status::Ok();
}

Status NbdTarget::PatchBlock(const char* src, uint64_t off, uint64_t len) {
  const uint64_t block = off / min_block_;
  const uint64_t start = block * min_block_;
  const uint64_t blen = std::min(min_block_, size_ - start);
  {
    MutexLock lock(&rmw_mu_);
    while (rmw_blocks_.count(block) != 0) rmw_cv_.Wait(&lock);
    rmw_blocks_.insert(block);
  }
  std::unique_ptr<char[]> tmp(new (std::nothrow) char[blen]);
  Status s = tmp ? RunSync(Kind::kRead, tmp.get(), start, blen)
                 : Status::Error(ENOMEM, "no memory for a read-modify-write buffer");
  if (s.ok()) {
    if (src != nullptr) {
      std::memcpy(tmp.get() + (off - start), src, len);
    } else {
      std::memset(tmp.get() + (off - start), 0, len);
    }
    s = RunSync(Kind::kWrite, tmp.get(), start, blen);
  }
  MutexLock lock(&rmw_mu_);
  rmw_blocks_.erase(block);
  rmw_cv_.SignalAll();
  return s;
}

Status NbdTarget::Read(char* buf, size_t len, uint64_t off) {
  if (off >= size_) {
    std::memset(buf, 0, len);
    return Status::Ok();
  }
  const uint64_t n = std::min<uint64_t>(len, size_ - off);
  if (n < len) std::memset(buf + n, 0, len - n);
  if (Aligned(off, n)) return RunSync(Kind::kRead, buf, off, n);
  const uint64_t a0 = RoundDown(off, min_block_);
  const uint64_t a1 = std::min(RoundUp(off + n, min_block_), size_);
  std::unique_ptr<char[]> tmp(new (std::nothrow) char[a1 - a0]);
  if (!tmp) return Status::Error(ENOMEM, "no memory for a read buffer");
  if (Status s = RunSync(Kind::kRead, tmp.get(), a0, a1 - a0); !s.ok()) return s;
  std::memcpy(buf, tmp.get() + (off - a0), n);
  return Status::Ok();
}

Status NbdTarget::Flush() {
  if (!can_flush_) {
    // The server does not take flushes (its writes are durable as they
    // complete), but a lost connection still fails the job.
    MutexLock lock(&mu_);
    if (dead_err_ != 0) return Status::Error(dead_err_, dead_why_);
    return Status::Ok();
  }
  return RunSync(Kind::kFlush, nullptr, 0, 0);
}

Result<std::unique_ptr<TargetQueue>> NbdTarget::OpenQueue(unsigned depth) {
  (void)depth;  // the connection bounds what is in flight
  auto q = std::make_unique<NbdQueue>(shared_from_this());
  if (Status s = q->Init(); !s.ok()) return s;
  return std::unique_ptr<TargetQueue>(std::move(q));
}

// ---------------------------------------------------------------- the loop

void NbdTarget::Wake() {
  uint64_t one = 1;
  if (write(wake_.get(), &one, sizeof one) < 0) { /* already signalled */
  }
}

void NbdTarget::Issue(Part* p) {
  nbd_completion_callback cb{};
  cb.callback = &NbdTarget::OnComplete;
  cb.user_data = p;
  int64_t cookie = -1;
  switch (p->kind) {
    case Kind::kRead:
      cookie = nbd_aio_pread(h_, p->buf, p->len, p->off, cb, 0);
      break;
    case Kind::kWrite:
      cookie = nbd_aio_pwrite(h_, p->buf, p->len, p->off, cb, 0);
      break;
    case Kind::kZero:
      cookie = nbd_aio_zero(h_, p->len, p->off, cb, 0);
      break;
    case Kind::kFlush:
      cookie = nbd_aio_flush(h_, cb, 0);
      break;
  }
  if (cookie == -1) {
    // Refused before it was sent: no callback will come.
    int err = nbd_get_errno();
    LogDebug("NBD target '" + display_ + "': " + StripFunction(nbd_get_error()));
    CompletePart(p, err != 0 ? err : EIO, true);
  }
}

int NbdTarget::OnComplete(void* user_data, int* error) {
  auto* p = static_cast<Part*>(user_data);
  p->target->CompletePart(p, *error, true);
  return 1;  // retire the command
}

void NbdTarget::CompletePart(Part* p, int err, bool issued) {
  Op* op = p->op;
  bool last = false;
  {
    MutexLock lock(&mu_);
    if (issued && issued_.erase(p) == 0) return;  // already ended (after Close)
    // After a timeout or a close, libnbd fails the dropped commands with
    // ENOTCONN and the like: report why the connection was dropped.
    if (err != 0 && dead_err_ != 0) err = dead_err_;
    if (err != 0 && op->error == 0) op->error = err;
    last = --op->remaining == 0;
    cv_.SignalAll();
  }
  if (!last) return;
  std::unique_ptr<Op> owned(op);
  owned->done(owned->error);
}

void NbdTarget::Kill(int err, const std::string& why) {
  std::deque<Part*> queued;
  {
    MutexLock lock(&mu_);
    if (dead_err_ == 0) {
      dead_err_ = err;
      dead_why_ = why;
      LogWarn("NBD target '" + display_ + "': " + why);
    }
    queued.swap(pending_);
  }
  for (Part* p : queued) CompletePart(p, err, false);
  // libnbd sees end-of-file on its next read and fails every command in
  // flight (the loop keeps driving it until it has).
  if (fd_ >= 0) shutdown(fd_, SHUT_RDWR);
  Wake();
}

void NbdTarget::Loop() {
  RunGuarded(
      "NBD loop", [&] { LoopBody(); },
      [&](const std::string& what) { Kill(EIO, "internal error: " + what); });
  MutexLock lock(&mu_);
  loop_done_ = true;
  cv_.SignalAll();
}

void NbdTarget::LoopBody() {
  using Clock = std::chrono::steady_clock;
  auto last_progress = Clock::now();
  bool disconnect_sent = false;
  Clock::time_point disconnect_deadline{};
  for (;;) {
    std::vector<Part*> issue;
    bool dead, disconnect;
    size_t in_flight;
    {
      MutexLock lock(&mu_);
      dead = dead_err_ != 0;
      disconnect = disconnect_;
      if (!dead) {
        if (issued_.empty() && !pending_.empty()) last_progress = Clock::now();
        while (!pending_.empty() && issued_.size() < options_.max_in_flight) {
          issue.push_back(pending_.front());
          issued_.insert(pending_.front());
          pending_.pop_front();
        }
      }
      in_flight = issued_.size();
    }
    for (Part* p : issue) Issue(p);
    if (!issue.empty()) continue;  // issuing may have completed some: look again

    const bool handle_live = nbd_aio_is_dead(h_) != 1 && nbd_aio_is_closed(h_) != 1;
    if (disconnect && in_flight == 0) {
      if (!handle_live || dead) return;
      if (!disconnect_sent) {
        // A clean goodbye: a non-persistent server (qemu-nbd) exits on it.
        disconnect_sent = true;
        disconnect_deadline = Clock::now() + kDisconnectWait;
        if (nbd_aio_disconnect(h_, 0) == -1) return;
        continue;
      }
      if (Clock::now() >= disconnect_deadline) return;
    }
    pollfd pf[2] = {{wake_.get(), POLLIN, 0}, {fd_, 0, 0}};
    nfds_t n = 1;
    if (handle_live) {
      const unsigned dir = nbd_aio_get_direction(h_);
      if (dir & LIBNBD_AIO_DIRECTION_READ) pf[1].events |= POLLIN;
      if (dir & LIBNBD_AIO_DIRECTION_WRITE) pf[1].events |= POLLOUT;
      n = 2;
    } else if (!dead) {
      // The server hung up (or the socket failed): libnbd has already
      // failed what was in flight.
      Kill(EIO, "the NBD server closed the connection");
      continue;
    }
    int timeout_ms = -1;
    const auto now = Clock::now();
    if (in_flight > 0 && !dead) {
      auto left = last_progress + options_.timeout - now;
      timeout_ms = static_cast<int>(
          std::max<int64_t>(0,
                            std::chrono::duration_cast<std::chrono::milliseconds>(left).count()) +
          1);
    }
    if (disconnect_sent) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(disconnect_deadline - now);
      int ms = static_cast<int>(std::max<int64_t>(0, left.count()) + 1);
      timeout_ms = timeout_ms < 0 ? ms : std::min(timeout_ms, ms);
    }
    if (poll(pf, n, timeout_ms) < 0 && errno != EINTR) {
      Kill(EIO, std::string("poll: ") + std::strerror(errno));
      continue;
    }
    if (pf[0].revents & POLLIN) {
      uint64_t v;
      if (read(wake_.get(), &v, sizeof v) < 0) { /* raced with another read */
      }
    }
    if (n == 2 && pf[1].revents != 0) {
      last_progress = Clock::now();
      // A hang-up or socket error is reported to whichever direction libnbd
      // waits on, so that it sees the failure and fails what is in flight.
      const short ready = pf[1].revents;
      int r = 0;
      if ((ready & (POLLIN | POLLHUP | POLLERR)) &&
          (nbd_aio_get_direction(h_) & LIBNBD_AIO_DIRECTION_READ)) {
        r = nbd_aio_notify_read(h_);
      }
      if (r != -1 && (ready & (POLLOUT | POLLHUP | POLLERR)) &&
          (nbd_aio_get_direction(h_) & LIBNBD_AIO_DIRECTION_WRITE)) {
        r = nbd_aio_notify_write(h_);
      }
      if (r == -1 && !disconnect_sent) {
        const std::string msg = StripFunction(nbd_get_error());
        if (nbd_aio_is_dead(h_) == 1 || nbd_aio_is_closed(h_) == 1) {
          Kill(EIO, "the NBD connection failed: " + msg);
        }
      }
    }
    {
      MutexLock lock(&mu_);
      if (dead_err_ != 0 || issued_.empty()) continue;
    }
    if (Clock::now() - last_progress >= options_.timeout) {
      Kill(ETIMEDOUT,
           "the NBD server '" + display_ + "' did not answer for " + Seconds(options_.timeout));
    }
  }
}

Status NbdTarget::Close() {
  MutexLock close_lock(&close_mu_);
  if (closed_) return Status::Ok();
  closed_ = true;
  if (!loop_.joinable()) {
    MutexLock lock(&mu_);
    closing_ = true;
    return Status::Ok();
  }
  bool busy;
  {
    MutexLock lock(&mu_);
    closing_ = true;
    const auto grace = std::chrono::steady_clock::now() + kCloseGrace;
    while ((!issued_.empty() || !pending_.empty()) && dead_err_ == 0) {
      if (!cv_.WaitUntil(&lock, grace)) break;
    }
    busy = !issued_.empty() || !pending_.empty();
  }
  if (busy) Kill(ESHUTDOWN, "closed with requests outstanding");
  {
    MutexLock lock(&mu_);
    disconnect_ = true;
  }
  Wake();
  loop_.join();
  // Commands libnbd still holds (it frees them at close without calling
  // back): their callers must not wait forever.
  std::vector<Part*> left;
  {
    MutexLock lock(&mu_);
    left.assign(issued_.begin(), issued_.end());
    if (dead_err_ == 0) dead_err_ = ESHUTDOWN;
  }
  nbd_close(h_);
  h_ = nullptr;
  fd_ = -1;
  for (Part* p : left) CompletePart(p, ESHUTDOWN, true);
  return Status::Ok();
}

}  // namespace cbw::backup
