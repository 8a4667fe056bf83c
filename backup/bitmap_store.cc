#include "backup/bitmap_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "backup/log.h"
#include "backup/posix_io.h"

namespace cbw::backup {
namespace {

constexpr char kBitmapMagic[8] = {'C', 'B', 'W', 'B', 'I', 'T', 'M', '1'};
constexpr char kJournalMagic[8] = {'C', 'B', 'W', 'J', 'R', 'N', 'L', '1'};
constexpr char kSuffix[] = ".bitmap";
constexpr char kJournal[] = "journal";
constexpr uint32_t kRecording = 1, kInconsistent = 2;

void Put(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

// Reads little-endian integers from a byte string, remembering overruns.
class Reader {
 public:
  Reader(const std::string& s, size_t pos = 0) : s_(s), pos_(pos) {}
  uint64_t Get(int bytes) {
    if (pos_ + static_cast<size_t>(bytes) > s_.size()) {
      bad_ = true;
      return 0;
    }
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) {
      v |= static_cast<uint64_t>(static_cast<unsigned char>(s_[pos_ + static_cast<size_t>(i)]))
           << (8 * i);
    }
    pos_ += static_cast<size_t>(bytes);
    return v;
  }
  std::string Bytes(size_t n) {
    if (pos_ + n > s_.size()) {
      bad_ = true;
      return {};
    }
    std::string out = s_.substr(pos_, n);
    pos_ += n;
    return out;
  }
  bool bad() const { return bad_; }
  size_t pos() const { return pos_; }

 private:
  const std::string& s_;
  size_t pos_;
  bool bad_ = false;
};

Status MakeDir(const std::string& path) {
  if (mkdir(path.c_str(), 0700) != 0 && errno != EEXIST) {
    return Status::FromErrno(errno, "state dir '" + path + "'");
  }
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return Status::FromErrno(errno, "state dir '" + path + "'");
  if (!S_ISDIR(st.st_mode))
    return Status::Error(ENOTDIR, "state dir '" + path + "' is not a directory");
  return Status::Ok();
}

Result<std::string> ReadWhole(int dir_fd, const std::string& name, size_t max) {
  UniqueFd fd(openat(dir_fd, name.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK));
  if (!fd.valid()) return Status::FromErrno(errno, name);
  struct stat st {};
  if (fstat(fd.get(), &st) != 0) return Status::FromErrno(errno, name);
  if (!S_ISREG(st.st_mode)) return Status::Error(EINVAL, name + ": not a regular file");
  if (static_cast<uint64_t>(st.st_size) > max) return Status::Error(EFBIG, name + ": too big");
  std::string data(static_cast<size_t>(st.st_size), '\0');
  Result<size_t> n = PreadFull(fd.get(), data.data(), data.size(), 0);
  if (!n.ok()) return n.status();
  data.resize(*n);
  return data;
}

Status WriteDurably(int dir_fd, const std::string& dir, const std::string& name,
                    const std::string& data) {
  const std::string tmp = "." + name + ".tmp";
  UniqueFd fd(openat(dir_fd, tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd.valid()) return Status::FromErrno(errno, "create '" + dir + "/" + tmp + "'");
  Status s = PwriteFull(fd.get(), data.data(), data.size(), 0, "write '" + dir + "/" + tmp + "'");
  if (s.ok() && fsync(fd.get()) != 0)
    s = Status::FromErrno(errno, "fsync '" + dir + "/" + tmp + "'");
  fd.Reset();
  if (s.ok() && renameat(dir_fd, tmp.c_str(), dir_fd, name.c_str()) != 0) {
    s = Status::FromErrno(errno, "rename into '" + dir + "/" + name + "'");
  }
  if (!s.ok()) {
    unlinkat(dir_fd, tmp.c_str(), 0);
    return s;
  }
  if (fsync(dir_fd) != 0) return Status::FromErrno(errno, "fsync '" + dir + "'");
  return Status::Ok();
}

std::string EncodeHeader(const JournalHeader& h) {
  std::string out(kJournalMagic, sizeof(kJournalMagic));
  Put(&out, h.region_size, 8);
  Put(&out, h.drive_size, 8);
  Put(&out, h.generation, 8);
  Put(&out, static_cast<uint64_t>(h.lease_ns), 8);
  Put(&out, static_cast<uint64_t>(h.clean_mtime_ns), 8);
  Put(&out, h.source_dev, 8);
  Put(&out, h.source_ino, 8);
  Put(&out, Crc32c(out.data(), out.size()), 4);
  return out;
}

}  // namespace

uint32_t Crc32c(const void* data, size_t len, uint32_t crc) {
  static const auto* table = [] {
    auto* t = new uint32_t[256];
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (size_t i = 0; i < len; ++i) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

std::string BitmapStore::FileName(const std::string& bitmap_name) {
  // Readable where the name allows it, unique by a hash of the whole name
  // (names may be up to 1023 bytes of anything).
  std::string prefix;
  for (char c : bitmap_name) {
    if (prefix.size() >= 40) break;
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.';
    prefix.push_back(ok ? c : '_');
  }
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : bitmap_name) {
    h ^= c;
    h *= 1099511628211ull;
  }
  char hex[17];
  snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(h));
  return "b-" + prefix + "-" + hex + kSuffix;
}

std::optional<std::string> BitmapStore::NameFromFileName(const std::string& file) {
  // "b-" + prefix + "-" + 16 hex digits + suffix; the prefix is the whole
  // name when FileName of it gives the file's name back.
  const size_t tail = 1 + 16 + std::strlen(kSuffix);
  if (file.size() <= 2 + tail || file.compare(0, 2, "b-") != 0) return std::nullopt;
  std::string prefix = file.substr(2, file.size() - 2 - tail);
  if (prefix.empty() || FileName(prefix) != file) return std::nullopt;
  return prefix;
}

Result<std::unique_ptr<BitmapStore>> BitmapStore::Open(const std::string& state_dir,
                                                       const std::string& drive) {
  if (Status s = MakeDir(state_dir + "/bitmaps"); !s.ok()) return s;
  std::string dir = state_dir + "/bitmaps/" + drive;
  if (Status s = MakeDir(dir); !s.ok()) return s;
  UniqueFd fd(open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return Status::FromErrno(errno, "state dir '" + dir + "'");
  return std::unique_ptr<BitmapStore>(new BitmapStore(dir, std::move(fd)));
}

std::vector<BitmapRecord> BitmapStore::LoadBitmaps(std::vector<std::string>* unreadable) {
  std::vector<BitmapRecord> out;
  int dfd = dup(dir_fd_.get());
  DIR* d = dfd >= 0 ? fdopendir(dfd) : nullptr;
  if (d == nullptr) {
    if (dfd >= 0) close(dfd);
    LogWarn("bitmaps: cannot list '" + dir_ + "': " + std::strerror(errno));
    return out;
  }
  std::vector<std::string> names;
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n.size() > 7 && n.compare(n.size() - 7, 7, kSuffix) == 0 && n[0] != '.') names.push_back(n);
    if (n[0] == '.' && n.size() > 4 && n.compare(n.size() - 4, 4, ".tmp") == 0) {
      unlinkat(dir_fd_.get(), n.c_str(), 0);  // a save cut short
    }
  }
  closedir(d);
  std::sort(names.begin(), names.end());
  for (const auto& file : names) {
    Result<std::string> data = ReadWhole(dir_fd_.get(), file, uint64_t{1} << 36);
    if (!data.ok()) {
      unreadable->push_back(dir_ + "/" + file + ": " + data.status().message());
      continue;
    }
    const std::string& s = *data;
    Reader r(s);
    BitmapRecord rec;
    std::string magic = r.Bytes(8);
    uint32_t flags = static_cast<uint32_t>(r.Get(4));
    uint32_t name_len = static_cast<uint32_t>(r.Get(4));
    rec.granularity = r.Get(8);
    rec.drive_size = r.Get(8);
    rec.generation = r.Get(8);
    rec.source_dev = r.Get(8);
    rec.source_ino = r.Get(8);
    rec.name = name_len <= 1023 ? r.Bytes(name_len) : std::string();
    if (r.bad() || magic != std::string(kBitmapMagic, 8) || rec.name.empty() ||
        FileName(rec.name) != file) {
      // A damaged header. The file's name still names the bitmap when the
      // name was short and plain (the file name holds it whole, and its
      // hash confirms it): that bitmap comes back inconsistent, so its user
      // learns it cannot be trusted rather than finding it gone.
      std::optional<std::string> name = NameFromFileName(file);
      if (!name) {
        unreadable->push_back(dir_ + "/" + file + ": not a cbwfs bitmap");
        continue;
      }
      LogWarn("bitmaps: '" + dir_ + "/" + file + "' is corrupt: bitmap '" + *name +
              "' is inconsistent");
      BitmapRecord damaged;
      damaged.name = std::move(*name);
      damaged.inconsistent = true;
      out.push_back(std::move(damaged));
      continue;
    }
    rec.recording = flags & kRecording;
    rec.inconsistent = flags & kInconsistent;
    uint64_t nwords = r.Get(8);
    bool ok = !r.bad() && nwords <= (s.size() - r.pos()) / 8;
    if (ok) {
      rec.words.resize(nwords);
      for (auto& w : rec.words) w = r.Get(8);
      size_t body = r.pos();
      uint32_t crc = static_cast<uint32_t>(r.Get(4));
      ok = !r.bad() && r.pos() == s.size() && Crc32c(s.data(), body) == crc;
    }
    if (!ok) {
      LogWarn("bitmaps: '" + dir_ + "/" + file + "' is corrupt: bitmap '" + rec.name +
              "' is inconsistent");
      rec.inconsistent = true;
      rec.words.clear();
      // Nothing in a damaged file is trusted, its granularity included.
      rec.granularity = 0;
    }
    out.push_back(std::move(rec));
  }
  return out;
}

Status BitmapStore::SaveBitmap(const BitmapRecord& rec) {
  std::string out(kBitmapMagic, sizeof(kBitmapMagic));
  Put(&out, (rec.recording ? kRecording : 0) | (rec.inconsistent ? kInconsistent : 0), 4);
  Put(&out, rec.name.size(), 4);
  Put(&out, rec.granularity, 8);
  Put(&out, rec.drive_size, 8);
  Put(&out, rec.generation, 8);
  Put(&out, rec.source_dev, 8);
  Put(&out, rec.source_ino, 8);
  out += rec.name;
  Put(&out, rec.words.size(), 8);
  out.reserve(out.size() + rec.words.size() * 8 + 4);
  for (uint64_t w : rec.words) Put(&out, w, 8);
  Put(&out, Crc32c(out.data(), out.size()), 4);
  return WriteDurably(dir_fd_.get(), dir_, FileName(rec.name), out);
}

Status BitmapStore::RemoveBitmap(const std::string& name) {
  if (unlinkat(dir_fd_.get(), FileName(name).c_str(), 0) != 0 && errno != ENOENT) {
    return Status::FromErrno(errno, "remove '" + dir_ + "/" + FileName(name) + "'");
  }
  if (fsync(dir_fd_.get()) != 0) return Status::FromErrno(errno, "fsync '" + dir_ + "'");
  return Status::Ok();
}

std::optional<JournalHeader> BitmapStore::LoadJournal(std::vector<bool>* regions,
                                                      std::string* why) {
  Result<std::string> data = ReadWhole(dir_fd_.get(), kJournal, uint64_t{1} << 32);
  if (!data.ok()) {
    *why = data.status().code() == ENOENT ? "journal missing" : data.status().message();
    return std::nullopt;
  }
  const std::string& s = *data;
  Reader r(s);
  JournalHeader h;
  std::string magic = r.Bytes(8);
  h.region_size = r.Get(8);
  h.drive_size = r.Get(8);
  h.generation = r.Get(8);
  h.lease_ns = static_cast<int64_t>(r.Get(8));
  h.clean_mtime_ns = static_cast<int64_t>(r.Get(8));
  h.source_dev = r.Get(8);
  h.source_ino = r.Get(8);
  size_t body = r.pos();
  uint32_t crc = static_cast<uint32_t>(r.Get(4));
  if (r.bad() || magic != std::string(kJournalMagic, 8) || Crc32c(s.data(), body) != crc ||
      h.region_size == 0) {
    *why = "journal corrupt";
    return std::nullopt;
  }
  uint64_t nregions = (h.drive_size + h.region_size - 1) / h.region_size;
  regions->assign(nregions, false);
  for (uint64_t i = 0; i < nregions; ++i) {
    size_t byte = kJournalHeaderBytes + i / 8;
    if (byte < s.size() && (static_cast<unsigned char>(s[byte]) >> (i % 8)) & 1) {
      (*regions)[i] = true;
    }
  }
  return h;
}

Status BitmapStore::OpenJournal() {
  if (journal_fd_.valid()) return Status::Ok();
  journal_fd_.Reset(
      openat(dir_fd_.get(), kJournal, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!journal_fd_.valid()) return Status::FromErrno(errno, "open '" + dir_ + "/journal'");
  return Status::Ok();
}

Status BitmapStore::WriteJournal(const JournalHeader& header, const std::vector<bool>& regions) {
  journal_bytes_.assign((regions.size() + 7) / 8, 0);
  for (size_t i = 0; i < regions.size(); ++i) {
    if (regions[i]) journal_bytes_[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
  }
  std::string data = EncodeHeader(header);
  data.resize(kJournalHeaderBytes, '\0');
  data.append(reinterpret_cast<const char*>(journal_bytes_.data()), journal_bytes_.size());
  // Replaced whole (a journal of a new size, or a first one), then reopened.
  journal_fd_.Reset();
  if (Status s = WriteDurably(dir_fd_.get(), dir_, kJournal, data); !s.ok()) return s;
  return OpenJournal();
}

Status BitmapStore::MarkRegions(const std::vector<uint64_t>& regions) {
  if (Status s = OpenJournal(); !s.ok()) return s;
  uint64_t lo = UINT64_MAX, hi = 0;
  for (uint64_t r : regions) {
    if (r / 8 >= journal_bytes_.size()) journal_bytes_.resize(r / 8 + 1, 0);
    journal_bytes_[r / 8] |= static_cast<uint8_t>(1u << (r % 8));
    lo = std::min(lo, r / 8);
    hi = std::max(hi, r / 8 + 1);
  }
  if (lo >= hi) return Status::Ok();
  if (Status s = PwriteFull(journal_fd_.get(), journal_bytes_.data() + lo, hi - lo,
                            kJournalHeaderBytes + lo, "write '" + dir_ + "/journal'");
      !s.ok()) {
    return s;
  }
  if (fdatasync(journal_fd_.get()) != 0) {
    return Status::FromErrno(errno, "fdatasync '" + dir_ + "/journal'");
  }
  return Status::Ok();
}

Status BitmapStore::WriteJournalHeader(const JournalHeader& header, bool sync) {
  if (Status s = OpenJournal(); !s.ok()) return s;
  std::string data = EncodeHeader(header);
  if (Status s = PwriteFull(journal_fd_.get(), data.data(), data.size(), 0,
                            "write '" + dir_ + "/journal'");
      !s.ok()) {
    return s;
  }
  if (sync && fdatasync(journal_fd_.get()) != 0) {
    return Status::FromErrno(errno, "fdatasync '" + dir_ + "/journal'");
  }
  return Status::Ok();
}

}  // namespace cbw::backup
