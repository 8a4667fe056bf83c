#include "backup/backup_job.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "backup/log.h"

namespace cbw::backup {
namespace {

constexpr uint64_t kMaxWaitNs = 50'000'000;        // longest the copier sleeps unwoken
constexpr uint64_t kWritebackBytes = 64ull << 20;  // start target writeback this often
constexpr uint64_t kWritebackTag = 0xffff;         // user_data of writeback requests

uint64_t MonoNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

double RealSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

bool IsZero(const char* p, size_t n) {
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    uint64_t w[8];
    std::memcpy(w, p + i, sizeof(w));
    if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0) return false;
  }
  for (; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

// JobSTT: allowed[from][to].
bool TransitionAllowed(JobStatus from, JobStatus to) {
  using S = JobStatus;
  switch (from) {
    case S::kUndefined:
      return to == S::kCreated;
    case S::kCreated:
      return to == S::kRunning || to == S::kAborting || to == S::kNull;
    case S::kRunning:
      return to == S::kPaused || to == S::kReady || to == S::kWaiting || to == S::kAborting;
    case S::kPaused:
      return to == S::kRunning;
    case S::kReady:
      return to == S::kStandby || to == S::kWaiting || to == S::kAborting;
    case S::kStandby:
      return to == S::kReady;
    case S::kWaiting:
      return to == S::kPending || to == S::kAborting;
    case S::kPending:
      return to == S::kAborting || to == S::kConcluded;
    case S::kAborting:
      return to == S::kAborting || to == S::kConcluded;
    case S::kConcluded:
      return to == S::kNull;
    case S::kNull:
      return false;
  }
  return false;
}

// JobVerbTable.
bool VerbAllowed(JobVerb verb, JobStatus s) {
  using S = JobStatus;
  switch (verb) {
    case JobVerb::kCancel:
      return s == S::kCreated || s == S::kRunning || s == S::kPaused || s == S::kReady ||
             s == S::kStandby || s == S::kWaiting || s == S::kPending;
    case JobVerb::kPause:
    case JobVerb::kResume:
    case JobVerb::kSetSpeed:
    case JobVerb::kChange:
      return s == S::kCreated || s == S::kRunning || s == S::kPaused || s == S::kReady ||
             s == S::kStandby;
    case JobVerb::kComplete:
      return s == S::kReady || s == S::kStandby;
    case JobVerb::kFinalize:
      return s == S::kPending;
    case JobVerb::kDismiss:
      return s == S::kConcluded;
  }
  return false;
}

// Reads exactly len bytes (short only at EOF, which the caller treats as an
// error for a fixed-size source).
ssize_t PreadFull(int fd, char* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, buf + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return static_cast<ssize_t>(done);
}

Status PwriteFull(int fd, const char* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(fd, buf + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "write to target");
    }
    if (n == 0) return Status::Error(EIO, "write to target made no progress");
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

}  // namespace

// ---------------------------------------------------------------- Txn

void Txn::Add(const std::shared_ptr<BackupJob>& job) {
  std::lock_guard<std::mutex> lock(mu_);
  jobs_.push_back(job);
}

std::vector<std::shared_ptr<BackupJob>> Txn::Peers(const BackupJob* from) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<BackupJob>> out;
  for (const auto& w : jobs_) {
    if (auto j = w.lock(); j && j.get() != from) out.push_back(std::move(j));
  }
  return out;
}

void Txn::MarkCopied() {
  bool all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    all = ++copied_ >= jobs_.size();
  }
  if (all) {
    for (auto& j : Peers(nullptr)) j->Kick();
  }
}

bool Txn::AllCopied() const {
  std::lock_guard<std::mutex> lock(mu_);
  return mode_ == CompletionMode::kIndividual || copied_ >= jobs_.size();
}

void Txn::Abort(const BackupJob* from) {
  if (mode_ != CompletionMode::kGrouped) return;
  for (auto& j : Peers(from)) j->CancelInternal();
}

void Txn::FinalizeAll(const BackupJob* from) {
  if (mode_ != CompletionMode::kGrouped) return;
  for (auto& j : Peers(from)) j->FinalizeInternal();
}

// ---------------------------------------------------------------- Hook

class BackupJob::Hook : public WriteHook {
 public:
  explicit Hook(BackupJob* job) : job_(job) {}
  Status BeforeWrite(uint64_t offset, uint64_t length) override {
    return job_->BeforeWrite(offset, length);
  }

 private:
  BackupJob* const job_;  // the job removes this hook before it is destroyed
};

// ---------------------------------------------------------------- job

BackupJob::BackupJob(JobParams p)
    : id_(p.options.job_id),
      options_(p.options),
      drive_(p.drive),
      target_(std::move(p.target)),
      bus_(p.bus),
      txn_(p.txn ? p.txn : std::make_shared<Txn>(CompletionMode::kIndividual)),
      cluster_size_(p.cluster_size),
      chunk_size_(std::max(p.cluster_size, p.chunk_size / p.cluster_size * p.cluster_size)),
      queue_depth_(std::max(1u, p.queue_depth)),
      size_(p.drive->size()),
      nclusters_((p.drive->size() + p.cluster_size - 1) / p.cluster_size),
      cbw_timeout_(p.cbw_timeout),
      hook_(std::make_shared<Hook>(this)),
      clusters_(nclusters_),
      speed_(p.options.speed),
      limiter_(p.options.speed, chunk_size_, p.cluster_size, MonoNs()) {
  started_ = RealSeconds();
}

BackupJob::~BackupJob() { Join(); }

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
  std::unique_lock<std::mutex> lock(mu_);
  if (!thread_started_) return true;
  return cv_.wait_until(lock, deadline, [&] { return run_finished_; });
}

