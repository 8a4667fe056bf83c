#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "backup/event_bus.h"
#include "backup/mutex.h"

namespace cbw::fs {

// The `events` file (SPEC 4): each open reads the events published after it
// opened, one JSON line each, in order. A blocking read with nothing queued
// is parked (it holds no FUSE worker) and answered when an event comes, with
// EINTR when interrupted (fuse_req_interrupt_func: Ctrl-C on `cat events`
// works at once), or with end-of-file once the streams end; O_NONBLOCK reads
// get EAGAIN; poll() works (fuse_lowlevel_notify_poll). A reader that falls
// more than 1 MiB behind misses events and is told how many (one
// EVENTS_DROPPED line in their place).
//
// Delivery happens with no lock held. The bus calls OnEvent with its own
// mutex and the publishing job's held, so OnEvent only renders the line,
// queues it under mu_ and wakes the delivery thread; that thread takes the
// parked reads and poll handles that can now be answered out of the readers
// under mu_, and answers them after releasing it. Each reader's bytes go to
// its reads in the order the events came.
//
// Thread safety: every method is thread-safe. Lock order: EventBus's mutex
// -> mu_ (OnEvent); libfuse's request lock -> mu_ (the interrupt callback).
// Nothing is replied, notified or asked of the bus while mu_ is held.
// Ownership: a Reader belongs to this object from Open until Release (the
// open file's fi->fh); its id and bus token never change after Open returns,
// and everything else about the open is in its Queue, under mu_. The bus
// must outlive this object.
class EventsFile {
 public:
  // One open (its fi->fh): only the open's identity, fixed once Open has
  // returned. Its queue lives in this object's table, under mu_.
  struct Reader {
    uint64_t id = 0;
    uint64_t token = 0;  // the bus subscription
  };

  explicit EventsFile(backup::EventBus* bus);
  // Ends the streams, stops the delivery thread and unsubscribes readers
  // that were never released (a lazily unmounted mount sends no releases).
  ~EventsFile();
  EventsFile(const EventsFile&) = delete;
  EventsFile& operator=(const EventsFile&) = delete;

  // Starts the delivery thread. Call once, in the process that serves the
  // mount (after daemonizing: threads do not survive fork), before the loop.
  void Start() CBW_EXCLUDES(mu_);

  // A new open: subscribes it to the bus.
  Reader* Open() CBW_EXCLUDES(mu_);
  // The open's release: unsubscribes it, answers any read it still has
  // parked with EINTR, and frees it.
  void Release(Reader* reader) CBW_EXCLUDES(mu_);
  // Answers `req` now (data, EAGAIN, EINTR, EOF) or parks it.
  void Read(fuse_req_t req, Reader* reader, size_t size, bool nonblock) CBW_EXCLUDES(mu_);
  // POLLIN when something is queued (or the stream ended); keeps `ph` (when
  // given) to notify at the next event.
  void Poll(fuse_req_t req, Reader* reader, fuse_pollhandle* ph) CBW_EXCLUDES(mu_);

  // At stop, while the loop still serves: waits until every reader has read
  // what is queued for it, then ends the streams (EOF) and waits until the
  // readers have closed, each wait bounded by `deadline`.
  void StopEvents(std::chrono::milliseconds deadline) CBW_EXCLUDES(mu_);
  // Ends the streams (parked reads get EOF, later reads too) and stops the
  // delivery thread. Idempotent.
  void Shutdown() CBW_EXCLUDES(mu_);

 private:
  struct Parked {
    fuse_req_t req;
    size_t size;
  };
  // One reader's state; reached only through queues_ (so only under mu_).
  struct Queue {
    std::unique_ptr<Reader> reader;  // the open's handle, owned here
    std::string backlog;             // rendered lines not read yet
    uint64_t dropped = 0;            // events missed since the backlog was full
    std::deque<Parked> parked;       // blocking reads waiting, oldest first
    fuse_pollhandle* poll = nullptr;
    bool ready = false;  // listed in ready_
  };
  struct Answer {
    fuse_req_t req;
    std::string data;
  };

  static void OnInterrupt(fuse_req_t req, void* self);
  void OnEvent(uint64_t reader_id, const backup::Event& event) noexcept CBW_EXCLUDES(mu_);
  void DeliveryLoop() CBW_EXCLUDES(mu_);
  // The queue of the open `reader`, or null once released.
  Queue* FindLocked(const Reader* reader) CBW_REQUIRES(mu_);
  // What `q` has to give (bytes or a dropped-count line).
  bool HasDataLocked(const Queue& q) const CBW_REQUIRES(mu_);
  bool AnyHasDataLocked() const CBW_REQUIRES(mu_);
  // Takes at most `size` bytes of the queue.
  std::string TakeLocked(Queue& q, size_t size) CBW_REQUIRES(mu_);
  void MarkReadyLocked(Queue& q) CBW_REQUIRES(mu_);
  // Moves the answers and poll handles a ready reader can be given now.
  void CollectLocked(std::vector<Answer>* answers, std::vector<fuse_pollhandle*>* polls)
      CBW_REQUIRES(mu_);
  // Sets ended_ and replies EOF to every parked read, POLLIN to every poller.
  void EndStreams() CBW_EXCLUDES(mu_);
  static void Notify(fuse_pollhandle* ph);

  backup::EventBus* bus_;

  mutable backup::Mutex mu_;
  std::map<uint64_t, Queue> queues_ CBW_GUARDED_BY(mu_);  // by reader id
  uint64_t next_id_ CBW_GUARDED_BY(mu_) = 1;
  std::vector<Queue*> ready_ CBW_GUARDED_BY(mu_);  // with parked reads or a poller to serve
  bool ended_ CBW_GUARDED_BY(mu_) = false;         // streams ended: reads give EOF
  bool stopping_ CBW_GUARDED_BY(mu_) = false;      // the delivery thread is to exit
  std::thread delivery_ CBW_GUARDED_BY(mu_);
  backup::CondVar wake_;     // the delivery thread: ready_ or stopping_
  backup::CondVar changed_;  // StopEvents: a queue drained, a reader left
};

}  // namespace cbw::fs
