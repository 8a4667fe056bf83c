#include "backup/job_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>

#include "backup/ids.h"
#include "backup/log.h"

namespace cbw::backup {
namespace {

constexpr char kHeader[] = "cbwfs-job 1";
constexpr char kSuffix[] = ".job";
constexpr char kTmpSuffix[] = ".tmp";
// Records are small; anything bigger is not ours.
constexpr size_t kMaxRecordBytes = 64 * 1024;

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string Escape(const std::string& v) {
  std::string out;
  for (char ch : v) {
    auto c = static_cast<unsigned char>(ch);
    switch (ch) {
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[5];
          std::snprintf(buf, sizeof buf, "\\x%02x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  return out;
}

bool Unescape(const std::string& v, std::string* out) {
  out->clear();
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] != '\\') {
      *out += v[i];
      continue;
    }
    if (++i >= v.size()) return false;
    switch (v[i]) {
      case '\\':
        *out += '\\';
        break;
      case 'n':
        *out += '\n';
        break;
      case 'r':
        *out += '\r';
        break;
      case 't':
        *out += '\t';
        break;
      case 'x': {
        if (i + 2 >= v.size()) return false;
        char hex[3] = {v[i + 1], v[i + 2], 0};
        if (!std::isxdigit(static_cast<unsigned char>(hex[0])) ||
            !std::isxdigit(static_cast<unsigned char>(hex[1]))) {
          return false;
        }
        *out += static_cast<char>(std::strtoul(hex, nullptr, 16));
        i += 2;
        break;
      }
      default:
        return false;
    }
  }
  return true;
}

std::string Num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6f", v);
  return buf;
}

bool ParseU64(const std::string& s, uint64_t* v) {
  if (s.empty() || !std::isdigit(static_cast<unsigned char>(s[0]))) return false;
  errno = 0;
  char* end = nullptr;
  unsigned long long x = std::strtoull(s.c_str(), &end, 10);
  if (errno != 0 || *end != '\0') return false;
  *v = x;
  return true;
}

bool ParseDouble(const std::string& s, double* v) {
  if (s.empty()) return false;
  errno = 0;
  char* end = nullptr;
  double x = std::strtod(s.c_str(), &end);
  if (errno != 0 || *end != '\0' || !(x == x)) return false;
  *v = x;
  return true;
}

bool ParseBool(const std::string& s, bool* v) {
  if (s != "0" && s != "1") return false;
  *v = s == "1";
  return true;
}

// Enum values by their QMP spelling (the ToString of each value up to `last`).
template <class E>
bool ParseEnum(const std::string& s, E last, E* v) {
  for (int i = 0; i <= static_cast<int>(last); ++i) {
    if (s == ToString(static_cast<E>(i))) {
      *v = static_cast<E>(i);
      return true;
    }
  }
  return false;
}

Status Bad(const std::string& why) { return Status::Error(EINVAL, why); }

Status WriteAll(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "write");
    }
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

