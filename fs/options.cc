#include "fs/options.h"

#include <algorithm>
#include <boost/program_options.hpp>
#include <cctype>
#include <cerrno>
#include <fstream>
#include <set>
#include <sstream>

#include "backup/ids.h"

namespace cbw::fs {
namespace po = boost::program_options;
using backup::Status;

namespace {

const std::set<std::string> kReservedNames = {"control", "events", "jobs", "snapshots", "metrics"};

// The options a config file may set too (all but --config, --help, --version).
po::options_description Settings() {
  po::options_description d;
  d.add_options()  //
      ("drive",
       po::value<std::vector<std::string>>()->composing()->value_name("NAME=PATH[,readonly=on]"),
       "a source image or block device, shown as MOUNTPOINT/NAME (repeatable, at least one)")  //
      ("foreground,f", po::bool_switch(),
       "stay in the foreground and log to stderr (else detach once the mount is live)")  //
      ("mount-options,o",
       po::value<std::vector<std::string>>()->composing()->value_name("OPT[,OPT...]"),
       "FUSE mount options (e.g. allow_other), and cbwfs's own writeback_cache: let the "
       "kernel cache drive writes (off by default; see cbwfs(1))")  //
      ("cluster-size", po::value<std::string>()->value_name("BYTES"),
       "CBW granularity, a power of two from 4K to 16M (default 64K)")  //
      ("cbw-buffer", po::value<std::string>()->value_name("BYTES"),
       "memory per job for copy-before-write data not yet in the target, so drive writes "
       "need not wait for it (on-cbw-error break-snapshot only; default 64M, 0: off)")  //
      ("state-dir", po::value<std::string>()->value_name("DIR"),
       "keep job records in DIR across restarts")  //
      ("qmp", po::value<std::string>()->value_name("PATH"),
       "also serve QMP on a unix socket at PATH (mode 0600), for qmp-shell and other QMP "
       "clients")  //
      ("log-file", po::value<std::string>()->value_name("PATH"),
       "append log messages to PATH ('-': stderr, kept when detached); default: stderr in "
       "the foreground, syslog once detached")  //
      ("log-level", po::value<std::string>()->value_name("LEVEL"),
       "error, warn, info (default) or debug");
  return d;
}

po::options_description Describe() {
  po::options_description d("Options");
  const po::options_description settings = Settings();
  for (const auto& option : settings.options()) d.add(option);
  d.add_options()  //
      ("config", po::value<std::string>()->value_name("FILE"),
       "read options from FILE, one 'option = value' a line (e.g. 'drive = vm=/img/vm.raw', "
       "'mountpoint = /mnt/cbw'); options on the command line override it")  //
      ("help,h", "show this help")                                           //
      ("version,V", "show the version");
  return d;
}

Status Usage(const std::string& msg) { return Status::Error(EINVAL, msg); }

}  // namespace

bool ParseSize(const std::string& text, uint64_t* bytes) {
  if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0]))) return false;
  size_t pos = 0;
  uint64_t v = 0;
  while (pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos]))) {
    if (v > (UINT64_MAX - 9) / 10) return false;
    v = v * 10 + static_cast<uint64_t>(text[pos++] - '0');
  }
  std::string suffix = text.substr(pos);
  uint64_t mult = 1;
  if (suffix == "K" || suffix == "k") {
    mult = 1024;
  } else if (suffix == "M" || suffix == "m") {
    mult = 1024 * 1024;
  } else if (suffix == "G" || suffix == "g") {
    mult = 1024ull * 1024 * 1024;
  } else if (!suffix.empty()) {
    return false;
  }
  if (v > UINT64_MAX / mult) return false;
  *bytes = v * mult;
  return true;
}