void BackupJob::PublishLocked(Event e) {
  if (bus_ != nullptr) bus_->Publish(std::move(e));
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
  cv_.notify_all();
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

std::vector<BackupJob::ClusterRun> BackupJob::ClaimDirtyLocked(uint64_t c0, uint64_t c1) {
  std::vector<ClusterRun> runs;
  for (const auto& [a, b] : clusters_.Claim(c0, c1)) runs.push_back({a, b});
  return runs;
}

void BackupJob::FinishClaimLocked(uint64_t c0, uint64_t c1, bool ok, uint64_t data_bytes,
                                  uint64_t zero_bytes, bool cbw) {
  clusters_.Finish(c0, c1, ok);
  if (ok) {
    offset_ += data_bytes + zero_bytes;
    skipped_bytes_ += zero_bytes;
    if (cbw) cbw_bytes_ += data_bytes;
    SampleRateLocked();
  }
  cv_.notify_all();
}

void BackupJob::SetErrorLocked(int err, std::string message) {
  if (!error_) {
    error_ = std::move(message);
    error_code_ = err;
    LogWarn("job '" + id_ + "' failed: " + *error_);
  }
  cv_.notify_all();
}

void BackupJob::SampleRateLocked() {
  double now = static_cast<double>(MonoNs()) / 1e9;
  if (!rate_samples_.empty() && now - rate_samples_.back().first < 0.1) {
    return;
  }
  rate_samples_.emplace_back(now, offset_);
  while (rate_samples_.size() > 2 && rate_samples_[1].first < now - 2.0) {
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
  std::lock_guard<std::mutex> lock(mu_);
  Event e;
  e.type = EventType::kJobStatusChange;
  e.job_id = id_;
  e.status = JobStatus::kCreated;
  PublishLocked(std::move(e));
}

void BackupJob::Start() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    busy_ = true;
    rate_samples_.emplace_back(static_cast<double>(MonoNs()) / 1e9, 0);
    TransitionLocked(JobStatus::kRunning);
  }
  std::lock_guard<std::mutex> lock(join_mu_);
  {
    std::lock_guard<std::mutex> l(mu_);
    thread_started_ = true;
  }
  // The job thread holds the job, so that Shutdown may leave it behind.
  thread_ = std::thread([self = shared_from_this()] { self->Run(); });
}

// ---------------------------------------------------------------- verbs

Status BackupJob::Cancel(bool force) {
  std::lock_guard<std::mutex> lock(mu_);
  if (user_paused_ && !force) {
    return Status::Error(EBUSY, "The block job for device '" + id_ + "' is currently paused");
  }
  if (Status s = VerbCheckLocked(JobVerb::kCancel); !s.ok()) return s;
  cancel_requested_ = true;
  user_paused_ = false;
  cv_.notify_all();
  return Status::Ok();
}

void BackupJob::CancelInternal() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!VerbAllowed(JobVerb::kCancel, status_) || stopping_) return;
  cancel_requested_ = true;
  user_paused_ = false;
  cv_.notify_all();
}

Status BackupJob::Pause() {
  std::lock_guard<std::mutex> lock(mu_);
  if (Status s = VerbCheckLocked(JobVerb::kPause); !s.ok()) return s;
  if (user_paused_) return Status::Error(EBUSY, "Job is already paused");
  user_paused_ = true;
  cv_.notify_all();
  return Status::Ok();
}

Status BackupJob::Resume() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!user_paused_) return Status::Error(EBUSY, "Can't resume a job that was not paused");
  if (Status s = VerbCheckLocked(JobVerb::kResume); !s.ok()) return s;
  user_paused_ = false;
  io_status_ = IoStatus::kOk;
  cv_.notify_all();
  return Status::Ok();
}

Status BackupJob::SetSpeed(int64_t speed) {
  std::lock_guard<std::mutex> lock(mu_);
  if (Status s = VerbCheckLocked(JobVerb::kSetSpeed); !s.ok()) return s;
  if (speed < 0) return Status::Error(EINVAL, "Parameter 'speed' expects a non-negative value");
  speed_ = static_cast<uint64_t>(speed);
  limiter_.SetSpeed(speed_, MonoNs());
  cv_.notify_all();
  return Status::Ok();
}

Status BackupJob::Complete() {
  std::lock_guard<std::mutex> lock(mu_);
  if (Status s = VerbCheckLocked(JobVerb::kComplete); !s.ok()) return s;
  return Status::Error(EBUSY, "The active block job '" + id_ + "' cannot be completed");
}

Status BackupJob::Finalize() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (Status s = VerbCheckLocked(JobVerb::kFinalize); !s.ok()) return s;
    finalize_requested_ = true;
    cv_.notify_all();
  }
  txn_->FinalizeAll(this);
  return Status::Ok();
}

void BackupJob::FinalizeInternal() {
  std::lock_guard<std::mutex> lock(mu_);
  finalize_requested_ = true;
  cv_.notify_all();
}

Status BackupJob::Dismiss() {
  std::lock_guard<std::mutex> lock(mu_);
  if (Status s = VerbCheckLocked(JobVerb::kDismiss); !s.ok()) return s;
  TransitionLocked(JobStatus::kNull);
  listed_ = false;
  return Status::Ok();
}

void BackupJob::Kick() {
  std::lock_guard<std::mutex> lock(mu_);
  cv_.notify_all();
}

// ---------------------------------------------------------------- queries

JobInfo BackupJob::Info() const {
  std::lock_guard<std::mutex> lock(mu_);
  JobInfo i;
  i.id = id_;
  i.drive = drive_->name();
  i.target = target_.display;
  i.sync = options_.sync;
  i.status = status_;
  i.len = size_;
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
    double now = static_cast<double>(MonoNs()) / 1e9;
    // Base: the newest sample at least 2 s old, else the oldest one.
    auto base = rate_samples_.front();
    for (const auto& s : rate_samples_) {
      if (s.first <= now - 2.0) base = s;
    }
    double dt = now - base.first;
    if (dt > 0.05) i.bytes_per_second = static_cast<double>(offset_ - base.second) / dt;
    if (options_.sync != SyncMode::kNone && i.bytes_per_second > 0) {
      i.eta_seconds = static_cast<double>(size_ - offset_) / i.bytes_per_second;
    }
  }
  return i;
}

