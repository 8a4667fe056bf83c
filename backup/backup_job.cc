#include "backup/backup_job.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "backup/log.h"
#include "backup/posix_io.h"
#include "backup/threads.h"

namespace cbw::backup {
namespace {

// How far back the measured rate (and so the ETA) looks: long enough to
// smooth bursts (holes, CBW storms), short enough to follow a changed load.
constexpr double kRateWindowSeconds = 10.0;
constexpr double kRateSampleSeconds = 0.25;
// Cap on CBW worker threads per job: writers beyond it queue (and time out
// like any other CBW if every worker hangs on a dead target).
constexpr unsigned kMaxCbwWorkers = 16;
// A view seek gives up after this many steps (runs of done / not-done
// clusters) and answers conservatively (data), so no seek walks a huge,
// finely fragmented view. Each step scans at most kSeekScanClusters.
constexpr int kSeekMaxSteps = 4096;
constexpr uint64_t kSeekScanClusters = uint64_t{1} << 22;

std::string TimeoutText(std::chrono::milliseconds t) {
  const auto ms = t.count();
  return "copy-before-write timed out after " +
         (ms % 1000 == 0 ? std::to_string(ms / 1000) + " s" : std::to_string(ms) + " ms") +
         " (target not answering)";
}

}  // namespace

// The hook the registry installs on the drive. It holds the job weakly: the
// job removes it from the drive before it can be destroyed.
class BackupJob::Hook : public WriteHook {
 public:
  explicit Hook(BackupJob* job) : job_(job) {}
  Status BeforeWrite(uint64_t offset, uint64_t length, bool may_block) override {
    return job_->BeforeWrite(offset, length, may_block);
  }

