// Philox4x32-10 as Triton's tl.rand uses it, and the initial weights derived from it.
//
// Must stay bit-identical to procrustes_kernels/philox.py (and so to tl.rand on GPU): counter =
// (offset lo, offset hi, 0, 0), key = (seed lo, seed hi), output word c0 read as int32, negative
// values folded with ~x, times one float32 constant. Only integer ops and correctly rounded float32
// operations are involved, so every compiler and ISA gives the same bits (the build turns off FMA
// contraction, which would otherwise fuse 2u - 1 or the products below).
#pragma once

#include <cstdint>

#include "common.h"

namespace pk {

inline constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
inline constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
inline constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
inline constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
// float32(4.6566127342e-10): the largest scale with (2**31 - 1) * scale < 1 after rounding.
inline constexpr float kUniformScale = 0x1.fffffep-32f;

struct PhiloxKey {
  uint32_t k0, k1;
  explicit PhiloxKey(uint64_t seed)
      : k0(static_cast<uint32_t>(seed)), k1(static_cast<uint32_t>(seed >> 32)) {}
};

// First output word for counter (lo, hi, 0, 0).
PK_INLINE uint32_t philox_word(PhiloxKey key, uint32_t lo, uint32_t hi) {
  uint32_t c0 = lo, c1 = hi, c2 = 0, c3 = 0;
  uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(c2) * kPhiloxRoundB;
    const uint64_t pa = static_cast<uint64_t>(c0) * kPhiloxRoundA;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

PK_INLINE float uniform_of_word(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x ^= x >> 31;  // tl.rand's `x < 0 ? ~x : x`, branch-free so the block loops vectorise
  return static_cast<float>(x) * kUniformScale;
}

// w0 = (2u - 1) * bound, each operation rounded to float32 in this order (philox.init_values).
PK_INLINE float init_value_of_uniform(float u, float bound) { return (2.0f * u - 1.0f) * bound; }

PK_INLINE float init_value(PhiloxKey key, int64_t offset, float bound) {
  const uint64_t off = static_cast<uint64_t>(offset);
  const uint32_t word =
      philox_word(key, static_cast<uint32_t>(off), static_cast<uint32_t>(off >> 32));
  return init_value_of_uniform(uniform_of_word(word), bound);
}

// w0 for offsets [start, start + len): one tight loop the compiler vectorises across offsets.
PK_INLINE void init_values_block(PhiloxKey key, int64_t start, int len, float bound, float* w0) {
  const uint64_t first = static_cast<uint64_t>(start);
  const uint32_t hi0 = static_cast<uint32_t>(first >> 32);
  const uint32_t lo0 = static_cast<uint32_t>(first);
  if (static_cast<uint64_t>(lo0) + static_cast<uint64_t>(len) <= (uint64_t{1} << 32)) {
    // The common case: the high counter word is the same for the whole block.
    for (int j = 0; j < len; ++j) {
      const uint32_t word = philox_word(key, lo0 + static_cast<uint32_t>(j), hi0);
      w0[j] = init_value_of_uniform(uniform_of_word(word), bound);
    }
  } else {
    for (int j = 0; j < len; ++j) w0[j] = init_value(key, start + j, bound);
  }
}

// A block generator: w0 for offsets [start, start + len). The kernels call one through a pointer
// chosen once per op for the CPU (see init_block_fn() in ops.h); all produce identical bits.
using InitBlockFn = void (*)(PhiloxKey key, int64_t start, int len, float bound, float* w0);

void init_values_block_plain(PhiloxKey key, int64_t start, int len, float bound, float* w0);
#if PK_HAVE_SIMD_VARIANT
void init_values_block_avx2(PhiloxKey key, int64_t start, int len, float bound, float* w0);
void init_values_block_avx512(PhiloxKey key, int64_t start, int len, float bound, float* w0);
#endif

}  // namespace pk