bool BackupJob::listed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return listed_;
}

bool BackupJob::ended() const {
  std::lock_guard<std::mutex> lock(mu_);
  return status_ == JobStatus::kConcluded || status_ == JobStatus::kNull;
}

bool BackupJob::live() const { return !ended(); }

double BackupJob::finished_time() const {
  std::lock_guard<std::mutex> lock(mu_);
  return finished_.value_or(0);
}

bool BackupJob::view_available() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !stopping_ && !cancel_requested_;
}

// ---------------------------------------------------------------- CBW

Status BackupJob::ZeroTarget(uint64_t off, uint64_t len) {
  int fd = target_.fd.get();
  int mode = target_.is_block ? (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
                              : (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
  if (fallocate(fd, mode, static_cast<off_t>(off), static_cast<off_t>(len)) == 0) {
    return Status::Ok();
  }
  if (errno != EOPNOTSUPP && errno != ENOSYS) {
    return Status::FromErrno(errno, "punch target");
  }
  static const std::vector<char> zeros(1 << 20, 0);
  for (uint64_t done = 0; done < len;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(len - done, zeros.size()));
    if (Status s = PwriteFull(fd, zeros.data(), n, off + done); !s.ok()) return s;
    done += n;
  }
  return Status::Ok();
}

Status BackupJob::CopySync(uint64_t off, uint64_t len, uint64_t* zero_bytes) {
  const size_t piece = static_cast<size_t>(std::min<uint64_t>(len, chunk_size_));
  std::unique_ptr<char[]> buf(new (std::nothrow) char[piece]);
  if (!buf) return Status::Error(ENOMEM, "no memory for a copy-before-write buffer");
  for (uint64_t done = 0; done < len;) {
    // A worker that was stuck in the previous piece must not touch the
    // drive once the job has concluded (the drive may be gone).
    if (ending_.load()) return Status::Error(ECANCELED, "job ended");
    size_t n = static_cast<size_t>(std::min<uint64_t>(len - done, piece));
    ssize_t r = PreadFull(drive_->fd(), buf.get(), n, off + done);
    if (r < 0) return Status::FromErrno(errno, "read from source");
    if (static_cast<size_t>(r) < n) return Status::Error(EIO, "short read from source");
    // Cluster by cluster: all-zero clusters become holes in the target.
    for (size_t i = 0; i < n;) {
      size_t cl = static_cast<size_t>(std::min<uint64_t>(cluster_size_, n - i));
      bool zero = IsZero(buf.get() + i, cl);
      size_t j = i + cl;
      while (j < n) {
        size_t cl2 = static_cast<size_t>(std::min<uint64_t>(cluster_size_, n - j));
        if (IsZero(buf.get() + j, cl2) != zero) break;
        j += cl2;
      }
      Status s;
      if (zero) {
        *zero_bytes += j - i;
        if (!target_.fresh) s = ZeroTarget(off + done + i, j - i);
      } else {
        s = PwriteFull(target_.fd.get(), buf.get() + i, j - i, off + done + i);
      }
      if (!s.ok()) return s;
      i = j;
    }
    done += n;
  }
  return Status::Ok();
}

Status BackupJob::BeforeWrite(uint64_t offset, uint64_t length) {
  if (length == 0 || offset >= size_) return Status::Ok();
  const uint64_t c0 = offset / cluster_size_;
  const uint64_t c1 =
      std::min(nclusters_, (std::min(offset + length, size_) + cluster_size_ - 1) / cluster_size_);
  std::unique_lock<std::mutex> lock(mu_);
  if (clusters_.dirty_count() == 0 && clusters_.copying_count() == 0 && frozen_reads_.empty()) {
    return Status::Ok();
  }
  // Every wait below is bounded by one deadline: a target that stopped
  // answering must not hang the drive.
  const auto deadline = std::chrono::steady_clock::now() + cbw_timeout_;
  for (;;) {
    if (stopping_ || broken_) return Status::Ok();
    std::vector<ClusterRun> runs = ClaimDirtyLocked(c0, c1);
    if (!runs.empty()) {
      // The copies run on CBW workers, so that this writer can give up on
      // them (they may be stuck in target I/O) while they finish in the
      // background; the workers end the claims.
      std::vector<std::shared_ptr<CbwTask>> mine;
      for (const auto& r : runs) {
        auto t = std::make_shared<CbwTask>();
        t->c0 = r.c0;
        t->c1 = r.c1;
        mine.push_back(t);
        cbw_queue_.push_back(mine.back());
      }
      SpawnCbwWorkerLocked();
      bool done = cv_.wait_until(lock, deadline, [&] {
        return stopping_ || broken_ ||
               std::all_of(mine.begin(), mine.end(), [](const auto& t) { return t->done; });
      });
      if (stopping_ || broken_) return Status::Ok();
      if (!done) return CbwTimeoutLocked(mine);
      for (const auto& t : mine) {
        if (t->result.ok()) continue;
        const Status& failure = t->result;
        if (options_.on_cbw_error == CbwErrorPolicy::kBreakGuestWrite) {
          LogWarn("job '" + id_ +
                  "': copy-before-write failed, refusing the drive write: " + failure.message());
          return Status::Error(EIO, "copy-before-write failed: " + failure.message());
        }
        broken_ = true;
        SetErrorLocked(failure.code(), std::strerror(failure.code()));
        return Status::Ok();
      }
      continue;
    }
    if (!clusters_.AnyCopying(c0, c1)) break;
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) return CbwTimeoutLocked({});
  }
  // The old data is safe in the target; snapshot readers still reading it
  // from the source must finish before the source changes.
  if (!cv_.wait_until(lock, deadline,
                      [&] { return stopping_ || broken_ || !FrozenOverlapsLocked(c0, c1); })) {
    return CbwTimeoutLocked({});
  }
  return Status::Ok();
}

