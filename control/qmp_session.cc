#include "control/qmp_session.h"

#include <cerrno>
#include <utility>

#include "backup/log.h"
#include "control/wire.h"

namespace cbw::control {
namespace {

using nlohmann::ordered_json;

constexpr const char kCapabilities[] = "qmp_capabilities";

}  // namespace

std::string QmpSession::Greeting() {
  ordered_json query;
  query["execute"] = "query-version";
  CommandOutcome version = dispatcher_->ExecuteCommand(query);
  ordered_json qmp;
  qmp["version"] = std::move(version.ret);
  qmp["capabilities"] = ordered_json::array();
  ordered_json greeting;
  greeting["QMP"] = std::move(qmp);
  return ToQmpText(greeting) + "\n";
}

std::string QmpSession::Handle(std::string_view value) {
  ParsedWrite parsed = ParseWrite(value);
  if (parsed.error != 0 || parsed.commands.size() != 1) {
    // The transport frames one value at a time, so a well-formed value is
    // exactly one command; anything else is refused like a bad write.
    CommandOutcome bad;
    bad.error = GenericError(parsed.error != 0 ? parsed.error : EINVAL,
                             parsed.error != 0 ? parsed.message : "Expected one JSON object");
    LogErrorReply("qmp", "", *bad.error);
    return Dispatcher::ReplyLine(bad, nullptr);
  }
  const ordered_json& command = parsed.commands.front();
  CommandOutcome out = dispatcher_->ExecuteCommand(
      command, negotiated_ ? CommandSet::kAll : CommandSet::kNegotiation);
  if (!negotiated_) {
    if (out.error && out.error->cls == "CommandNotFound") {
      out.error->desc = "Expecting capabilities negotiation with 'qmp_capabilities'";
    } else if (!out.error && out.name == kCapabilities) {
      negotiated_ = true;
    }
  } else if (!out.error && out.name == kCapabilities) {
    // Arguments were checked first (QEMU's marshaller does), then refused.
    out.error = QmpError{EINVAL, "CommandNotFound",
                         "Capabilities negotiation is already complete, command ignored"};
  }
  if (out.error) LogErrorReply("qmp", out.name, *out.error);
  auto id = command.find("id");
  return Dispatcher::ReplyLine(out, id != command.end() ? &*id : nullptr);
}

}  // namespace cbw::control
