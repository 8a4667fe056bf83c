#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

#include "backup/job_registry.h"
#include "backup/job_types.h"
#include "control/args.h"

namespace cbw::control {

// What one write() on the control file did.
struct WriteOutcome {
  // 0 when every command in the write succeeded; else the errno of the first
  // failure (SPEC 2.2 table). The write() returns its byte count or fails with it.
  int error = 0;
  // The response lines (each ending in '\n') for the commands that ran, in
  // order, including the failing one's error reply. Empty when the write was
  // refused as a whole (bad JSON, oversized): then `last_reply` still says why.
  std::string responses;
  // The last response line produced (what `cat control` on a fresh open shows).
  // For a write refused as a whole it is a GenericError reply naming the
  // problem ("JSON parse error, ...", "QMP input must be a JSON object",
  // "Command at offset N exceeds 65536 bytes"). Empty only for a write of
  // whitespace alone, which runs nothing and succeeds.
  std::string last_reply;
};

// Seams for tests and the fuzzer; production code uses the defaults.
struct DispatcherOptions {
  // When set, called with each drive-backup's fully validated options (also
  // each transaction action's) just before the registry sees them. It may
  // rewrite them (the fuzzer confines targets to a scratch directory) or
  // refuse with a Status, whose errno and message become the reply.
  std::function<backup::Status(backup::BackupOptions*)> vet_backup;
};

// The commands a transport offers: all of them, or only qmp_capabilities
// (QMP's capability negotiation mode, where any other command is not found).
enum class CommandSet { kAll, kNegotiation };

// What one command did (ExecuteCommand).
struct CommandOutcome {
  std::string name;               // the command run, "" when the envelope was bad
  std::optional<QmpError> error;  // set on failure
  nlohmann::ordered_json ret;     // the return value on success
};

// QMP over bytes: parses a write's worth of commands, validates them strictly
// (QEMU's order, classes and texts), calls the registry, renders replies.
//
// Thread safety: Execute is thread-safe (it keeps no state between calls but
// the registry's). Ownership: borrows the registry.
class Dispatcher {
 public:
  explicit Dispatcher(backup::JobRegistry* registry);
  Dispatcher(backup::JobRegistry* registry, DispatcherOptions options);

  // One write(): one or more whole JSON objects separated by optional
  // whitespace. A write ending inside an unfinished value, or holding anything
  // but JSON objects, runs nothing and fails with EINVAL. A command over
  // 64 KiB fails with EMSGSIZE. Commands run in order; the first failure ends
  // the write. Every error is also logged (stderr/syslog via the logger).
  //
  // Strict JSON only (RFC 8259): no comments, no duplicate keys, valid UTF-8,
  // no NUL bytes (nor "\u0000"), nesting at most 64 deep. Each command is
  // then checked as QEMU's QMP dispatcher and QAPI visitor do (envelope,
  // command name, members in schema order, leftovers), then the pure
  // semantic checks QEMU makes (device, format, bitmap, compress, job id,
  // speed), and only then does the registry see it.
  WriteOutcome Execute(std::string_view bytes);

  // One parsed command (a JSON object), checked and run exactly as each
  // command of Execute is, for transports that frame and answer commands
  // one at a time (the QMP socket). Does not log.
  CommandOutcome ExecuteCommand(const nlohmann::ordered_json& command,
                                CommandSet set = CommandSet::kAll);
  // The reply line for an outcome ("{"return": ...}" or "{"error": ...}",
  // with `id` echoed when given), ending in a newline.
  static std::string ReplyLine(const CommandOutcome& outcome, const nlohmann::ordered_json* id);

 private:
  backup::JobRegistry* registry_;
  DispatcherOptions options_;
};

}  // namespace cbw::control
