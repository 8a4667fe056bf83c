#include "cbwctl/mounts.h"

namespace cbw::ctl {

namespace {

std::string Unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '3' && s[i + 2] >= '0' &&
        s[i + 2] <= '7' && s[i + 3] >= '0' && s[i + 3] <= '7') {
      out += static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0'));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

std::vector<std::string_view> Fields(std::string_view line) {
  std::vector<std::string_view> f;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && line[i] == ' ') ++i;
    size_t start = i;
    while (i < line.size() && line[i] != ' ') ++i;
    if (i > start) f.push_back(line.substr(start, i - start));
  }
  return f;
}

}  // namespace

std::vector<std::string> CbwfsMounts(std::string_view mountinfo) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < mountinfo.size()) {
    size_t nl = mountinfo.find('\n', pos);
    if (nl == std::string_view::npos) nl = mountinfo.size();
    std::vector<std::string_view> f = Fields(mountinfo.substr(pos, nl - pos));
    pos = nl + 1;
    // id parent major:minor root mountpoint options [optional...] - fstype source super
    for (size_t i = 6; i + 1 < f.size(); ++i) {
      if (f[i] != "-") continue;
      if (f[i + 1] == "fuse.cbwfs") out.push_back(Unescape(f[4]));
      break;
    }
  }
  return out;
}

Result<std::string> ChooseMountpoint(const std::optional<std::string>& flag, const char* env,
                                     std::string_view mountinfo) {
  if (flag) return *flag;
  if (env != nullptr && *env != '\0') return std::string(env);
  std::vector<std::string> found = CbwfsMounts(mountinfo);
  if (found.size() == 1) return found[0];
  if (found.empty()) {
    return Error{kExitMount, "no cbwfs mount found; name one with -m MOUNTPOINT (or $CBWFS_MOUNT)"};
  }
  std::string list;
  for (const auto& m : found) list += (list.empty() ? "" : ", ") + m;
  return Error{kExitMount, "several cbwfs mounts (" + list + "); choose one with -m MOUNTPOINT"};
}

}  // namespace cbw::ctl
