#pragma once

#include <string_view>

namespace cbw::backup {

// QMP's id rule, used for job ids, drive names and the file names of job
// records (SPEC 1, 2.3): a letter, then letters, digits, '-', '.', '_'; at
// most 64 characters. "Letter" and "digit" mean ASCII ones whatever the
// locale, so a name valid here is valid in every process and file system.
// Pure, thread-safe.
bool IsValidId(std::string_view id);

}  // namespace cbw::backup
