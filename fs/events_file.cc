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

struct EventsFile::Reader {
  uint64_t id = 0;
  uint64_t token = 0;  // the bus subscription
  // Guarded by EventsFile::mu_:
  std::string backlog;   // rendered lines not read yet
  uint64_t dropped = 0;  // events missed since the backlog was full
  struct Parked {
    fuse_req_t req;
    size_t size;
  };
  std::deque<Parked> parked;  // blocking reads waiting, oldest first
  fuse_pollhandle* poll = nullptr;
  bool ready = false;  // listed in ready_
};

EventsFile::EventsFile(backup::EventBus* bus) : bus_(bus) {}

EventsFile::~EventsFile() {
  Shutdown();
  std::vector<uint64_t> tokens;
  {
    std::lock_guard lock(mu_);
    for (auto& [id, r] : readers_) tokens.push_back(r->token);
  }
  for (uint64_t t : tokens) bus_->Unsubscribe(t);
  std::lock_guard lock(mu_);
  for (auto& [id, r] : readers_) {
    if (r->poll) fuse_pollhandle_destroy(r->poll);
  }
  readers_.clear();
}

void EventsFile::Start() {
  std::lock_guard lock(mu_);
  if (delivery_.joinable() || stopping_) return;
  delivery_ = std::thread(
      [this] { backup::RunGuarded("events delivery thread", [this] { DeliveryLoop(); }); });
}

void EventsFile::Shutdown() {
  EndStreams();
  std::thread t;
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    t = std::move(delivery_);
  }
  wake_.notify_all();
  if (t.joinable()) t.join();
}

EventsFile::Reader* EventsFile::Open() {
  auto owned = std::make_unique<Reader>();
  Reader* r = owned.get();
  {
    std::lock_guard lock(mu_);
    // Each reader is in ready_ at most once: with room reserved, listing one
    // never allocates (OnEvent cannot fail there).
    ready_.reserve(readers_.size() + 1);
    r->id = next_id_++;
    readers_.emplace(r->id, std::move(owned));
  }
  uint64_t id = r->id;
  try {
    // The callback finds its reader by id, so one that runs after Release
    // (whatever the bus guarantees) finds nothing.
    uint64_t token = bus_->Subscribe([this, id](const backup::Event& ev) { OnEvent(id, ev); });
    std::lock_guard lock(mu_);
    r->token = token;
  } catch (...) {
    std::lock_guard lock(mu_);
    readers_.erase(id);
    throw;
  }
  return r;
}

void EventsFile::Release(Reader* reader) {
  bus_->Unsubscribe(reader->token);
  std::unique_ptr<Reader> owned;
  std::deque<Reader::Parked> left;
  fuse_pollhandle* ph = nullptr;
  {
    std::lock_guard lock(mu_);
    auto it = readers_.find(reader->id);
    if (it == readers_.end()) return;
    owned = std::move(it->second);
    readers_.erase(it);
    left = std::move(reader->parked);
    ph = std::exchange(reader->poll, nullptr);
    if (reader->ready) ready_.erase(std::find(ready_.begin(), ready_.end(), reader));
  }
  // The kernel holds the file while a read is in flight, so this is only for
  // an open whose opener went away before it completed.
  for (const auto& p : left) fuse_reply_err(p.req, EINTR);
  if (ph) fuse_pollhandle_destroy(ph);
  changed_.notify_all();
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
    std::lock_guard lock(mu_);
    if (reader->parked.empty() && HasDataLocked(*reader)) {
      outcome = kData;
      data = TakeLocked(*reader, size);
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
      reader->parked.push_back({req, size});
      if (HasDataLocked(*reader)) {
        MarkReadyLocked(*reader);
        wake = true;
      }
    }
  }
  switch (outcome) {
    case kData:
      changed_.notify_all();
      fuse_reply_buf(req, data.data(), data.size());
      return;
    case kEof:
      fuse_reply_buf(req, nullptr, 0);
      return;
    case kError:
      fuse_reply_err(req, err);
      return;
    case kParked:
      if (wake) wake_.notify_one();
      return;
  }
}