// mkdir -p, new directories 0700.
Status MakeDirs(const std::string& dir) {
  struct stat st {};
  if (stat(dir.c_str(), &st) == 0) {
    return S_ISDIR(st.st_mode) ? Status::Ok() : Status::Error(ENOTDIR, "");
  }
  if (errno != ENOENT) return Status::Error(errno, "");
  size_t slash = dir.find_last_of('/');
  if (slash != std::string::npos && slash > 0) {
    if (Status s = MakeDirs(dir.substr(0, slash)); !s.ok()) return s;
  }
  if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) return Status::Error(errno, "");
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<JobStore>> JobStore::Open(const std::string& dir) {
  auto fail = [&](int err) { return Status::FromErrno(err, "state dir '" + dir + "'"); };
  if (dir.empty()) return fail(ENOENT);
  if (Status s = MakeDirs(dir); !s.ok()) return fail(s.code());
  UniqueFd fd(open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return fail(errno);
  // Prove now that records can be written, rather than fail on the first job.
  const char* probe = ".probe.tmp";
  int p = openat(fd.get(), probe, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (p < 0) return fail(errno);
  close(p);
  unlinkat(fd.get(), probe, 0);
  return std::unique_ptr<JobStore>(new JobStore(dir, std::move(fd)));
}

std::string JobStore::Format(const JobInfo& i) {
  std::string out = std::string(kHeader) + "\n";
  auto put = [&](const char* key, const std::string& value) {
    out += key;
    out += '=';
    out += Escape(value);
    out += '\n';
  };
  auto b = [](bool v) { return std::string(v ? "1" : "0"); };
  put("id", i.id);
  put("drive", i.drive);
  put("target", i.target);
  put("sync", ToString(i.sync));
  put("status", ToString(i.status));
  put("len", std::to_string(i.len));
  put("offset", std::to_string(i.offset));
  put("busy", b(i.busy));
  put("paused", b(i.paused));
  put("speed", std::to_string(i.speed));
  put("io-status", ToString(i.io_status));
  put("auto-finalize", b(i.auto_finalize));
  put("auto-dismiss", b(i.auto_dismiss));
  if (i.error) put("error", *i.error);
  put("bytes-per-second", Num(i.bytes_per_second));
  if (i.eta_seconds) put("eta-seconds", Num(*i.eta_seconds));
  put("cbw-bytes", std::to_string(i.cbw_bytes));
  put("skipped-bytes", std::to_string(i.skipped_bytes));
  put("started", Num(i.started));
  if (i.finished) put("finished", Num(*i.finished));
  put("result", ToString(i.result));
  put("listed", b(i.listed));
  out += "end\n";
  return out;
}

Result<JobInfo> JobStore::Parse(const std::string& text) {
  std::map<std::string, std::string> kv;
  size_t pos = 0;
  bool header = false, end = false;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) return Bad("last line is not terminated");
    std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    if (!header) {
      if (line != kHeader) return Bad("not a cbwfs job record (header '" + Escape(line) + "')");
      header = true;
      continue;
    }
    if (end) return Bad("data after 'end'");
    if (line == "end") {
      end = true;
      continue;
    }
    size_t eq = line.find('=');
    if (eq == std::string::npos || eq == 0) return Bad("malformed line '" + Escape(line) + "'");
    std::string value;
    if (!Unescape(line.substr(eq + 1), &value)) return Bad("bad escape in '" + Escape(line) + "'");
    if (!kv.emplace(line.substr(0, eq), value).second) return Bad("key given twice");
  }
  if (!header) return Bad("empty record");
  if (!end) return Bad("record is incomplete (no 'end')");

  JobInfo i;
  for (const char* key : {"id", "drive", "status", "result", "started"}) {
    if (!kv.count(key)) return Bad(std::string("missing '") + key + "'");
  }
  bool ok = true;
  auto get = [&](const char* key) -> const std::string* {
    auto it = kv.find(key);
    return it == kv.end() ? nullptr : &it->second;
  };
  i.id = *get("id");
  i.drive = *get("drive");
  if (auto v = get("target")) i.target = *v;
  if (auto v = get("sync")) ok &= ParseEnum(*v, SyncMode::kNone, &i.sync);
  ok &= ParseEnum(*get("status"), JobStatus::kNull, &i.status);
  if (auto v = get("len")) ok &= ParseU64(*v, &i.len);
  if (auto v = get("offset")) ok &= ParseU64(*v, &i.offset);
  if (auto v = get("busy")) ok &= ParseBool(*v, &i.busy);
  if (auto v = get("paused")) ok &= ParseBool(*v, &i.paused);
  if (auto v = get("speed")) ok &= ParseU64(*v, &i.speed);
  if (auto v = get("io-status")) ok &= ParseEnum(*v, IoStatus::kNoSpace, &i.io_status);
  if (auto v = get("auto-finalize")) ok &= ParseBool(*v, &i.auto_finalize);
  if (auto v = get("auto-dismiss")) ok &= ParseBool(*v, &i.auto_dismiss);
  if (auto v = get("error")) i.error = *v;
  if (auto v = get("bytes-per-second")) ok &= ParseDouble(*v, &i.bytes_per_second);
  if (auto v = get("eta-seconds")) {
    double d = 0;
    ok &= ParseDouble(*v, &d);
    i.eta_seconds = d;
  }
  if (auto v = get("cbw-bytes")) ok &= ParseU64(*v, &i.cbw_bytes);
  if (auto v = get("skipped-bytes")) ok &= ParseU64(*v, &i.skipped_bytes);
  ok &= ParseDouble(*get("started"), &i.started);
  if (auto v = get("finished")) {
    double d = 0;
    ok &= ParseDouble(*v, &d);
    i.finished = d;
  }
  ok &= ParseEnum(*get("result"), JobResult::kCancelled, &i.result);
  if (auto v = get("listed")) ok &= ParseBool(*v, &i.listed);
  if (!ok) return Bad("a value does not parse");
  if (!IsValidId(i.id)) return Bad("invalid job id '" + Escape(i.id) + "'");
  return i;
}