Status BackupJob::CbwTimeoutLocked(const std::vector<std::shared_ptr<CbwTask>>& mine) {
  // Copies no worker has started yet are taken back; started ones stay with
  // their (stuck) worker, which ends the claim if its I/O ever returns.
  for (const auto& t : mine) {
    if (t->started) continue;
    auto it = std::find(cbw_queue_.begin(), cbw_queue_.end(), t);
    if (it != cbw_queue_.end()) cbw_queue_.erase(it);
    FinishClaimLocked(t->c0, t->c1, false, 0, 0, true);
  }
  const auto ms = cbw_timeout_.count();
  const std::string what =
      "copy-before-write timed out after " +
      (ms % 1000 == 0 ? std::to_string(ms / 1000) + " s" : std::to_string(ms) + " ms") +
      " (target not answering)";
  if (options_.on_cbw_error == CbwErrorPolicy::kBreakGuestWrite) {
    LogWarn("job '" + id_ + "': " + what + ", refusing the drive write");
    return Status::Error(EIO, what);
  }
  broken_ = true;
  SetErrorLocked(ETIMEDOUT, what);
  return Status::Ok();
}

void BackupJob::SpawnCbwWorkerLocked() {
  // Enough workers for what is queued, within a cap: writers beyond it wait
  // in the queue (and time out like any other CBW if all workers hang).
  constexpr unsigned kMaxCbwWorkers = 16;
  if (cbw_idle_ >= cbw_queue_.size() || cbw_threads_ >= kMaxCbwWorkers) {
    cbw_cv_.notify_all();
    return;
  }
  ++cbw_threads_;
  // The worker holds the job: it may outlive every other owner while stuck.
  std::thread([self = shared_from_this()] { self->CbwWorker(); }).detach();
  cbw_cv_.notify_all();
}

void BackupJob::CbwWorker() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (stopping_) {
      // The job is ending: its target may be closed; give the rest back.
      while (!cbw_queue_.empty()) {
        auto t = cbw_queue_.front();
        cbw_queue_.pop_front();
        FinishClaimLocked(t->c0, t->c1, false, 0, 0, true);
        t->result = Status::Error(ECANCELED, "job ending");
        t->done = true;
      }
      break;
    }
    if (cbw_queue_.empty()) {
      ++cbw_idle_;
      bool work = cbw_cv_.wait_for(lock, std::chrono::seconds(10),
                                   [&] { return stopping_ || !cbw_queue_.empty(); });
      --cbw_idle_;
      if (!work) break;  // idle for long: let the thread go
      continue;
    }
    auto t = cbw_queue_.front();
    cbw_queue_.pop_front();
    t->started = true;
    ++target_users_;
    lock.unlock();
    uint64_t zeros = 0;
    const uint64_t bytes = ClusterBytes(t->c0, t->c1);
    Status st = CopySync(t->c0 * cluster_size_, bytes, &zeros);
    lock.lock();
    FinishClaimLocked(t->c0, t->c1, st.ok(), bytes - zeros, zeros, true);
    t->result = std::move(st);
    t->done = true;
    cv_.notify_all();
    if (UniqueFd fd = ReleaseTargetLocked(); fd.valid()) {
      lock.unlock();
      fd.Reset();  // may block on a dead target: not with mu_ held
      lock.lock();
    }
  }
  --cbw_threads_;
}

UniqueFd BackupJob::ReleaseTargetLocked() {
  --target_users_;
  if (target_users_ == 0 && target_orphaned_) return std::move(target_.fd);
  return UniqueFd();
}

// ---------------------------------------------------------------- views

Result<size_t> BackupJob::ReadSnapshot(void* buf, size_t len, uint64_t off) {
  struct Segment {
    uint64_t off, len;
    bool from_target;
  };
  std::vector<Segment> segs;
  ClusterRun frozen{0, 0};
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || broken_ || cancel_requested_) {
      return Status::Error(EIO, "snapshot is no longer available");
    }
    if (off >= size_ || len == 0) return size_t{0};
    len = static_cast<size_t>(std::min<uint64_t>(len, size_ - off));
    uint64_t c0 = off / cluster_size_;
    uint64_t c1 = (off + len + cluster_size_ - 1) / cluster_size_;
    for (uint64_t c = c0; c < c1; ++c) {
      uint64_t s = std::max(off, c * cluster_size_);
      uint64_t e = std::min(off + len, (c + 1) * cluster_size_);
      bool t = clusters_.Get(c) == ClusterMap::State::kDone;
      if (!segs.empty() && segs.back().from_target == t) {
        segs.back().len += e - s;
      } else {
        segs.push_back({s, e - s, t});
      }
    }
    frozen = {c0, c1};
    frozen_reads_.push_back(frozen);
    ++target_users_;
  }
  int err = 0;
  for (const auto& sg : segs) {
    char* p = static_cast<char*>(buf) + (sg.off - off);
    int fd = sg.from_target ? target_.fd.get() : drive_->fd();
    ssize_t r = PreadFull(fd, p, sg.len, sg.off);
    if (r < 0) {
      err = errno;
      break;
    }
    if (static_cast<uint64_t>(r) < sg.len) std::memset(p + r, 0, sg.len - static_cast<size_t>(r));
  }
  UniqueFd closing;  // declared first: closed after the lock is released
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = frozen_reads_.begin(); it != frozen_reads_.end(); ++it) {
    if (it->c0 == frozen.c0 && it->c1 == frozen.c1) {
      frozen_reads_.erase(it);
      break;
    }
  }
  closing = ReleaseTargetLocked();
  cv_.notify_all();
  // A snapshot that broke while we read may have handed us new data.
  if (stopping_ || broken_ || cancel_requested_) {
    return Status::Error(EIO, "snapshot is no longer available");
  }
  if (err != 0) return Status::FromErrno(err, "snapshot read");
  return len;
}

