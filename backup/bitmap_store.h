#pragma once

// On-disk formats of persistent dirty bitmaps (SPEC 7), under
// STATE_DIR/bitmaps/<drive>/:
//
//   <name-prefix>-<hash>.bitmap   one per persistent bitmap, replaced whole
//                                 (temp + fsync + rename + dir fsync)
//   journal                       regions possibly written since the bitmaps
//                                 were last saved, updated in place
//
// All integers are little-endian.
//
// A bitmap file: "CBWBITM1", u32 flags (1 = recording, 2 = inconsistent),
// u32 name length, u64 granularity, u64 drive size, u64 generation, u64
// source device, u64 source inode, then the name, u64 word count, the words
// (bit i of word w = granule 64w+i dirty), and a CRC-32C of all before it.
//
// The journal: a 4 KiB header ("CBWJRNL1", u64 region size, u64 drive size,
// u64 generation, i64 lease (CLOCK_REALTIME ns; 0 after a clean stop), i64
// source mtime at the clean stop (ns), u64 source device, u64 source inode,
// u32 CRC-32C of the fields before it), then one bit per region of the drive.
// A region's bit is on disk (fdatasync) before the first write into it since
// the last save reaches the source; the lease says until when this daemon may
// write the source (a write past it renews it first), so after a crash a
// source modified later than the lease was changed by someone else.

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backup/status.h"
#include "backup/unique_fd.h"

namespace cbw::backup {

uint32_t Crc32c(const void* data, size_t len, uint32_t crc = 0);

struct BitmapRecord {
  std::string name;
  bool recording = true;
  bool inconsistent = false;
  uint64_t granularity = 0;
  uint64_t drive_size = 0;
  uint64_t generation = 0;
  uint64_t source_dev = 0;
  uint64_t source_ino = 0;
  std::vector<uint64_t> words;
};

struct JournalHeader {
  uint64_t region_size = 0;
  uint64_t drive_size = 0;
  uint64_t generation = 0;
  int64_t lease_ns = 0;  // 0: clean stop
  int64_t clean_mtime_ns = 0;
  uint64_t source_dev = 0;
  uint64_t source_ino = 0;
};

// The files of one drive's persistent bitmaps. Not thread-safe: its owner
// (DriveBitmaps) serialises calls.
class BitmapStore {
 public:
  static constexpr uint64_t kJournalHeaderBytes = 4096;

  // Opens (creating, 0700) STATE_DIR/bitmaps/<drive>.
  static Result<std::unique_ptr<BitmapStore>> Open(const std::string& state_dir,
                                                   const std::string& drive);
  const std::string& dir() const { return dir_; }

  // Every bitmap file: parsed records, and the file names that could not be
  // parsed at all (logged; left alone). A record whose CRC fails comes back
  // with `inconsistent` set, no words and granularity 0 (unknown); so does
  // one whose header is damaged, when its file name gives its name whole
  // (NameFromFileName).
  std::vector<BitmapRecord> LoadBitmaps(std::vector<std::string>* unreadable);
  Status SaveBitmap(const BitmapRecord& record);
  // The bitmap name a file name was made from, when FileName kept it whole
  // (at most 40 characters of letters, digits, '-', '_', '.').
  static std::optional<std::string> NameFromFileName(const std::string& file);
  Status RemoveBitmap(const std::string& name);

  // The journal: nullopt (with the reason) when missing or corrupt.
  std::optional<JournalHeader> LoadJournal(std::vector<bool>* regions, std::string* why);
  // Replaces the journal (header + regions), durably.
  Status WriteJournal(const JournalHeader& header, const std::vector<bool>& regions);
  // Sets region bits in place and makes them durable (fdatasync).
  Status MarkRegions(const std::vector<uint64_t>& regions);
  // Rewrites the header in place; `sync` makes it durable.
  Status WriteJournalHeader(const JournalHeader& header, bool sync);

  static std::string FileName(const std::string& bitmap_name);

 private:
  BitmapStore(std::string dir, UniqueFd dir_fd)
      : dir_(std::move(dir)), dir_fd_(std::move(dir_fd)) {}
  Status OpenJournal();

  std::string dir_;
  UniqueFd dir_fd_;
  UniqueFd journal_fd_;
  std::vector<uint8_t> journal_bytes_;  // the region bytes as last written
};

}  // namespace cbw::backup
