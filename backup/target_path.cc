#include "backup/target_path.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <deque>
#include <vector>

namespace cbw::backup {
namespace {

constexpr int kMaxSymlinks = 40;

std::deque<std::string> Split(const std::string& p) {
  std::deque<std::string> out;
  size_t i = 0;
  while (i <= p.size()) {
    size_t j = p.find('/', i);
    if (j == std::string::npos) j = p.size();
    if (j > i) out.push_back(p.substr(i, j - i));
    i = j + 1;
  }
  return out;
}

Status UnderMount(const std::string& raw, const std::string& mountpoint) {
  return Status::Error(EINVAL, "Target '" + raw + "' is under the mountpoint '" +
                                   (mountpoint.empty() ? std::string("(cbwfs)") : mountpoint) +
                                   "'");
}

std::string Join(const std::string& dir, const std::string& name) {
  return (dir == "/" ? "" : dir) + "/" + name;
}

}  // namespace

bool IsPathUnder(const std::string& path, const std::string& dir) {
  if (dir.empty()) return false;
  if (dir == "/") return true;
  if (path == dir) return true;
  return path.size() > dir.size() && path.compare(0, dir.size(), dir) == 0 &&
         path[dir.size()] == '/';
}

Result<ResolvedPath> ResolvePath(const std::string& raw, const std::string& base_dir,
                                 const std::string& mountpoint, dev_t mount_dev) {
  if (raw.empty()) return Status::Error(EINVAL, "Target path is empty");
  std::string full = raw[0] == '/' ? raw : (base_dir.empty() ? "/" : base_dir) + "/" + raw;
  // A path that names the mount literally is refused before any lookup.
  {
    std::string text;
    for (const auto& c : Split(full)) {
      text = Join(text.empty() ? "/" : text, c);
      if (IsPathUnder(text, mountpoint)) return UnderMount(raw, mountpoint);
    }
  }
  std::deque<std::string> todo = Split(full);
  UniqueFd cur(open("/", O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!cur.valid()) return Status::FromErrno(errno, "open '/'");
  std::vector<std::string> where;  // the components of cur, resolved
  auto cur_path = [&] {
    std::string p;
    for (const auto& c : where) p += "/" + c;
    return p.empty() ? std::string("/") : p;
  };
  int hops = 0;
  while (!todo.empty()) {
    std::string comp = std::move(todo.front());
    todo.pop_front();
    if (comp == ".") continue;
    if (comp == "..") {
      // Up from a directory outside the mount never enters it.
      UniqueFd up(openat(cur.get(), "..", O_PATH | O_DIRECTORY | O_CLOEXEC));
      if (!up.valid()) return Status::FromErrno(errno, "open '" + cur_path() + "/..'");
      cur = std::move(up);
      if (!where.empty()) where.pop_back();
      continue;
    }
    const bool last = todo.empty();
    const std::string here = Join(cur_path(), comp);
    if (IsPathUnder(here, mountpoint)) return UnderMount(raw, mountpoint);
    struct statx sx {};
    if (statx(cur.get(), comp.c_str(), AT_SYMLINK_NOFOLLOW | AT_STATX_DONT_SYNC,
              STATX_TYPE | STATX_MODE | STATX_INO, &sx) != 0) {
      int e = errno;
      if (e == ENOENT && last) {
        ResolvedPath r;
        r.parent = std::move(cur);
        r.name = comp;
        r.path = here;
        return r;
      }
      return Status::Error(e, here);
    }
    if (mount_dev != 0 && makedev(sx.stx_dev_major, sx.stx_dev_minor) == mount_dev) {
      return UnderMount(raw, mountpoint);
    }
    if (S_ISLNK(sx.stx_mode)) {
      if (++hops > kMaxSymlinks) return Status::Error(ELOOP, here);
      char buf[PATH_MAX];
      ssize_t n = readlinkat(cur.get(), comp.c_str(), buf, sizeof(buf) - 1);
      if (n < 0) return Status::Error(errno, here);
      buf[n] = '\0';
      std::deque<std::string> link = Split(buf);
      todo.insert(todo.begin(), link.begin(), link.end());
      if (buf[0] == '/') {
        UniqueFd root(open("/", O_PATH | O_DIRECTORY | O_CLOEXEC));
        if (!root.valid()) return Status::FromErrno(errno, "open '/'");
        cur = std::move(root);
        where.clear();
      }
      // Re-check the whole new path by text, as for the original.
      std::string text = cur_path();
      for (const auto& c : todo) {
        text = Join(text, c);
        if (IsPathUnder(text, mountpoint)) return UnderMount(raw, mountpoint);
      }
      continue;
    }
    if (last) {
      ResolvedPath r;
      r.parent = std::move(cur);
      r.name = comp;
      r.path = here;
      r.exists = true;
      r.st.st_mode = sx.stx_mode;
      r.st.st_ino = sx.stx_ino;
      r.st.st_dev = makedev(sx.stx_dev_major, sx.stx_dev_minor);
      r.st.st_rdev = makedev(sx.stx_rdev_major, sx.stx_rdev_minor);
      return r;
    }
    if (!S_ISDIR(sx.stx_mode)) return Status::Error(ENOTDIR, here);
    UniqueFd next(openat(cur.get(), comp.c_str(), O_PATH | O_NOFOLLOW | O_DIRECTORY | O_CLOEXEC));
    if (!next.valid()) return Status::Error(errno, here);
    cur = std::move(next);
    where.push_back(comp);
  }
  // The path named a directory ("/", "x/..", ...): not a file.
  return Status::Error(EISDIR, full);
}

}  // namespace cbw::backup