Result<uint64_t> BackupJob::SeekSnapshot(uint64_t off, int whence) {
  if (whence != SEEK_DATA && whence != SEEK_HOLE) {
    return Status::Error(EINVAL, "unsupported whence");
  }
  struct Run {
    uint64_t start, end;
    bool from_target;
  };
  std::vector<Run> runs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || broken_ || cancel_requested_) {
      return Status::Error(EIO, "snapshot is no longer available");
    }
    if (off >= size_) return Status::Error(ENXIO, "past the end");
    for (uint64_t c = off / cluster_size_; c < nclusters_; ++c) {
      bool t = clusters_.Get(c) == ClusterMap::State::kDone;
      uint64_t s = std::max(off, c * cluster_size_);
      uint64_t e = std::min(size_, (c + 1) * cluster_size_);
      if (!runs.empty() && runs.back().from_target == t) {
        runs.back().end = e;
      } else {
        runs.push_back({s, e, t});
      }
    }
    ++target_users_;
  }
  Result<uint64_t> result = whence == SEEK_DATA
                                ? Result<uint64_t>(Status::Error(ENXIO, "no data past the offset"))
                                : Result<uint64_t>(size_);
  for (const auto& r : runs) {
    int fd = r.from_target ? target_.fd.get() : drive_->fd();
    off_t got = lseek(fd, static_cast<off_t>(r.start), whence);
    if (got < 0) {
      if (errno == ENXIO) continue;
      result = Status::FromErrno(errno, "snapshot seek");
      break;
    }
    if (static_cast<uint64_t>(got) < r.end) {
      result = static_cast<uint64_t>(got);
      break;
    }
  }
  UniqueFd closing;  // declared first: closed after the lock is released
  std::lock_guard<std::mutex> lock(mu_);
  closing = ReleaseTargetLocked();
  cv_.notify_all();
  if (stopping_ || broken_ || cancel_requested_) {
    return Status::Error(EIO, "snapshot is no longer available");
  }
  return result;
}

// ---------------------------------------------------------------- copier

// The background copy of sync=full/top: one io_uring ring owned by the job
// thread, `queue_depth_` slots of one chunk each. A slot claims a run of
// dirty clusters, reads it, drops all-zero clusters (holes in the target)
// and writes the rest; short reads and writes are resubmitted for the rest.
// Holes found by SEEK_DATA are claimed and marked done without any I/O (or
// punched, for a target that may hold stale data). Without io_uring (e.g. a
// seccomp filter) the same steps run synchronously.
class BackupJob::Copier {
 public:
  explicit Copier(BackupJob* job) : j_(job) {}
  ~Copier() {
    if (ring_ok_) io_uring_queue_exit(&ring_);
    for (auto& s : slots_) std::free(s.buf);
  }
  Status Init();
  Outcome Run();

 private:
  enum class Phase { kFree, kRead, kWrite };
  struct Slot {
    char* buf = nullptr;
    Phase phase = Phase::kFree;
    uint64_t c0 = 0, c1 = 0, off = 0, len = 0, pos = 0, zero_bytes = 0;
    std::vector<std::pair<uint64_t, uint64_t>> runs;  // (offset in buf, length) to write
    size_t run = 0;
  };
  struct PassError {
    int err;
    bool is_read;
  };

  int FreeSlot() const;
  // Claims and starts the next piece of work at the cursor.
  void DispatchOne(int slot, uint64_t max_clusters);
  void SubmitRead(int slot);
  void SubmitWrite(int slot);
  void Submit(int slot, bool write, int fd, char* buf, size_t len, uint64_t off);
  void Reap(uint64_t timeout_ns);
  void OnComplete(int slot, int res);
  void SlotDone(Slot& s);
  void SlotFail(Slot& s, int err, bool is_read);

  BackupJob* const j_;
  io_uring ring_{};
  bool ring_ok_ = false;
  std::vector<Slot> slots_;
  unsigned inflight_ = 0;
  std::deque<std::pair<int, int>> sync_done_;  // (slot, res) without io_uring
  uint64_t cursor_ = 0;
  uint64_t ext_start_ = 0, ext_end_ = 0;  // a known data extent of the source
  std::optional<PassError> perr_;
  uint64_t unflushed_ = 0;  // bytes written since writeback was last started
};

Status BackupJob::Copier::Init() {
  slots_.resize(j_->queue_depth_);
  for (auto& s : slots_) {
    if (posix_memalign(reinterpret_cast<void**>(&s.buf), 4096, j_->chunk_size_) != 0) {
      return Status::Error(ENOMEM, "no memory for copy buffers");
    }
  }
  int r = io_uring_queue_init(j_->queue_depth_ * 2 + 2, &ring_, 0);
  ring_ok_ = r == 0;
  if (!ring_ok_)
    LogWarn("io_uring unavailable (" + std::string(std::strerror(-r)) + "); copying synchronously");
  return Status::Ok();
}

int BackupJob::Copier::FreeSlot() const {
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].phase == Phase::kFree) return static_cast<int>(i);
  }
  return -1;
}