Status JobStore::SyncDir() {
  if (fsync(dir_fd_.get()) != 0) return Status::FromErrno(errno, "fsync of '" + dir_ + "'");
  return Status::Ok();
}

Status JobStore::Save(const JobInfo& info) {
  if (!IsValidId(info.id)) return Status::Error(EINVAL, "invalid job id '" + info.id + "'");
  const std::string tmp = "." + info.id + kTmpSuffix;
  const std::string name = info.id + kSuffix;
  auto fail = [&](int err, const std::string& what) {
    unlinkat(dir_fd_.get(), tmp.c_str(), 0);
    return Status::FromErrno(err, what + " '" + dir_ + "/" + name + "'");
  };
  UniqueFd fd(openat(dir_fd_.get(), tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd.valid()) return fail(errno, "could not create the record");
  if (Status s = WriteAll(fd.get(), Format(info)); !s.ok())
    return fail(s.code(), "could not write");
  if (fsync(fd.get()) != 0) return fail(errno, "could not fsync");
  fd.Reset();
  if (renameat(dir_fd_.get(), tmp.c_str(), dir_fd_.get(), name.c_str()) != 0) {
    return fail(errno, "could not rename into");
  }
  return SyncDir();
}

Status JobStore::Remove(const std::string& id) {
  if (!IsValidId(id)) return Status::Ok();
  const std::string name = id + kSuffix;
  if (unlinkat(dir_fd_.get(), name.c_str(), 0) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return Status::FromErrno(errno, "could not remove '" + dir_ + "/" + name + "'");
  }
  return SyncDir();
}

std::vector<JobInfo> JobStore::Load() {
  std::vector<JobInfo> out;
  int dfd = dup(dir_fd_.get());
  if (dfd < 0) {
    LogWarn("state dir '" + dir_ + "': " + std::strerror(errno));
    return out;
  }
  DIR* d = fdopendir(dfd);
  if (d == nullptr) {
    LogWarn("state dir '" + dir_ + "': " + std::strerror(errno));
    close(dfd);
    return out;
  }
  rewinddir(d);
  std::vector<std::string> names;
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  closedir(d);
  std::sort(names.begin(), names.end());
  for (const std::string& n : names) {
    const std::string path = dir_ + "/" + n;
    if (n[0] == '.' && EndsWith(n, kTmpSuffix)) {
      // A write cut short by a crash: the record it was replacing is intact.
      unlinkat(dir_fd_.get(), n.c_str(), 0);
      continue;
    }
    if (!EndsWith(n, kSuffix)) {
      LogWarn("state dir: skipping foreign file '" + path + "'");
      continue;
    }
    std::string id = n.substr(0, n.size() - std::strlen(kSuffix));
    UniqueFd fd(openat(dir_fd_.get(), n.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK));
    struct stat st {};
    if (!fd.valid() || fstat(fd.get(), &st) != 0) {
      LogWarn("state dir: skipping '" + path + "': " + std::strerror(errno));
      continue;
    }
    if (!S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) > kMaxRecordBytes) {
      LogWarn("state dir: skipping '" + path + "': not a job record");
      continue;
    }
    std::string text;
    char buf[4096];
    ssize_t r;
    while (text.size() <= kMaxRecordBytes && (r = read(fd.get(), buf, sizeof buf)) != 0) {
      if (r < 0) {
        if (errno == EINTR) continue;
        break;
      }
      text.append(buf, static_cast<size_t>(r));
    }
    Result<JobInfo> info = Parse(text);
    if (!info.ok()) {
      LogWarn("state dir: skipping corrupt record '" + path + "': " + info.status().message());
      continue;
    }
    if (info->id != id) {
      LogWarn("state dir: skipping '" + path + "': it holds the record of '" + info->id + "'");
      continue;
    }
    out.push_back(std::move(*info));
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const JobInfo& a, const JobInfo& b) { return a.started < b.started; });
  return out;
}

}  // namespace cbw::backup
