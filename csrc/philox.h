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

#if PK_HAVE_SIMD_VARIANT
#include <immintrin.h>
#endif

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

// Zeros in place of w0, for passes where every use of w0 is multiplied by a zero scale: the
// products would be zeros anyway (up to their sign, which no kept result depends on), so the
// Philox rounds are skipped.
void zero_values_block(PhiloxKey key, int64_t start, int len, float bound, float* w0);

// w0 at offsets start + idx[l] for l < count (0 <= idx[l] < 2**31): the scattered elements of
// one group, e.g. the kept weights that were not tracked. idx and out must have room for
// count rounded up to kIdxPad entries (the padding lanes are computed and discarded).
inline constexpr int kIdxPad = 16;
using InitIdxFn = void (*)(PhiloxKey key, int64_t start, const int32_t* idx, int count,
                           float bound, float* out);

void init_values_idx_plain(PhiloxKey key, int64_t start, const int32_t* idx, int count,
                           float bound, float* out);
// zero_values_block() for the scattered elements (count rounded up to kIdxPad entries).
void zero_values_idx(PhiloxKey key, int64_t start, const int32_t* idx, int count, float bound,
                     float* out);
#if PK_HAVE_SIMD_VARIANT
void init_values_idx_avx2(PhiloxKey key, int64_t start, const int32_t* idx, int count,
                          float bound, float* out);
void init_values_idx_avx512(PhiloxKey key, int64_t start, const int32_t* idx, int count,
                            float bound, float* out);
#endif


#if PK_HAVE_SIMD_VARIANT
// ---------------------------------------------------------------------------------------------
// SIMD rounds, inlined into philox_simd.cpp's generators and into the AVX-512 update kernels.
//
// Each 64-bit lane carries one counter, its 32-bit words in the low half. _mm*_mul_epu32 reads
// only the low halves, so the high halves may hold garbage from the previous round (the low
// product word kept as a full 64-bit product, xors into it) without ever reaching a low half: the
// low halves are exactly the scalar words of philox_word(). Several independent vectors per
// iteration hide the multiply latency.
// ---------------------------------------------------------------------------------------------
// The round keys, and what the first rounds compute the same in every lane. A block's counters
// are (lo, hi, 0, 0) with one hi for all lanes, so round 0 multiplies only c0 (c2 = 0 makes the
// other product 0: c0 becomes hi ^ k0 and c1 becomes 0 in every lane), round 1's c0 product is
// that constant times A, and round 2 xors its low word in. Round 9 computes only the word that is
// read (c0). The words are exactly philox_word()'s; only the lane-invariant work is skipped.
struct RoundKeys {
  uint32_t k0[10], k1[10];
  uint32_t x1;  // round 1: c2 = lo(c0 * A of round 0) ^ x1
  uint32_t x2;  // round 2: c2 = hi(c0 * A) ^ x2
  RoundKeys(PhiloxKey key, uint32_t hi) {
    for (int r = 0; r < 10; ++r) {
      k0[r] = key.k0 + static_cast<uint32_t>(r) * kPhiloxKeyA;
      k1[r] = key.k1 + static_cast<uint32_t>(r) * kPhiloxKeyB;
    }
    const uint32_t c0_1 = hi ^ k0[0];
    const uint64_t pa1 = static_cast<uint64_t>(c0_1) * kPhiloxRoundA;
    x1 = static_cast<uint32_t>(pa1 >> 32) ^ k1[1];
    x2 = static_cast<uint32_t>(pa1) ^ k1[2];
  }
};

#define PK_AVX2_FN inline __attribute__((always_inline, target("avx2")))
#define PK_AVX512_FN inline __attribute__((always_inline, target("avx512f")))

// c0[v]: counters' low words in 64-bit lanes (high halves anything); on return their low halves
// hold the first output word.
template <int V>
PK_AVX2_FN void philox_rounds_avx2(__m256i* c0, const RoundKeys& rk) {
  const __m256i ka = _mm256_set1_epi64x(kPhiloxRoundA), kb = _mm256_set1_epi64x(kPhiloxRoundB);
  __m256i c1[V], c2[V], c3[V];
  {
    const __m256i k1 = _mm256_set1_epi64x(rk.k1[0]);
    for (int v = 0; v < V; ++v) {
      const __m256i pa = _mm256_mul_epu32(c0[v], ka);
      c2[v] = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), k1);
      c3[v] = pa;
    }
  }
  {
    const __m256i k0 = _mm256_set1_epi64x(rk.k0[1]), x1 = _mm256_set1_epi64x(rk.x1);
    for (int v = 0; v < V; ++v) {
      const __m256i pb = _mm256_mul_epu32(c2[v], kb);
      c0[v] = _mm256_xor_si256(_mm256_srli_epi64(pb, 32), k0);
      c2[v] = _mm256_xor_si256(c3[v], x1);
      c1[v] = pb;
    }
  }
  {
    const __m256i k0 = _mm256_set1_epi64x(rk.k0[2]), x2 = _mm256_set1_epi64x(rk.x2);
    for (int v = 0; v < V; ++v) {
      const __m256i pb = _mm256_mul_epu32(c2[v], kb), pa = _mm256_mul_epu32(c0[v], ka);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), c1[v]), k0);
      c2[v] = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), x2);
      c1[v] = pb;
      c3[v] = pa;
    }
  }
