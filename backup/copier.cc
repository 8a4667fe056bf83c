#include "backup/copier.h"

#include <liburing.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>

#include "backup/drive.h"
#include "backup/log.h"
#include "backup/posix_io.h"
#include "backup/uring.h"

namespace cbw::backup {
namespace {

constexpr uint64_t kMaxWaitNs = 50'000'000;        // longest a wait goes unwoken
constexpr uint64_t kWritebackBytes = 64ull << 20;  // start target writeback this often
constexpr uint64_t kPollTag = ~uint64_t{0};        // user_data of the target-queue poll

}  // namespace

// One chunk in flight: read from the source, then its data runs written and
// its zero runs zeroed on the target.
struct Copier::Slot {
  enum class Phase { kFree, kRead, kTarget };
  char* buf = nullptr;
  uint64_t cap = 0;  // buf's size: a chunk, or a cluster (small slots)
  Phase phase = Phase::kFree;
  CopierHost::Run run;
  uint64_t off = 0, len = 0, pos = 0;  // pos: bytes read so far
  uint64_t data_bytes = 0, zero_bytes = 0;
  unsigned pending = 0;  // target requests in flight
  int error = 0;         // first target error
};

// The source-read ring, or synchronous reads without io_uring.
struct Copier::Ring {
  io_uring ring{};
  bool ok = false;
  bool poll_armed = false;
  std::deque<std::pair<int, int>> sync_done;  // (slot, res)
  ~Ring() {
    if (ok) ExitRing(&ring);
  }
  bool Submit() {
    int r = io_uring_submit(&ring);
    if (r < 0) LogWarn(std::string("io_uring_submit: ") + std::strerror(-r));
    return r >= 0;
  }
};

Copier::Copier(CopierHost* host, Config config, Drive* source, std::shared_ptr<Target> target)
    : host_(host),
      config_(config),
      source_(source),
      target_(std::move(target)),
      size_(source->size()),
      nclusters_((source->size() + config.cluster_size - 1) / config.cluster_size) {}

Copier::~Copier() {
  ReleaseAll();
  for (auto& s : slots_) std::free(s.buf);
}

// Claims not finished (the copier stopped with I/O abandoned, or threw) go
// back to dirty, so no cluster stays "being copied" forever.
void Copier::ReleaseAll() {
  for (auto& s : slots_) {
    if (s.phase == Slot::Phase::kFree) continue;
    host_->Finish(s.run, false, 0, 0);
    s.phase = Slot::Phase::kFree;
  }
}

Status Copier::Init() {
  const unsigned big = BigSlots();
  slots_.resize(big + config_.small_depth);
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = slots_[i];
    s.cap = i < big ? config_.chunk_size : config_.cluster_size;
    if (posix_memalign(reinterpret_cast<void**>(&s.buf), 4096, s.cap) != 0) {
      return Status::Error(ENOMEM, "no memory for copy buffers");
    }
  }
  ring_ = std::make_unique<Ring>();
  int r = InitRing(static_cast<unsigned>(slots_.size()) + 2, &ring_->ring);
  ring_->ok = r == 0;
  if (!ring_->ok) {
    LogWarn("io_uring unavailable (" + std::string(std::strerror(-r)) +
            "); reading the source synchronously");
  }
  auto q = target_->OpenQueue(static_cast<unsigned>(slots_.size()) * 4);
  if (!q.ok()) return q.status();
  queue_ = std::move(*q);
  return Status::Ok();
}

int Copier::FreeSlot(bool small_too) const {
  const size_t n = small_too ? slots_.size() : BigSlots();
  for (size_t i = 0; i < n; ++i) {
    if (slots_[i].phase == Slot::Phase::kFree) return static_cast<int>(i);
  }
  return -1;
}

void Copier::SubmitRead(int i) {
  Slot& s = slots_[i];
  ++reads_in_flight_;
  if (host_->abandoned()) {  // the drive may be gone
    ring_->sync_done.emplace_back(i, -ECANCELED);
    return;
  }
  char* buf = s.buf + s.pos;
  const size_t len = s.len - s.pos;
  const uint64_t off = s.off + s.pos;
  io_uring_sqe* sqe = ring_->ok ? io_uring_get_sqe(&ring_->ring) : nullptr;
  if (sqe != nullptr) {
    io_uring_prep_read(sqe, source_->fd(), buf, static_cast<unsigned>(len), off);
    io_uring_sqe_set_data64(sqe, static_cast<uint64_t>(i));
    if (ring_->Submit()) return;
  }
  ssize_t n = pread(source_->fd(), buf, len, static_cast<off_t>(off));
  ring_->sync_done.emplace_back(i, n < 0 ? -errno : static_cast<int>(n));
}

