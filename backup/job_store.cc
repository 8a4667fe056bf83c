#include "backup/job_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string_view>

#include "backup/ids.h"
#include "backup/log.h"

namespace cbw::backup {
namespace {

constexpr char kTmpSuffix[] = ".tmp";
// Records are small; anything bigger is not ours.
constexpr size_t kMaxRecordBytes = 64 * 1024;

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

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

Result<std::unique_ptr<JobStore>> JobStore::Open(const std::string& dir,
                                                 std::shared_ptr<const JobRecordCodec> codec) {
  auto fail = [&](int err) { return Status::FromErrno(err, "state dir '" + dir + "'"); };
  if (codec == nullptr) return Status::Error(EINVAL, "state dir '" + dir + "': no record format");
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
  return std::unique_ptr<JobStore>(new JobStore(dir, std::move(fd), std::move(codec)));
}

std::string JobStore::FileName(const std::string& id) const {
  return id + std::string(codec_->FileSuffix());
}

std::string JobStore::PathOf(const std::string& id) const { return dir_ + "/" + FileName(id); }

Status JobStore::SyncDir() {
  if (fsync(dir_fd_.get()) != 0) return Status::FromErrno(errno, "fsync of '" + dir_ + "'");
  return Status::Ok();
}

Status JobStore::Save(const JobInfo& info) {
  if (!IsValidId(info.id)) return Status::Error(EINVAL, "invalid job id '" + info.id + "'");
  const std::string tmp = "." + info.id + kTmpSuffix;
  const std::string name = FileName(info.id);
  auto fail = [&](int err, const std::string& what) {
    unlinkat(dir_fd_.get(), tmp.c_str(), 0);
    return Status::FromErrno(err, what + " '" + dir_ + "/" + name + "'");
  };
  UniqueFd fd(openat(dir_fd_.get(), tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd.valid()) return fail(errno, "could not create the record");
  if (Status s = WriteAll(fd.get(), codec_->Encode(info)); !s.ok())
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
  const std::string name = FileName(id);
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
    // Subdirectories belong to others (bitmaps/, the dirty bitmaps' files).
    struct stat sub {};
    if (fstatat(dir_fd_.get(), n.c_str(), &sub, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(sub.st_mode)) {
      continue;
    }
    const std::string_view suffix = codec_->FileSuffix();
    const std::string id = n.substr(0, n.size() - std::min(n.size(), suffix.size()));
    if (!EndsWith(n, suffix) || !IsValidId(id)) {
      LogWarn("state dir: skipping foreign file '" + path + "'");
      continue;
    }
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
    int read_error = 0;
    char buf[4096];
    while (text.size() <= kMaxRecordBytes) {
      ssize_t r = read(fd.get(), buf, sizeof buf);
      if (r == 0) break;
      if (r < 0) {
        if (errno == EINTR) continue;
        read_error = errno;
        break;
      }
      text.append(buf, static_cast<size_t>(r));
    }
    if (read_error != 0) {
      LogWarn("state dir: skipping '" + path + "': " + std::strerror(read_error));
      continue;
    }
    if (text.size() > kMaxRecordBytes) {  // it grew since the fstat
      LogWarn("state dir: skipping '" + path + "': not a job record");
      continue;
    }
    Result<JobInfo> info = codec_->Decode(text);
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
