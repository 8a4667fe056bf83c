#include "tests/control/control_env.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace cbw::control::testing {

using nlohmann::ordered_json;

ControlEnv::ControlEnv() {
  char tmpl[] = "/tmp/cbw-control-test.XXXXXX";
  if (mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
  dir_ = tmpl;
  std::vector<backup::Drive*> raw;
  for (int i = 0; i < 2; ++i) {
    std::string data(kDriveSize, '\0');
    for (size_t off = 0; off < data.size(); ++off) {
      data[off] = static_cast<char>(1 + (off / 4096 + i * 7) % 251);
    }
    std::ofstream(drive_path(i), std::ios::binary) << data;
    auto d = backup::Drive::Open({"drive" + std::to_string(i), drive_path(i), false});
    if (!d.ok()) throw std::runtime_error("Drive::Open: " + d.status().message());
    raw.push_back(d->get());
    drives_.push_back(std::move(*d));
  }
  bus_ = std::make_unique<backup::EventBus>();
  backup::RegistryOptions options;
  options.mountpoint = dir_ + "/mnt";
  options.base_dir = dir_;
  registry_ = std::make_unique<backup::JobRegistry>(raw, bus_.get(), options);
  dispatcher_ = std::make_unique<Dispatcher>(registry_.get());
}

ControlEnv::~ControlEnv() {
  dispatcher_.reset();
  registry_.reset();
  bus_.reset();
  drives_.clear();
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

std::optional<backup::JobInfo> ControlEnv::FindJob(const std::string& id) {
  for (const backup::JobInfo& info : registry_->ListJobs()) {
    if (info.id == id) return info;
  }
  return std::nullopt;
}

bool ControlEnv::WaitFor(const std::function<bool()>& pred) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(15);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

bool ControlEnv::WaitForStatus(const std::string& id, backup::JobStatus status) {
  return WaitFor([&] {
    auto job = FindJob(id);
    return job && job->status == status;
  });
}

bool ControlEnv::WaitForEnd(const std::string& id) {
  return WaitFor([&] {
    auto file = registry_->GetJobFile(id);
    return !FindJob(id) && file && file->result != backup::JobResult::kNone;
  });
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool FileExists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

std::string ReadExample(const std::string& name) {
  std::string path = std::string(CBW_EXAMPLES_DIR) + "/" + name;
  if (!FileExists(path)) throw std::runtime_error("no example " + path);
  return ReadFile(path);
}

namespace {

bool Rewrite(ordered_json& args, const std::string& dir, const ordered_json& overrides) {
  bool changed = false;
  auto target = args.find("target");
  if (target != args.end() && target->is_string()) {
    *target = dir + "/" + std::filesystem::path(target->get<std::string>()).filename().string();
    changed = true;
  }
  for (const auto& [key, value] : overrides.items()) {
    args[key] = value;
    changed = true;
  }
  return changed;
}

}  // namespace

std::string Example(const std::string& name, const std::string& dir,
                    const std::string& overrides_json) {
  std::string text = ReadExample(name);
  ordered_json overrides = ordered_json::parse(overrides_json);
  // Examples may hold several commands; split them as a reader would.
  std::vector<ordered_json> commands;
  std::stringstream in(text);
  bool changed = false;
  while (true) {
    in >> std::ws;
    if (in.peek() == EOF) break;
    ordered_json cmd;
    in >> cmd;
    auto args = cmd.find("arguments");
    if (args != cmd.end()) {
      auto actions = args->find("actions");
      if (actions != args->end()) {
        for (auto& action : *actions) changed |= Rewrite(action["data"], dir, overrides);
      } else {
        changed |= Rewrite(*args, dir, overrides);
      }
    }
    commands.push_back(std::move(cmd));
  }
  if (!changed) return text;
  std::string out;
  for (const auto& cmd : commands) out += cmd.dump() + "\n";
  return out;
}

}  // namespace cbw::control::testing
