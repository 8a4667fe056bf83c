#include "cbwctl/cli.h"

#include <cmath>
#include <cstdlib>

namespace cbw::ctl {

namespace {

// Which commands an option applies to (a bit mask of 1 << Verb).
constexpr unsigned Bit(Verb v) { return 1u << static_cast<unsigned>(v); }
constexpr unsigned kAnyVerb = ~0u;

struct OptionSpec {
  std::string_view long_name;  // without "--"
  char short_name;             // 0: none
  bool has_value;
  unsigned verbs;
};

constexpr OptionSpec kOptions[] = {
    {"mount", 'm', true, kAnyVerb},
    {"help", 'h', false, kAnyVerb},
    {"version", 'V', false, kAnyVerb},
    {"quiet", 'q', false, Bit(Verb::kBackup) | Bit(Verb::kWait)},
    {"json", 0, false, Bit(Verb::kStatus)},
    {"sync", 0, true, Bit(Verb::kBackup)},
    {"speed", 0, true, Bit(Verb::kBackup)},
    {"bitmap", 0, true, Bit(Verb::kBackup)},
    {"bitmap-mode", 0, true, Bit(Verb::kBackup)},
    {"job-id", 0, true, Bit(Verb::kBackup)},
    {"format", 0, true, Bit(Verb::kBackup)},
    {"mode", 0, true, Bit(Verb::kBackup)},
    {"wait", 0, false, Bit(Verb::kBackup)},
    {"granularity", 0, true, Bit(Verb::kBitmap)},
    {"persistent", 0, false, Bit(Verb::kBitmap)},
    {"disabled", 0, false, Bit(Verb::kBitmap)},
};

struct Given {
  const OptionSpec* spec;
  std::string value;
};

const OptionSpec* FindLong(std::string_view name) {
  for (const auto& o : kOptions) {
    if (o.long_name == name) return &o;
  }
  return nullptr;
}

const OptionSpec* FindShort(char c) {
  for (const auto& o : kOptions) {
    if (o.short_name == c) return &o;
  }
  return nullptr;
}

std::optional<Verb> VerbOf(std::string_view word) {
  if (word == "backup") return Verb::kBackup;
  if (word == "status") return Verb::kStatus;
  if (word == "wait") return Verb::kWait;
  if (word == "cancel") return Verb::kCancel;
  if (word == "bitmap") return Verb::kBitmap;
  if (word == "help") return Verb::kHelp;
  return std::nullopt;
}

std::string Joined(const std::vector<std::string_view>& words) {
  std::string out;
  for (size_t i = 0; i < words.size(); ++i) {
    if (i) out += i + 1 == words.size() ? " or " : ", ";
    out += words[i];
  }
  return out;
}

// Checks `value` against the choices SPEC 2.3 and 7 list for `option`.
std::optional<Error> CheckChoice(std::string_view option, const std::string& value,
                                 const std::vector<std::string_view>& choices) {
  for (auto c : choices) {
    if (value == c) return std::nullopt;
  }
  return UsageError("--" + std::string(option) + ": '" + value + "' is not " + Joined(choices));
}

Error WrongCount(std::string_view verb, std::string_view wants) {
  return UsageError(std::string(verb) + " takes " + std::string(wants));
}

}  // namespace

std::optional<uint64_t> ParseSize(std::string_view text) {
  size_t i = 0;
  bool dot = false;
  size_t digits = 0;
  while (i < text.size() && (isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) {
    if (text[i] == '.') {
      if (dot) return std::nullopt;
      dot = true;
    } else {
      ++digits;
    }
    ++i;
  }
  if (digits == 0) return std::nullopt;
  std::string number(text.substr(0, i));
  std::string_view suffix = text.substr(i);
  long double scale = 1;
  if (!suffix.empty()) {
    switch (suffix[0]) {
      case 'k':
      case 'K':
        scale = 1024.0L;
        break;
      case 'm':
      case 'M':
        scale = 1024.0L * 1024;
        break;
      case 'g':
      case 'G':
        scale = 1024.0L * 1024 * 1024;
        break;
      case 't':
      case 'T':
        scale = 1024.0L * 1024 * 1024 * 1024;
        break;
      default:
        return std::nullopt;
    }
    suffix.remove_prefix(1);
    if (!suffix.empty() && suffix != "iB" && suffix != "B") return std::nullopt;
  }
  if (dot && scale == 1) return std::nullopt;  // "1.5" bytes means nothing
  long double value = std::strtold(number.c_str(), nullptr) * scale;
  if (!(value < 9223372036854775808.0L)) return std::nullopt;  // QMP integers are int64
  return static_cast<uint64_t>(std::floor(value));
}

std::string ResolveTarget(const std::string& target, const std::string& cwd) {
  if (target.empty() || target[0] == '/') return target;
  if (target.rfind("nbd://", 0) == 0 || target.rfind("nbd+unix://", 0) == 0 ||
      target.rfind("rbd:", 0) == 0) {
    return target;
  }
  std::string rel = target;
  while (rel.rfind("./", 0) == 0) rel.erase(0, 2);
  if (rel.empty() || rel == ".") return cwd;
  return cwd == "/" ? "/" + rel : cwd + "/" + rel;
}

Result<Invocation> ParseArgs(const std::vector<std::string>& args) {
  std::vector<Given> given;
  std::vector<std::string> words;
  bool options_done = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (options_done || a.size() < 2 || a[0] != '-') {
      words.push_back(a);
      continue;
    }
    if (a == "--") {
      options_done = true;
      continue;
    }
    const OptionSpec* spec;
    std::optional<std::string> inline_value;
    std::string shown;
    if (a[1] == '-') {
      std::string_view body = std::string_view(a).substr(2);
      size_t eq = body.find('=');
      if (eq != std::string_view::npos) {
        inline_value = std::string(body.substr(eq + 1));
        body = body.substr(0, eq);
      }
      spec = FindLong(body);
      shown = "--" + std::string(body);
    } else {
      spec = FindShort(a[1]);
      shown = a.substr(0, 2);
      if (a.size() > 2) inline_value = a.substr(2);
    }
    if (spec == nullptr) return UsageError("unknown option '" + shown + "'");
    if (spec->has_value) {
      if (!inline_value) {
        if (i + 1 >= args.size()) return UsageError("option '" + shown + "' needs a value");
        inline_value = args[++i];
      }
    } else if (inline_value) {
      return UsageError("option '" + shown + "' takes no value");
    }
    given.push_back({spec, inline_value.value_or("")});
  }

  Invocation inv;
  for (const auto& g : given) {
    if (g.spec->long_name == "help") return inv;  // kHelp
  }
  for (const auto& g : given) {
    if (g.spec->long_name == "version") {
      inv.verb = Verb::kVersion;
      return inv;
    }
  }
  if (words.empty()) return UsageError("no command given");
  std::optional<Verb> verb = VerbOf(words[0]);
  if (!verb) return UsageError("unknown command '" + words[0] + "'");
  inv.verb = *verb;
  if (inv.verb == Verb::kHelp) return inv;

  for (const auto& g : given) {
    const std::string name(g.spec->long_name);
    if (!(g.spec->verbs & Bit(inv.verb))) {
      return UsageError("option '--" + name + "' does not apply to '" + words[0] + "'");
    }
    const std::string& v = g.value;
    if (name == "mount") {
      if (v.empty()) return UsageError("option '--mount' needs a non-empty value");
      inv.mountpoint = v;
    } else if (name == "quiet") {
      inv.quiet = true;
    } else if (name == "json") {
      inv.json = true;
    } else if (name == "sync") {
      if (auto e = CheckChoice(name, v, {"full", "top", "none", "incremental", "bitmap"})) {
        return *e;
      }
      inv.backup.sync = v;
    } else if (name == "speed") {
      auto s = ParseSize(v);
      if (!s) {
        return UsageError("--speed: '" + v +
                          "' is not a rate in bytes/s (a number with an optional K, M, G or T "
                          "suffix)");
      }
      inv.backup.speed = *s;
    } else if (name == "bitmap") {
      inv.backup.bitmap = v;
    } else if (name == "bitmap-mode") {
      if (auto e = CheckChoice(name, v, {"on-success", "never", "always"})) return *e;
      inv.backup.bitmap_mode = v;
    } else if (name == "job-id") {
      inv.backup.job_id = v;
    } else if (name == "format") {
      inv.backup.format = v;
    } else if (name == "mode") {
      if (auto e = CheckChoice(name, v, {"absolute-paths", "existing"})) return *e;
      inv.backup.mode = v;
    } else if (name == "wait") {
      inv.backup.wait = true;
    } else if (name == "granularity") {
      auto s = ParseSize(v);
      if (!s) return UsageError("--granularity: '" + v + "' is not a size");
      inv.bitmap.granularity = *s;
    } else if (name == "persistent") {
      inv.bitmap.persistent = true;
    } else if (name == "disabled") {
      inv.bitmap.disabled = true;
    }
  }

  const size_t n = words.size() - 1;  // operands after the command word
  switch (inv.verb) {
    case Verb::kBackup:
      if (n != 2) return WrongCount("backup", "DRIVE and TARGET");
      inv.backup.drive = words[1];
      inv.backup.target = words[2];
      if (inv.backup.target.empty()) return UsageError("backup: TARGET is empty");
      if (inv.backup.sync.empty()) inv.backup.sync = inv.backup.bitmap ? "incremental" : "full";
      if (inv.quiet && !inv.backup.wait) return UsageError("option '--quiet' needs '--wait'");
      break;
    case Verb::kStatus:
      if (n > 1) return WrongCount("status", "at most one JOB");
      if (n == 1) inv.job = words[1];
      break;
    case Verb::kWait:
    case Verb::kCancel:
      if (n != 1) return WrongCount(words[0], "one JOB");
      inv.job = words[1];
      break;
    case Verb::kBitmap: {
      if (n != 3) return WrongCount("bitmap", "add|remove|clear, DRIVE and NAME");
      const std::string& op = words[1];
      if (op == "add") {
        inv.bitmap.op = BitmapOp::kAdd;
      } else if (op == "remove") {
        inv.bitmap.op = BitmapOp::kRemove;
      } else if (op == "clear") {
        inv.bitmap.op = BitmapOp::kClear;
      } else {
        return UsageError("bitmap: '" + op + "' is not add, remove or clear");
      }
      if (op != "add" && (inv.bitmap.granularity || inv.bitmap.persistent || inv.bitmap.disabled)) {
        return UsageError("--granularity, --persistent and --disabled apply to 'bitmap add' only");
      }
      inv.bitmap.drive = words[2];
      inv.bitmap.name = words[3];
      break;
    }
    case Verb::kHelp:
    case Verb::kVersion:
      break;
  }
  // A job id becomes a path under the mount: refuse what would walk
  // elsewhere (the daemon's ids never contain '/').
  for (const std::string& id : {inv.job, inv.backup.JobId()}) {
    if (id.find('/') != std::string::npos || id == "." || id == "..") {
      return UsageError("'" + id + "' is not a valid job id");
    }
  }
  return inv;
}

std::string HelpText() {
  return R"(Usage: cbwctl [-m MOUNTPOINT] COMMAND [ARGUMENTS] [OPTIONS]

Starts and follows backups of a mounted cbwfs. cbwctl only uses the mount's
files: QMP commands through MOUNTPOINT/control, records in MOUNTPOINT/jobs/,
and MOUNTPOINT/events.

Commands:
  backup DRIVE TARGET   start a drive-backup of DRIVE into TARGET
      --sync MODE         full, top, none, incremental or bitmap (default full,
                          or incremental when --bitmap is given)
      --speed RATE        rate limit in bytes/s, suffixes K, M, G, T (powers of
                          1024; 100M = 104857600); 0 = unlimited (the default)
      --bitmap NAME       the dirty bitmap for incremental/bitmap sync
      --bitmap-mode MODE  on-success, never or always
      --job-id ID         the job's id (default: DRIVE)
      --format FMT        raw or qcow2 (default: raw, or probed with --mode existing)
      --mode MODE         absolute-paths (create or truncate TARGET; the default)
                          or existing (TARGET must exist)
      --wait              then follow the job to its end, as 'wait' does
  status [JOB]          show JOB's record, or a table of every job
      --json              the records as JSON, one per line, as jobs/<id> holds them
  wait JOB              follow JOB until it ends; a job that has already ended
                        is reported at once
  cancel JOB            cancel JOB (job-cancel); returns once the daemon accepts it
  bitmap add|remove|clear DRIVE NAME
                        block-dirty-bitmap-add/-remove/-clear of bitmap NAME on DRIVE
      --granularity SIZE, --persistent, --disabled   (add only)

Options:
  -m, --mount MOUNTPOINT  the cbwfs mount. Default: $CBWFS_MOUNT, else the only
                          cbwfs mount (fstype fuse.cbwfs) in /proc/self/mountinfo
  -q, --quiet             no progress output while waiting (backup --wait, wait)
  -h, --help              this text
  -V, --version           cbwctl's version

While waiting, a terminal shows a progress bar redrawn in place (percent, bytes
done/total, rate, ETA); otherwise a plain line is printed every 5 s, when the
job's status changes, and at the end. Ctrl-C stops waiting; the job goes on.
A relative local TARGET is taken relative to cbwctl's working directory and sent
as an absolute path; nbd://, nbd+unix:// and rbd: targets are sent as given.
Errors show the daemon's QMP error text.

Exit status:
  0    success; for backup --wait and wait: the job succeeded
  1    the job failed (its error is shown)
  2    usage error
  3    the job was cancelled
  4    the daemon refused the command (its error is shown), or no such job
  5    no usable mount (none found, several found, I/O error, the daemon stopped)
       or the job's record vanished while waiting
  130  interrupted by Ctrl-C while waiting; the job keeps running
)";
}

}  // namespace cbw::ctl