#pragma GCC unroll 6
  for (int r = 3; r < 9; ++r) {
    const __m256i k0 = _mm256_set1_epi64x(rk.k0[r]), k1 = _mm256_set1_epi64x(rk.k1[r]);
    for (int v = 0; v < V; ++v) {
      const __m256i pb = _mm256_mul_epu32(c2[v], kb), pa = _mm256_mul_epu32(c0[v], ka);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), c1[v]), k0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), c3[v]), k1);
      c1[v] = pb;
      c3[v] = pa;
    }
  }
  {
    const __m256i k0 = _mm256_set1_epi64x(rk.k0[9]);
    for (int v = 0; v < V; ++v) {
      const __m256i pb = _mm256_mul_epu32(c2[v], kb);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), c1[v]), k0);
    }
  }
}

template <int V>
PK_AVX512_FN void philox_rounds_avx512(__m512i* c0, const RoundKeys& rk) {
  const __m512i ka = _mm512_set1_epi64(kPhiloxRoundA), kb = _mm512_set1_epi64(kPhiloxRoundB);
  __m512i c1[V], c2[V], c3[V];
  {
    const __m512i k1 = _mm512_set1_epi64(rk.k1[0]);
    for (int v = 0; v < V; ++v) {
      const __m512i pa = _mm512_mul_epu32(c0[v], ka);
      c2[v] = _mm512_xor_si512(_mm512_srli_epi64(pa, 32), k1);
      c3[v] = pa;
    }
  }
  {
    const __m512i k0 = _mm512_set1_epi64(rk.k0[1]), x1 = _mm512_set1_epi64(rk.x1);
    for (int v = 0; v < V; ++v) {
      const __m512i pb = _mm512_mul_epu32(c2[v], kb);
      c0[v] = _mm512_xor_si512(_mm512_srli_epi64(pb, 32), k0);
      c2[v] = _mm512_xor_si512(c3[v], x1);
      c1[v] = pb;
    }
  }
  {
    const __m512i k0 = _mm512_set1_epi64(rk.k0[2]), x2 = _mm512_set1_epi64(rk.x2);
    for (int v = 0; v < V; ++v) {
      const __m512i pb = _mm512_mul_epu32(c2[v], kb), pa = _mm512_mul_epu32(c0[v], ka);
      // 0x96: a ^ b ^ c in one instruction
      c0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[v], k0, 0x96);
      c2[v] = _mm512_xor_si512(_mm512_srli_epi64(pa, 32), x2);
      c1[v] = pb;
      c3[v] = pa;
    }
  }
#pragma GCC unroll 6
  for (int r = 3; r < 9; ++r) {
    const __m512i k0 = _mm512_set1_epi64(rk.k0[r]), k1 = _mm512_set1_epi64(rk.k1[r]);
    for (int v = 0; v < V; ++v) {
      const __m512i pb = _mm512_mul_epu32(c2[v], kb), pa = _mm512_mul_epu32(c0[v], ka);
      c0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[v], k0, 0x96);
      c2[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[v], k1, 0x96);
      c1[v] = pb;
      c3[v] = pa;
    }
  }
  {
    const __m512i k0 = _mm512_set1_epi64(rk.k0[9]);
    for (int v = 0; v < V; ++v) {
      const __m512i pb = _mm512_mul_epu32(c2[v], kb);
      c0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[v], k0, 0x96);
    }
  }
}

// w0 of 8 lanes from two vectors of 4 first words (AVX2), as uniform_of_word / init_value.
PK_AVX2_FN __m256 w0_of_words_avx2(__m256i a, __m256i b, float bound) {
  const __m256i low_words = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  a = _mm256_permutevar8x32_epi32(a, low_words);
  b = _mm256_permutevar8x32_epi32(b, low_words);
  __m256i x = _mm256_permute2x128_si256(a, b, 0x20);
  x = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUniformScale));
  return _mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(2.0f), u), _mm256_set1_ps(1.0f)),
                       _mm256_set1_ps(bound));
}

PK_AVX512_FN __m512 w0_of_words_avx512(__m512i a, __m512i b, float bound) {
  __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(a)),
                                 _mm512_cvtepi64_epi32(b), 1);
  x = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));
  const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(kUniformScale));
  return _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(2.0f), u), _mm512_set1_ps(1.0f)),
                       _mm512_set1_ps(bound));
}


// w0 of the 32 offsets (hi, lo) .. (hi, lo + 31), rk built for hi, lo + 31 < 2**32.
PK_AVX512_FN void w0_block32_avx512(const RoundKeys& rk, uint32_t lo, float bound, float* out) {
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i c0[4];
  for (int v = 0; v < 4; ++v) {
    c0[v] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(lo) + 8 * v), lane);
  }
  philox_rounds_avx512<4>(c0, rk);
  _mm512_storeu_ps(out, w0_of_words_avx512(c0[0], c0[1], bound));
  _mm512_storeu_ps(out + 16, w0_of_words_avx512(c0[2], c0[3], bound));
}
#endif  // PK_HAVE_SIMD_VARIANT

}  // namespace pk
