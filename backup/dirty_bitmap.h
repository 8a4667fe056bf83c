#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace cbw::backup {

// A bitmap of dirty ranges over a drive, one bit per `granularity` bytes
// (QEMU's BdrvDirtyBitmap without the name and state). Set() may run from many
// writer threads at once (atomic or-ing); every other method needs the
// owner's exclusion against Set() (DriveBitmaps changes bitmaps only with the
// drive's write gate closed, or reads a racy but monotone snapshot).
class DirtyBitmap {
 public:
  // QEMU's rule for a bitmap's granularity: a power of two, 512 B .. 2 GiB.
  static bool ValidGranularity(uint64_t g) {
    return g >= 512 && g <= (uint64_t{1} << 31) && (g & (g - 1)) == 0;
  }
  // A bitmap over `size` bytes; `granularity` is valid (above).
  DirtyBitmap(uint64_t size, uint64_t granularity);
  DirtyBitmap(const DirtyBitmap& other);
  DirtyBitmap& operator=(const DirtyBitmap&) = delete;

  uint64_t size() const { return size_; }
  uint64_t granularity() const { return granularity_; }
  uint64_t bit_count() const { return nbits_; }

  // Marks [off, off + len) dirty (whole granules). Thread-safe.
  void Set(uint64_t off, uint64_t len);
  // Marks [off, off + len) clean: granules fully or partly inside it.
  void Reset(uint64_t off, uint64_t len);
  void Clear();
  // Dirty bytes (granules times granularity, the last one clipped).
  uint64_t Count() const;
  bool Get(uint64_t off) const;
  // this |= other (any granularity: each dirty range of `other` is set).
  void Merge(const DirtyBitmap& other);
  // Calls fn(off, len) for each maximal dirty byte range, in order.
  template <class F>
  void ForEachDirty(F fn) const {
    uint64_t b = NextBit(0, true);
    while (b < nbits_) {
      uint64_t e = NextBit(b, false);
      uint64_t off = b * granularity_;
      fn(off, std::min(size_, e * granularity_) - off);
      b = NextBit(e, true);
    }
  }
  // Whether any byte of [off, off + len) is dirty.
  bool AnyDirty(uint64_t off, uint64_t len) const;

  // The raw words (persistence): bit i of word w is granule 64 * w + i.
  std::vector<uint64_t> Words() const;
  // Replaces the bits; false if `words` has the wrong length.
  bool SetWords(const std::vector<uint64_t>& words);

 private:
  uint64_t NextBit(uint64_t from, bool set) const;

  uint64_t size_;
  uint64_t granularity_;
  uint64_t nbits_;
  uint64_t nwords_;
  std::unique_ptr<std::atomic<uint64_t>[]> words_;
};

}  // namespace cbw::backup
