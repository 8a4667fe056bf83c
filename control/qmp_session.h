#pragma once

#include <string>
#include <string_view>

#include "control/dispatcher.h"

namespace cbw::control {

// One QMP connection's protocol state (SPEC 8, the QMP socket), as QEMU's
// monitor keeps it: a greeting, then capability negotiation, then every
// command of the control file. The transport (qmp/) frames the byte stream
// into JSON values and writes what this returns; events go only to
// connections that have negotiated.
//
// Before negotiation only qmp_capabilities is found: any other command gets
// QEMU's CommandNotFound "Expecting capabilities negotiation with
// 'qmp_capabilities'" (envelope errors keep their own text, as in QEMU). A
// qmp_capabilities after negotiation gets CommandNotFound "Capabilities
// negotiation is already complete, command ignored". Replies echo `id`.
// Errors are logged (as the control file's are).
//
// Thread safety: not thread-safe (one per connection, used by its thread).
// Ownership: borrows the dispatcher, which is thread-safe.
class QmpSession {
 public:
  explicit QmpSession(Dispatcher* dispatcher) : dispatcher_(dispatcher) {}

  // The greeting line: {"QMP": {"version": <query-version's return>,
  // "capabilities": []}} and a newline.
  std::string Greeting();
  // One JSON value as framed by the transport (the whole value, or its first
  // kMaxCommandBytes + 1 bytes when it is longer, which then fails with the
  // control file's "exceeds 65536 bytes"). Returns the reply line.
  std::string Handle(std::string_view value);
  bool negotiated() const { return negotiated_; }

 private:
  Dispatcher* dispatcher_;
  bool negotiated_ = false;
};

}  // namespace cbw::control