void Copier::Dispatch(int i, uint64_t max_clusters) {
  const uint64_t cs = config_.cluster_size;
  uint64_t c = host_->NextDirty(cursor_);
  if (c >= nclusters_) {
    cursor_ = nclusters_;
    return;
  }
  cursor_ = c;
  Slot& s = slots_[i];
  // Extent lookups need no lock: a cluster still dirty has not been written
  // since the point in time, so what SEEK_DATA says of it holds for it.
  const uint64_t off = c * cs;
  if (!(off >= ext_start_ && off < ext_end_)) {
    uint64_t d = off;
    Result<uint64_t> data = source_->Seek(off, SEEK_DATA);
    if (data.ok()) {
      d = *data;
    } else if (data.status().code() == ENXIO) {
      d = size_;
    }
    if (d > off) {
      const uint64_t hole_end = d >= size_ ? nclusters_ : d / cs;
      if (hole_end > c) {
        // A hole: nothing to read. One contiguous dirty run of it at a time.
        std::optional<CopierHost::Run> run = host_->ClaimNext(&cursor_, hole_end, hole_end - c);
        if (!run) return;
        const uint64_t bytes = std::min(run->c1 * cs, size_) - run->c0 * cs;
        if (target_->zeroed()) {
          host_->Finish(*run, true, 0, bytes);
          return;
        }
        s.phase = Slot::Phase::kTarget;
        s.run = *run;
        s.off = run->c0 * cs;
        s.len = bytes;
        s.data_bytes = 0;
        s.zero_bytes = bytes;
        s.error = 0;
        s.pending = 1;
        queue_->SubmitZeroes(s.off, bytes, static_cast<uint64_t>(i));
        ReapTarget();
        return;
      }
    }
    Result<uint64_t> hole = source_->Seek(std::max(d, off), SEEK_HOLE);
    ext_start_ = off;
    ext_end_ = hole.ok() ? *hole : size_;
    if (ext_end_ <= off) ext_end_ = off + 1;
  }
  const uint64_t end = std::min((ext_end_ + cs - 1) / cs, nclusters_);
  max_clusters = std::max<uint64_t>(1, std::min(max_clusters, s.cap / cs));
  std::optional<CopierHost::Run> run = host_->ClaimNext(&cursor_, end, max_clusters);
  if (!run) return;
  if (s.cap == config_.chunk_size && max_clusters > 1) {
    // Cut short by a clean cluster (not by the extent, the size, or a limit)?
    scattered_ = run->c1 - run->c0 < max_clusters && run->c1 < end;
  }
  s.run = *run;
  s.off = run->c0 * cs;
  s.len = std::min(run->c1 * cs, size_) - s.off;
  s.pos = 0;
  s.data_bytes = s.zero_bytes = 0;
  s.error = 0;
  s.pending = 0;
  s.phase = Slot::Phase::kRead;
  host_->Consume(s.len);
  SubmitRead(i);
}

void Copier::OnRead(int i, int res) {
  --reads_in_flight_;
  Slot& s = slots_[i];
  if (res < 0) return SlotFail(i, -res, true);
  if (res == 0) return SlotFail(i, EIO, true);  // the source is fixed-size
  s.pos += static_cast<uint64_t>(res);
  if (s.pos < s.len) return SubmitRead(i);
  // All-zero clusters are not written as data; contiguous data clusters are
  // merged into one request, and so are contiguous zero clusters.
  const uint64_t cs = config_.cluster_size;
  std::vector<std::pair<uint64_t, uint64_t>> data, zeros;  // (offset in buf, length)
  for (uint64_t b = 0; b < s.len; b += cs) {
    const uint64_t n = std::min(cs, s.len - b);
    auto& runs = IsZero(s.buf + b, n) ? zeros : data;
    if (!runs.empty() && runs.back().first + runs.back().second == b) {
      runs.back().second += n;
    } else {
      runs.emplace_back(b, n);
    }
  }
  for (const auto& z : zeros) s.zero_bytes += z.second;
  s.data_bytes = s.len - s.zero_bytes;
  if (target_->zeroed()) zeros.clear();
  s.phase = Slot::Phase::kTarget;
  s.pending = static_cast<unsigned>(data.size() + zeros.size());
  if (s.pending == 0) return SlotDone(i);
  for (const auto& [o, n] : data) {
    queue_->SubmitWrite(s.buf + o, n, s.off + o, static_cast<uint64_t>(i));
  }
  for (const auto& [o, n] : zeros) queue_->SubmitZeroes(s.off + o, n, static_cast<uint64_t>(i));
  ReapTarget();
}

void Copier::OnTarget(int i, int err) {
  Slot& s = slots_[i];
  if (s.phase != Slot::Phase::kTarget || s.pending == 0) return;
  if (err != 0 && s.error == 0) s.error = err;
  if (--s.pending > 0) return;
  if (s.error != 0) return SlotFail(i, s.error, false);
  SlotDone(i);
}

void Copier::SlotDone(int i) {
  Slot& s = slots_[i];
  unflushed_ += s.data_bytes;
  if (unflushed_ >= kWritebackBytes) {
    unflushed_ = 0;
    queue_->StartWriteback();
  }
  s.phase = Slot::Phase::kFree;
  host_->Finish(s.run, true, s.data_bytes, s.zero_bytes);
}

