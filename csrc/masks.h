// Bit masks of 64 scores (float32) or 64 stored score upper halves (uint16), one struct per
// instruction set: Isa 0 portable, 1 AVX2, 2 AVX-512 (the value of simd_level() in ops.h). A sink
// (sinks.h) asks for them as Masks<Isa>::gt(...) etc. and so compiles for the set of the pass
// that inlines it (passes.h). Also the padding of a short last group and the lane masks of the
// AVX-512 code.
#pragma once

#include <cstdint>
#include <limits>

#include "common.h"

#if PK_HAVE_SIMD_VARIANT
#include <immintrin.h>
// GCC 12 flags the deliberately undefined lanes inside its own AVX-512 intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pk {
namespace {

#if PK_HAVE_SIMD_VARIANT
// The first n of 16 lanes.
PK_INLINE PK_AVX512_TARGET __mmask16 first_lanes(int n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}
#endif

// ---------------------------------------------------------------------------------------------
// Bit masks of 64 scores, per instruction set (Isa 0: portable, 1: AVX2, 2: AVX-512). Scores past
// the end of the weight are never passed in: a short last group is padded with NaN, which compares
// false.
// ---------------------------------------------------------------------------------------------
template <int Isa>
struct Masks {
  static PK_INLINE uint64_t gt(const float* s, float t) {
    alignas(64) uint8_t f[64];
    for (int j = 0; j < 64; ++j) f[j] = s[j] > t;
    return pack_flags64(f);
  }
  static PK_INLINE uint64_t eq(const float* s, float t) {
    alignas(64) uint8_t f[64];
    for (int j = 0; j < 64; ++j) f[j] = s[j] == t;
    return pack_flags64(f);
  }
  // Scores whose upper 16 bits equal hi.
  static PK_INLINE uint64_t high_eq(const float* s, uint32_t hi) {
    alignas(64) uint8_t f[64];
    for (int j = 0; j < 64; ++j) f[j] = (static_cast<uint32_t>(float_bits(s[j])) >> 16) == hi;
    return pack_flags64(f);
  }
};

#if PK_HAVE_SIMD_VARIANT
// Not always_inline: GCC inlines them once the sink is inside a PK_SIMD_TARGET function.
#define PK_AVX2_INLINE inline __attribute__((target("avx2")))
template <>
struct Masks<1> {
  static PK_AVX2_INLINE uint64_t gt(const float* s, float t) {
    const __m256 vt = _mm256_set1_ps(t);
    uint64_t w = 0;
    for (int v = 0; v < 8; ++v) {
      const __m256 x = _mm256_loadu_ps(s + 8 * v);
      w |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(x, vt, _CMP_GT_OQ))) << (8 * v);
    }
    return w;
  }
  static PK_AVX2_INLINE uint64_t eq(const float* s, float t) {
    const __m256 vt = _mm256_set1_ps(t);
    uint64_t w = 0;
    for (int v = 0; v < 8; ++v) {
      const __m256 x = _mm256_loadu_ps(s + 8 * v);
      w |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(x, vt, _CMP_EQ_OQ))) << (8 * v);
    }
    return w;
  }
  static PK_AVX2_INLINE uint64_t high_eq(const float* s, uint32_t hi) {
    const __m256i vh = _mm256_set1_epi32(static_cast<int32_t>(hi));
    uint64_t w = 0;
    for (int v = 0; v < 8; ++v) {
      const __m256i x = _mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 8 * v)), 16);
      const __m256i e = _mm256_cmpeq_epi32(x, vh);
      w |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(e))))
           << (8 * v);
    }
    return w;
  }
};

#define PK_AVX512_INLINE inline __attribute__((target("avx512f")))
template <>
struct Masks<2> {
  static PK_AVX512_INLINE uint64_t gt(const float* s, float t) {
    const __m512 vt = _mm512_set1_ps(t);
    uint64_t w = 0;
    for (int v = 0; v < 4; ++v) {
      w |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(s + 16 * v), vt, _CMP_GT_OQ))
           << (16 * v);
    }
    return w;
  }
  static PK_AVX512_INLINE uint64_t eq(const float* s, float t) {
    const __m512 vt = _mm512_set1_ps(t);
    uint64_t w = 0;
    for (int v = 0; v < 4; ++v) {
      w |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(s + 16 * v), vt, _CMP_EQ_OQ))
           << (16 * v);
    }
    return w;
  }
  static PK_AVX512_INLINE uint64_t high_eq(const float* s, uint32_t hi) {
    const __m512i vh = _mm512_set1_epi32(static_cast<int32_t>(hi));
    uint64_t w = 0;
    for (int v = 0; v < 4; ++v) {
      const __m512i x = _mm512_srli_epi32(_mm512_loadu_si512(s + 16 * v), 16);
      w |= static_cast<uint64_t>(_mm512_cmpeq_epi32_mask(x, vh)) << (16 * v);
    }
    return w;
  }
};
#endif

