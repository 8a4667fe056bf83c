#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "cbwctl/cli.h"
#include "cbwctl/outcome.h"

namespace cbw::ctl {

// The QMP commands cbwctl sends and the replies it reads back: pure
// functions, thread-safe. Keys are in QMP's documented order so the text a
// user sees in the daemon's log reads naturally.

using OrderedJson = nlohmann::ordered_json;

// drive-backup with device, target (already resolved), sync and only the
// optional arguments the user gave.
OrderedJson BackupCommand(const BackupArgs& args);
// job-cancel of `job`.
OrderedJson CancelCommand(const std::string& job);
// block-dirty-bitmap-add/-remove/-clear with node = drive and name (SPEC 7).
OrderedJson BitmapCommand(const BitmapArgs& args);

// What one write() on control carries: the command with `id` added (so the
// reply read back can be told apart from another open's), on one line.
std::string CommandText(const OrderedJson& command, const std::string& id);

// One reply line from control.
struct Reply {
  bool ok = false;
  OrderedJson value;        // "return" when ok
  std::string error_class;  // when !ok
  std::string desc;         // when !ok
  OrderedJson id;           // echoed id, null when absent
};
// Parses a reply line; fails (kExitMount) when it is not a QMP reply.
Result<Reply> ParseReply(std::string_view line);

// True when an `events` line may change `job`'s record in a way a waiter
// cares about: its status changes, it completes, is cancelled, meets an
// error or goes pending; and EVENTS_DROPPED (anything may have been missed).
bool EventConcernsJob(std::string_view line, const std::string& job);

}  // namespace cbw::ctl
