#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "backup/event_bus.h"

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
// open file's fi->fh); the bus must outlive this object.
class EventsFile {
 public:
  struct Reader;

  explicit EventsFile(backup::EventBus* bus);
  // Ends the streams, stops the delivery thread and unsubscribes readers
  // that were never released (a lazily unmounted mount sends no releases).
  ~EventsFile();
  EventsFile(const EventsFile&) = delete;
  EventsFile& operator=(const EventsFile&) = delete;

  // Starts the delivery thread. Call once, in the process that serves the
  // mount (after daemonizing: threads do not survive fork), before the loop.
  void Start();

  // A new open: subscribes it to the bus.
  Reader* Open();
  // The open's release: unsubscribes it, answers any read it still has
  // parked with EINTR, and frees it.
  void Release(Reader* reader);
  // Answers `req` now (data, EAGAIN, EINTR, EOF) or parks it.
  void Read(fuse_req_t req, Reader* reader, size_t size, bool nonblock);
  // POLLIN when something is queued (or the stream ended); keeps `ph` (when
  // given) to notify at the next event.
  void Poll(fuse_req_t req, Reader* reader, fuse_pollhandle* ph);

  // At stop, while the loop still serves: waits until every reader has read
  // what is queued for it, then ends the streams (EOF) and waits until the
  // readers have closed, each wait bounded by `deadline`.
  void StopEvents(std::chrono::milliseconds deadline);
  // Ends the streams (parked reads get EOF, later reads too) and stops the
  // delivery thread. Idempotent.
  void Shutdown();

 private:
  struct Answer {
    fuse_req_t req;
    std::string data;
  };

  static void OnInterrupt(fuse_req_t req, void* self);
  void OnEvent(uint64_t reader_id, const backup::Event& event) noexcept;
  void DeliveryLoop();
  // Under mu_: what `reader` has to give (bytes or a dropped-count line).
  static bool HasDataLocked(const Reader& reader);
  // Under mu_: takes at most `size` bytes of the reader's queue.
  static std::string TakeLocked(Reader& reader, size_t size);
  void MarkReadyLocked(Reader& reader);
  // Moves the answers and poll handles a ready reader can be given now.
  void CollectLocked(std::vector<Answer>* answers, std::vector<fuse_pollhandle*>* polls);
  // Sets ended_ and replies EOF to every parked read, POLLIN to every poller.
  void EndStreams();
  static void Notify(fuse_pollhandle* ph);

  backup::EventBus* bus_;

  std::mutex mu_;
  // Guarded by mu_:
  std::map<uint64_t, std::unique_ptr<Reader>> readers_;  // by id
  uint64_t next_id_ = 1;
  std::vector<Reader*> ready_;       // readers with parked reads or a poller to serve
  bool ended_ = false;               // streams ended: reads give EOF
  bool stopping_ = false;            // the delivery thread is to exit
  std::condition_variable wake_;     // the delivery thread: ready_ or stopping_
  std::condition_variable changed_;  // StopEvents: a queue drained, a reader left

  std::thread delivery_;
};

}  // namespace cbw::fs
