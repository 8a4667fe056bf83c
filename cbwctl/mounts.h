#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cbwctl/outcome.h"

namespace cbw::ctl {

// Finding the cbwfs mount to talk to: pure functions, thread-safe.

// The mountpoints of fstype "fuse.cbwfs" in a /proc/self/mountinfo text, in
// its order, with the kernel's octal escapes ("\040" for a space) undone.
std::vector<std::string> CbwfsMounts(std::string_view mountinfo);

// -m if given, else $CBWFS_MOUNT if set and non-empty (`env`, may be null),
// else the only cbwfs mount in `mountinfo`. None or several fail with
// kExitMount and a message that names -m.
Result<std::string> ChooseMountpoint(const std::optional<std::string>& flag, const char* env,
                                     std::string_view mountinfo);

}  // namespace cbw::ctl