// Bits of word k that lie inside a group of len elements.
PK_INLINE uint64_t valid_bits(int len, int k) {
  const int r = len - 64 * k;
  return r >= 64 ? ~uint64_t{0} : (r <= 0 ? 0 : (uint64_t{1} << r) - 1);
}

// The scores of a group as 256 readable floats: s itself, or a NaN-padded copy when short.
PK_INLINE const float* full_group(const float* s, int len, float* pad) {
  if (len == kGroupSize) return s;
  for (int j = 0; j < len; ++j) pad[j] = s[j];
  for (int j = len; j < kGroupSize; ++j) pad[j] = std::numeric_limits<float>::quiet_NaN();
  return pad;
}

// Bit masks of 64 entries of a stored upper-half buffer (uint16), per instruction set: entries
// > v, == v, >= v.
template <int Isa>
struct Masks16 {
  template <class Cmp>
  static PK_INLINE uint64_t mask(const uint16_t* h, const Cmp& cmp) {
    alignas(64) uint8_t f[64];
    for (int j = 0; j < 64; ++j) f[j] = cmp(h[j]);
    return pack_flags64(f);
  }
  static PK_INLINE uint64_t gt(const uint16_t* h, uint32_t v) {
    return mask(h, [v](uint32_t x) { return x > v; });
  }
  static PK_INLINE uint64_t eq(const uint16_t* h, uint32_t v) {
    return mask(h, [v](uint32_t x) { return x == v; });
  }
  static PK_INLINE uint64_t ge(const uint16_t* h, uint32_t v) {
    return mask(h, [v](uint32_t x) { return x >= v; });
  }
};

#if PK_HAVE_SIMD_VARIANT
template <>
struct Masks16<1> {
  // 8 entries widened to int32 (values below 2**16 compare the same signed).
  static PK_AVX2_INLINE __m256i load8(const uint16_t* h) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
  }
  static PK_AVX2_INLINE uint64_t bits8(__m256i m, int v) {
    return static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(m))))
           << (8 * v);
  }
  static PK_AVX2_INLINE uint64_t gt(const uint16_t* h, uint32_t x) {
    const __m256i vx = _mm256_set1_epi32(static_cast<int32_t>(x));
    uint64_t w = 0;
    for (int v = 0; v < 8; ++v) w |= bits8(_mm256_cmpgt_epi32(load8(h + 8 * v), vx), v);
    return w;
  }
  static PK_AVX2_INLINE uint64_t eq(const uint16_t* h, uint32_t x) {
    const __m256i vx = _mm256_set1_epi32(static_cast<int32_t>(x));
    uint64_t w = 0;
    for (int v = 0; v < 8; ++v) w |= bits8(_mm256_cmpeq_epi32(load8(h + 8 * v), vx), v);
    return w;
  }
  static PK_AVX2_INLINE uint64_t ge(const uint16_t* h, uint32_t x) {
    return x == 0 ? ~uint64_t{0} : gt(h, x - 1);
  }
};

template <>
struct Masks16<2> {
  static PK_AVX512_INLINE __m512i load16(const uint16_t* h) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
  }
  static PK_AVX512_INLINE uint64_t gt(const uint16_t* h, uint32_t x) {
    const __m512i vx = _mm512_set1_epi32(static_cast<int32_t>(x));
    uint64_t w = 0;
    for (int v = 0; v < 4; ++v) {
      w |= static_cast<uint64_t>(_mm512_cmpgt_epu32_mask(load16(h + 16 * v), vx)) << (16 * v);
    }
    return w;
  }
  static PK_AVX512_INLINE uint64_t eq(const uint16_t* h, uint32_t x) {
    const __m512i vx = _mm512_set1_epi32(static_cast<int32_t>(x));
    uint64_t w = 0;
    for (int v = 0; v < 4; ++v) {
      w |= static_cast<uint64_t>(_mm512_cmpeq_epu32_mask(load16(h + 16 * v), vx)) << (16 * v);
    }
    return w;
  }
  static PK_AVX512_INLINE uint64_t ge(const uint16_t* h, uint32_t x) {
    const __m512i vx = _mm512_set1_epi32(static_cast<int32_t>(x));
    uint64_t w = 0;
    for (int v = 0; v < 4; ++v) {
      w |= static_cast<uint64_t>(_mm512_cmpge_epu32_mask(load16(h + 16 * v), vx)) << (16 * v);
    }
    return w;
  }
};
#endif

// A group of the upper-half buffer as 256 readable entries (a short last group is copied and
// padded; callers mask the padding off with valid_bits()).
PK_INLINE const uint16_t* full_group16(const uint16_t* h, int len, uint16_t* pad) {
  if (len == kGroupSize) return h;
  for (int j = 0; j < len; ++j) pad[j] = h[j];
  for (int j = len; j < kGroupSize; ++j) pad[j] = 0;
  return pad;
}

}  // namespace
}  // namespace pk