void Copier::SlotFail(int i, int err, bool is_read) {
  Slot& s = slots_[i];
  s.phase = Slot::Phase::kFree;
  host_->Finish(s.run, false, 0, 0);
  if (!error_) error_ = PassError{err, is_read};
  cursor_ = std::min(cursor_, s.run.c0);
  ext_start_ = ext_end_ = 0;
}

void Copier::ReapTarget() {
  std::vector<TargetCompletion> done;
  queue_->Reap(&done);
  for (const auto& c : done) OnTarget(static_cast<int>(c.tag), c.error);
}

void Copier::WaitAndReap(uint64_t timeout_ns) {
  Ring& r = *ring_;
  if (!r.sync_done.empty()) {
    auto [slot, res] = r.sync_done.front();
    r.sync_done.pop_front();
    OnRead(slot, res);
    return;
  }
  ReapTarget();
  if (!r.ok) {
    // No ring: the source side is synchronous, so wait on the target alone.
    pollfd p{queue_->poll_fd(), POLLIN, 0};
    poll(&p, 1, static_cast<int>(timeout_ns / 1'000'000) + 1);
    ReapTarget();
    return;
  }
  if (!r.poll_armed && queue_->in_flight() > 0) {
    if (io_uring_sqe* sqe = io_uring_get_sqe(&r.ring)) {
      io_uring_prep_poll_add(sqe, queue_->poll_fd(), POLLIN);
      io_uring_sqe_set_data64(sqe, kPollTag);
      r.poll_armed = r.Submit();
    }
  }
  io_uring_cqe* cqe = nullptr;
  __kernel_timespec ts{};
  ts.tv_sec = static_cast<long long>(timeout_ns / 1'000'000'000ull);
  ts.tv_nsec = static_cast<long long>(timeout_ns % 1'000'000'000ull);
  if (io_uring_wait_cqe_timeout(&r.ring, &cqe, &ts) != 0) {
    // With no poll armed (it could not be submitted) the target is reaped
    // on each turn, at most kMaxWaitNs late.
    ReapTarget();
    return;
  }
  // Take every completion that is ready, then handle them: handling may
  // submit, which must not race with iterating the completion ring.
  std::vector<std::pair<uint64_t, int>> done;
  while (cqe != nullptr) {
    done.emplace_back(io_uring_cqe_get_data64(cqe), cqe->res);
    io_uring_cqe_seen(&r.ring, cqe);
    cqe = nullptr;
    if (io_uring_peek_cqe(&r.ring, &cqe) != 0) break;
  }
  for (auto [tag, res] : done) {
    if (tag == kPollTag) {
      r.poll_armed = false;
      ReapTarget();
    } else {
      OnRead(static_cast<int>(tag), res);
    }
  }
}

Copier::Outcome Copier::Run() {
  if (Status s = Init(); !s.ok()) {
    host_->OnIoError(s.code(), false);
    return host_->halt() == CopierHost::Halt::kCancel ? Outcome::kCancelled : Outcome::kFailed;
  }
  const uint64_t cs = config_.cluster_size;
  auto busy = [&] {
    for (const auto& s : slots_) {
      if (s.phase != Slot::Phase::kFree) return true;
    }
    return false;
  };
  for (;;) {
    const CopierHost::Halt halt = host_->halt();
    uint64_t delay = 0;
    if (halt == CopierHost::Halt::kNone && !error_ && cursor_ < nclusters_) {
      int slot = FreeSlot(scattered_);
      if (slot >= 0) {
        const uint64_t chunk = host_->ChunkBytes();
        delay = host_->DelayNs(chunk);
        if (delay == 0) {
          Dispatch(slot, std::max<uint64_t>(1, chunk / cs));
          continue;
        }
      }
    }
    if (busy()) {
      WaitAndReap(delay > 0 ? std::min(delay, kMaxWaitNs) : kMaxWaitNs);
      continue;
    }
    // Nothing in flight.
    if (halt == CopierHost::Halt::kCancel) return Outcome::kCancelled;
    if (halt == CopierHost::Halt::kError) return Outcome::kFailed;
    if (error_) {
      PassError e = *error_;
      error_.reset();
      if (!host_->OnIoError(e.err, e.is_read)) {
        return host_->halt() == CopierHost::Halt::kCancel ? Outcome::kCancelled : Outcome::kFailed;
      }
      continue;
    }
    if (halt == CopierHost::Halt::kPause) {
      if (!host_->OnPause()) return Outcome::kCancelled;
      continue;
    }
    if (delay > 0) {
      host_->Wait(std::min(delay, kMaxWaitNs));
      continue;
    }
    if (cursor_ < nclusters_) continue;
    if (host_->AllDone()) break;
    // Clusters still in a writer's hands, or returned dirty by a failed
    // copy-before-write: wait for them, then sweep again from the start.
    host_->Wait(kMaxWaitNs);
    cursor_ = 0;
  }
  // Durability before success.
  for (;;) {
    Status s = target_->Flush();
    if (s.ok()) return Outcome::kSuccess;
    if (!host_->OnIoError(s.code(), false)) {
      return host_->halt() == CopierHost::Halt::kCancel ? Outcome::kCancelled : Outcome::kFailed;
    }
  }
}

}  // namespace cbw::backup