void EventsFile::Poll(fuse_req_t req, Reader* reader, fuse_pollhandle* ph) {
  unsigned revents = 0;
  fuse_pollhandle* old = nullptr;
  {
    std::lock_guard lock(mu_);
    if (HasDataLocked(*reader) || ended_) revents = POLLIN;
    if (ph) old = std::exchange(reader->poll, ph);
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
      std::lock_guard lock(ef->mu_);
      for (auto& [id, r] : ef->readers_) {
        auto it = std::find_if(r->parked.begin(), r->parked.end(),
                               [req](const Reader::Parked& p) { return p.req == req; });
        if (it != r->parked.end()) {
          r->parked.erase(it);
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
    std::lock_guard lock(mu_);
    auto it = readers_.find(reader_id);
    if (it == readers_.end()) return;
    Reader& r = *it->second;
    try {
      if (line.empty() || r.backlog.size() + line.size() > kBacklogBytes) {
        ++r.dropped;
      } else if (r.dropped) {
        r.backlog += control::RenderEventsDropped(r.dropped) + line;
        r.dropped = 0;
      } else {
        r.backlog += line;
      }
    } catch (...) {
      ++r.dropped;
    }
    if (!r.parked.empty() || r.poll) {
      MarkReadyLocked(r);
      wake = true;
    }
  } catch (...) {
    backup::LogStoppedException("events: queueing an event", "lock failed");
  }
  if (wake) wake_.notify_one();
}

bool EventsFile::HasDataLocked(const Reader& reader) {
  return !reader.backlog.empty() || reader.dropped > 0;
}

std::string EventsFile::TakeLocked(Reader& reader, size_t size) {
  if (reader.backlog.empty() && reader.dropped) {
    reader.backlog = control::RenderEventsDropped(reader.dropped);
    reader.dropped = 0;
  }
  std::string out = reader.backlog.substr(0, size);
  reader.backlog.erase(0, out.size());
  return out;
}

void EventsFile::MarkReadyLocked(Reader& reader) {
  if (reader.ready) return;
  reader.ready = true;
  ready_.push_back(&reader);  // capacity reserved in Open: does not throw
}

void EventsFile::CollectLocked(std::vector<Answer>* answers, std::vector<fuse_pollhandle*>* polls) {
  while (!ready_.empty()) {
    Reader& r = *ready_.back();
    answers->reserve(answers->size() + r.parked.size());
    polls->reserve(polls->size() + 1);
    while (!r.parked.empty() && HasDataLocked(r)) {
      // Taken before the pop: if taking throws, the read stays parked.
      std::string data = TakeLocked(r, r.parked.front().size);
      answers->push_back({r.parked.front().req, std::move(data)});
      r.parked.pop_front();
    }
    if (r.poll && (HasDataLocked(r) || ended_)) polls->push_back(std::exchange(r.poll, nullptr));
    r.ready = false;
    ready_.pop_back();
  }
}

void EventsFile::DeliveryLoop() {
  std::unique_lock lock(mu_);
  for (;;) {
    wake_.wait(lock, [&] { return stopping_ || !ready_.empty(); });
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
    lock.unlock();
    for (auto& a : answers) fuse_reply_buf(a.req, a.data.data(), a.data.size());
    for (fuse_pollhandle* ph : polls) Notify(ph);
    changed_.notify_all();
    lock.lock();
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
    std::lock_guard lock(mu_);
    ended_ = true;
    size_t parked = 0;
    for (auto& [id, r] : readers_) parked += r->parked.size();
    answers.reserve(parked);
    polls.reserve(readers_.size());
    for (auto& [id, r] : readers_) {
      // A parked read still gets what is queued for it; the rest get EOF.
      while (!r->parked.empty()) {
        std::string data;
        try {
          if (HasDataLocked(*r)) data = TakeLocked(*r, r->parked.front().size);
        } catch (...) {
          data.clear();  // out of memory: EOF rather than no answer at all
        }
        answers.push_back({r->parked.front().req, std::move(data)});
        r->parked.pop_front();
      }
      if (r->poll) polls.push_back(std::exchange(r->poll, nullptr));
    }
  }
  for (auto& a : answers) fuse_reply_buf(a.req, a.data.data(), a.data.size());
  for (fuse_pollhandle* ph : polls) Notify(ph);
  changed_.notify_all();
}

void EventsFile::StopEvents(std::chrono::milliseconds deadline) {
  {
    std::unique_lock lock(mu_);
    changed_.wait_for(lock, deadline, [&] {
      return std::none_of(readers_.begin(), readers_.end(),
                          [](const auto& e) { return HasDataLocked(*e.second); });
    });
  }
  EndStreams();
  std::unique_lock lock(mu_);
  changed_.wait_for(lock, deadline, [&] { return readers_.empty(); });
}

}  // namespace cbw::fs
