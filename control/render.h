#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "backup/job_types.h"

namespace cbw::control {

// JSON shapes shared by the QMP replies and the jobs/ and events files.
// Pure functions, thread-safe. (RenderJobFile, RenderEvent and
// RenderEventsDropped, declared in control/dispatcher.h, build on these.)

// QMP's BlockJobInfo (query-block-jobs), in QEMU's schema order.
nlohmann::ordered_json BlockJobInfoJson(const backup::JobInfo& info);
// QMP's JobInfo (query-jobs).
nlohmann::ordered_json JobInfoJson(const backup::JobInfo& info);
// RFC 3339 UTC with milliseconds, e.g. "2026-11-26T14:20:42.123Z", from
// seconds since the epoch.
std::string Rfc3339(double seconds);

}  // namespace cbw::control