std::string UsageText() {
  std::ostringstream out;
  out << "Usage: cbwfs [OPTIONS] --drive NAME=PATH [--drive NAME=PATH ...] MOUNTPOINT\n"
         "       cbwfs --config FILE [OPTIONS]\n\n"
         "Shows each drive as MOUNTPOINT/NAME behind a copy-before-write interposer and\n"
         "takes QMP drive-backup commands written into MOUNTPOINT/control (or sent to the\n"
         "--qmp socket). MOUNTPOINT/events streams QMP events, jobs/ holds job records,\n"
         "snapshots/ point-in-time views, metrics Prometheus counters.\n\n"
      << Describe()
      << "\nUnmount with `fusermount3 -u MOUNTPOINT` or SIGTERM (which waits for open drives to\n"
         "close; a second one stops at once). Without -f, cbwfs returns once the mount is\n"
         "live. Exit status: 0 after a clean unmount, 2 for a usage error, 1 for any other\n"
         "failure. See cbwfs(1).\n";
  return out.str();
}

backup::Result<Options> ParseOptions(int argc, char** argv) {
  po::options_description desc = Describe();
  po::options_description hidden;
  hidden.add_options()("mountpoint", po::value<std::vector<std::string>>());
  po::options_description all;
  all.add(desc).add(hidden);
  po::positional_options_description pos;
  pos.add("mountpoint", -1);

  po::variables_map vm;
  try {
    po::store(
        po::command_line_parser(argc, argv)
            .options(all)
            .positional(pos)
            .style(po::command_line_style::default_style & ~po::command_line_style::allow_guessing)
            .run(),
        vm);
    if (vm.count("help") || vm.count("version")) {
      Options o;
      o.help = vm.count("help") > 0;
      o.version = vm.count("version") > 0;
      return o;
    }
    if (vm.count("config")) {
      const std::string path = vm["config"].as<std::string>();
      if (path.empty()) return Usage("--config: empty FILE");
      std::ifstream in(path);
      if (!in) return Status::FromErrno(errno, "config file '" + path + "'");
      po::options_description file_options;
      file_options.add(Settings()).add(hidden);
      po::parsed_options parsed(nullptr);
      try {
        parsed = po::parse_config_file(in, file_options, /*allow_unregistered=*/false);
      } catch (const po::error& e) {
        return Usage("config file '" + path + "': " + e.what());
      }
      if (in.bad()) return Status::FromErrno(EIO, "config file '" + path + "'");
      // The command line wins, for repeatable options too: drop the file's
      // values of every option given there.
      auto& opts = parsed.options;
      opts.erase(std::remove_if(opts.begin(), opts.end(),
                                [&](const po::option& opt) {
                                  auto it = vm.find(opt.string_key);
                                  return it != vm.end() && !it->second.defaulted();
                                }),
                 opts.end());
      try {
        po::store(parsed, vm);
      } catch (const po::error& e) {
        return Usage("config file '" + path + "': " + e.what());
      }
    }
    po::notify(vm);
  } catch (const po::error& e) {
    return Usage(e.what());
  }

  Options o;
  o.foreground = vm["foreground"].as<bool>();
  if (vm.count("config")) o.config_file = vm["config"].as<std::string>();

  if (vm.count("mountpoint")) {
    const auto& mps = vm["mountpoint"].as<std::vector<std::string>>();
    if (mps.size() > 1) return Usage("unexpected argument '" + mps[1] + "': one MOUNTPOINT only");
    o.mountpoint = mps[0];
  }
  if (o.mountpoint.empty()) return Usage("missing MOUNTPOINT");

  std::set<std::string> names;
  if (vm.count("drive")) {
    for (const std::string& spec : vm["drive"].as<std::vector<std::string>>()) {
      backup::DriveConfig dc;
      size_t eq = spec.find('=');
      if (eq == std::string::npos) {
        return Usage("--drive '" + spec + "': expected NAME=PATH[,readonly=on]");
      }
      dc.name = spec.substr(0, eq);
      std::string rest = spec.substr(eq + 1);
      // Trailing ",readonly=on|off"; a path may itself contain commas.
      for (;;) {
        size_t comma = rest.rfind(',');
        if (comma == std::string::npos) break;
        std::string opt = rest.substr(comma + 1);
        if (opt == "readonly=on") {
          dc.readonly = true;
        } else if (opt == "readonly=off") {
          dc.readonly = false;
        } else if (opt.rfind("readonly=", 0) == 0) {
          return Usage("--drive '" + spec + "': readonly takes on or off");
        } else {
          break;
        }
        rest.resize(comma);
      }
      dc.path = rest;
      if (!backup::IsValidId(dc.name)) {
        return Usage("--drive '" + spec + "': invalid drive name '" + dc.name +
                     "' (a letter, then letters, digits, '-', '.', '_'; at most 64)");
      }
      if (kReservedNames.count(dc.name)) {
        return Usage("--drive '" + spec + "': the name '" + dc.name + "' is reserved");
      }
      if (!names.insert(dc.name).second) {
        return Usage("--drive '" + spec + "': drive name '" + dc.name + "' given twice");
      }
      if (dc.path.empty()) return Usage("--drive '" + spec + "': empty PATH");
      o.drives.push_back(std::move(dc));
    }
  }
  if (o.drives.empty()) return Usage("at least one --drive NAME=PATH is required");

  if (vm.count("mount-options")) {
    for (const std::string& group : vm["mount-options"].as<std::vector<std::string>>()) {
      std::stringstream ss(group);
      std::string opt;
      while (std::getline(ss, opt, ',')) {
        // cbwfs's own mount options: libfuse's session parser would refuse
        // them (it takes no writeback_cache of its own since 3.0).
        if (opt == "writeback_cache") {
          o.writeback_cache = true;
        } else if (opt == "no_writeback_cache") {
          o.writeback_cache = false;
        } else if (!opt.empty()) {
          o.mount_options.push_back(opt);
        }
      }
    }
  }
  if (vm.count("cluster-size")) {
    const std::string& text = vm["cluster-size"].as<std::string>();
    uint64_t v = 0;
    if (!ParseSize(text, &v) || v < 4096 || v > (16u << 20) || (v & (v - 1)) != 0) {
      return Usage("--cluster-size '" + text +
                   "': must be a power of two from 4K to 16M (suffixes K, M)");
    }
    o.cluster_size = v;
  }
  if (vm.count("cbw-buffer")) {
    const std::string& text = vm["cbw-buffer"].as<std::string>();
    uint64_t v = 0;
    if (!ParseSize(text, &v) || v > (64ull << 30)) {
      return Usage("--cbw-buffer '" + text + "': a size up to 64G (suffixes K, M, G), or 0");
    }
    o.cbw_buffer_bytes = v;
  }
  if (vm.count("state-dir")) {
    o.state_dir = vm["state-dir"].as<std::string>();
    if (o.state_dir.empty()) return Usage("--state-dir: empty DIR");
  }
  if (vm.count("qmp")) {
    o.qmp_path = vm["qmp"].as<std::string>();
    if (o.qmp_path.empty()) return Usage("--qmp: empty PATH");
  }
  if (vm.count("log-file")) {
    o.log_file = vm["log-file"].as<std::string>();
    if (o.log_file.empty()) return Usage("--log-file: empty PATH");
  }
  if (vm.count("log-level")) {
    const std::string& l = vm["log-level"].as<std::string>();
    if (l == "error") {
      o.log_level = backup::LogLevel::kError;
    } else if (l == "warn") {
      o.log_level = backup::LogLevel::kWarn;
    } else if (l == "info") {
      o.log_level = backup::LogLevel::kInfo;
    } else if (l == "debug") {
      o.log_level = backup::LogLevel::kDebug;
    } else {
      return Usage("--log-level '" + l + "': expected error, warn, info or debug");
    }
  }
  return o;
}

}  // namespace cbw::fs
