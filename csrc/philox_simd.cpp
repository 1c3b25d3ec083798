// Philox blocks: the baseline loop of philox.h, and AVX2 / AVX-512 intrinsics (2.7x / 5x faster
// than that loop auto-vectorised for AVX2, on one Sapphire Rapids core).
//
// Each 64-bit lane carries one counter, its 32-bit words in the low half. _mm*_mul_epu32 reads only
// the low halves, so the high halves may hold garbage from the previous round (the low product
// word kept as a full 64-bit product, xors into it) without ever reaching a low half: the low
// halves are exactly the scalar words of philox_word(). Several independent vectors per iteration
// hide the multiply latency.
#include "philox.h"

#if PK_HAVE_SIMD_VARIANT
#include <immintrin.h>
// GCC 12 flags the deliberately undefined lanes inside its own AVX-512 intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pk {

void init_values_block_plain(PhiloxKey key, int64_t start, int len, float bound, float* w0) {
  init_values_block(key, start, len, bound, w0);
}

#if PK_HAVE_SIMD_VARIANT
namespace {

// Lane counters stay below 2**32 (no carry into the high word) when this holds.
bool no_carry(int64_t start, int len) {
  return (static_cast<uint64_t>(start) & 0xFFFFFFFFu) + static_cast<uint64_t>(len) <=
         (uint64_t{1} << 32);
}

}  // namespace

__attribute__((target("avx2"))) void init_values_block_avx2(PhiloxKey key, int64_t start,
                                                            int len, float bound, float* w0) {
  constexpr int kVectors = 4;  // 16 counters per iteration
  int j = 0;
  if (no_carry(start, len)) {
    const uint64_t lo0 = static_cast<uint64_t>(start) & 0xFFFFFFFFu;
    const __m256i ka = _mm256_set1_epi64x(kPhiloxRoundA), kb = _mm256_set1_epi64x(kPhiloxRoundB);
    __m256i rk0[10], rk1[10];
    for (int r = 0; r < 10; ++r) {
      rk0[r] = _mm256_set1_epi64x(static_cast<uint32_t>(key.k0 + r * kPhiloxKeyA));
      rk1[r] = _mm256_set1_epi64x(static_cast<uint32_t>(key.k1 + r * kPhiloxKeyB));
    }
    const __m256i hi = _mm256_set1_epi64x(static_cast<int64_t>(static_cast<uint64_t>(start) >> 32));
    const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
    const __m256i low_words = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256 scale = _mm256_set1_ps(kUniformScale), vbound = _mm256_set1_ps(bound);
    const __m256 two = _mm256_set1_ps(2.0f), one = _mm256_set1_ps(1.0f);
    for (; j + 4 * kVectors <= len; j += 4 * kVectors) {
      __m256i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
      for (int v = 0; v < kVectors; ++v) {
        c0[v] = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(lo0 + j + 4 * v)), lane);
        c1[v] = hi;
        c2[v] = c3[v] = _mm256_setzero_si256();
      }
#pragma GCC unroll 10
      for (int r = 0; r < 10; ++r) {
        for (int v = 0; v < kVectors; ++v) {
          const __m256i pb = _mm256_mul_epu32(c2[v], kb), pa = _mm256_mul_epu32(c0[v], ka);
          c0[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), c1[v]), rk0[r]);
          c2[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), c3[v]), rk1[r]);
          c1[v] = pb;
          c3[v] = pa;
        }
      }
      for (int v = 0; v < kVectors; v += 2) {
        const __m256i a = _mm256_permutevar8x32_epi32(c0[v], low_words);
        const __m256i b = _mm256_permutevar8x32_epi32(c0[v + 1], low_words);
        __m256i x = _mm256_permute2x128_si256(a, b, 0x20);
        x = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));
        const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(x), scale);
        const __m256 w = _mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(two, u), one), vbound);
        _mm256_storeu_ps(w0 + j + 4 * v, w);
      }
    }
  }
  for (; j < len; ++j) w0[j] = init_value(key, start + j, bound);
}

__attribute__((target("avx512f"))) void init_values_block_avx512(PhiloxKey key, int64_t start,
                                                                 int len, float bound,
                                                                 float* w0) {
  constexpr int kVectors = 4;  // 32 counters per iteration
  int j = 0;
  if (no_carry(start, len)) {
    const uint64_t lo0 = static_cast<uint64_t>(start) & 0xFFFFFFFFu;
    const __m512i ka = _mm512_set1_epi64(kPhiloxRoundA), kb = _mm512_set1_epi64(kPhiloxRoundB);
    __m512i rk0[10], rk1[10];
    for (int r = 0; r < 10; ++r) {
      rk0[r] = _mm512_set1_epi64(static_cast<uint32_t>(key.k0 + r * kPhiloxKeyA));
      rk1[r] = _mm512_set1_epi64(static_cast<uint32_t>(key.k1 + r * kPhiloxKeyB));
    }
    const __m512i hi = _mm512_set1_epi64(static_cast<int64_t>(static_cast<uint64_t>(start) >> 32));
    const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    const __m512 scale = _mm512_set1_ps(kUniformScale), vbound = _mm512_set1_ps(bound);
    const __m512 two = _mm512_set1_ps(2.0f), one = _mm512_set1_ps(1.0f);
    for (; j + 8 * kVectors <= len; j += 8 * kVectors) {
      __m512i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
      for (int v = 0; v < kVectors; ++v) {
        c0[v] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(lo0 + j + 8 * v)), lane);
        c1[v] = hi;
        c2[v] = c3[v] = _mm512_setzero_si512();
      }
#pragma GCC unroll 10
      for (int r = 0; r < 10; ++r) {
        for (int v = 0; v < kVectors; ++v) {
          const __m512i pb = _mm512_mul_epu32(c2[v], kb), pa = _mm512_mul_epu32(c0[v], ka);
          // 0x96: a ^ b ^ c in one instruction
          c0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[v], rk0[r], 0x96);
          c2[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[v], rk1[r], 0x96);
          c1[v] = pb;
          c3[v] = pa;
        }
      }
      for (int v = 0; v < kVectors; v += 2) {
        __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(c0[v])),
                                       _mm512_cvtepi64_epi32(c0[v + 1]), 1);
        x = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));
        const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(x), scale);
        const __m512 w = _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(two, u), one), vbound);
        _mm512_storeu_ps(w0 + j + 8 * v, w);
      }
    }
  }
  for (; j < len; ++j) w0[j] = init_value(key, start + j, bound);
}

#endif  // PK_HAVE_SIMD_VARIANT

}  // namespace pk
