#include "control/dispatcher.h"

#include <cerrno>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "backup/ids.h"
#include "backup/log.h"
#include "control/args.h"
#include "control/render.h"
#include "control/wire.h"

#ifndef CBWFS_VERSION
#error "CBWFS_VERSION must be defined by the build"
#endif

namespace cbw::control {
namespace {

using nlohmann::ordered_json;

// What one command produced: a return value or an error.
struct Reply {
  std::optional<QmpError> error;
  ordered_json ret = ordered_json::object();
};

Reply Fail(QmpError e) {
  Reply r;
  r.error = std::move(e);
  return r;
}

Reply Return(ordered_json ret) {
  Reply r;
  r.ret = std::move(ret);
  return r;
}

struct Context {
  backup::JobRegistry* registry;
  const DispatcherOptions* options;
};

// How a registry error for a job verb is worded: QEMU's legacy block-job-*
// commands and its job-* commands word "no such job" differently.
enum class Family { kBlockJob, kJob, kOther };

QmpError FromStatus(const backup::Status& status, Family family, const std::string& id) {
  const int err = status.code() != 0 ? status.code() : EIO;
  if (err == ESRCH && family == Family::kBlockJob) {
    return QmpError{ESRCH, "DeviceNotActive", "Block job '" + id + "' not found"};
  }
  if (err == ESRCH && family == Family::kJob) return GenericError(ESRCH, "Job not found");
  return GenericError(err, status.message().empty() ? "Operation failed" : status.message());
}

Reply FromVerbStatus(const backup::Status& status, Family family, const std::string& id) {
  if (status.ok()) return Return(ordered_json::object());
  return Fail(FromStatus(status, family, id));
}

// ---- drive-backup -------------------------------------------------------

// drive-backup's arguments after the QAPI layer: types and enums checked.
struct BackupArgs {
  backup::BackupOptions options;
  std::string sync;  // as given: "incremental"/"bitmap" are checked later
  int64_t speed = 0;
  std::optional<std::string> job_id;
  std::optional<std::string> bitmap;
  std::optional<std::string> bitmap_mode;
  bool compress = false;
  std::optional<std::string> format;
};

backup::ErrorPolicy ToErrorPolicy(const std::string& s) {
  if (s == "ignore") return backup::ErrorPolicy::kIgnore;
  if (s == "stop") return backup::ErrorPolicy::kStop;
  // QEMU's jobs treat "auto" exactly like "enospc".
  if (s == "enospc" || s == "auto") return backup::ErrorPolicy::kEnospc;
  return backup::ErrorPolicy::kReport;
}

// QMP's BlockdevOnError, "auto" included (SPEC lists the other four).
std::optional<backup::ErrorPolicy> ReadOnError(ArgReader& r, std::string_view name) {
  auto v = r.Enum(name, {"report", "ignore", "enospc", "stop", "auto"}, false);
  if (!v) return std::nullopt;
  return ToErrorPolicy(*v);
}

// Reads DriveBackup's members in QEMU's schema order (BackupCommon's, then
// target, format, mode), so the first error reported is QEMU's.
bool ReadBackupArgs(ArgReader& r, BackupArgs* out) {
  backup::BackupOptions& o = out->options;
  out->job_id = r.String("job-id", false);
  if (auto v = r.String("device", true)) o.device = *v;
  if (auto v = r.Enum("sync", {"top", "full", "none", "incremental", "bitmap"}, true)) {
    out->sync = *v;
  }
  if (auto v = r.Int("speed", false)) out->speed = *v;
  out->bitmap = r.String("bitmap", false);
  out->bitmap_mode = r.Enum("bitmap-mode", {"on-success", "never", "always"}, false);
  if (auto v = r.Bool("compress", false)) out->compress = *v;
  if (auto v = ReadOnError(r, "on-source-error")) o.on_source_error = *v;
  if (auto v = ReadOnError(r, "on-target-error")) o.on_target_error = *v;
  if (auto v = r.Enum("on-cbw-error", {"break-guest-write", "break-snapshot"}, false)) {
    o.on_cbw_error = *v == "break-guest-write" ? backup::CbwErrorPolicy::kBreakGuestWrite
                                               : backup::CbwErrorPolicy::kBreakSnapshot;
  }
  if (auto v = r.Bool("auto-finalize", false)) o.auto_finalize = *v;
  if (auto v = r.Bool("auto-dismiss", false)) o.auto_dismiss = *v;
  if (auto v = r.String("target", true)) o.target = *v;
  out->format = r.String("format", false);
  if (auto v = r.Enum("mode", {"existing", "absolute-paths"}, false)) {
    o.mode = *v == "existing" ? backup::TargetMode::kExisting : backup::TargetMode::kAbsolutePaths;
  }
  return r.Finish();
}

// The checks QEMU makes after its QAPI layer that need no side effect, in
// QEMU's order: device lookup, format, bitmap arguments (do_backup_common),
// compression, job id, speed. What needs the world beyond a lookup (the
// target, id collisions) is the registry's.
std::optional<QmpError> CheckBackup(const Context& ctx, BackupArgs* a,
                                    backup::BitmapCatalog* catalog) {
  backup::BackupOptions& o = a->options;
  if (ctx.registry->FindDrive(o.device) == nullptr) {
    return GenericError(ENODEV,
                        "Cannot find device='" + o.device + "' nor node-name='" + o.device + "'");
  }
  if (a->format) {
    if (*a->format != "raw" && *a->format != "qcow2") {
      // Formats QEMU has but cbwfs does not write get a clear refusal; any
      // other name is QEMU's unknown format.
      static const char* const kKnown[] = {"qcow", "qed", "vmdk",      "vdi",   "vhdx", "vpc",
                                           "luks", "dmg", "parallels", "bochs", "cloop"};
      for (const char* known : kKnown) {
        if (*a->format == known) {
          return GenericError(EINVAL, "Format '" + *a->format +
                                          "' is not supported for backup targets (raw and qcow2 "
                                          "are)");
        }
      }
      return GenericError(EINVAL, "Unknown file format '" + *a->format + "'");
    }
    o.format = *a->format;
  }
  // do_backup_common's bitmap checks, against the bitmaps as they are (or,
  // in a transaction, as the earlier actions leave them).
  auto mode = catalog->UseForBackup({o.device, a->sync, a->bitmap, a->bitmap_mode});
  if (!mode.ok()) return FromStatus(mode.status(), Family::kOther, "");
  o.bitmap = a->bitmap;
  if (*mode) o.bitmap_mode = backup::ToString(**mode);
  if (a->compress) {
    return GenericError(EINVAL, "Compression is not supported for this drive " + o.device);
  }
  if (a->job_id) {
    if (!backup::IsValidId(*a->job_id)) {
      return GenericError(EINVAL, "Invalid job ID '" + *a->job_id + "'");
    }
    o.job_id = *a->job_id;
  }
  if (a->speed < 0) {
    // QEMU finds a job id in use before it looks at the speed; the registry
    // takes only a valid speed, so make the same (pure) check here first.
    const std::string& id = o.job_id.empty() ? o.device : o.job_id;
    for (const backup::JobInfo& job : ctx.registry->ListJobs()) {
      if (job.id == id) return GenericError(EBUSY, "Job ID '" + id + "' already in use");
    }
    return GenericError(EINVAL, "Parameter 'speed' expects a non-negative value");
  }
  o.speed = static_cast<uint64_t>(a->speed);
  o.sync = a->sync == "none"          ? backup::SyncMode::kNone
           : a->sync == "top"         ? backup::SyncMode::kTop
           : a->sync == "incremental" ? backup::SyncMode::kIncremental
           : a->sync == "bitmap"      ? backup::SyncMode::kBitmap
                                      : backup::SyncMode::kFull;
  if (ctx.options->vet_backup) {
    backup::Status s = ctx.options->vet_backup(&o);
    if (!s.ok()) return FromStatus(s, Family::kOther, "");
  }
  return std::nullopt;
}

Reply RunActions(const Context& ctx, const std::vector<backup::TxnAction>& actions,
                 backup::CompletionMode mode) {
  if (actions.empty()) return Return(ordered_json::object());
  backup::Status s = ctx.registry->Transaction(actions, mode);
  if (!s.ok()) return Fail(FromStatus(s, Family::kOther, ""));
  return Return(ordered_json::object());
}

Reply DriveBackup(const Context& ctx, const ordered_json& args) {
  ArgReader r(args, "");
  BackupArgs a;
  if (!ReadBackupArgs(r, &a)) return Fail(*r.error());
  backup::BitmapCatalog catalog = ctx.registry->Catalog();
  if (auto e = CheckBackup(ctx, &a, &catalog)) return Fail(std::move(*e));
  return RunActions(ctx, {{a.options, std::nullopt}}, backup::CompletionMode::kIndividual);
}

// ---- dirty bitmaps ------------------------------------------------------

using BitmapKind = backup::BitmapAction::Kind;

// Reads one bitmap command's arguments in QEMU's schema order.
bool ReadBitmapArgs(ArgReader& r, BitmapKind kind, backup::BitmapAction* out) {
  out->kind = kind;
  if (auto v = r.String("node", true)) out->node = *v;
  if (kind == BitmapKind::kMerge) {
    if (auto v = r.String("target", true)) out->name = *v;
    if (const ordered_json* list = r.Array("bitmaps", true)) {
      for (size_t i = 0; i < list->size(); ++i) {
        const ordered_json& e = (*list)[i];
        const std::string name = r.FullName("bitmaps") + "[" + std::to_string(i) + "]";
        if (e.is_string()) {
          out->sources.emplace_back("", e.get<std::string>());
        } else if (e.is_object()) {
          ArgReader er(e, name);
          auto node = er.String("node", true);
          auto bname = er.String("name", true);
          if (!er.Finish()) {
            r.SetError(*er.error());
            return false;
          }
          out->sources.emplace_back(*node, *bname);
        } else {
          r.SetError(GenericError(EINVAL, "Invalid parameter type for '" + name +
                                              "', expected: BlockDirtyBitmapOrStr"));
          return false;
        }
      }
    }
    return r.Finish();
  }
  if (auto v = r.String("name", true)) out->name = *v;
  if (kind == BitmapKind::kAdd) {
    if (auto v = r.Int("granularity", false)) {
      if (*v < 0 || *v > 0xffffffffll) {
        r.SetError(GenericError(EINVAL, "Parameter 'granularity' expects uint32_t"));
        return false;
      }
      out->granularity = static_cast<uint64_t>(*v);
    }
    if (auto v = r.Bool("persistent", false)) out->persistent = *v;
    if (auto v = r.Bool("disabled", false)) out->disabled = *v;
  }
  return r.Finish();
}

template <BitmapKind kKind>
Reply BitmapCommand(const Context& ctx, const ordered_json& args) {
  ArgReader r(args, "");
  backup::BitmapAction a;
  if (!ReadBitmapArgs(r, kKind, &a)) return Fail(*r.error());
  return RunActions(ctx, {{std::nullopt, a}}, backup::CompletionMode::kIndividual);
}

// ---- transaction --------------------------------------------------------

// One action: a drive-backup, a dirty-bitmap command, or QEMU's "abort"
// (which fails the whole transaction; handy for testing all-or-nothing).
struct Action {
  bool abort = false;
  std::optional<backup::BitmapAction> bitmap;
  BackupArgs backup;
};

constexpr std::pair<const char*, BitmapKind> kBitmapActions[] = {
    {"block-dirty-bitmap-add", BitmapKind::kAdd},
    {"block-dirty-bitmap-remove", BitmapKind::kRemove},
    {"block-dirty-bitmap-clear", BitmapKind::kClear},
    {"block-dirty-bitmap-enable", BitmapKind::kEnable},
    {"block-dirty-bitmap-disable", BitmapKind::kDisable},
    {"block-dirty-bitmap-merge", BitmapKind::kMerge},
};

Reply Transaction(const Context& ctx, const ordered_json& args) {
  // QEMU's QAPI layer reads the whole argument tree first: every action's
  // type and data, then properties, then unexpected members.
  ArgReader r(args, "");
  std::vector<Action> actions;
  if (const ordered_json* list = r.Array("actions", true)) {
    for (size_t i = 0; i < list->size(); ++i) {
      const std::string name = "actions[" + std::to_string(i) + "]";
      const ordered_json& element = (*list)[i];
      if (!element.is_object()) {
        return Fail(
            GenericError(EINVAL, "Invalid parameter type for '" + name + "', expected: object"));
      }
      ArgReader ar(element, name);
      Action action;
      std::optional<std::string> type =
          ar.Enum("type",
                  {"abort", "block-dirty-bitmap-add", "block-dirty-bitmap-clear",
                   "block-dirty-bitmap-disable", "block-dirty-bitmap-enable",
                   "block-dirty-bitmap-merge", "block-dirty-bitmap-remove", "drive-backup"},
                  true);
      const ordered_json* data = ar.Object("data", true);
      if (!ar.ok()) return Fail(*ar.error());
      ArgReader dr(*data, ar.FullName("data"));
      if (*type == "abort") {
        action.abort = true;
        dr.Finish();
      } else if (*type == "drive-backup") {
        ReadBackupArgs(dr, &action.backup);
      } else {
        for (const auto& [name, kind] : kBitmapActions) {
          if (*type != name) continue;
          action.bitmap.emplace();
          ReadBitmapArgs(dr, kind, &*action.bitmap);
        }
      }
      if (!dr.ok()) return Fail(*dr.error());
      if (!ar.Finish()) return Fail(*ar.error());
      actions.push_back(std::move(action));
    }
  }
  backup::CompletionMode mode = backup::CompletionMode::kIndividual;
  if (const ordered_json* props = r.Object("properties", false)) {
    ArgReader pr(*props, r.FullName("properties"));
    auto v = pr.Enum("completion-mode", {"individual", "grouped"}, false);
    if (!pr.Finish()) return Fail(*pr.error());
    if (v && *v == "grouped") mode = backup::CompletionMode::kGrouped;
  }
  if (!r.Finish()) return Fail(*r.error());

  // Then each action is prepared in order, each seeing what the earlier ones
  // did to the bitmaps; the first failure aborts all.
  backup::BitmapCatalog catalog = ctx.registry->Catalog();
  const bool grouped = mode == backup::CompletionMode::kGrouped;
  std::vector<backup::TxnAction> txn;
  for (Action& action : actions) {
    if (action.abort) {
      return Fail(GenericError(ECANCELED, "Transaction aborted using Abort action"));
    }
    if (action.bitmap) {
      backup::Status s = catalog.Apply(*action.bitmap, grouped);
      if (!s.ok()) return Fail(FromStatus(s, Family::kOther, ""));
      txn.push_back({std::nullopt, *action.bitmap});
      continue;
    }
    if (auto e = CheckBackup(ctx, &action.backup, &catalog)) return Fail(std::move(*e));
    txn.push_back({action.backup.options, std::nullopt});
  }
  return RunActions(ctx, txn, mode);
}

// ---- job verbs ----------------------------------------------------------

enum class Verb { kCancel, kPause, kResume, kComplete, kFinalize, kDismiss };

backup::Status ApplyVerb(backup::JobRegistry* registry, Verb verb, const std::string& id,
                         bool force) {
  switch (verb) {
    case Verb::kCancel:
      return registry->Cancel(id, force);
    case Verb::kPause:
      return registry->Pause(id);
    case Verb::kResume:
      return registry->Resume(id);
    case Verb::kComplete:
      return registry->Complete(id);
    case Verb::kFinalize:
      return registry->Finalize(id);
    case Verb::kDismiss:
      return registry->Dismiss(id);
  }
  return backup::Status::Error(EINVAL, "Unknown verb");
}

// A verb command: `{<arg>: id}`, plus `force` for block-job-cancel.
template <Verb kVerb, Family kFamily>
Reply RunVerb(const Context& ctx, const ordered_json& args) {
  const bool legacy_cancel = kVerb == Verb::kCancel && kFamily == Family::kBlockJob;
  // block-job-finalize/dismiss take `id` like the job-* commands; the other
  // block-job-* verbs take `device`.
  const char* arg =
      kFamily == Family::kBlockJob && kVerb != Verb::kFinalize && kVerb != Verb::kDismiss ? "device"
                                                                                          : "id";
  ArgReader r(args, "");
  std::optional<std::string> id = r.String(arg, true);
  // job-cancel is always forced; block-job-cancel's force defaults to false.
  bool force = !legacy_cancel;
  if (legacy_cancel) {
    if (auto v = r.Bool("force", false)) force = *v;
  }
  if (!r.Finish()) return Fail(*r.error());
  return FromVerbStatus(ApplyVerb(ctx.registry, kVerb, *id, force), kFamily, *id);
}

Reply BlockJobSetSpeed(const Context& ctx, const ordered_json& args) {
  ArgReader r(args, "");
  std::optional<std::string> device = r.String("device", true);
  std::optional<int64_t> speed = r.Int("speed", true);
  if (!r.Finish()) return Fail(*r.error());
  // The registry checks the verb before the sign, as QEMU does.
  return FromVerbStatus(ctx.registry->SetSpeed(*device, *speed), Family::kBlockJob, *device);
}

// ---- queries ------------------------------------------------------------

Reply NoArguments(const ordered_json& args) {
  ArgReader r(args, "");
  if (!r.Finish()) return Fail(*r.error());
  return Return(ordered_json::object());
}

Reply QmpCapabilities(const Context&, const ordered_json& args) {
  ArgReader r(args, "");
  const ordered_json* enable = r.Array("enable", false);
  if (!r.Finish()) return Fail(*r.error());
  if (enable != nullptr) {
    for (size_t i = 0; i < enable->size(); ++i) {
      const ordered_json& cap = (*enable)[i];
      const std::string name = "enable[" + std::to_string(i) + "]";
      if (!cap.is_string()) {
        return Fail(
            GenericError(EINVAL, "Invalid parameter type for '" + name + "', expected: string"));
      }
      if (cap.get<std::string>() != "oob") {
        return Fail(GenericError(EINVAL, "Parameter '" + name + "' does not accept value '" +
                                             cap.get<std::string>() + "'"));
      }
      return Fail(GenericError(EINVAL, "Capability 'oob' not available"));
    }
  }
  return Return(ordered_json::object());
}

Reply QueryVersion(const Context&, const ordered_json& args) {
  Reply r = NoArguments(args);
  if (r.error) return r;
  // cbwfs's own version in QMP's shape: qemu.{major,minor,micro} hold
  // cbwfs's numbers, "package" names the program.
  const char* v = CBWFS_VERSION;
  char* end = nullptr;
  long parts[3] = {0, 0, 0};
  for (long& part : parts) {
    part = std::strtol(v, &end, 10);
    if (*end != '.') break;
    v = end + 1;
  }
  ordered_json qemu;
  qemu["major"] = parts[0];
  qemu["minor"] = parts[1];
  qemu["micro"] = parts[2];
  ordered_json ret;
  ret["qemu"] = std::move(qemu);
  ret["package"] = std::string("cbwfs ") + CBWFS_VERSION;
  return Return(std::move(ret));
}

Reply QueryCommands(const Context&, const ordered_json& args);

Reply QueryBlock(const Context& ctx, const ordered_json& args) {
  Reply r = NoArguments(args);
  if (r.error) return r;
  ordered_json list = ordered_json::array();
  for (const backup::Drive* d : ctx.registry->drives()) {
    ordered_json image;
    image["filename"] = d->path();
    image["format"] = "raw";
    image["virtual-size"] = d->size();
    image["actual-size"] = d->AllocatedBytes();
    ordered_json inserted;
    inserted["file"] = d->path();
    inserted["ro"] = d->readonly();
    inserted["image"] = std::move(image);
    // QEMU lists a node's bitmaps here (BlockDeviceInfo), when it has any.
    std::vector<backup::BitmapInfo> bitmaps = ctx.registry->Bitmaps(d->name());
    if (!bitmaps.empty()) {
      ordered_json list = ordered_json::array();
      for (const auto& b : bitmaps) list.push_back(BitmapInfoJson(b));
      inserted["dirty-bitmaps"] = std::move(list);
    }
    ordered_json info;
    info["device"] = d->name();
    info["inserted"] = std::move(inserted);
    list.push_back(std::move(info));
  }
  return Return(std::move(list));
}

Reply QueryBlockJobs(const Context& ctx, const ordered_json& args) {
  Reply r = NoArguments(args);
  if (r.error) return r;
  ordered_json list = ordered_json::array();
  for (const backup::JobInfo& info : ctx.registry->ListJobs())
    list.push_back(BlockJobInfoJson(info));
  return Return(std::move(list));
}

Reply QueryJobs(const Context& ctx, const ordered_json& args) {
  Reply r = NoArguments(args);
  if (r.error) return r;
  ordered_json list = ordered_json::array();
  for (const backup::JobInfo& info : ctx.registry->ListJobs()) list.push_back(JobInfoJson(info));
  return Return(std::move(list));
}

// ---- the command table --------------------------------------------------

struct Command {
  const char* name;
  Reply (*run)(const Context&, const ordered_json& args);
};

constexpr Command kCommands[] = {
    {"qmp_capabilities", QmpCapabilities},
    {"query-version", QueryVersion},
    {"query-commands", QueryCommands},
    {"query-block", QueryBlock},
    {"drive-backup", DriveBackup},
    {"transaction", Transaction},
    {"block-dirty-bitmap-add", BitmapCommand<BitmapKind::kAdd>},
    {"block-dirty-bitmap-remove", BitmapCommand<BitmapKind::kRemove>},
    {"block-dirty-bitmap-clear", BitmapCommand<BitmapKind::kClear>},
    {"block-dirty-bitmap-enable", BitmapCommand<BitmapKind::kEnable>},
    {"block-dirty-bitmap-disable", BitmapCommand<BitmapKind::kDisable>},
    {"block-dirty-bitmap-merge", BitmapCommand<BitmapKind::kMerge>},
    {"query-block-jobs", QueryBlockJobs},
    {"query-jobs", QueryJobs},
    {"block-job-set-speed", BlockJobSetSpeed},
    {"block-job-cancel", RunVerb<Verb::kCancel, Family::kBlockJob>},
    {"block-job-pause", RunVerb<Verb::kPause, Family::kBlockJob>},
    {"block-job-resume", RunVerb<Verb::kResume, Family::kBlockJob>},
    {"block-job-complete", RunVerb<Verb::kComplete, Family::kBlockJob>},
    {"block-job-finalize", RunVerb<Verb::kFinalize, Family::kBlockJob>},
    {"block-job-dismiss", RunVerb<Verb::kDismiss, Family::kBlockJob>},
    {"job-pause", RunVerb<Verb::kPause, Family::kJob>},
    {"job-resume", RunVerb<Verb::kResume, Family::kJob>},
    {"job-cancel", RunVerb<Verb::kCancel, Family::kJob>},
    {"job-complete", RunVerb<Verb::kComplete, Family::kJob>},
    {"job-finalize", RunVerb<Verb::kFinalize, Family::kJob>},
    {"job-dismiss", RunVerb<Verb::kDismiss, Family::kJob>},
};

Reply QueryCommands(const Context&, const ordered_json& args) {
  Reply r = NoArguments(args);
  if (r.error) return r;
  ordered_json list = ordered_json::array();
  for (const Command& c : kCommands) {
    ordered_json entry;
    entry["name"] = c.name;
    list.push_back(std::move(entry));
  }
  return Return(std::move(list));
}

// ---- one command --------------------------------------------------------

std::string ReplyText(const Reply& reply, const ordered_json* id) {
  ordered_json line;
  if (reply.error) {
    ordered_json error;
    error["class"] = reply.error->cls;
    error["desc"] = reply.error->desc;
    line["error"] = std::move(error);
  } else {
    line["return"] = reply.ret;
  }
  if (id != nullptr) line["id"] = *id;
  return ToQmpText(line) + "\n";
}

// Checks the envelope as QEMU's dispatcher does, then runs the command if
// `set` offers it.
Reply RunCommand(const Context& ctx, const ordered_json& cmd, std::string* name,
                 CommandSet set = CommandSet::kAll) {
  const ordered_json* execute = nullptr;
  const ordered_json* arguments = nullptr;
  for (const auto& [key, value] : cmd.items()) {
    if (key == "execute") {
      if (!value.is_string()) {
        return Fail(GenericError(EINVAL, "QMP input member 'execute' must be a string"));
      }
      execute = &value;
    } else if (key == "arguments") {
      if (!value.is_object()) {
        return Fail(GenericError(EINVAL, "QMP input member 'arguments' must be an object"));
      }
      arguments = &value;
    } else if (key != "id") {
      return Fail(GenericError(EINVAL, "QMP input member '" + key + "' is unexpected"));
    }
  }
  if (execute == nullptr) return Fail(GenericError(EINVAL, "QMP input lacks member 'execute'"));
  *name = execute->get<std::string>();
  static const ordered_json kNoArguments = ordered_json::object();
  for (const Command& c : kCommands) {
    if (set == CommandSet::kNegotiation && c.run != QmpCapabilities) continue;
    if (*name == c.name) return c.run(ctx, arguments != nullptr ? *arguments : kNoArguments);
  }
  return Fail(
      QmpError{EOPNOTSUPP, "CommandNotFound", "The command " + *name + " has not been found"});
}

}  // namespace

Dispatcher::Dispatcher(backup::JobRegistry* registry) : registry_(registry) {}

Dispatcher::Dispatcher(backup::JobRegistry* registry, DispatcherOptions options)
    : registry_(registry), options_(std::move(options)) {}

WriteOutcome Dispatcher::Execute(std::string_view bytes) {
  WriteOutcome out;
  ParsedWrite parsed = ParseWrite(bytes);
  if (parsed.error != 0) {
    // Refused as a whole: nothing ran, so `responses` stays empty (see the
    // header); the reason goes to last_reply for `cat control`.
    QmpError e = GenericError(parsed.error, parsed.message);
    LogErrorReply("control", "", e);
    out.error = e.err;
    out.last_reply = ReplyText(Fail(e), nullptr);
    return out;
  }
  const Context ctx{registry_, &options_};
  for (const ordered_json& cmd : parsed.commands) {
    std::string name;
    Reply reply = RunCommand(ctx, cmd, &name);
    auto id = cmd.find("id");
    std::string line = ReplyText(reply, id != cmd.end() ? &*id : nullptr);
    out.responses += line;
    if (reply.error) {
      LogErrorReply("control", name, *reply.error);
      out.error = reply.error->err;
      out.last_reply = std::move(line);
      break;
    }
    out.last_reply = std::move(line);
  }
  return out;
}

CommandOutcome Dispatcher::ExecuteCommand(const ordered_json& command, CommandSet set) {
  const Context ctx{registry_, &options_};
  CommandOutcome out;
  Reply reply = RunCommand(ctx, command, &out.name, set);
  out.error = std::move(reply.error);
  out.ret = std::move(reply.ret);
  return out;
}

std::string Dispatcher::ReplyLine(const CommandOutcome& outcome, const ordered_json* id) {
  Reply reply;
  reply.error = outcome.error;
  reply.ret = outcome.ret;
  return ReplyText(reply, id);
}

}  // namespace cbw::control
