#include "fs/events_file.h"

#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "backup/log.h"
#include "backup/threads.h"
#include "control/render.h"

namespace cbw::fs {
namespace {

// Bounds one reader's backlog; past it the reader is told how many it missed.
constexpr size_t kBacklogBytes = 1 << 20;

}  // namespace

EventsFile::EventsFile(backup::EventBus* bus) : bus_(bus) {}

EventsFile::~EventsFile() {
  Shutdown();
  std::vector<uint64_t> tokens;
  {
    backup::MutexLock lock(&mu_);
    for (auto& [id, q] : queues_) tokens.push_back(q.reader->token);
  }
  for (uint64_t t : tokens) bus_->Unsubscribe(t);
  backup::MutexLock lock(&mu_);
  for (auto& [id, q] : queues_) {
    if (q.poll) fuse_pollhandle_destroy(q.poll);
  }
  queues_.clear();
}

void EventsFile::Start() {
  backup::MutexLock lock(&mu_);
  if (delivery_.joinable() || stopping_) return;
  delivery_ = std::thread(
      [this] { backup::RunGuarded("events delivery thread", [this] { DeliveryLoop(); }); });
}

void EventsFile::Shutdown() {
  EndStreams();
  std::thread t;
  {
    backup::MutexLock lock(&mu_);
    stopping_ = true;
    t = std::move(delivery_);
  }
  wake_.SignalAll();
  if (t.joinable()) t.join();
}

EventsFile::Reader* EventsFile::Open() {
  Reader* r;
  uint64_t id;
  {
    backup::MutexLock lock(&mu_);
    // Each reader is in ready_ at most once: with room reserved, listing one
    // never allocates (OnEvent cannot fail there).
    ready_.reserve(queues_.size() + 1);
    id = next_id_++;
    Queue& q = queues_[id];
    q.reader = std::make_unique<Reader>();
    q.reader->id = id;
    r = q.reader.get();
  }
  try {
    // The callback finds its reader by id, so one that runs after Release
    // (whatever the bus guarantees) finds nothing.
    uint64_t token = bus_->Subscribe([this, id](const backup::Event& ev) { OnEvent(id, ev); });
    backup::MutexLock lock(&mu_);
    r->token = token;
  } catch (...) {
    backup::MutexLock lock(&mu_);
    queues_.erase(id);
    throw;
  }
  return r;
}

EventsFile::Queue* EventsFile::FindLocked(const Reader* reader) {
  auto it = queues_.find(reader->id);
  return it == queues_.end() ? nullptr : &it->second;
}

void EventsFile::Release(Reader* reader) {
  bus_->Unsubscribe(reader->token);
  std::unique_ptr<Reader> owned;
  std::deque<Parked> left;
  fuse_pollhandle* ph = nullptr;
  {
    backup::MutexLock lock(&mu_);
    Queue* q = FindLocked(reader);
    if (!q) return;
    owned = std::move(q->reader);
    left = std::move(q->parked);
    ph = std::exchange(q->poll, nullptr);
    if (q->ready) ready_.erase(std::find(ready_.begin(), ready_.end(), q));
    queues_.erase(reader->id);
  }
  // The kernel holds the file while a read is in flight, so this is only for
  // an open whose opener went away before it completed.
  for (const auto& p : left) fuse_reply_err(p.req, EINTR);
  if (ph) fuse_pollhandle_destroy(ph);
  changed_.SignalAll();
}

void EventsFile::Read(fuse_req_t req, Reader* reader, size_t size, bool nonblock) {
  // Register for interrupts before parking: libfuse calls OnInterrupt at
  // once if the request is already interrupted, and it must find the request
  // either not yet parked (then fuse_req_interrupted says so below) or parked
  // (then it answers EINTR itself).
  if (!nonblock) fuse_req_interrupt_func(req, &EventsFile::OnInterrupt, this);
  enum { kData, kEof, kError, kParked } outcome;
  std::string data;
  int err = 0;
  bool wake = false;
  {
    backup::MutexLock lock(&mu_);
    Queue* q = FindLocked(reader);
    if (!q) {
      outcome = kError;
      err = EBADF;
    } else if (q->parked.empty() && HasDataLocked(*q)) {
      outcome = kData;
      data = TakeLocked(*q, size);
    } else if (ended_) {
      outcome = kEof;
    } else if (nonblock) {
      outcome = kError;
      err = EAGAIN;
    } else if (fuse_req_interrupted(req)) {
      outcome = kError;
      err = EINTR;
    } else {
      // Reads parked earlier come first: the delivery thread serves them in
      // order, this one after them.
      outcome = kParked;
      q->parked.push_back({req, size});
      if (HasDataLocked(*q)) {
        MarkReadyLocked(*q);
        wake = true;
      }
    }
  }
  switch (outcome) {
    case kData:
      changed_.SignalAll();
      fuse_reply_buf(req, data.data(), data.size());
      return;
    case kEof:
      fuse_reply_buf(req, nullptr, 0);
      return;
    case kError:
      fuse_reply_err(req, err);
      return;
    case kParked:
      if (wake) wake_.Signal();
      return;
  }
}

void EventsFile::Poll(fuse_req_t req, Reader* reader, fuse_pollhandle* ph) {
  unsigned revents = 0;
  fuse_pollhandle* old = nullptr;
  {
    backup::MutexLock lock(&mu_);
    Queue* q = FindLocked(reader);
    if (!q || HasDataLocked(*q) || ended_) revents = POLLIN;
    if (q && ph) {
      old = std::exchange(q->poll, ph);
    } else {
      old = ph;  // nothing to notify later
    }
  }
  if (old) fuse_pollhandle_destroy(old);
  fuse_reply_poll(req, revents);
}

void EventsFile::OnInterrupt(fuse_req_t req, void* self) {
  // Called by libfuse (with the request's own lock held) on the thread that
  // read the INTERRUPT; it answers the request only if it finds it parked,
  // under the lock that parking and delivery take, so it is answered once.
  backup::RunGuarded("events interrupt", [&] {
    auto* ef = static_cast<EventsFile*>(self);
    bool found = false;
    {
      backup::MutexLock lock(&ef->mu_);
      for (auto& [id, q] : ef->queues_) {
        auto it = std::find_if(q.parked.begin(), q.parked.end(),
                               [req](const Parked& p) { return p.req == req; });
        if (it != q.parked.end()) {
          q.parked.erase(it);
          found = true;
          break;
        }
      }
    }
    if (found) fuse_reply_err(req, EINTR);
  });
}

void EventsFile::OnEvent(uint64_t reader_id, const backup::Event& event) noexcept {
  // Runs under the bus's mutex and the publishing job's: queue and return.
  std::string line;
  try {
    line = control::RenderEvent(event);
  } catch (...) {
    line.clear();  // counted as missed below
  }
  bool wake = false;
  try {
    backup::MutexLock lock(&mu_);
    auto it = queues_.find(reader_id);
    if (it == queues_.end()) return;
    Queue& q = it->second;
    try {
      if (line.empty() || q.backlog.size() + line.size() > kBacklogBytes) {
        ++q.dropped;
      } else if (q.dropped) {
        q.backlog += control::RenderEventsDropped(q.dropped) + line;
        q.dropped = 0;
      } else {
        q.backlog += line;
      }
    } catch (...) {
      ++q.dropped;
    }
    if (!q.parked.empty() || q.poll) {
      MarkReadyLocked(q);
      wake = true;
    }
  } catch (...) {
    backup::LogStoppedException("events: queueing an event", "lock failed");
  }
  if (wake) wake_.Signal();
}

bool EventsFile::HasDataLocked(const Queue& q) const { return !q.backlog.empty() || q.dropped > 0; }

bool EventsFile::AnyHasDataLocked() const {
  for (const auto& [id, q] : queues_) {
    if (HasDataLocked(q)) return true;
  }
  return false;
}

std::string EventsFile::TakeLocked(Queue& q, size_t size) {
  if (q.backlog.empty() && q.dropped) {
    q.backlog = control::RenderEventsDropped(q.dropped);
    q.dropped = 0;
  }
  std::string out = q.backlog.substr(0, size);
  q.backlog.erase(0, out.size());
  return out;
}

void EventsFile::MarkReadyLocked(Queue& q) {
  if (q.ready) return;
  q.ready = true;
  ready_.push_back(&q);  // capacity reserved in Open: does not throw
}

void EventsFile::CollectLocked(std::vector<Answer>* answers, std::vector<fuse_pollhandle*>* polls) {
  while (!ready_.empty()) {
    Queue& q = *ready_.back();
    answers->reserve(answers->size() + q.parked.size());
    polls->reserve(polls->size() + 1);
    while (!q.parked.empty() && HasDataLocked(q)) {
      // Taken before the pop: if taking throws, the read stays parked.
      std::string data = TakeLocked(q, q.parked.front().size);
      answers->push_back({q.parked.front().req, std::move(data)});
      q.parked.pop_front();
    }
    if (q.poll && (HasDataLocked(q) || ended_)) polls->push_back(std::exchange(q.poll, nullptr));
    q.ready = false;
    ready_.pop_back();
  }
}

void EventsFile::DeliveryLoop() {
  backup::MutexLock lock(&mu_);
  for (;;) {
    while (!stopping_ && ready_.empty()) wake_.Wait(&lock);
    if (stopping_) return;
    std::vector<Answer> answers;
    std::vector<fuse_pollhandle*> polls;
    try {
      CollectLocked(&answers, &polls);
    } catch (...) {
      // Out of memory: what was collected is sent; the rest stays ready and
      // is tried again at the next wake.
      backup::LogStoppedException("events delivery", "collecting answers failed");
    }
    lock.Unlock();
    for (auto& a : answers) fuse_reply_buf(a.req, a.data.data(), a.data.size());
    for (fuse_pollhandle* ph : polls) Notify(ph);
    changed_.SignalAll();
    lock.Relock();
  }
}

void EventsFile::Notify(fuse_pollhandle* ph) {
  int r = fuse_lowlevel_notify_poll(ph);
  // ENOENT: the poller is gone (or was woken already); nothing to tell.
  if (r != 0 && r != -ENOENT) {
    try {
      backup::LogDebug(std::string("events: poll notification failed: ") + std::strerror(-r));
    } catch (...) {
    }
  }
  fuse_pollhandle_destroy(ph);
}

void EventsFile::EndStreams() {
  std::vector<Answer> answers;
  std::vector<fuse_pollhandle*> polls;
  {
    backup::MutexLock lock(&mu_);
    ended_ = true;
    size_t parked = 0;
    for (auto& [id, q] : queues_) parked += q.parked.size();
    answers.reserve(parked);
    polls.reserve(queues_.size());
    for (auto& [id, q] : queues_) {
      // A parked read still gets what is queued for it; the rest get EOF.
      while (!q.parked.empty()) {
        std::string data;
        try {
          if (HasDataLocked(q)) data = TakeLocked(q, q.parked.front().size);
        } catch (...) {
          data.clear();  // out of memory: EOF rather than no answer at all
        }
        answers.push_back({q.parked.front().req, std::move(data)});
        q.parked.pop_front();
      }
      if (q.poll) polls.push_back(std::exchange(q.poll, nullptr));
    }
  }
  for (auto& a : answers) fuse_reply_buf(a.req, a.data.data(), a.data.size());
  for (fuse_pollhandle* ph : polls) Notify(ph);
  changed_.SignalAll();
}

void EventsFile::StopEvents(std::chrono::milliseconds deadline) {
  {
    backup::MutexLock lock(&mu_);
    auto until = std::chrono::steady_clock::now() + deadline;
    while (AnyHasDataLocked()) {
      if (!changed_.WaitUntil(&lock, until)) break;
    }
  }
  EndStreams();
  backup::MutexLock lock(&mu_);
  auto until = std::chrono::steady_clock::now() + deadline;
  while (!queues_.empty()) {
    if (!changed_.WaitUntil(&lock, until)) break;
  }
}

}  // namespace cbw::fs