void BackupJob::Copier::Submit(int slot, bool write, int fd, char* buf, size_t len, uint64_t off) {
  ++inflight_;
  io_uring_sqe* sqe = ring_ok_ ? io_uring_get_sqe(&ring_) : nullptr;
  if (sqe == nullptr) {
    ssize_t n = write ? pwrite(fd, buf, len, static_cast<off_t>(off))
                      : pread(fd, buf, len, static_cast<off_t>(off));
    sync_done_.emplace_back(slot, n < 0 ? -errno : static_cast<int>(n));
    return;
  }
  if (write) {
    io_uring_prep_write(sqe, fd, buf, static_cast<unsigned>(len), off);
  } else {
    io_uring_prep_read(sqe, fd, buf, static_cast<unsigned>(len), off);
  }
  io_uring_sqe_set_data64(sqe, static_cast<uint64_t>(slot));
  io_uring_submit(&ring_);
}

void BackupJob::Copier::SubmitRead(int i) {
  Slot& s = slots_[i];
  if (j_->ending_.load()) {  // abandoned: the drive may be gone
    ++inflight_;
    sync_done_.emplace_back(i, -ECANCELED);
    return;
  }
  Submit(i, false, j_->drive_->fd(), s.buf + s.pos, s.len - s.pos, s.off + s.pos);
}

void BackupJob::Copier::SubmitWrite(int i) {
  Slot& s = slots_[i];
  auto [ro, rl] = s.runs[s.run];
  Submit(i, true, j_->target_.fd.get(), s.buf + ro + s.pos, rl - s.pos, s.off + ro + s.pos);
}

