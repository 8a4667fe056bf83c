#include "backup/dirty_bitmap.h"

#include <algorithm>

namespace cbw::backup {
namespace {

uint64_t MaskBetween(uint64_t lo, uint64_t hi) {  // bits [lo, hi) of a word, hi <= 64
  uint64_t upper = hi == 64 ? ~uint64_t{0} : ((uint64_t{1} << hi) - 1);
  return upper & (~uint64_t{0} << lo);
}

}  // namespace

DirtyBitmap::DirtyBitmap(uint64_t size, uint64_t granularity)
    : size_(size),
      granularity_(granularity),
      nbits_((size + granularity - 1) / granularity),
      nwords_((nbits_ + 63) / 64),
      words_(new std::atomic<uint64_t>[std::max<uint64_t>(1, nwords_)]) {
  for (uint64_t i = 0; i < std::max<uint64_t>(1, nwords_); ++i) words_[i].store(0);
}

DirtyBitmap::DirtyBitmap(const DirtyBitmap& o) : DirtyBitmap(o.size_, o.granularity_) {
  for (uint64_t i = 0; i < nwords_; ++i) words_[i].store(o.words_[i].load());
}

void DirtyBitmap::Set(uint64_t off, uint64_t len) {
  if (len == 0 || off >= size_) return;
  uint64_t b0 = off / granularity_;
  uint64_t b1 = std::min(nbits_, (std::min(off + len, size_) + granularity_ - 1) / granularity_);
  for (uint64_t b = b0; b < b1;) {
    uint64_t w = b / 64, lo = b % 64, hi = std::min<uint64_t>(64, lo + (b1 - b));
    uint64_t mask = MaskBetween(lo, hi);
    // Most writes hit granules already dirty: a load avoids the locked op.
    if ((words_[w].load(std::memory_order_relaxed) & mask) != mask) {
      words_[w].fetch_or(mask, std::memory_order_relaxed);
    }
    b += hi - lo;
  }
}

void DirtyBitmap::Reset(uint64_t off, uint64_t len) {
  if (len == 0 || off >= size_) return;
  uint64_t b0 = off / granularity_;
  uint64_t b1 = std::min(nbits_, (std::min(off + len, size_) + granularity_ - 1) / granularity_);
  for (uint64_t b = b0; b < b1;) {
    uint64_t w = b / 64, lo = b % 64, hi = std::min<uint64_t>(64, lo + (b1 - b));
    words_[w].fetch_and(~MaskBetween(lo, hi), std::memory_order_relaxed);
    b += hi - lo;
  }
}

void DirtyBitmap::Clear() {
  for (uint64_t i = 0; i < nwords_; ++i) words_[i].store(0, std::memory_order_relaxed);
}

uint64_t DirtyBitmap::Count() const {
  uint64_t bits = 0;
  for (uint64_t i = 0; i < nwords_; ++i) {
    bits += static_cast<uint64_t>(__builtin_popcountll(words_[i].load(std::memory_order_relaxed)));
  }
  uint64_t bytes = bits * granularity_;
  // The last granule may reach past the end.
  if (nbits_ > 0 && Get((nbits_ - 1) * granularity_)) bytes -= nbits_ * granularity_ - size_;
  return bytes;
}

bool DirtyBitmap::Get(uint64_t off) const {
  if (off >= size_) return false;
  uint64_t b = off / granularity_;
  return (words_[b / 64].load(std::memory_order_relaxed) >> (b % 64)) & 1;
}

bool DirtyBitmap::AnyDirty(uint64_t off, uint64_t len) const {
  if (len == 0 || off >= size_) return false;
  uint64_t b0 = off / granularity_;
  uint64_t b1 = std::min(nbits_, (std::min(off + len, size_) + granularity_ - 1) / granularity_);
  return NextBit(b0, true) < b1;
}

uint64_t DirtyBitmap::NextBit(uint64_t from, bool set) const {
  if (from >= nbits_) return nbits_;
  uint64_t w = from / 64;
  auto word = [&](uint64_t i) {
    uint64_t v = words_[i].load(std::memory_order_relaxed);
    return set ? v : ~v;
  };
  uint64_t v = word(w) & (~uint64_t{0} << (from % 64));
  for (;;) {
    if (v) return std::min(nbits_, w * 64 + static_cast<uint64_t>(__builtin_ctzll(v)));
    if (++w >= nwords_) return nbits_;
    v = word(w);
  }
}

void DirtyBitmap::Merge(const DirtyBitmap& other) {
  if (other.granularity_ == granularity_ && other.nwords_ == nwords_) {
    for (uint64_t i = 0; i < nwords_; ++i) {
      uint64_t v = other.words_[i].load(std::memory_order_relaxed);
      if (v) words_[i].fetch_or(v, std::memory_order_relaxed);
    }
    return;
  }
  other.ForEachDirty([&](uint64_t off, uint64_t len) { Set(off, len); });
}

std::vector<uint64_t> DirtyBitmap::Words() const {
  std::vector<uint64_t> out(nwords_);
  for (uint64_t i = 0; i < nwords_; ++i) out[i] = words_[i].load(std::memory_order_relaxed);
  return out;
}

bool DirtyBitmap::SetWords(const std::vector<uint64_t>& words) {
  if (words.size() != nwords_) return false;
  for (uint64_t i = 0; i < nwords_; ++i) words_[i].store(words[i], std::memory_order_relaxed);
  // Bits past the end stay clear.
  if (nbits_ % 64 != 0 && nwords_ > 0) {
    words_[nwords_ - 1].fetch_and(MaskBetween(0, nbits_ % 64), std::memory_order_relaxed);
  }
  return true;
}

}  // namespace cbw::backup
