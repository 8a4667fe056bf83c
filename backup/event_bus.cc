#include "backup/event_bus.h"

#include <time.h>

#include <utility>

namespace cbw::backup {

uint64_t EventBus::Subscribe(Subscriber fn) {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t token = next_token_++;
  subscribers_.emplace(token, std::move(fn));
  return token;
}

void EventBus::Unsubscribe(uint64_t token) {
  std::lock_guard<std::mutex> lock(mu_);
  subscribers_.erase(token);
}

void EventBus::Publish(Event event) {
  // The time is taken under the lock so timestamps never go backwards in
  // delivery order.
  std::lock_guard<std::mutex> lock(mu_);
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  event.seconds = ts.tv_sec;
  event.microseconds = ts.tv_nsec / 1000;
  for (auto& [token, fn] : subscribers_) fn(event);
}

}  // namespace cbw::backup