void BackupJob::Copier::Reap(uint64_t timeout_ns) {
  if (!sync_done_.empty()) {
    auto [slot, res] = sync_done_.front();
    sync_done_.pop_front();
    OnComplete(slot, res);
    return;
  }
  if (!ring_ok_ || inflight_ == 0) return;
  io_uring_cqe* cqe = nullptr;
  __kernel_timespec ts{};
  ts.tv_sec = static_cast<long long>(timeout_ns / 1'000'000'000ull);
  ts.tv_nsec = static_cast<long long>(timeout_ns % 1'000'000'000ull);
  int r = io_uring_wait_cqe_timeout(&ring_, &cqe, &ts);
  if (r != 0) return;
  // Take every completion that is ready, then handle them (handling may
  // submit, which must not race with iterating the CQ ring).
  std::vector<std::pair<int, int>> done;
  while (cqe != nullptr) {
    done.emplace_back(static_cast<int>(io_uring_cqe_get_data64(cqe)), cqe->res);
    io_uring_cqe_seen(&ring_, cqe);
    cqe = nullptr;
    if (io_uring_peek_cqe(&ring_, &cqe) != 0) break;
  }
  for (auto [slot, res] : done) {
    if (slot == static_cast<int>(kWritebackTag)) {
      --inflight_;  // only a hint to the kernel: its result does not matter
    } else {
      OnComplete(slot, res);
    }
  }
}

void BackupJob::Copier::OnComplete(int i, int res) {
  --inflight_;
  Slot& s = slots_[i];
  if (s.phase == Phase::kRead) {
    if (res < 0) return SlotFail(s, -res, true);
    if (res == 0) return SlotFail(s, EIO, true);  // the source is fixed-size
    s.pos += static_cast<uint64_t>(res);
    if (s.pos < s.len) return SubmitRead(i);
    // All-zero clusters are not written; contiguous data clusters are merged.
    s.runs.clear();
    s.zero_bytes = 0;
    const uint64_t cs = j_->cluster_size_;
    for (uint64_t b = 0; b < s.len; b += cs) {
      uint64_t n = std::min(cs, s.len - b);
      if (IsZero(s.buf + b, n)) {
        s.zero_bytes += n;
        if (!j_->target_.fresh) {
          if (Status st = j_->ZeroTarget(s.off + b, n); !st.ok()) {
            return SlotFail(s, st.code(), false);
          }
        }
      } else if (!s.runs.empty() && s.runs.back().first + s.runs.back().second == b) {
        s.runs.back().second += n;
      } else {
        s.runs.emplace_back(b, n);
      }
    }
    if (s.runs.empty()) return SlotDone(s);
    s.phase = Phase::kWrite;
    s.run = 0;
    s.pos = 0;
    return SubmitWrite(i);
  }
  if (res < 0) return SlotFail(s, -res, false);
  if (res == 0) return SlotFail(s, EIO, false);
  s.pos += static_cast<uint64_t>(res);
  if (s.pos < s.runs[s.run].second) return SubmitWrite(i);
  s.pos = 0;
  if (++s.run < s.runs.size()) return SubmitWrite(i);
  SlotDone(s);
}

void BackupJob::Copier::SlotDone(Slot& s) {
  // Start writeback of what is written as we go, so the disk works while we
  // copy and the final fsync has little left to do.
  unflushed_ += s.len - s.zero_bytes;
  if (unflushed_ >= kWritebackBytes) {
    unflushed_ = 0;
    io_uring_sqe* sqe = ring_ok_ ? io_uring_get_sqe(&ring_) : nullptr;
    if (sqe != nullptr) {
      io_uring_prep_sync_file_range(sqe, j_->target_.fd.get(), 0, 0, SYNC_FILE_RANGE_WRITE);
      io_uring_sqe_set_data64(sqe, kWritebackTag);
      io_uring_submit(&ring_);
      ++inflight_;
    } else {
      sync_file_range(j_->target_.fd.get(), 0, 0, SYNC_FILE_RANGE_WRITE);
    }
  }
  std::lock_guard<std::mutex> lock(j_->mu_);
  j_->FinishClaimLocked(s.c0, s.c1, true, s.len - s.zero_bytes, s.zero_bytes, false);
  s.phase = Phase::kFree;
}

void BackupJob::Copier::SlotFail(Slot& s, int err, bool is_read) {
  std::lock_guard<std::mutex> lock(j_->mu_);
  j_->FinishClaimLocked(s.c0, s.c1, false, 0, 0, false);
  s.phase = Phase::kFree;
  if (!perr_) perr_ = PassError{err, is_read};
  cursor_ = std::min(cursor_, s.c0);
}

void BackupJob::Copier::DispatchOne(int i, uint64_t max_clusters) {
  const uint64_t cs = j_->cluster_size_;
  const uint64_t n = j_->nclusters_;
  uint64_t c;
  {
    std::lock_guard<std::mutex> lock(j_->mu_);
    cursor_ = j_->clusters_.NextDirty(cursor_);
    if (cursor_ >= n) return;
    c = cursor_;
  }
  // Extent lookups need no lock: a cluster still dirty has not been written
  // since the point in time, so what SEEK_DATA says of it holds for it.
  const uint64_t off = c * cs;
  if (!(off >= ext_start_ && off < ext_end_)) {
    uint64_t d = off;
    Result<uint64_t> data = j_->drive_->Seek(off, SEEK_DATA);
    if (data.ok()) {
      d = *data;
    } else if (data.status().code() == ENXIO) {
      d = j_->size_;
    }
    if (d > off) {
      uint64_t hend = d >= j_->size_ ? n : d / cs;
      if (hend > c) {
        std::vector<ClusterRun> runs;
        {
          std::lock_guard<std::mutex> lock(j_->mu_);
          runs = j_->ClaimDirtyLocked(c, hend);
        }
        Status st;
        if (!j_->target_.fresh) {
          for (const auto& r : runs) {
            if (!st.ok()) break;
            st = j_->ZeroTarget(r.c0 * cs, j_->ClusterBytes(r.c0, r.c1));
          }
        }
        std::lock_guard<std::mutex> lock(j_->mu_);
        for (const auto& r : runs) {
          j_->FinishClaimLocked(r.c0, r.c1, st.ok(), 0, j_->ClusterBytes(r.c0, r.c1), false);
        }
        if (!st.ok()) {
          if (!perr_) perr_ = PassError{st.code(), false};
        } else {
          cursor_ = hend;
        }
        return;
      }
    }
    Result<uint64_t> hole = j_->drive_->Seek(std::max(d, off), SEEK_HOLE);
    ext_start_ = off;
    ext_end_ = hole.ok() ? *hole : j_->size_;
    if (ext_end_ <= off) ext_end_ = off + 1;
  }
  uint64_t dend = std::min({(ext_end_ + cs - 1) / cs, n, c + max_clusters});
  Slot& s = slots_[i];
  {
    std::lock_guard<std::mutex> lock(j_->mu_);
    uint64_t e = std::min(dend, j_->clusters_.NextClean(c));
    if (e == c) return;          // taken by a writer meanwhile
    j_->ClaimDirtyLocked(c, e);  // [c, e) is all dirty: one run
    cursor_ = e;
    s.c0 = c;
    s.c1 = e;
    s.off = c * cs;
    s.len = j_->ClusterBytes(c, e);
    j_->limiter_.Consume(s.len, MonoNs());
  }
  s.pos = 0;
  s.phase = Phase::kRead;
  SubmitRead(i);
}

BackupJob::Outcome BackupJob::Copier::Run() {
  const uint64_t cs = j_->cluster_size_;
  for (;;) {
    bool dispatch = false;
    uint64_t delay = 0;
    uint64_t max_clusters = 0;
    int slot = -1;
    {
      std::lock_guard<std::mutex> lock(j_->mu_);
      bool stop = j_->cancel_requested_ || j_->error_ || perr_ || j_->user_paused_;
      slot = FreeSlot();
      if (!stop && slot >= 0 && cursor_ < j_->nclusters_) {
        uint64_t chunk = j_->limiter_.ChunkBytes();
        max_clusters = chunk / cs;
        delay = j_->limiter_.DelayNs(chunk, MonoNs());
        dispatch = delay == 0;
      }
    }
    if (dispatch) {
      DispatchOne(slot, max_clusters);
      continue;
    }
    if (inflight_ > 0) {
      Reap(delay > 0 ? std::min(delay, kMaxWaitNs) : kMaxWaitNs);
      continue;
    }
    std::unique_lock<std::mutex> lock(j_->mu_);
    if (j_->cancel_requested_) return Outcome::kCancelled;
    if (j_->error_) return Outcome::kFailed;
    if (perr_) {
      PassError e = *perr_;
      perr_.reset();
      ext_start_ = ext_end_ = 0;
      if (!j_->HandleIoError(lock, e.err, e.is_read)) {
        return j_->cancel_requested_ ? Outcome::kCancelled : Outcome::kFailed;
      }
      continue;
    }
    if (j_->user_paused_) {
      if (!j_->PausePointLocked(lock)) return Outcome::kCancelled;
      continue;
    }
    if (delay > 0) {
      j_->cv_.wait_for(lock, std::chrono::nanoseconds(std::min(delay, kMaxWaitNs)));
      continue;
    }
    if (cursor_ < j_->nclusters_) continue;
    if (j_->clusters_.dirty_count() == 0 && j_->clusters_.copying_count() == 0) break;
    // Clusters still in a writer's hands, or returned dirty by a failed CBW:
    // wait for the writers, then sweep again from the start.
    if (j_->clusters_.copying_count() > 0) j_->cv_.wait(lock);
    cursor_ = 0;
  }
  // Durability before success.
  for (;;) {
    if (fsync(j_->target_.fd.get()) == 0) return Outcome::kSuccess;
    int err = errno;
    std::unique_lock<std::mutex> lock(j_->mu_);
    if (j_->cancel_requested_) return Outcome::kCancelled;
    if (!j_->HandleIoError(lock, err, false)) {
      return j_->cancel_requested_ ? Outcome::kCancelled : Outcome::kFailed;
    }
  }
}

// ---------------------------------------------------------------- job thread

bool BackupJob::PausePointLocked(std::unique_lock<std::mutex>& lock) {
  if (user_paused_ && !cancel_requested_) {
    busy_ = false;
    TransitionLocked(JobStatus::kPaused);
    cv_.wait(lock, [&] { return !user_paused_ || cancel_requested_; });
    TransitionLocked(JobStatus::kRunning);
    busy_ = true;
  }
  return !cancel_requested_;
}

bool BackupJob::HandleIoError(std::unique_lock<std::mutex>& lock, int err, bool is_read) {
  ErrorPolicy policy = is_read ? options_.on_source_error : options_.on_target_error;
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
    // Retry at once, but do not spin on a persistent error.
    cv_.wait_for(lock, std::chrono::milliseconds(10));
    return !cancel_requested_;
  }
  io_status_ = err == ENOSPC ? IoStatus::kNoSpace : IoStatus::kFailed;
  user_paused_ = true;
  if (!PausePointLocked(lock)) return false;
  io_status_ = IoStatus::kOk;
  return true;
}

BackupJob::Outcome BackupJob::RunNone() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (!PausePointLocked(lock)) return Outcome::kCancelled;
    if (error_) return Outcome::kFailed;
    busy_ = false;  // nothing to do until a write or a verb
    cv_.wait(lock);
    busy_ = true;
  }
}

