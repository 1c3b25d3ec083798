// Small shared pieces of the C++ backend: inlining / ISA attributes, bit helpers, group layout.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define PK_INLINE inline __attribute__((always_inline))
#define PK_NOINLINE __attribute__((noinline))
#else
#define PK_INLINE inline
#define PK_NOINLINE
#endif

// The hot loops are compiled three times: for the baseline ISA, for AVX2 + FMA and for AVX-512,
// chosen at run time. Per-function target attributes (never a file-wide pragma) keep every
// out-of-line function, including std:: template instances shared with other files, at the
// baseline ISA; only code inlined into a PK_SIMD_TARGET (PK_AVX512_TARGET) function is compiled
// for AVX2 (AVX-512).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PK_HAVE_SIMD_VARIANT 1
#define PK_SIMD_TARGET __attribute__((target("avx2,fma,popcnt,bmi,bmi2")))
#define PK_AVX512_TARGET __attribute__((target("avx512f,avx2,fma,popcnt,bmi,bmi2")))
#else
#define PK_HAVE_SIMD_VARIANT 0
#define PK_SIMD_TARGET
#define PK_AVX512_TARGET
#endif

// The bitmask's bytes are the little-endian bytes of its 64-bit words: on such hosts whole groups
// are copied as words.
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define PK_LITTLE_ENDIAN 1
#else
#define PK_LITTLE_ENDIAN 0
#endif

namespace pk {

// The constants the Python package defines too (GROUP_SIZE, RADIX_*_BINS, HIST_*): bindings.cpp
// exports each under that name as an attribute of _C, and tests/test_cpp_contract.py checks that
// the two agree.
//
// Elements per group_ptr entry (storage.GROUP_SIZE); a group is 32 bytes of the bitmask.
inline constexpr int kGroupSize = 256;
inline constexpr int kGroupBytes = kGroupSize / 8;
inline constexpr int kGroupWords = kGroupSize / 64;

// Radix select on the bit patterns of non-negative float32 scores: a high digit of the upper 15
// bits (the sign bit is 0), then a low digit of the lower 16 bits, one histogram pass each.
inline constexpr int kRadixLowBits = 16;
inline constexpr int kRadixHighBits = 31 - kRadixLowBits;
inline constexpr int64_t kRadixHighBins = int64_t{1} << kRadixHighBits;  // RADIX_HIGH_BINS
inline constexpr int64_t kRadixLowBins = int64_t{1} << kRadixLowBits;    // RADIX_LOW_BINS

// Log-spaced score bins on the float32 bit pattern: 2**kHistMantissaBits bins per octave from
// 2**kHistMinExp to 2**kHistMaxExp, the bin of a score being
// clamp((bits >> kHistShift) - kHistBase, 0, kHistBins - 1): shift 18, base 2784, 2080 bins. The
// kernels take the bins as arguments (LogBins in ops.h), which the Python wrapper sets to these.
inline constexpr int kHistMantissaBits = 5;
inline constexpr int kHistMinExp = -40;
inline constexpr int kHistMaxExp = 25;
inline constexpr int kHistShift = 23 - kHistMantissaBits;
inline constexpr int64_t kHistBase = int64_t{127 + kHistMinExp} << kHistMantissaBits;
inline constexpr int64_t kHistBins = int64_t{kHistMaxExp - kHistMinExp} << kHistMantissaBits;

PK_INLINE int popcount64(uint64_t x) {
#if defined(__GNUC__)
  return __builtin_popcountll(x);
#else
  int n = 0;
  for (; x; x &= x - 1) ++n;
  return n;
#endif
}

PK_INLINE int ctz64(uint64_t x) {  // x != 0
#if defined(__GNUC__)
  return __builtin_ctzll(x);
#else
  int n = 0;
  while (!(x & 1)) {
    x >>= 1;
    ++n;
  }
  return n;
#endif
}

PK_INLINE int group_popcount(const uint64_t* w) {
  return popcount64(w[0]) + popcount64(w[1]) + popcount64(w[2]) + popcount64(w[3]);
}

// Bits of group g as four little-endian words, with bits at or past `len` cleared (padding bits
// past numel are not part of the tracked set, as in storage.unpack_bits).
PK_INLINE void load_group_bits(const uint8_t* bits, int64_t nbytes, int64_t g, int len,
                               uint64_t* w) {
  const int64_t b0 = g * kGroupBytes;
#if PK_LITTLE_ENDIAN
  if (len == kGroupSize) {  // a full group: its 32 bytes are all there
    std::memcpy(w, bits + b0, kGroupBytes);
    return;
  }
#endif
  const int64_t avail = nbytes - b0;
  const int nb = avail < kGroupBytes ? static_cast<int>(avail) : kGroupBytes;
  w[0] = w[1] = w[2] = w[3] = 0;
  for (int k = 0; k < nb; ++k) w[k >> 3] |= static_cast<uint64_t>(bits[b0 + k]) << ((k & 7) * 8);
  if (len < kGroupSize) {
    const int full = len >> 6, rem = len & 63;
    for (int k = full; k < kGroupWords; ++k) {
      w[k] = (k == full && rem) ? (w[k] & ((uint64_t{1} << rem) - 1)) : 0;
    }
  }
}

PK_INLINE void store_group_bits(uint8_t* bits, int64_t nbytes, int64_t g, const uint64_t* w) {
  const int64_t b0 = g * kGroupBytes;
#if PK_LITTLE_ENDIAN
  if (b0 + kGroupBytes <= nbytes) {
    std::memcpy(bits + b0, w, kGroupBytes);
    return;
  }
#endif
  const int64_t avail = nbytes - b0;
  const int nb = avail < kGroupBytes ? static_cast<int>(avail) : kGroupBytes;
  for (int k = 0; k < nb; ++k) bits[b0 + k] = static_cast<uint8_t>(w[k >> 3] >> ((k & 7) * 8));
}

// Bit j of the result is flag j, for 64 flags of 0 or 1: each byte of the product's top byte
// collects one flag (the partial products land on distinct bits, so nothing carries).
PK_INLINE uint64_t pack_flags64(const uint8_t* f) {
  uint64_t w = 0;
  for (int k = 0; k < 8; ++k) {
    uint64_t x;
    std::memcpy(&x, f + 8 * k, sizeof x);
    w |= ((x * 0x0102040810204080ull) >> 56) << (8 * k);
  }
  return w;
}

PK_INLINE int32_t float_bits(float x) {
  int32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

}  // namespace pk
