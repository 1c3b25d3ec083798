// Sinks: what a pass (passes.h) does with the scores of one group. The scoring passes hand a sink
// the group's 256 float32 scores: log-bin histogram, radix histograms of the high and the low
// digit, the compaction's threshold bitmask (and the kept candidates it collects). The scans of a
// step's later passes hand it the stored upper halves of the scores instead, and a way to compute
// the exact scores of the few elements those cannot decide (Exact in score.h).
//
// Every sink is per thread (one per OpenMP thread, each on its own histogram row or buffer) and
// writes only per-group outputs or integer counts, so results never depend on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "common.h"
#include "masks.h"
#include "ops.h"

namespace pk {
namespace {

// ---------------------------------------------------------------------------------------------
// Sinks of the scoring passes. Each copies its fields to locals first: the histogram stores
// could alias the sink itself as far as the compiler knows, which would reload every field once
// per element. Counts go to per-thread uint32 rows (run_counted keeps every row below 2**32
// counts).
// ---------------------------------------------------------------------------------------------
// The counting loops are unrolled: the increments of different bins then overlap (about 1.5x
// faster than the plain loop); a full group has a fixed trip count.
// Elements per count() call of the interleaved pass.
inline constexpr int kCountPart = 32;

// Log bins of float bit patterns, clamped into [0, nbins): in int32 arithmetic when it cannot
// overflow (as for the package's bins, kHist* in common.h), else in int64.
PK_INLINE constexpr bool log_bins_narrow(const LogBins& bins) {
  return bins.shift >= 1 && bins.base >= -(int64_t{1} << 30) && bins.base <= (int64_t{1} << 30) &&
         bins.nbins <= (int64_t{1} << 30);
}
static_assert(log_bins_narrow(LogBins{kHistShift, kHistBase, kHistBins}),
              "the package's log bins take the int32 path");

// The radix digits of a score's bit pattern (the sign bit is 0 for a score).
inline constexpr uint32_t kHighDigitMask = static_cast<uint32_t>(kRadixHighBins - 1);
inline constexpr uint32_t kLowDigitMask = static_cast<uint32_t>(kRadixLowBins - 1);

// bits_of(src[j]): the float32 bit pattern (or its upper half, shifted up) of entry j.
PK_INLINE int32_t bits_of(float x) { return float_bits(x); }
PK_INLINE int32_t bits_of(uint16_t upper) {
  return static_cast<int32_t>(static_cast<uint32_t>(upper) << kRadixLowBits);
}

template <class Src>
PK_INLINE void log_bin_index(const Src* src, int n, const LogBins& bins, int32_t* idx) {
  const int shift = bins.shift;
  if (log_bins_narrow(bins)) {
    const int32_t base = static_cast<int32_t>(bins.base), top = static_cast<int32_t>(bins.nbins - 1);
    for (int j = 0; j < n; ++j) {  // vectorises
      int32_t b = (bits_of(src[j]) >> shift) - base;
      b = b < 0 ? 0 : b;
      idx[j] = b > top ? top : b;
    }
  } else {
    const int64_t base = bins.base, top = bins.nbins - 1;
    for (int j = 0; j < n; ++j) {
      int64_t b = static_cast<int64_t>(bits_of(src[j]) >> shift) - base;
      b = b < 0 ? 0 : b;
      idx[j] = static_cast<int32_t>(b > top ? top : b);
    }
  }
}

// Counts of the log bins of n scores (or stored upper halves) into hist.
template <class Src>
PK_INLINE void count_log_bins(const Src* src, int n, const LogBins& bins, uint32_t* hist) {
  alignas(64) int32_t idx[kGroupSize];
  for (int j0 = 0; j0 < n; j0 += kGroupSize) {
    const int m = std::min(n - j0, kGroupSize);
    log_bin_index(src + j0, m, bins, idx);
#pragma GCC unroll 8
    for (int j = 0; j < m; ++j) ++hist[idx[j]];
  }
}

// A sink has count(s, n), the histogram part, which the AVX-512 pass interleaves with the next
// group's Philox (they use different execution ports), and body<Isa>(g, len, s), the rest;
// group<Isa>() does both.
template <class Sink>
struct SinkBase {
  static constexpr bool kWantCM = false;  // collect(g, c, m) after body(): the kept candidates
  template <int Isa>
  PK_INLINE void group(int64_t g, int len, const float* s) {
    static_cast<Sink*>(this)->count(s, len);
    static_cast<Sink*>(this)->template body<Isa>(g, len, s);
  }
};

struct LogHistSink : SinkBase<LogHistSink> {
  uint32_t* hist;
  LogBins bins;
  LogHistSink(uint32_t* h, LogBins b) : hist(h), bins(b) {}
  PK_INLINE void count(const float* s, int n) { count_log_bins(s, n, bins, hist); }
  template <int Isa>
  PK_INLINE void body(int64_t, int, const float*) {}
};

struct RadixHighSink : SinkBase<RadixHighSink> {
  uint32_t* hist;
  explicit RadixHighSink(uint32_t* h) : hist(h) {}
  PK_INLINE void count(const float* s, int n) {
    uint32_t* const h = hist;
    // Scores are |.|, so the sign bit is 0 and the index is below 2**15 (masked all the same).
    const auto bin = [](float x) {
      return (static_cast<uint32_t>(float_bits(x)) >> kRadixLowBits) & kHighDigitMask;
    };
    if (n == kCountPart) {
#pragma GCC unroll 8
      for (int j = 0; j < kCountPart; ++j) ++h[bin(s[j])];
    } else {
#pragma GCC unroll 8
      for (int j = 0; j < n; ++j) ++h[bin(s[j])];
    }
  }
  template <int Isa>
  PK_INLINE void body(int64_t, int, const float*) {}
};

struct RadixLowSink : SinkBase<RadixLowSink> {
  uint32_t* hist;
  uint32_t high;
  RadixLowSink(uint32_t* h, uint32_t hi) : hist(h), high(hi) {}
  PK_INLINE void count(const float*, int) {}
  template <int Isa>
  PK_INLINE void body(int64_t, int len, const float* s) {
    alignas(64) float pad[kGroupSize];
    const float* f = full_group(s, len, pad);
    uint32_t* const h = hist;
    const uint32_t hi = high;
    for (int k = 0; k < kGroupWords; ++k) {
      // (a NaN score has upper bits 0x7FC0 too: the padding is masked off)
      for (uint64_t b = Masks<Isa>::high_eq(f + 64 * k, hi) & valid_bits(len, k); b; b &= b - 1) {
        ++h[static_cast<uint32_t>(float_bits(f[64 * k + ctz64(b)])) & kLowDigitMask];
      }
    }
  }
};

// First pass of compact(): bits of s > threshold, per-group counts of those and of the ties.
struct CompactSink : SinkBase<CompactSink> {
  float thr;
  uint8_t* out_bits;
  uint8_t* tie_bits;  // nullptr when there is no tie quota
  int64_t nbytes;
  int32_t* gt_count;
  int32_t* tie_count;
  uint32_t* hist;  // nullptr unless the log histogram is asked for
  LogBins bins;
  uint64_t last_gt[kGroupWords] = {0, 0, 0, 0};  // the last group's kept bits
  CompactSink(float t, uint8_t* ob, uint8_t* tb, int64_t nb, int32_t* gc, int32_t* tc,
              uint32_t* h, LogBins b)
      : thr(t), out_bits(ob), tie_bits(tb), nbytes(nb), gt_count(gc), tie_count(tc), hist(h),
        bins(b) {}
  PK_INLINE void count(const float* s, int n) {
    if (hist) count_log_bins(s, n, bins, hist);
  }
  template <int Isa>
  PK_INLINE void body(int64_t g, int len, const float* s) {
    alignas(64) float pad[kGroupSize];
    const float* f = full_group(s, len, pad);
    const float t = thr;
    uint64_t w[kGroupWords];
    for (int k = 0; k < kGroupWords; ++k) w[k] = Masks<Isa>::gt(f + 64 * k, t);
    store_group_bits(out_bits, nbytes, g, w);
    gt_count[g] = group_popcount(w);
    for (int k = 0; k < kGroupWords; ++k) last_gt[k] = w[k];
    if (tie_bits) {
      for (int k = 0; k < kGroupWords; ++k) w[k] = Masks<Isa>::eq(f + 64 * k, t);
      store_group_bits(tie_bits, nbytes, g, w);
      tie_count[g] = group_popcount(w);
    }
  }
};

// compact() without a tie quota keeps exactly the scores above the threshold, so it knows the
// kept set during the pass: this sink also appends the kept candidates (and momenta) to its
// thread's buffers, and the compaction then only copies them into place (no second pass, no
// second Philox for the kept untracked weights).
template <class T>
struct CompactKeepSink : CompactSink {
  static constexpr bool kWantCM = true;
  typename Compaction<T>::Buffer* out;
  int64_t* group_off;   // per group: where its kept entries start in its thread's buffers
  int32_t* group_thread;
  int32_t tid;
  bool with_mom;
  CompactKeepSink(const CompactSink& base, typename Compaction<T>::Buffer* o, int64_t* off, int32_t* thr, int t,
                  bool mom)
      : CompactSink(base), out(o), group_off(off), group_thread(thr), tid(t), with_mom(mom) {}
  template <int Isa>
  PK_INLINE void collect(int64_t g, const T* c, const T* m) {
    typename Compaction<T>::Buffer& o = *out;
    const int64_t at = o.size;
    if (at + kGroupSize > o.capacity) grow(o, at + kGroupSize);
    group_off[g] = at;
    group_thread[g] = tid;
    T* const v = o.vals.get() + at;
#if PK_HAVE_SIMD_VARIANT
    if constexpr (Isa == 2 && std::is_same_v<T, float>) {
      o.size = at + collect_f32_avx512(c, m, v, with_mom ? o.moms.get() + at : nullptr);
      return;
    }
#endif
    int q = 0;
    for (int k = 0; k < kGroupWords; ++k) {
      for (uint64_t b = last_gt[k]; b; b &= b - 1) v[q++] = c[k * 64 + ctz64(b)];
    }
    if (with_mom) {
      T* const mo = o.moms.get() + at;
      q = 0;
      for (int k = 0; k < kGroupWords; ++k) {
        for (uint64_t b = last_gt[k]; b; b &= b - 1) mo[q++] = m[k * 64 + ctz64(b)];
      }
    }
    o.size = at + q;
  }
#if PK_HAVE_SIMD_VARIANT
  // The kept lanes of each 16 compressed out (float, AVX-512).
  inline PK_AVX512_TARGET int collect_f32_avx512(const float* c, const float* m, float* v,
                                                    float* mo) const {
    int q = 0;
    for (int j = 0; j < kGroupSize; j += 16) {
      const __mmask16 keep = static_cast<__mmask16>(last_gt[j >> 6] >> (j & 63));
      const __mmask16 packed = first_lanes(__builtin_popcount(keep));
      _mm512_mask_storeu_ps(v + q, packed, _mm512_maskz_compress_ps(keep, _mm512_load_ps(c + j)));
      if (mo) {
        _mm512_mask_storeu_ps(mo + q, packed, _mm512_maskz_compress_ps(keep, _mm512_load_ps(m + j)));
      }
      q += __builtin_popcount(keep);
    }
    return q;
  }
#endif
  PK_NOINLINE void grow(typename Compaction<T>::Buffer& o, int64_t need) {
    const int64_t cap = std::max<int64_t>(2 * o.capacity, need + 64 * kGroupSize);
    std::unique_ptr<T[]> v(new T[cap]);  // uninitialised: only entries below size are read
    if (o.size) std::memcpy(v.get(), o.vals.get(), sizeof(T) * o.size);
    o.vals = std::move(v);
    if (with_mom) {
      std::unique_ptr<T[]> mo(new T[cap]);
      if (o.size) std::memcpy(mo.get(), o.moms.get(), sizeof(T) * o.size);
      o.moms = std::move(mo);
    }
    o.capacity = cap;
  }
};

// ---------------------------------------------------------------------------------------------
// The stored scores of a step: the upper 16 bits of every score (uint16), written by the first
// pass. They order the scores as the scores themselves, except within one value of the upper
// bits: the later passes then recompute the exact score of those few elements (Exact in score.h),
// a fraction of a percent of the weight for a histogram threshold. An upper half is the sign bit
// and the radix high digit, so the high histogram needs no exact score at all.
// ---------------------------------------------------------------------------------------------
static_assert(kRadixLowBits == 16, "a stored upper half is the bit pattern less the low digit");

PK_INLINE uint16_t upper_half(float s) {
  return static_cast<uint16_t>(static_cast<uint32_t>(float_bits(s)) >> kRadixLowBits);
}

// Sinks of a scan over stored upper halves: group<Isa>(g, len, h, exact).
struct HighFromUpper {
  uint32_t* hist;
  template <int Isa, class Ex>
  PK_INLINE void group(int64_t, int len, const uint16_t* h, const Ex&) {
    uint32_t* const hs = hist;
    if (len == kGroupSize) {
#pragma GCC unroll 8
      for (int j = 0; j < kGroupSize; ++j) ++hs[h[j] & kHighDigitMask];
    } else {
      for (int j = 0; j < len; ++j) ++hs[h[j] & kHighDigitMask];
    }
  }
};

// Log bins from the upper halves (exact when bins.shift >= 16: the lower half is shifted out).
struct LogFromUpper {
  uint32_t* hist;
  LogBins bins;
  template <int Isa, class Ex>
  PK_INLINE void group(int64_t, int len, const uint16_t* h, const Ex&) {
    count_log_bins(h, len, bins, hist);
  }
};

// The lower halves of the scores whose upper half is `high`: few (a fraction of a percent of the
// weight for the bin a top-k threshold falls in), so they are listed per thread rather than counted
// into a 2**16-bin row per thread.
struct LowFromUpper {
  std::vector<uint16_t>* lows;
  uint32_t high;
  template <int Isa, class Ex>
  PK_INLINE void group(int64_t g, int len, const uint16_t* h, const Ex& exact) {
    alignas(64) uint16_t pad[kGroupSize];
    const uint16_t* f = full_group16(h, len, pad);
    uint64_t want[kGroupWords];
    uint64_t any = 0;
    for (int k = 0; k < kGroupWords; ++k) {
      want[k] = Masks16<Isa>::eq(f + 64 * k, high) & valid_bits(len, k);
      any |= want[k];
    }
    if (!any) return;
    alignas(64) float s[kGroupSize];
    if (!exact(g, want, s)) return;
    for (int k = 0; k < kGroupWords; ++k) {
      for (uint64_t b = want[k]; b; b &= b - 1) {
        lows->push_back(static_cast<uint16_t>(float_bits(s[k * 64 + ctz64(b)])));
      }
    }
  }
};

// compact()'s first pass from the upper halves, for a threshold t >= +0 (sign bit clear) with
// upper half tu: an entry above tu (and below 0x7F80, infinities and NaNs) is above t, one below
// is not; entries equal to tu, and any >= 0x7F80, are decided on their exact scores.
struct SelectFromUpper {
  float thr;
  uint32_t tu;
  uint8_t* out_bits;
  uint8_t* tie_bits;
  int64_t nbytes;
  int32_t* gt_count;
  int32_t* tie_count;
  uint32_t* hist;
  LogBins bins;
  template <int Isa, class Ex>
  PK_INLINE void group(int64_t g, int len, const uint16_t* h, const Ex& exact) {
    alignas(64) uint16_t pad[kGroupSize];
    const uint16_t* f = full_group16(h, len, pad);
    uint64_t gt[kGroupWords], want[kGroupWords], eq[kGroupWords] = {0, 0, 0, 0};
    uint64_t any = 0;
    for (int k = 0; k < kGroupWords; ++k) {
      const uint64_t valid = valid_bits(len, k);
      const uint64_t special = Masks16<Isa>::ge(f + 64 * k, 0x7F80u);
      gt[k] = Masks16<Isa>::gt(f + 64 * k, tu) & ~special & valid;
      want[k] = (Masks16<Isa>::eq(f + 64 * k, tu) | special) & valid;
      any |= want[k];
    }
    if (any) {
      alignas(64) float s[kGroupSize];
      if (exact(g, want, s)) {
        const float t = thr;
        for (int k = 0; k < kGroupWords; ++k) {
          for (uint64_t b = want[k]; b; b &= b - 1) {
            const float x = s[k * 64 + ctz64(b)];
            const uint64_t bit = b & (~b + 1);
            if (x > t) gt[k] |= bit;
            if (x == t) eq[k] |= bit;
          }
        }
      }
    }
    store_group_bits(out_bits, nbytes, g, gt);
    gt_count[g] = group_popcount(gt);
    if (tie_bits) {
      store_group_bits(tie_bits, nbytes, g, eq);
      tie_count[g] = group_popcount(eq);
    }
    if (hist) count_log_bins(h, len, bins, hist);
  }
};

}  // namespace
}  // namespace pk
