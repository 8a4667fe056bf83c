#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "backup/bitmap_catalog.h"
#include "backup/event_bus.h"
#include "backup/job_types.h"

namespace cbw::control {

// JSON shapes of the QMP replies and of the jobs/ and events files (and of
// the --state-dir records, which are jobs/ files). Pure functions,
// thread-safe.

// QMP's BlockJobInfo (query-block-jobs), in QEMU's schema order.
nlohmann::ordered_json BlockJobInfoJson(const backup::JobInfo& info);
// QMP's BlockDirtyInfo (query-block's inserted.dirty-bitmaps), in QEMU's
// order; `inconsistent` only when true.
nlohmann::ordered_json BitmapInfoJson(const backup::BitmapInfo& info);
// QMP's JobInfo (query-jobs).
nlohmann::ordered_json JobInfoJson(const backup::JobInfo& info);
// RFC 3339 UTC with milliseconds, e.g. "2026-11-26T14:20:42.123Z", from
// seconds since the epoch.
std::string Rfc3339(double seconds);

// One jobs/<id> file: a JSON object and a newline (SPEC 4).
std::string RenderJobFile(const backup::JobInfo& info);
// One events line: {"event", "data", "timestamp"} and a newline.
std::string RenderEvent(const backup::Event& event);
// The line a slow events reader gets in place of `count` events it missed.
std::string RenderEventsDropped(uint64_t count);

}  // namespace cbw::control