BackupJob::Outcome BackupJob::RunFull() {
  Copier copier(this);
  if (Status s = copier.Init(); !s.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    SetErrorLocked(s.code(), s.message());
    return Outcome::kFailed;
  }
  return copier.Run();
}

BackupJob::Outcome BackupJob::Complete(Outcome copied) {
  if (copied != Outcome::kSuccess) return copied;
  std::unique_lock<std::mutex> lock(mu_);
  if (cancel_requested_) return Outcome::kCancelled;
  if (error_) return Outcome::kFailed;
  busy_ = false;
  TransitionLocked(JobStatus::kWaiting);
  lock.unlock();
  txn_->MarkCopied();
  lock.lock();
  cv_.wait(lock, [&] { return cancel_requested_ || error_ || txn_->AllCopied(); });
  if (cancel_requested_) return Outcome::kCancelled;
  if (error_) return Outcome::kFailed;
  TransitionLocked(JobStatus::kPending);
  if (!options_.auto_finalize) {
    Event e;
    e.type = EventType::kBlockJobPending;
    e.job_id = id_;
    PublishLocked(std::move(e));
    cv_.wait(lock, [&] { return finalize_requested_ || cancel_requested_; });
    if (cancel_requested_) return Outcome::kCancelled;
  }
  return Outcome::kSuccess;
}

void BackupJob::Conclude(Outcome outcome) {
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (error_) outcome = Outcome::kFailed;  // the first error is sticky
    stopping_ = true;
    busy_ = false;
    cv_.notify_all();
    if (outcome != Outcome::kSuccess) {
      if (status_ == JobStatus::kPaused) TransitionLocked(JobStatus::kRunning);
      TransitionLocked(JobStatus::kAborting);
    }
    cbw_cv_.notify_all();  // idle CBW workers go
  }
  if (outcome != Outcome::kSuccess) txn_->Abort(this);
  // Writers inside the hook return at once now (stopping_), so this is
  // prompt even when CBW workers are stuck on the target.
  drive_->RemoveHook(hook_.get());
  ending_.store(true);

  UniqueFd closing;  // declared first: closed after the lock is released
  std::lock_guard<std::mutex> lock(mu_);
  // Views read EIO from now on. The target fd stays open for whoever still
  // uses it (a snapshot read, a stuck copier or CBW worker); the last closes.
  target_orphaned_ = true;
  if (target_users_ == 0) closing = std::move(target_.fd);
  finished_ = RealSeconds();
  Event e;
  e.job_id = id_;
  e.len = size_;
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
}

void BackupJob::Run() {
  // How long a cancel or an error may wait for a copier stuck in target I/O
  // before the job concludes without it: long enough for a slow but living
  // target to finish its in-flight requests, short enough that job-cancel
  // visibly works within seconds.
  constexpr auto kAbandonGrace = std::chrono::seconds(2);
  {
    std::lock_guard<std::mutex> lock(mu_);
    copier_running_ = true;
    ++target_users_;
  }
  std::thread copier([self = shared_from_this()] {
    Outcome o = self->options_.sync == SyncMode::kNone ? self->RunNone() : self->RunFull();
    UniqueFd closing;  // declared first: closed after the lock is released
    std::lock_guard<std::mutex> lock(self->mu_);
    self->copy_outcome_ = static_cast<int>(o);
    self->copier_running_ = false;
    closing = self->ReleaseTargetLocked();
    self->cv_.notify_all();
  });
  Outcome outcome;
  bool abandoned = false;
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !copier_running_ || cancel_requested_ || error_; });
    if (copier_running_ && !cv_.wait_for(lock, kAbandonGrace, [&] { return !copier_running_; })) {
      LogWarn("job '" + id_ + "': the copier is stuck in target I/O; ending the job without it");
      abandoned = true;
      outcome = cancel_requested_ ? Outcome::kCancelled : Outcome::kFailed;
      if (!error_ && !cancel_requested_) SetErrorLocked(ETIMEDOUT, "target not answering");
    } else {
      outcome = static_cast<Outcome>(*copy_outcome_);
    }
  }
  if (!abandoned) {
    copier.join();
  } else {
    // It holds the job and the target fd (as a target user): it closes the
    // fd and goes whenever its I/O returns, touching nothing else.
    ending_.store(true);
    copier.detach();
  }
  Conclude(Complete(outcome));
  std::lock_guard<std::mutex> lock(mu_);
  run_finished_ = true;
  cv_.notify_all();
}

}  // namespace cbw::backup
