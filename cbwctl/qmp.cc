#include "cbwctl/qmp.h"

namespace cbw::ctl {

OrderedJson BackupCommand(const BackupArgs& a) {
  OrderedJson args;
  args["device"] = a.drive;
  if (a.job_id) args["job-id"] = *a.job_id;
  args["target"] = a.target;
  if (a.format) args["format"] = *a.format;
  if (a.mode) args["mode"] = *a.mode;
  args["sync"] = a.sync;
  if (a.bitmap) args["bitmap"] = *a.bitmap;
  if (a.bitmap_mode) args["bitmap-mode"] = *a.bitmap_mode;
  if (a.speed) args["speed"] = *a.speed;
  OrderedJson cmd;
  cmd["execute"] = "drive-backup";
  cmd["arguments"] = std::move(args);
  return cmd;
}

OrderedJson CancelCommand(const std::string& job) {
  OrderedJson cmd;
  cmd["execute"] = "job-cancel";
  cmd["arguments"]["id"] = job;
  return cmd;
}

OrderedJson BitmapCommand(const BitmapArgs& a) {
  const char* verb = a.op == BitmapOp::kAdd      ? "block-dirty-bitmap-add"
                     : a.op == BitmapOp::kRemove ? "block-dirty-bitmap-remove"
                                                 : "block-dirty-bitmap-clear";
  OrderedJson args;
  args["node"] = a.drive;
  args["name"] = a.name;
  if (a.op == BitmapOp::kAdd) {
    if (a.granularity) args["granularity"] = *a.granularity;
    if (a.persistent) args["persistent"] = true;
    if (a.disabled) args["disabled"] = true;
  }
  OrderedJson cmd;
  cmd["execute"] = verb;
  cmd["arguments"] = std::move(args);
  return cmd;
}

std::string CommandText(const OrderedJson& command, const std::string& id) {
  OrderedJson c = command;
  c["id"] = id;
  return c.dump() + "\n";
}

Result<Reply> ParseReply(std::string_view line) {
  OrderedJson j = OrderedJson::parse(line, nullptr, false);
  Reply r;
  if (!j.is_discarded() && j.is_object()) {
    if (j.contains("id")) r.id = j["id"];
    if (j.contains("return")) {
      r.ok = true;
      r.value = j["return"];
      return r;
    }
    if (j.contains("error") && j["error"].is_object()) {
      const auto& e = j["error"];
      r.error_class = e.value("class", "");
      r.desc = e.value("desc", "");
      return r;
    }
  }
  return Error{kExitMount, "not a QMP reply: " + std::string(line.substr(0, 200))};
}

bool EventConcernsJob(std::string_view line, const std::string& job) {
  OrderedJson j = OrderedJson::parse(line, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("event") || !j["event"].is_string()) {
    return false;
  }
  const std::string name = j["event"];
  if (name == "EVENTS_DROPPED") return true;
  if (!j.contains("data") || !j["data"].is_object()) return false;
  const auto& d = j["data"];
  const char* key = nullptr;
  if (name == "JOB_STATUS_CHANGE" || name == "BLOCK_JOB_PENDING") {
    key = "id";
  } else if (name == "BLOCK_JOB_COMPLETED" || name == "BLOCK_JOB_CANCELLED" ||
             name == "BLOCK_JOB_ERROR") {
    key = "device";
  } else {
    return false;
  }
  return d.contains(key) && d[key].is_string() && d[key] == job;
}

}  // namespace cbw::ctl