 private:
  BackupJob* const job_;
};

// One copy-before-write copy, run on a CBW worker for a waiting writer.
// Fields are guarded by the job's mu_.
struct BackupJob::CbwTask {
  Run run;
  bool started = false;
  bool done = false;
  bool taken_back = false;  // the writer gave up before a worker started it
  Status result;
};

BackupJob::BackupJob(JobParams p)
    : id_(p.options.job_id),
      options_(p.options),
      drive_(p.drive),
      drive_lease_(p.drive->lease()),
      target_identity_(p.target->identity()),
      target_display_(p.target->display()),
      bus_(p.bus),
      txn_(p.txn ? p.txn : std::make_shared<Txn>(CompletionMode::kIndividual)),
      cluster_size_(p.cluster_size),
      chunk_size_(std::max(p.cluster_size, p.chunk_size / p.cluster_size * p.cluster_size)),
      queue_depth_(std::max(1u, p.queue_depth)),
      size_(p.drive->size()),
      nclusters_((p.drive->size() + p.cluster_size - 1) / p.cluster_size),
      cbw_timeout_(p.cbw_timeout),
      cbw_buffer_bytes_(p.cbw_buffer_bytes),
      buffering_(p.cbw_buffer_bytes > 0 &&
                 p.options.on_cbw_error == CbwErrorPolicy::kBreakSnapshot),
      hook_(std::make_shared<Hook>(this)),
      cbw_pool_(WorkerPool::Create("job '" + p.options.job_id + "' cbw", kMaxCbwWorkers,
                                   std::chrono::seconds(10))),
      on_bitmap_end_(std::move(p.on_bitmap_end)),
      started_(RealSeconds()),
      target_(std::move(p.target)),
      clusters_(nclusters_),
      speed_(p.options.speed),
      limiter_(p.options.speed, chunk_size_, p.cluster_size, MonoNs()),
      len_(p.drive->size()) {}

BackupJob::~BackupJob() {
  cbw_pool_->Stop();
  Join();
}

void BackupJob::Join() {
  std::lock_guard<std::mutex> lock(join_mu_);
  if (!thread_.joinable()) return;
  if (thread_.get_id() == std::this_thread::get_id()) {
    thread_.detach();  // the last owner let go on the job's own thread
  } else {
    thread_.join();
  }
}

bool BackupJob::WaitFinished(std::chrono::steady_clock::time_point deadline) {
  MutexLock lock(&mu_);
  if (!thread_started_) return true;
  while (!run_finished_) {
    if (!cv_.WaitUntil(&lock, deadline)) return run_finished_;
  }
  return true;
}

// ---------------------------------------------------------------- events

void BackupJob::PublishLocked(Event e) {
  if (bus_ != nullptr) outbox_.push_back(std::move(e));
}

void BackupJob::FlushEvents() {
  if (bus_ == nullptr) return;
  MutexLock publishing(&publish_mu_);
  for (;;) {
    std::vector<Event> batch;
    {
      MutexLock lock(&mu_);
      batch.swap(outbox_);
    }
    if (batch.empty()) return;
    for (auto& e : batch) bus_->Publish(std::move(e));
  }
}

void BackupJob::WaitLocked(MutexLock* lock) {
  if (!outbox_.empty()) {
    lock->Unlock();
    FlushEvents();
    lock->Relock();
    return;
  }
  cv_.Wait(lock);
}

bool BackupJob::WaitUntilLocked(MutexLock* lock, std::chrono::steady_clock::time_point deadline) {
  if (!outbox_.empty()) {
    lock->Unlock();
    FlushEvents();
    lock->Relock();
    return std::chrono::steady_clock::now() < deadline;
  }
  return cv_.WaitUntil(lock, deadline);
}

void BackupJob::TransitionLocked(JobStatus to) {
  if (!TransitionAllowed(status_, to)) {
    LogError("job '" + id_ + "': illegal transition " + ToString(status_) + " -> " + ToString(to));
  }
  status_ = to;
  Event e;
  e.type = EventType::kJobStatusChange;
  e.job_id = id_;
  e.status = to;
  PublishLocked(std::move(e));
  cv_.SignalAll();
}

Status BackupJob::VerbCheckLocked(JobVerb verb) const {
  if (VerbAllowed(verb, status_)) return Status::Ok();
  return Status::Error(EBUSY, "Job '" + id_ + "' in state '" + ToString(status_) +
                                  "' cannot accept command verb '" + ToString(verb) + "'");
}

uint64_t BackupJob::ClusterBytes(uint64_t c0, uint64_t c1) const {
  uint64_t end = std::min(c1 * cluster_size_, size_);
  uint64_t start = c0 * cluster_size_;
  return end > start ? end - start : 0;
}

void BackupJob::FinishClaimLocked(const Run& run, bool ok, uint64_t data_bytes, uint64_t zero_bytes,
                                  bool cbw) {
  clusters_.Finish(run.c0, run.c1, ok);
  if (ok) {
    // Progress counts the copy set only (sync=bitmap); copies of other
    // clusters (for the view) are CBW work.
    uint64_t in_set = data_bytes + zero_bytes;
    if (clusters_.restricted()) {
      const uint64_t n = clusters_.CopySetCount(run.c0, run.c1);
      in_set = n == run.c1 - run.c0 ? in_set : std::min(in_set, n * cluster_size_);
    }
    offset_ += in_set;
    skipped_bytes_ += std::min(zero_bytes, in_set);
    if (cbw) cbw_bytes_ += data_bytes;
    SampleRateLocked();
  }
  cv_.SignalAll();
}

void BackupJob::SetCopySet(const DirtyBitmap& frozen) {
  std::vector<uint64_t> set((nclusters_ + 63) / 64, 0);
  frozen.ForEachDirty([&](uint64_t off, uint64_t len) {
    const uint64_t c0 = off / cluster_size_;
    const uint64_t c1 = std::min(nclusters_, (off + len + cluster_size_ - 1) / cluster_size_);
    for (uint64_t c = c0; c < c1; ++c) set[c / 64] |= uint64_t{1} << (c % 64);
  });
  uint64_t clusters = 0;
  for (uint64_t w : set) clusters += static_cast<uint64_t>(__builtin_popcountll(w));
  MutexLock lock(&mu_);
  clusters_.RestrictCopySet(std::move(set));
  // Clusters times their size, the last one clipped to the drive.
  len_ = clusters * cluster_size_;
  if (nclusters_ > 0 && clusters_.InCopySet(nclusters_ - 1)) {
    len_ -= nclusters_ * cluster_size_ - size_;
  }
}

void BackupJob::SetErrorLocked(int err, std::string message) {
  if (!error_) {
    error_ = std::move(message);
    LogWarn("job '" + id_ + "' failed: " + *error_ + " (" + std::strerror(err) + ")");
  }
  cv_.SignalAll();
}

void BackupJob::SampleRateLocked() {
  const double now = MonoSeconds();
  if (!rate_samples_.empty() && now - rate_samples_.back().first < kRateSampleSeconds) return;
  rate_samples_.emplace_back(now, offset_);
  while (rate_samples_.size() > 2 && rate_samples_[1].first < now - kRateWindowSeconds) {
    rate_samples_.pop_front();
  }
}

bool BackupJob::FrozenOverlapsLocked(uint64_t c0, uint64_t c1) const {
  for (const auto& r : frozen_reads_) {
    if (r.c0 < c1 && c0 < r.c1) return true;
  }
  return false;
}

void BackupJob::Announce() {
  {
    MutexLock lock(&mu_);
    Event e;
    e.type = EventType::kJobStatusChange;
    e.job_id = id_;
    e.status = JobStatus::kCreated;
    PublishLocked(std::move(e));
  }
  FlushEvents();
}

void BackupJob::Start() {
  {
    MutexLock lock(&mu_);
    busy_ = true;
    rate_samples_.emplace_back(MonoSeconds(), 0);
    TransitionLocked(JobStatus::kRunning);
  }
  FlushEvents();
  std::lock_guard<std::mutex> join(join_mu_);
  {
    MutexLock lock(&mu_);
    thread_started_ = true;
  }
  // The job thread holds the job, so that Shutdown may leave it behind.
  thread_ = std::thread(
      [self = shared_from_this()] { RunGuarded("job thread", [&] { self->RunJob(); }); });
}

// ---------------------------------------------------------------- verbs

Status BackupJob::Cancel(bool force) {
  MutexLock lock(&mu_);
  if (user_paused_ && !force) {
    return Status::Error(EBUSY, "The block job for device '" + id_ + "' is currently paused");
  }
  if (Status s = VerbCheckLocked(JobVerb::kCancel); !s.ok()) return s;
  cancel_requested_ = true;
  user_paused_ = false;
  cv_.SignalAll();
  return Status::Ok();
}

void BackupJob::CancelInternal() {
  MutexLock lock(&mu_);
  if (!VerbAllowed(JobVerb::kCancel, status_) || stopping_) return;
  cancel_requested_ = true;
  user_paused_ = false;
  cv_.SignalAll();
}

Status BackupJob::Pause() {
  MutexLock lock(&mu_);
  if (Status s = VerbCheckLocked(JobVerb::kPause); !s.ok()) return s;
  if (user_paused_) return Status::Error(EBUSY, "Job is already paused");
  user_paused_ = true;
  cv_.SignalAll();
  return Status::Ok();
}

Status BackupJob::Resume() {
  MutexLock lock(&mu_);
  if (!user_paused_) return Status::Error(EBUSY, "Can't resume a job that was not paused");
  if (Status s = VerbCheckLocked(JobVerb::kResume); !s.ok()) return s;
  user_paused_ = false;
  io_status_ = IoStatus::kOk;
  cv_.SignalAll();
  return Status::Ok();
}

Status BackupJob::SetSpeed(int64_t speed) {
  MutexLock lock(&mu_);
  if (Status s = VerbCheckLocked(JobVerb::kSetSpeed); !s.ok()) return s;
  if (speed < 0) return Status::Error(EINVAL, "Parameter 'speed' expects a non-negative value");
  speed_ = static_cast<uint64_t>(speed);
  limiter_.SetSpeed(speed_, MonoNs());
  cv_.SignalAll();
  return Status::Ok();
}

Status BackupJob::Complete() {
  MutexLock lock(&mu_);
  if (Status s = VerbCheckLocked(JobVerb::kComplete); !s.ok()) return s;
  return Status::Error(EBUSY, "The active block job '" + id_ + "' cannot be completed");
}

Status BackupJob::Finalize() {
  {
    MutexLock lock(&mu_);
    if (Status s = VerbCheckLocked(JobVerb::kFinalize); !s.ok()) return s;
    finalize_requested_ = true;
    cv_.SignalAll();
  }
  txn_->FinalizeAll(this);
  return Status::Ok();
}

void BackupJob::FinalizeInternal() {
  MutexLock lock(&mu_);
  finalize_requested_ = true;
  cv_.SignalAll();
}

Status BackupJob::Dismiss() {
  {
    MutexLock lock(&mu_);
    if (Status s = VerbCheckLocked(JobVerb::kDismiss); !s.ok()) return s;
    TransitionLocked(JobStatus::kNull);
    listed_ = false;
  }
  FlushEvents();
  return Status::Ok();
}

void BackupJob::Kick() {
  MutexLock lock(&mu_);
  cv_.SignalAll();
}

// ---------------------------------------------------------------- queries

JobInfo BackupJob::Info() const {
  MutexLock lock(&mu_);
  JobInfo i;
  i.id = id_;
  i.drive = drive_->name();
  i.target = target_display_;
  i.sync = options_.sync;
  i.status = status_;
  i.len = len_;
  i.offset = offset_;
  i.busy = busy_ && status_ == JobStatus::kRunning;
  i.paused = user_paused_;
  i.speed = speed_;
  i.io_status = io_status_;
  i.auto_finalize = options_.auto_finalize;
  i.auto_dismiss = options_.auto_dismiss;
  i.error = error_;
  i.cbw_bytes = cbw_bytes_;
  i.skipped_bytes = skipped_bytes_;
  i.started = started_;
  i.finished = finished_;
  i.result = result_;
  i.listed = listed_;
  if (finished_) {
    double dt = *finished_ - started_;
    i.bytes_per_second = dt > 0 ? static_cast<double>(offset_) / dt : 0;
    if (result_ == JobResult::kSuccess) i.eta_seconds = 0;
  } else if (!rate_samples_.empty()) {
    // Progress counts the background copy and the CBW copies alike; the
    // rate is over the last kRateWindowSeconds, so the ETA follows the load
    // the job has now rather than its first burst.
    const double now = MonoSeconds();
    const auto& base = rate_samples_.front();
    const double dt = now - base.first;
    if (dt > 0.2) i.bytes_per_second = static_cast<double>(offset_ - base.second) / dt;
    if (options_.sync != SyncMode::kNone && i.bytes_per_second > 0) {
      i.eta_seconds = static_cast<double>(len_ - std::min(len_, offset_)) / i.bytes_per_second;
    }
  }
  return i;
}

bool BackupJob::listed() const {
  MutexLock lock(&mu_);
  return listed_;
}

bool BackupJob::ended() const {
  MutexLock lock(&mu_);
  return status_ == JobStatus::kConcluded || status_ == JobStatus::kNull;
}

bool BackupJob::view_available() const {
  MutexLock lock(&mu_);
  return !stopping_ && !cancel_requested_;
}

// ---------------------------------------------------------------- CBW

Status BackupJob::CopySync(Target* target, uint64_t off, uint64_t len, uint64_t* zero_bytes) {
  const size_t piece = static_cast<size_t>(std::min<uint64_t>(len, chunk_size_));
  std::unique_ptr<char[]> buf(new (std::nothrow) char[piece]);
  if (!buf) return Status::Error(ENOMEM, "no memory for a copy-before-write buffer");
  for (uint64_t done = 0; done < len;) {
    // A task stuck in the previous piece must not touch the drive once the
    // job has concluded, nor once the drive is closing.
    const size_t n = static_cast<size_t>(std::min<uint64_t>(len - done, piece));
    Result<size_t> r = Status::Error(ECANCELED, "job ended");
    {
      SourceLease::Hold hold = drive_lease_->Acquire();
      if (!hold || ending_.load()) return r.status();
      r = PreadFull(hold.fd(), buf.get(), n, off + done);
    }
    if (!r.ok()) return Status::FromErrno(r.status().code(), "read from source");
    if (*r < n) return Status::Error(EIO, "short read from source");
    if (Status s = WriteOut(target, buf.get(), n, off + done, zero_bytes); !s.ok()) return s;
    done += n;
  }
  return Status::Ok();
}

Status BackupJob::WriteOut(Target* target, const char* buf, size_t n, uint64_t off,
                           uint64_t* zero_bytes) {
  // Cluster by cluster: all-zero clusters become holes or write-zeroes.
  for (size_t i = 0; i < n;) {
    const size_t cl = static_cast<size_t>(std::min<uint64_t>(cluster_size_, n - i));
    const bool zero = IsZero(buf + i, cl);
    size_t j = i + cl;
    while (j < n) {
      size_t cl2 = static_cast<size_t>(std::min<uint64_t>(cluster_size_, n - j));
      if (IsZero(buf + j, cl2) != zero) break;
      j += cl2;
    }
    Status s;
    if (zero) {
      *zero_bytes += j - i;
      if (!target->zeroed()) s = target->WriteZeroes(off + i, j - i);
    } else {
      s = target->Write(buf + i, j - i, off + i);
    }
    if (!s.ok()) return s;
    i = j;
  }
  return Status::Ok();
}

uint64_t BackupJob::DirtyBytesLocked(uint64_t c0, uint64_t c1) const {
  uint64_t n = 0;
  for (uint64_t a = clusters_.NextDirty(c0, c1); a < c1;) {
    const uint64_t b = std::min(c1, clusters_.NextClean(a));
    n += ClusterBytes(a, b);
    a = clusters_.NextDirty(b, c1);
  }
  return n;
}

Status BackupJob::BufferDirtyLocked(MutexLock* lock, uint64_t c0, uint64_t c1, uint64_t need) {
  buffer_used_ += need;
  std::vector<Run> runs;
  for (const auto& [a, b] : clusters_.Claim(c0, c1)) runs.push_back({a, b});
  lock->Unlock();
  // The read is the writer's own (the source is local, and the write that
  // follows is I/O on the same thread anyway); no lock is held.
  std::vector<std::shared_ptr<std::vector<char>>> data(runs.size());
  Status st;
  try {
    for (size_t i = 0; i < runs.size() && st.ok(); ++i) {
      const uint64_t bytes = ClusterBytes(runs[i].c0, runs[i].c1);
      data[i] = std::make_shared<std::vector<char>>(bytes);
      Result<size_t> r =
          PreadFull(drive_->fd(), data[i]->data(), bytes, runs[i].c0 * cluster_size_);
      if (!r.ok()) {
        st = Status::FromErrno(r.status().code(), "read from source");
      } else if (*r < bytes) {
        st = Status::Error(EIO, "short read from source");
      }
    }
  } catch (const std::bad_alloc&) {
    st = Status::Error(ENOMEM, "no memory for a copy-before-write buffer");
  }
  // Split into all-zero and data pieces, cluster by cluster, before taking
  // the lock: zero pieces keep no memory and are holes to the view's seeks.
  struct Piece {
    size_t run;
    uint64_t c0, c1;
    bool zero;
  };
  std::vector<Piece> pieces;
  for (size_t i = 0; st.ok() && i < runs.size(); ++i) {
    const Run& r = runs[i];
    auto zero_at = [&](uint64_t c) {
      return IsZero(data[i]->data() + (c - r.c0) * cluster_size_, ClusterBytes(c, c + 1));
    };
    for (uint64_t a = r.c0; a < r.c1;) {
      const bool zero = zero_at(a);
      uint64_t b = a + 1;
      while (b < r.c1 && zero_at(b) == zero) ++b;
      pieces.push_back({i, a, b, zero});
      a = b;
    }
  }
  lock->Relock();
  if (!st.ok() || stopping_) {
    for (const auto& r : runs) FinishClaimLocked(r, false, 0, 0, true);
    buffer_used_ -= need;
    cv_.SignalAll();
    return st.ok() ? Status::Ok() : CbwFailedLocked(st);
  }
  std::vector<uint64_t> zero_bytes(runs.size(), 0);
  for (const Piece& p : pieces) {
    const uint64_t bytes = ClusterBytes(p.c0, p.c1);
    if (p.zero) {
      buffer_used_ -= bytes;
      zero_bytes[p.run] += bytes;
      buffered_.emplace(p.c0, Buffered{p.c1, nullptr, 0});
    } else {
      buffered_.emplace(p.c0,
                        Buffered{p.c1, data[p.run],
                                 static_cast<size_t>((p.c0 - runs[p.run].c0) * cluster_size_)});
    }
    cbw_pool_->Submit([self = shared_from_this(), c0 = p.c0] { self->StoreBuffered(c0); });
  }
  uint64_t data_bytes = 0;
  for (size_t i = 0; i < runs.size(); ++i) {
    // Preserved as far as writers, views and the copier go.
    const uint64_t run_bytes = ClusterBytes(runs[i].c0, runs[i].c1);
    FinishClaimLocked(runs[i], true, run_bytes - zero_bytes[i], zero_bytes[i], true);
    data_bytes += run_bytes - zero_bytes[i];
  }
  drive_->NoteCbwCopy(data_bytes);  // MOUNTPOINT/metrics
  return Status::Ok();
}

void BackupJob::StoreBuffered(uint64_t c0) {
  std::shared_ptr<Target> target;
  Buffered b;
  {
    MutexLock lock(&mu_);
    auto it = buffered_.find(c0);
    if (it == buffered_.end()) return;  // the job ended first
    if (stopping_ || !target_) return;
    b = it->second;
    target = target_;
  }
  const uint64_t bytes = ClusterBytes(c0, b.c1);
  Status st;
  if (ending_.load()) {
    st = Status::Error(ECANCELED, "job ended");
  } else if (!b.data) {
    if (!target->zeroed()) st = target->WriteZeroes(c0 * cluster_size_, bytes);
  } else {
    // Data pieces are whole data clusters (split when buffered).
    st = target->Write(b.data->data() + b.data_off, bytes, c0 * cluster_size_);
  }
  {
    MutexLock lock(&mu_);
    auto it = buffered_.find(c0);
    if (it != buffered_.end()) {
      buffered_.erase(it);
      if (b.data) buffer_used_ -= bytes;
      if (!st.ok()) {
        lost_.push_back({c0, b.c1});
        if (!stopping_) {
          LogWarn("job '" + id_ + "': storing a copy-before-write buffer failed: " + st.message());
          CbwFailedLocked(st);  // break-snapshot: the job fails, writes went on
        }
      }
      cv_.SignalAll();
    }
  }
  // `target` goes here, without the lock (the last reference may close it).
}

Status BackupJob::CbwFailedLocked(const Status& why) {
  if (options_.on_cbw_error == CbwErrorPolicy::kBreakGuestWrite) {
    LogWarn("job '" + id_ +
            "': copy-before-write failed, refusing the drive write: " + why.message());
    return Status::Error(EIO, "copy-before-write failed: " + why.message());
  }
  broken_ = true;
  SetErrorLocked(why.code(), why.code() == ETIMEDOUT ? why.message() : std::strerror(why.code()));
  return Status::Ok();
}

Status BackupJob::BeforeWrite(uint64_t offset, uint64_t length, bool may_block) {
  if (length == 0 || offset >= size_) return Status::Ok();
  const uint64_t c0 = offset / cluster_size_;
  const uint64_t c1 =
      std::min(nclusters_, (std::min(offset + length, size_) + cluster_size_ - 1) / cluster_size_);
  MutexLock lock(&mu_);
  if (stopping_ || broken_) return Status::Ok();
  if (clusters_.dirty_count() == 0 && clusters_.copying_count() == 0 && frozen_reads_.empty()) {
    return Status::Ok();
  }
  if (!may_block) {
    // The fast path cannot wait: anything to copy or wait for goes to a
    // thread that may (see WriteHook). A buffered CBW with room needs no
    // wait: the writer reads the old data itself and goes on.
    if (clusters_.AnyCopying(c0, c1) || FrozenOverlapsLocked(c0, c1)) {
      return Status::Error(EAGAIN, "copy-before-write needed");
    }
    if (clusters_.NextDirty(c0, c1) < c1) {
      const uint64_t need = buffering_ ? DirtyBytesLocked(c0, c1) : 0;
      if (!buffering_ || buffer_used_ + need > cbw_buffer_bytes_) {
        return Status::Error(EAGAIN, "copy-before-write needed");
      }
      if (Status s = BufferDirtyLocked(&lock, c0, c1, need); !s.ok()) return s;
      // Others may have claimed or frozen clusters meanwhile: the slow path
      // re-checks.
      if (stopping_ || broken_) return Status::Ok();
      if (clusters_.NextDirty(c0, c1) < c1 || clusters_.AnyCopying(c0, c1) ||
          FrozenOverlapsLocked(c0, c1)) {
        return Status::Error(EAGAIN, "copy-before-write needed");
      }
    }
    return Status::Ok();
  }
  // Every wait below is bounded by one deadline: a target that stopped
  // answering must not hang the drive.
  const auto deadline = std::chrono::steady_clock::now() + cbw_timeout_;
  for (;;) {
    if (stopping_ || broken_) return Status::Ok();
    if (buffering_ && clusters_.NextDirty(c0, c1) < c1) {
      const uint64_t need = DirtyBytesLocked(c0, c1);
      if (need <= cbw_buffer_bytes_) {
        if (buffer_used_ + need > cbw_buffer_bytes_) {
          // The buffer is full: wait for the store to make room.
          if (!WaitUntilLocked(&lock, deadline)) {
            return CbwFailedLocked(Status::Error(ETIMEDOUT, TimeoutText(cbw_timeout_)));
          }
          continue;
        }
        if (Status s = BufferDirtyLocked(&lock, c0, c1, need); !s.ok()) return s;
        continue;
      }
      // Larger than the whole buffer: copied synchronously below.
    }
    std::vector<std::shared_ptr<CbwTask>> mine;
    {
      // Claims are handed to tasks; any not handed over (an exception on the
      // way) go back to dirty when this scope ends, lock still held.
      std::vector<Run> unhanded;
      struct Release {
        BackupJob* job;
        std::vector<Run>* runs;
        ~Release() CBW_NO_TSA {
          for (const auto& r : *runs) job->FinishClaimLocked(r, false, 0, 0, true);
        }
      } release{this, &unhanded};
      for (const auto& [a, b] : clusters_.Claim(c0, c1)) unhanded.push_back({a, b});
      while (!unhanded.empty()) {
        auto task = std::make_shared<CbwTask>();
        task->run = unhanded.back();
        cbw_pool_->Submit([self = shared_from_this(), task] { self->RunCbwTask(task); });
        mine.push_back(std::move(task));
        unhanded.pop_back();
      }
    }
    if (!mine.empty()) {
      // The copies run on CBW workers, so that this writer can give up on
      // them (they may be stuck in target I/O) while they finish in the
      // background; the workers end the claims.
      auto all_done = [&]() CBW_REQUIRES(mu_) {
        return std::all_of(mine.begin(), mine.end(), [](const auto& t) { return t->done; });
      };
      while (!stopping_ && !broken_ && !all_done()) {
        if (!WaitUntilLocked(&lock, deadline)) break;
      }
      if (stopping_ || broken_) return Status::Ok();
      if (!all_done()) {
        // Copies no worker has started yet are taken back; started ones stay
        // with their (stuck) worker, which ends the claim if its I/O returns.
        for (const auto& t : mine) {
          if (t->started || t->done) continue;
          t->taken_back = true;
          FinishClaimLocked(t->run, false, 0, 0, true);
        }
        return CbwFailedLocked(Status::Error(ETIMEDOUT, TimeoutText(cbw_timeout_)));
      }
      for (const auto& t : mine) {
        if (!t->result.ok()) return CbwFailedLocked(t->result);
      }
      continue;
    }
    if (!clusters_.AnyCopying(c0, c1)) break;
    if (!WaitUntilLocked(&lock, deadline)) {
      return CbwFailedLocked(Status::Error(ETIMEDOUT, TimeoutText(cbw_timeout_)));
    }
  }
  // The old data is safe in the target; snapshot readers still reading it
  // from the source must finish before the source changes.
  while (!stopping_ && !broken_ && FrozenOverlapsLocked(c0, c1)) {
    if (!WaitUntilLocked(&lock, deadline)) {
      return CbwFailedLocked(Status::Error(ETIMEDOUT, TimeoutText(cbw_timeout_)));
    }
  }
  return Status::Ok();
}

void BackupJob::RunCbwTask(const std::shared_ptr<CbwTask>& task) {
  std::shared_ptr<Target> target;
  {
    MutexLock lock(&mu_);
    if (task->taken_back) return;
    if (stopping_ || !target_) {
      // The job is ending: its target may be closed; give the claim back.
      FinishClaimLocked(task->run, false, 0, 0, true);
      task->result = Status::Error(ECANCELED, "job ending");
      task->done = true;
      return;
    }
    task->started = true;
    target = target_;
  }
  uint64_t zeros = 0;
  const uint64_t bytes = ClusterBytes(task->run.c0, task->run.c1);
  Status st = CopySync(target.get(), task->run.c0 * cluster_size_, bytes, &zeros);
  if (st.ok()) {
    if (SourceLease::Hold hold = drive_lease_->Acquire(); hold && !ending_.load()) {
      drive_->NoteCbwCopy(bytes);  // MOUNTPOINT/metrics
    }
  }
  {
    MutexLock lock(&mu_);
    FinishClaimLocked(task->run, st.ok(), bytes - zeros, zeros, true);
    task->result = std::move(st);
    task->done = true;
  }
  // `target` goes here, without the lock: if it is the last reference, its
  // close may block on a dead target.
}

// ---------------------------------------------------------------- views

Result<size_t> BackupJob::ReadSnapshot(void* buf, size_t len, uint64_t off) {
  struct Segment {
    uint64_t off, len;
    bool from_target;
    // Buffered CBW: the data is in memory (`mem` + mem_off holds cluster
    // mem_c0 on; null: zeroes).
    bool buffered = false;
    std::shared_ptr<const std::vector<char>> mem;
    size_t mem_off = 0;
    uint64_t mem_c0 = 0;
  };
  std::vector<Segment> segs;
  Run frozen{0, 0};
  std::shared_ptr<Target> target;
  {
    MutexLock lock(&mu_);
    if (stopping_ || broken_ || cancel_requested_ || !target_) {
      return Status::Error(EIO, "snapshot is no longer available");
    }
    if (off >= size_ || len == 0) return size_t{0};
    len = static_cast<size_t>(std::min<uint64_t>(len, size_ - off));
    const uint64_t c0 = off / cluster_size_;
    const uint64_t c1 = (off + len + cluster_size_ - 1) / cluster_size_;
    for (uint64_t c = c0; c < c1;) {
      uint64_t e = clusters_.RunEnd(c, c1);
      const bool done = clusters_.IsDone(c);
      Segment seg{0, 0, done, false, nullptr, 0, 0};
      if (done && !buffered_.empty()) {
        // Done clusters still in the CBW buffer are read from memory.
        auto it = buffered_.upper_bound(c);
        if (it != buffered_.begin() && std::prev(it)->second.c1 > c) {
          --it;
          e = std::min(e, it->second.c1);
          seg.buffered = true;
          seg.mem = it->second.data;
          seg.mem_off = it->second.data_off;
          seg.mem_c0 = it->first;
        } else if (it != buffered_.end() && it->first < e) {
          e = it->first;
        }
      }
      const uint64_t s = std::max(off, c * cluster_size_);
      const uint64_t t = std::min(off + len, e * cluster_size_);
      seg.off = s;
      seg.len = t - s;
      segs.push_back(std::move(seg));
      c = e;
    }
    frozen = {c0, c1};
    frozen_reads_.push_back(frozen);
    target = target_;
  }
  int err = 0;
  std::string what;
  for (const auto& sg : segs) {
    char* p = static_cast<char*>(buf) + (sg.off - off);
    if (sg.buffered) {
      if (sg.mem) {
        std::memcpy(p, sg.mem->data() + sg.mem_off + (sg.off - sg.mem_c0 * cluster_size_), sg.len);
      } else {
        std::memset(p, 0, sg.len);
      }
    } else if (sg.from_target) {
      if (Status s = target->Read(p, sg.len, sg.off); !s.ok()) {
        err = s.code();
        what = s.message();
        break;
      }
    } else {
      Result<size_t> r = PreadFull(drive_->fd(), p, sg.len, sg.off);
      if (!r.ok()) {
        err = r.status().code();
        what = "snapshot read from source";
        break;
      }
      if (*r < sg.len) std::memset(p + *r, 0, sg.len - *r);
    }
  }
  {
    MutexLock lock(&mu_);
    for (auto it = frozen_reads_.begin(); it != frozen_reads_.end(); ++it) {
      if (it->c0 == frozen.c0 && it->c1 == frozen.c1) {
        frozen_reads_.erase(it);
        break;
      }
    }
    cv_.SignalAll();
    // A snapshot that broke while we read may have handed us new data.
    if (stopping_ || broken_ || cancel_requested_) {
      return Status::Error(EIO, "snapshot is no longer available");
    }
  }
  if (err != 0) return Status::Error(err, what);
  return len;
}

Result<uint64_t> BackupJob::SeekSnapshot(uint64_t off, int whence) {
  if (whence != SEEK_DATA && whence != SEEK_HOLE) {
    return Status::Error(EINVAL, "unsupported whence");
  }
  std::shared_ptr<Target> target;
  {
    MutexLock lock(&mu_);
    if (stopping_ || broken_ || cancel_requested_ || !target_) {
      return Status::Error(EIO, "snapshot is no longer available");
    }
    target = target_;
  }
  if (off >= size_) return Status::Error(ENXIO, "past the end");
  // The answer of each medium from some position is valid for every
  // position up to it (no data, or no hole, in between): each is asked only
  // when the walk passes its last answer. So a seek costs a word scan per
  // run of done / not-done clusters and a syscall per extent of a medium.
  struct Known {
    uint64_t from = 1, answer = 0;  // empty
  };
  Known known[2];  // [0] the source, [1] the target
  const uint64_t none = UINT64_MAX;
  uint64_t pos = off;
  for (int step = 0; step < kSeekMaxSteps; ++step) {
    if (pos >= size_) {
      if (whence == SEEK_DATA) return Status::Error(ENXIO, "no data past the offset");
      return size_;
    }
    const uint64_t c = pos / cluster_size_;
    bool done;
    uint64_t run_end;
    {
      MutexLock lock(&mu_);
      if (stopping_ || broken_ || cancel_requested_) {
        return Status::Error(EIO, "snapshot is no longer available");
      }
      done = clusters_.IsDone(c);
      run_end = std::min(size_, clusters_.RunEnd(c, c + kSeekScanClusters) * cluster_size_);
      if (done && !buffered_.empty()) {
        // Buffered clusters are data the target does not hold yet.
        auto it = buffered_.upper_bound(c);
        if (it != buffered_.begin() && std::prev(it)->second.c1 > c) {
          const Buffered& b = std::prev(it)->second;
          if ((whence == SEEK_DATA) == (b.data != nullptr)) return pos;  // data, or a hole
          pos = std::min(size_, b.c1 * cluster_size_);
          continue;
        }
        if (it != buffered_.end()) run_end = std::min(run_end, it->first * cluster_size_);
      }
    }
    Known& k = known[done ? 1 : 0];
    uint64_t answer;
    if (pos >= k.from && pos <= k.answer) {
      answer = k.answer;
    } else {
      Result<uint64_t> r = done ? target->Seek(pos, whence) : drive_->Seek(pos, whence);
      if (r.ok()) {
        answer = *r;
      } else if (r.status().code() == ENXIO) {
        answer = whence == SEEK_DATA ? none : size_;
      } else {
        return r.status();
      }
      k = {pos, answer};
    }
    if (answer < run_end) return std::max(answer, pos);
    pos = run_end;
  }
  // Too fragmented to walk: report data (allowed: a hole may read as data).
  return whence == SEEK_DATA ? pos : size_;
}

// ---------------------------------------------------------------- copier host

CopierHost::Halt BackupJob::halt() {
  MutexLock lock(&mu_);
  if (cancel_requested_) return Halt::kCancel;
  if (error_) return Halt::kError;
  if (user_paused_) return Halt::kPause;
  return Halt::kNone;
}

std::optional<CopierHost::Run> BackupJob::ClaimNext(uint64_t* cursor, uint64_t end,
                                                    uint64_t max_clusters) {
  MutexLock lock(&mu_);
  const uint64_t c = clusters_.NextCopyable(*cursor, end);
  if (c >= std::min(end, nclusters_)) {
    *cursor = std::max(*cursor, std::min(end, nclusters_));
    return std::nullopt;
  }
  const uint64_t e = clusters_.NextUncopyable(c, std::min(end, c + max_clusters));
  clusters_.Claim(c, e);  // [c, e) is all dirty: one run
  *cursor = e;
  return Run{c, e};
}

uint64_t BackupJob::NextDirty(uint64_t from) {
  MutexLock lock(&mu_);
  return clusters_.NextCopyable(from);
}

void BackupJob::Finish(const Run& run, bool ok, uint64_t data, uint64_t zero) {
  MutexLock lock(&mu_);
  FinishClaimLocked(run, ok, data, zero, false);
}

uint64_t BackupJob::ChunkBytes() {
  MutexLock lock(&mu_);
  return limiter_.ChunkBytes();
}

uint64_t BackupJob::DelayNs(uint64_t bytes) {
  MutexLock lock(&mu_);
  return limiter_.DelayNs(bytes, MonoNs());
}

void BackupJob::Consume(uint64_t bytes) {
  MutexLock lock(&mu_);
  limiter_.Consume(bytes, MonoNs());
}

bool BackupJob::AllDone() {
  MutexLock lock(&mu_);
  return clusters_.NextCopyable(0) >= nclusters_ && clusters_.copying_count() == 0 &&
         buffered_.empty();
}

void BackupJob::Wait(uint64_t ns) {
  MutexLock lock(&mu_);
  if (cancel_requested_ || error_) return;
  WaitUntilLocked(&lock, std::chrono::steady_clock::now() + std::chrono::nanoseconds(ns));
}

bool BackupJob::OnPause() {
  bool ok;
  {
    MutexLock lock(&mu_);
    ok = PausePointLocked(&lock);
  }
  FlushEvents();
  return ok;
}

bool BackupJob::OnIoError(int err, bool is_read) {
  bool ok;
  {
    MutexLock lock(&mu_);
    ok = HandleIoErrorLocked(&lock, err, is_read);
  }
  FlushEvents();
  return ok;
}

// ---------------------------------------------------------------- job thread

bool BackupJob::PausePointLocked(MutexLock* lock) {
  if (user_paused_ && !cancel_requested_) {
    busy_ = false;
    TransitionLocked(JobStatus::kPaused);
    while (user_paused_ && !cancel_requested_) WaitLocked(lock);
    TransitionLocked(JobStatus::kRunning);
    busy_ = true;
  }
  return !cancel_requested_;
}

bool BackupJob::HandleIoErrorLocked(MutexLock* lock, int err, bool is_read) {
  const ErrorPolicy policy = is_read ? options_.on_source_error : options_.on_target_error;
  const char* action = "report";
  switch (policy) {
    case ErrorPolicy::kReport:
      action = "report";
      break;
    case ErrorPolicy::kIgnore:
      action = "ignore";
      break;
    case ErrorPolicy::kStop:
      action = "stop";
      break;
    case ErrorPolicy::kEnospc:
      action = err == ENOSPC ? "stop" : "report";
      break;
  }
  Event e;
  e.type = EventType::kBlockJobError;
  e.job_id = id_;
  e.is_read = is_read;
  e.action = action;
  PublishLocked(std::move(e));
  if (std::strcmp(action, "report") == 0) {
    SetErrorLocked(err, std::strerror(err));
    return false;
  }
  if (std::strcmp(action, "ignore") == 0) {
    // Retry at once, but do not spin on a persistent error (and let a
    // writer waiting for the failed clusters take them first).
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(10);
    while (!cancel_requested_ && WaitUntilLocked(lock, until)) {
    }
    return !cancel_requested_;
  }
  io_status_ = err == ENOSPC ? IoStatus::kNoSpace : IoStatus::kFailed;
  user_paused_ = true;
  if (!PausePointLocked(lock)) return false;
  io_status_ = IoStatus::kOk;
  return true;
}

BackupJob::Outcome BackupJob::RunNone() {
  MutexLock lock(&mu_);
  for (;;) {
    if (!PausePointLocked(&lock)) return Outcome::kCancelled;
    if (error_) return Outcome::kFailed;
    busy_ = false;  // nothing to do until a write or a verb
    WaitLocked(&lock);
    busy_ = true;
  }
}

BackupJob::Outcome BackupJob::RunCopier() {
  std::shared_ptr<Target> target;
  {
    MutexLock lock(&mu_);
    target = target_;
  }
  Copier::Config cfg;
  cfg.cluster_size = cluster_size_;
  cfg.chunk_size = chunk_size_;
  cfg.depth = queue_depth_;
  Copier copier(this, cfg, drive_, std::move(target));
  switch (copier.Run()) {
    case Copier::Outcome::kSuccess:
      return Outcome::kSuccess;
    case Copier::Outcome::kCancelled:
      return Outcome::kCancelled;
    case Copier::Outcome::kFailed:
      return Outcome::kFailed;
  }
  return Outcome::kFailed;
}

BackupJob::Outcome BackupJob::Complete(Outcome copied) {
  if (copied != Outcome::kSuccess) return copied;
  {
    MutexLock lock(&mu_);
    if (cancel_requested_) return Outcome::kCancelled;
    if (error_) return Outcome::kFailed;
    busy_ = false;
    TransitionLocked(JobStatus::kWaiting);
  }
  FlushEvents();
  txn_->MarkCopied();
  Outcome out = Outcome::kSuccess;
  {
    MutexLock lock(&mu_);
    while (!cancel_requested_ && !error_ && !txn_->AllCopied()) WaitLocked(&lock);
    if (cancel_requested_) {
      out = Outcome::kCancelled;
    } else if (error_) {
      out = Outcome::kFailed;
    } else {
      TransitionLocked(JobStatus::kPending);
      if (!options_.auto_finalize) {
        Event e;
        e.type = EventType::kBlockJobPending;
        e.job_id = id_;
        PublishLocked(std::move(e));
        while (!finalize_requested_ && !cancel_requested_) WaitLocked(&lock);
        if (cancel_requested_) out = Outcome::kCancelled;
      }
    }
  }
  FlushEvents();
  return out;
}

void BackupJob::Conclude(Outcome outcome) {
  {
    MutexLock lock(&mu_);
    if (error_) outcome = Outcome::kFailed;  // the first error is sticky
    stopping_ = true;
    busy_ = false;
    // Buffered clusters not stored by now never will be (stores in flight
    // keep their own data); the memory goes.
    for (const auto& [c0, b] : buffered_) lost_.push_back({c0, b.c1});
    buffered_.clear();
    buffer_used_ = 0;
    cv_.SignalAll();
    if (outcome != Outcome::kSuccess) {
      if (status_ == JobStatus::kPaused) TransitionLocked(JobStatus::kRunning);
      TransitionLocked(JobStatus::kAborting);
    }
  }
  FlushEvents();
  cbw_pool_->Stop();
  if (outcome != Outcome::kSuccess) txn_->Abort(this);
  // Writers inside the hook return at once now (stopping_), so this is
  // prompt even when CBW tasks are stuck on the target.
  drive_->RemoveHook(hook_.get());
  ending_.store(true);

  std::shared_ptr<Target> target;
  {
    MutexLock lock(&mu_);
    target = std::move(target_);  // views read EIO from now on
  }
  // Ends the target (a qemu-nbd child stops cleanly); users still holding it
  // (a stuck copier or CBW task) get errors. The last one closes it.
  if (target) {
    if (Status s = target->Close(); !s.ok()) {
      MutexLock lock(&mu_);
      if (outcome == Outcome::kSuccess) {
        SetErrorLocked(s.code(), s.message());
        outcome = Outcome::kFailed;
        TransitionLocked(JobStatus::kAborting);
      } else {
        LogWarn("job '" + id_ + "': closing the target: " + s.message());
      }
    }
    target.reset();
  }
  if (on_bitmap_end_) {
    // The bitmap's fate (SPEC 7) is settled before the job is announced as
    // ended, so query-block right after BLOCK_JOB_COMPLETED shows it.
    std::vector<std::pair<uint64_t, uint64_t>> not_copied;
    {
      MutexLock lock(&mu_);
      for (uint64_t c = clusters_.NextCopyable(0); c < nclusters_;) {
        const uint64_t e = clusters_.NextUncopyable(c);
        not_copied.emplace_back(c * cluster_size_, ClusterBytes(c, e));
        c = clusters_.NextCopyable(e);
      }
      for (const Run& r : lost_)
        not_copied.emplace_back(r.c0 * cluster_size_, ClusterBytes(r.c0, r.c1));
    }
    on_bitmap_end_(outcome == Outcome::kSuccess, std::move(not_copied));
  }
  {
    MutexLock lock(&mu_);
    finished_ = RealSeconds();
    Event e;
    e.job_id = id_;
    e.len = len_;
    e.offset = offset_;
    e.speed = speed_;
    if (outcome == Outcome::kCancelled) {
      result_ = JobResult::kCancelled;
      e.type = EventType::kBlockJobCancelled;
    } else {
      result_ = outcome == Outcome::kSuccess ? JobResult::kSuccess : JobResult::kFailed;
      e.type = EventType::kBlockJobCompleted;
      if (outcome == Outcome::kFailed) e.error = error_.value_or("Input/output error");
    }
    PublishLocked(std::move(e));
    TransitionLocked(JobStatus::kConcluded);
    if (options_.auto_dismiss) {
      TransitionLocked(JobStatus::kNull);
      listed_ = false;
    }
    switch (result_) {
      case JobResult::kSuccess:
        LogInfo("job '" + id_ + "' succeeded: " + std::to_string(offset_) + " bytes, target '" +
                target_display_ + "'");
        break;
      case JobResult::kCancelled:
        LogInfo("job '" + id_ + "' cancelled at " + std::to_string(offset_) + " of " +
                std::to_string(size_) + " bytes");
        break;
      default:
        LogInfo("job '" + id_ + "' failed: " + error_.value_or("Input/output error"));
        break;
    }
  }
  FlushEvents();
}

void BackupJob::RunJob() {
  // How long a cancel or an error may wait for a copier stuck in target I/O
  // before the job concludes without it: long enough for a slow but living
  // target to finish its in-flight requests, short enough that job-cancel
  // visibly works within seconds.
  constexpr auto kAbandonGrace = std::chrono::seconds(2);
  {
    MutexLock lock(&mu_);
    copier_running_ = true;
  }
  std::thread copier;
  try {
    copier = std::thread([self = shared_from_this()] {
      std::optional<Copier::Outcome> o;
      RunGuarded(
          "copier",
          [&] {
            Outcome r =
                self->options_.sync == SyncMode::kNone ? self->RunNone() : self->RunCopier();
            o = r == Outcome::kSuccess     ? Copier::Outcome::kSuccess
                : r == Outcome::kCancelled ? Copier::Outcome::kCancelled
                                           : Copier::Outcome::kFailed;
          },
          [&](const std::string& what) {
            MutexLock lock(&self->mu_);
            self->SetErrorLocked(EIO, "internal error: " + what);
          });
      MutexLock lock(&self->mu_);
      self->copy_outcome_ = o.value_or(Copier::Outcome::kFailed);
      self->copier_running_ = false;
      self->cv_.SignalAll();
    });
  } catch (...) {
    MutexLock lock(&mu_);
    SetErrorLocked(EAGAIN, "could not start the copier thread");
    copier_running_ = false;
    copy_outcome_ = Copier::Outcome::kFailed;
  }
  Outcome outcome = Outcome::kFailed;
  bool abandoned = false;
  {
    MutexLock lock(&mu_);
    while (copier_running_ && !cancel_requested_ && !error_) WaitLocked(&lock);
    const auto grace_end = std::chrono::steady_clock::now() + kAbandonGrace;
    while (copier_running_) {
      if (!WaitUntilLocked(&lock, grace_end)) break;
    }
    if (copier_running_) {
      LogWarn("job '" + id_ + "': the copier is stuck in target I/O; ending the job without it");
      abandoned = true;
      outcome = cancel_requested_ ? Outcome::kCancelled : Outcome::kFailed;
      if (!error_ && !cancel_requested_) SetErrorLocked(ETIMEDOUT, "target not answering");
    } else {
      switch (copy_outcome_.value_or(Copier::Outcome::kFailed)) {
        case Copier::Outcome::kSuccess:
          outcome = Outcome::kSuccess;
          break;
        case Copier::Outcome::kCancelled:
          outcome = Outcome::kCancelled;
          break;
        case Copier::Outcome::kFailed:
          outcome = Outcome::kFailed;
          break;
      }
    }
  }
  if (copier.joinable()) {
    if (!abandoned) {
      copier.join();
    } else {
      // It holds the job and the target: it goes whenever its I/O returns,
      // touching nothing else.
      ending_.store(true);
      copier.detach();
    }
  }
  Conclude(Complete(outcome));
  MutexLock lock(&mu_);
  run_finished_ = true;
  cv_.SignalAll();
}

}  // namespace cbw::backup
