// The update-pass kernels as templates over the value type (float / double); ops_f32.cpp and
// ops_f64.cpp instantiate them, so the two halves compile in parallel.
//
// Every pass walks the weight in groups of 256 elements (one group_ptr entry, 32 bytes of the
// bitmask). A scoring pass regenerates w0 of a group with Philox, computes the candidate and the
// score of every element (in AVX-512 with the tracked values expanded into their lanes; else as
// if untracked, then again for the tracked ones), and hands the scores to a "sink" (histogram,
// threshold bitmask). The dense gradient is read once per pass and nothing dense is stored except,
// when the caller passes a buffer, the upper 16 bits of every score (2 bytes per weight, for one
// step): the later passes of the same step then scan those and recompute only the few exact
// scores they cannot decide from them (see ops/cpp_ops.py, Segment.scratch). Groups are
// independent and every result is either per element or an integer count, so results never
// depend on the thread count or the schedule.
//
// The compaction writes the kept values last. Without a tie quota, the scoring pass itself
// collects the kept candidates; otherwise the gather recomputes the kept elements only (taking
// the tracked ones from the first pass of the step when it kept them), with the w0 of newly kept
// elements from a scattered-offset Philox in SIMD.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ops.h"
#include "parallel.h"
#include "philox.h"

#if PK_HAVE_SIMD_VARIANT
#include <immintrin.h>
// GCC 12 flags the deliberately undefined lanes inside its own AVX-512 intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pk {
namespace {

// float32 rounding of a Python float as torch.tensor(x, dtype=torch.float32) does it, without the
// undefined behaviour of converting an out-of-range double.
float to_f32(double x) {
  if (std::isfinite(x) && std::fabs(x) >= 0x1.ffffffp+127) return x > 0 ? INFINITY : -INFINITY;
  return static_cast<float>(x);
}

// A Python scalar as torch hands it to a kernel of dtype T.
template <class T>
T to_compute(double x) {
  if constexpr (sizeof(T) == sizeof(float)) {
    return to_f32(x);
  } else {
    return x;
  }
}

// Records the lowest bad group seen by any thread (the report is then the same on every run).
void report_bad_group(std::atomic<int64_t>* bad, int64_t g) {
  int64_t cur = bad->load(std::memory_order_relaxed);
  while (g < cur && !bad->compare_exchange_weak(cur, g, std::memory_order_relaxed)) {
  }
}

void throw_if_bad(const std::atomic<int64_t>& bad, const int64_t* ptr, const char* fn) {
  const int64_t g = bad.load();
  if (g == std::numeric_limits<int64_t>::max()) return;
  throw std::invalid_argument(
      std::string(fn) + "(): expected group_ptr consistent with bits (group_ptr[g + 1] - " +
      "group_ptr[g] == popcount of group g), got group_ptr[" + std::to_string(g) +
      "]=" + std::to_string(ptr[g]) + ", group_ptr[" + std::to_string(g + 1) +
      "]=" + std::to_string(ptr[g + 1]));
}

// Whole-array checks of the storage header: the per-group checks in the passes then guarantee
// that every tracked value index lies inside `values`.
void check_header(const int64_t* ptr, int64_t ngroups, int64_t nvalues, const char* fn) {
  if (ptr[0] != 0) {
    throw std::invalid_argument(std::string(fn) + "(): expected group_ptr[0] == 0, got " +
                                std::to_string(ptr[0]));
  }
  if (ptr[ngroups] != nvalues) {
    throw std::invalid_argument(std::string(fn) + "(): expected group_ptr[-1] == values.numel() == " +
                                std::to_string(nvalues) + ", got " + std::to_string(ptr[ngroups]));
  }
}

// Checks group g of the old storage and returns its first value index, or -1.
PK_INLINE int64_t group_start(const int64_t* ptr, int64_t nvalues, int64_t g, int pc) {
  const int64_t a = ptr[g], b = ptr[g + 1];
  if (a < 0 || b < a || b - a != pc || b > nvalues) return -1;
  return a;
}

PK_INLINE int group_len(int64_t n, int64_t base) {
  return static_cast<int>(std::min<int64_t>(kGroupSize, n - base));
}

// torch's CPU `self.add(other, alpha=a)`: fmadd(other, a, self) in its vectorised kernels.
template <bool Fused, class T>
PK_INLINE T add_scaled(T self, T other, T alpha) {
  if constexpr (Fused) {
    return std::fma(other, alpha, self);
  } else {
    return self + alpha * other;  // two roundings: the build compiles with -ffp-contract=off
  }
}

// Scalars of one update pass over one segment, converted once as the reference converts them.
template <class T>
struct Update {
  PhiloxKey key;
  InitBlockFn init_block;
  InitIdxFn init_idx;
  float bound;
  int64_t n, nbytes, ngroups;
  const T* values;
  int64_t nvalues;
  const uint8_t* bits;
  const int64_t* ptr;
  const T* grad;
  const T* mom;  // nullptr unless momentum != 0 and a buffer exists (reference: else m = g')
  T* tracked_c;  // see SegmentArgs
  T* tracked_m;
  float scale_prev, scale;
  bool has_wd;
  T wd, neg_lr, mu;
  std::atomic<int64_t>* bad;

  Update(const SegmentArgs<T>& s, const StepArgs& p, std::atomic<int64_t>* bad_group)
      : key(s.seed),
        init_block(init_block_fn()),
        init_idx(init_idx_fn()),
        bound(to_f32(s.bound)),
        n(s.numel),
        nbytes(ceil_div(s.numel, 8)),
        ngroups(ceil_div(s.numel, kGroupSize)),
        values(s.values),
        nvalues(s.nvalues),
        bits(s.bits),
        ptr(s.group_ptr),
        grad(s.grad),
        mom(p.momentum != 0 && s.momentum != nullptr && s.nvalues > 0 ? s.momentum : nullptr),
        tracked_c(s.tracked_c),
        tracked_m(p.momentum != 0 ? s.tracked_m : nullptr),
        scale_prev(to_f32(p.scale_prev)),
        scale(to_f32(p.scale)),
        has_wd(p.weight_decay != 0),
        wd(to_compute<T>(p.weight_decay)),
        neg_lr(to_compute<T>(-p.lr)),
        mu(to_compute<T>(p.momentum)),
        bad(bad_group) {}
};

// ---------------------------------------------------------------------------------------------
// The candidate and score of every element of one group:
//
//   W  = tracked ? value : T(scale_prev * w0)
//   g' = weight_decay != 0 ? g.add(W, alpha=weight_decay) : g
//   m  = tracked and a momentum buffer ? momentum * m_old + g' : g'
//   c  = W.add(m, alpha=-lr)
//   s  = float32(|c - T(scale * w0)|)
//
// First for all elements as untracked (vectorised), then again for the tracked ones. c and m are
// written only when WantCM (dense candidates()).
// ---------------------------------------------------------------------------------------------
template <class T, bool Fused, bool HasWd, bool WantCM>
PK_INLINE void untracked_scores(const float* __restrict w0, const T* __restrict gr, int len,
                                float sp, float sc, T wd, T neg_lr, float* __restrict s,
                                T* __restrict c, T* __restrict m) {
  for (int j = 0; j < len; ++j) {
    const T W = static_cast<T>(w0[j] * sp);
    const T gp = HasWd ? add_scaled<Fused>(gr[j], W, wd) : gr[j];
    const T cj = add_scaled<Fused>(W, gp, neg_lr);
    const T target = static_cast<T>(w0[j] * sc);
    s[j] = static_cast<float>(std::fabs(cj - target));
    if constexpr (WantCM) {
      c[j] = cj;
      m[j] = gp;
    }
  }
}

// Scores of a group whose w0 is already in w0[0, len).
template <class T, bool Fused, bool WantCM, bool KeepTracked = false>
PK_INLINE void score_group_w0(const Update<T>& u, int64_t base, int len, const uint64_t* tw,
                              int64_t r0, const float* w0, float* s, T* c, T* m) {
  const T* gr = u.grad + base;
  const float sp = u.scale_prev, sc = u.scale;
  const T wd = u.wd, neg_lr = u.neg_lr, mu = u.mu;
  if (u.has_wd) {
    untracked_scores<T, Fused, true, WantCM>(w0, gr, len, sp, sc, wd, neg_lr, s, c, m);
  } else {
    untracked_scores<T, Fused, false, WantCM>(w0, gr, len, sp, sc, wd, neg_lr, s, c, m);
  }
  int64_t r = r0;
  for (int k = 0; k < kGroupWords; ++k) {
    for (uint64_t b = tw[k]; b; b &= b - 1, ++r) {
      const int j = k * 64 + ctz64(b);
      const T W = u.values[r];
      const T gp = u.has_wd ? add_scaled<Fused>(gr[j], W, wd) : gr[j];
      T mm = gp;
      if (u.mom) {
        const T decayed = u.mom[r] * mu;  // rounded before the add, as mul() then add_()
        mm = decayed + gp;
      }
      const T cj = add_scaled<Fused>(W, mm, neg_lr);
      const T target = static_cast<T>(w0[j] * sc);
      s[j] = static_cast<float>(std::fabs(cj - target));
      if constexpr (WantCM) {
        c[j] = cj;
        m[j] = mm;
      }
      if constexpr (KeepTracked) {
        if (u.tracked_c) u.tracked_c[r] = cj;
        if (u.tracked_m) u.tracked_m[r] = mm;
      }
    }
  }
}

template <class T, bool Fused, bool WantCM, bool KeepTracked = false>
PK_INLINE void score_group(const Update<T>& u, int64_t base, int len, const uint64_t* tw,
                           int64_t r0, float* w0, float* s, T* c, T* m) {
  u.init_block(u.key, base, len, u.bound, w0);
  score_group_w0<T, Fused, WantCM, KeepTracked>(u, base, len, tw, r0, w0, s, c, m);
}

#if PK_HAVE_SIMD_VARIANT
#define PK_AVX512_TARGET __attribute__((target("avx512f,avx2,fma,popcnt,bmi,bmi2")))

PK_INLINE PK_AVX512_TARGET __mmask16 first_lanes(int n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}

// score_group_w0() for float in AVX-512: tracked and untracked elements in the same vectors, the
// tracked values and momenta expanded into their lanes (so the cost does not depend on how many
// are tracked). The operations per element are those of score_group_w0().
template <bool Fused, bool WantCM, bool KeepTracked>
PK_INLINE PK_AVX512_TARGET void score_group_f32_avx512(const Update<float>& u, int64_t base,
                                                       int len, const uint64_t* tw, int64_t r0,
                                                       const float* w0, float* s, float* c,
                                                       float* m) {
  const float* gr = u.grad + base;
  const __m512 sp = _mm512_set1_ps(u.scale_prev), sc = _mm512_set1_ps(u.scale);
  const __m512 wd = _mm512_set1_ps(u.wd), neg_lr = _mm512_set1_ps(u.neg_lr);
  const __m512 mu = _mm512_set1_ps(u.mu);
  int64_t r = r0;
  for (int j = 0; j < len; j += 16) {
    const __mmask16 valid = len - j >= 16 ? static_cast<__mmask16>(0xFFFF) : first_lanes(len - j);
    const __mmask16 trk = static_cast<__mmask16>(tw[j >> 6] >> (j & 63));
    const int pc = __builtin_popcount(trk);
    const __mmask16 packed = first_lanes(pc);
    const __m512 wv = _mm512_maskz_loadu_ps(valid, w0 + j);
    const __m512 W = _mm512_mask_expand_ps(_mm512_mul_ps(wv, sp), trk,
                                           _mm512_maskz_loadu_ps(packed, u.values + r));
    const __m512 g = _mm512_maskz_loadu_ps(valid, gr + j);
    __m512 gp = g;
    if (u.has_wd) gp = Fused ? _mm512_fmadd_ps(W, wd, g) : _mm512_add_ps(g, _mm512_mul_ps(wd, W));
    __m512 mm = gp;
    if (u.mom) {
      const __m512 mo = _mm512_maskz_expand_ps(trk, _mm512_maskz_loadu_ps(packed, u.mom + r));
      mm = _mm512_mask_add_ps(gp, trk, _mm512_mul_ps(mo, mu), gp);
    }
    const __m512 cv =
        Fused ? _mm512_fmadd_ps(mm, neg_lr, W) : _mm512_add_ps(W, _mm512_mul_ps(neg_lr, mm));
    const __m512 sv = _mm512_abs_ps(_mm512_sub_ps(cv, _mm512_mul_ps(wv, sc)));
    _mm512_mask_storeu_ps(s + j, valid, sv);
    if constexpr (WantCM) {
      _mm512_mask_storeu_ps(c + j, valid, cv);
      _mm512_mask_storeu_ps(m + j, valid, mm);
    }
    if constexpr (KeepTracked) {
      if (u.tracked_c) _mm512_mask_storeu_ps(u.tracked_c + r, packed, _mm512_maskz_compress_ps(trk, cv));
      if (u.tracked_m) _mm512_mask_storeu_ps(u.tracked_m + r, packed, _mm512_maskz_compress_ps(trk, mm));
    }
    r += pc;
  }
}
#endif

// Loads and checks the old bits of group g; false (and the group reported) when inconsistent.
template <class T>
PK_INLINE bool open_group(const Update<T>& u, int64_t g, int len, uint64_t* tw, int64_t* r0) {
  load_group_bits(u.bits, u.nbytes, g, len, tw);
  *r0 = group_start(u.ptr, u.nvalues, g, group_popcount(tw));
  if (*r0 < 0) {
    report_bad_group(u.bad, g);
    return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Bit masks of 64 scores, per instruction set (Isa 0: portable, 1: AVX2). Scores past the end of
// the weight are never passed in: a short last group is padded with NaN, which compares false.
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

// ---------------------------------------------------------------------------------------------
// Sinks: what a pass does with the scores of one group. Each copies its fields to locals first:
// the histogram stores could alias the sink itself as far as the compiler knows, which would
// reload every field once per element. Counts go to per-thread uint32 rows (run_counted keeps
// every row below 2**32 counts).
// ---------------------------------------------------------------------------------------------
// The counting loops are unrolled: the increments of different bins then overlap (about 1.5x
// faster than the plain loop); a full group has a fixed trip count.
// Elements per count() call of the interleaved pass.
inline constexpr int kCountPart = 32;

// Log bins of float bit patterns, clamped into [0, nbins): in int32 arithmetic when it cannot
// overflow (the bins of selection.py: shift 18, base 2784), else in int64.
PK_INLINE bool log_bins_narrow(const LogBins& bins) {
  return bins.shift >= 1 && bins.base >= -(int64_t{1} << 30) && bins.base <= (int64_t{1} << 30) &&
         bins.nbins <= (int64_t{1} << 30);
}

// bits_of(src[j]): the float32 bit pattern (or its upper half, shifted up) of entry j.
PK_INLINE int32_t bits_of(float x) { return float_bits(x); }
PK_INLINE int32_t bits_of(uint16_t upper) {
  return static_cast<int32_t>(static_cast<uint32_t>(upper) << 16);
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
    const auto bin = [](float x) { return (static_cast<uint32_t>(float_bits(x)) >> 16) & 0x7FFFu; };
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
        ++h[static_cast<uint32_t>(float_bits(f[64 * k + ctz64(b)])) & 0xFFFFu];
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
// bits: the later passes then recompute the exact score of those few elements (Exact below), a
// fraction of a percent of the weight for a histogram threshold.
// ---------------------------------------------------------------------------------------------
PK_INLINE uint16_t upper_half(float s) {
  return static_cast<uint16_t>(static_cast<uint32_t>(float_bits(s)) >> 16);
}

// Exact scores of the elements of group g set in want[], into s[j]; false when the group's
// storage is inconsistent (reported).
template <class T, bool Fused>
struct Exact {
  const Update<T>& u;
  PK_INLINE bool operator()(int64_t g, const uint64_t* want, float* s) const {
    const int64_t base = g * kGroupSize;
    const int len = group_len(u.n, base);
    uint64_t tw[kGroupWords];
    int64_t r0;
    if (!open_group(u, g, len, tw, &r0)) return false;
    alignas(64) int32_t idx[kGroupSize + kIdxPad];
    alignas(64) float w0[kGroupSize + kIdxPad];
    int cnt = 0;
    for (int k = 0; k < kGroupWords; ++k) {
      for (uint64_t b = want[k]; b; b &= b - 1) idx[cnt++] = k * 64 + ctz64(b);
    }
    if (cnt == 0) return true;
    for (int q = cnt; q < cnt + kIdxPad; ++q) idx[q] = idx[cnt - 1];
    u.init_idx(u.key, base, idx, cnt, u.bound, w0);
    const T* gr = u.grad + base;
    const float sp = u.scale_prev, sc = u.scale;
    const T wd = u.wd, neg_lr = u.neg_lr, mu = u.mu;
    int q = 0;
    int64_t before = r0;
    for (int k = 0; k < kGroupWords; ++k) {
      for (uint64_t b = want[k]; b; b &= b - 1, ++q) {
        const int bit = ctz64(b);
        const int j = k * 64 + bit;
        const bool tracked = (tw[k] >> bit) & 1;
        const int64_t rank = before + popcount64(tw[k] & ((uint64_t{1} << bit) - 1));
        const T W = tracked ? u.values[rank] : static_cast<T>(w0[q] * sp);
        const T gp = u.has_wd ? add_scaled<Fused>(gr[j], W, wd) : gr[j];
        T mm = gp;
        if (u.mom && tracked) {
          const T decayed = u.mom[rank] * mu;
          mm = decayed + gp;
        }
        const T cj = add_scaled<Fused>(W, mm, neg_lr);
        const T target = static_cast<T>(w0[q] * sc);
        s[j] = static_cast<float>(std::fabs(cj - target));
      }
      before += popcount64(tw[k]);
    }
    return true;
  }
};

// Sinks of a scan over stored upper halves: group<Isa>(g, len, h, exact).
struct HighFromUpper {
  uint32_t* hist;
  template <int Isa, class Ex>
  PK_INLINE void group(int64_t, int len, const uint16_t* h, const Ex&) {
    uint32_t* const hs = hist;
    if (len == kGroupSize) {
#pragma GCC unroll 8
      for (int j = 0; j < kGroupSize; ++j) ++hs[h[j] & 0x7FFFu];
    } else {
      for (int j = 0; j < len; ++j) ++hs[h[j] & 0x7FFFu];
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

// ---------------------------------------------------------------------------------------------
// Pass drivers: compute the scores of groups [g0, g1) and hand each group to the sink (storing
// the upper halves into `store` when non-null), or scan stored upper halves.
// ---------------------------------------------------------------------------------------------
PK_INLINE void store_upper(const float* s, int len, uint16_t* out) {
  for (int j = 0; j < len; ++j) out[j] = upper_half(s[j]);  // vectorises
}

template <class T, bool Fused, int Isa, class Sink>
PK_INLINE void update_groups(const Update<T>& u, Sink& sink, uint16_t* store, int64_t g0,
                             int64_t g1) {
  constexpr bool kCM = Sink::kWantCM;
  alignas(64) float w0[kGroupSize];
  alignas(64) float s[kGroupSize];
  alignas(64) T c[kCM ? kGroupSize : 1];
  alignas(64) T m[kCM ? kGroupSize : 1];
  uint64_t tw[kGroupWords];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * kGroupSize;
    const int len = group_len(u.n, base);
    int64_t r0;
    if (!open_group(u, g, len, tw, &r0)) continue;
    if (store) {  // the step's first pass: it keeps what the later passes need
      score_group<T, Fused, kCM, true>(u, base, len, tw, r0, w0, s, c, m);
      store_upper(s, len, store + base);
    } else {
      score_group<T, Fused, kCM>(u, base, len, tw, r0, w0, s, c, m);
    }
    sink.template group<Isa>(g, len, s);
    if constexpr (kCM) sink.template collect<Isa>(g, c, m);
  }
}

template <class T, bool Fused, int Isa, class Sink>
PK_INLINE void scan_groups(const Update<T>& u, const uint16_t* upper, Sink& sink, int64_t g0,
                           int64_t g1) {
  const Exact<T, Fused> exact{u};
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * kGroupSize;
    sink.template group<Isa>(g, group_len(u.n, base), upper + base, exact);
  }
}

template <class T, bool Fused, class Sink>
PK_NOINLINE void update_plain(const Update<T>& u, Sink& sink, uint16_t* store, int64_t g0,
                              int64_t g1) {
  update_groups<T, Fused, 0>(u, sink, store, g0, g1);
}

template <class T, bool Fused, class Sink>
PK_NOINLINE void scan_plain(const Update<T>& u, const uint16_t* upper, Sink& sink, int64_t g0,
                            int64_t g1) {
  scan_groups<T, Fused, 0>(u, upper, sink, g0, g1);
}

#if PK_HAVE_SIMD_VARIANT
template <class T, bool Fused, class Sink>
PK_NOINLINE PK_SIMD_TARGET void update_simd(const Update<T>& u, Sink& sink, uint16_t* store,
                                            int64_t g0, int64_t g1) {
  update_groups<T, Fused, 1>(u, sink, store, g0, g1);
}

template <class T, bool Fused, class Sink>
PK_NOINLINE PK_SIMD_TARGET void scan_simd(const Update<T>& u, const uint16_t* upper, Sink& sink,
                                          int64_t g0, int64_t g1) {
  scan_groups<T, Fused, 1>(u, upper, sink, g0, g1);
}

// The AVX-512 pass (simd level 2) is software-pipelined: while it counts the scores of group g
// (scalar loads, adds and stores), it generates w0 of group g + 1 (vector multiplies), in
// alternating pieces of kCountPart elements, so the two kinds of work can overlap in the core.
template <class T, bool Fused, class Sink>
PK_NOINLINE PK_AVX512_TARGET void update_avx512(const Update<T>& u, Sink& sink, uint16_t* store,
                                                int64_t g0, int64_t g1) {
  constexpr bool kCM = Sink::kWantCM;
  alignas(64) float w0[2][kGroupSize];
  alignas(64) float s[kGroupSize];
  alignas(64) T c[kCM ? kGroupSize : 1];
  alignas(64) T m[kCM ? kGroupSize : 1];
  uint64_t tw[kGroupWords];
  uint32_t rk_hi = static_cast<uint32_t>(static_cast<uint64_t>(g0 * kGroupSize) >> 32);
  RoundKeys rk(u.key, rk_hi);
  if (g0 < g1) {
    u.init_block(u.key, g0 * kGroupSize, group_len(u.n, g0 * kGroupSize), u.bound, w0[0]);
  }
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * kGroupSize;
    const int len = group_len(u.n, base);
    const float* const cur = w0[(g - g0) & 1];
    float* const nxt = w0[(g - g0 + 1) & 1];
    const int64_t nbase = base + kGroupSize;
    const bool next = g + 1 < g1;
    // A full group is 256-aligned, so its counters never carry into the high word.
    const bool next_full = next && nbase + kGroupSize <= u.n;
    if (next_full) {
      const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(nbase) >> 32);
      if (hi != rk_hi) {
        rk = RoundKeys(u.key, hi);
        rk_hi = hi;
      }
    }
    int64_t r0;
    const bool ok = open_group(u, g, len, tw, &r0);
    if (ok) {
      if constexpr (std::is_same_v<T, float>) {
        if (store) {  // the step's first pass: it keeps what the later passes need
          score_group_f32_avx512<Fused, kCM, true>(u, base, len, tw, r0, cur, s, c, m);
        } else {
          score_group_f32_avx512<Fused, kCM, false>(u, base, len, tw, r0, cur, s, c, m);
        }
      } else if (store) {
        score_group_w0<T, Fused, kCM, true>(u, base, len, tw, r0, cur, s, c, m);
      } else {
        score_group_w0<T, Fused, kCM>(u, base, len, tw, r0, cur, s, c, m);
      }
      if (store) store_upper(s, len, store + base);
    }
    const uint32_t nlo = static_cast<uint32_t>(static_cast<uint64_t>(nbase));
    const char* const ngrad = reinterpret_cast<const char*>(u.grad + nbase);
    for (int j0 = 0; j0 < kGroupSize; j0 += kCountPart) {
      if (next_full) {
        w0_block32_avx512(rk, nlo + static_cast<uint32_t>(j0), u.bound, nxt + j0);
        for (size_t b = 0; b < kCountPart * sizeof(T); b += 64) {
          __builtin_prefetch(ngrad + j0 * sizeof(T) + b);
        }
      }
      if (ok && j0 < len) sink.count(s + j0, std::min(kCountPart, len - j0));
    }
    if (next && !next_full) u.init_block(u.key, nbase, group_len(u.n, nbase), u.bound, nxt);
    if (ok) {
      sink.template body<2>(g, len, s);
      if constexpr (kCM) sink.template collect<2>(g, c, m);
    }
  }
}

template <class T, bool Fused, class Sink>
PK_NOINLINE PK_AVX512_TARGET void scan_avx512(const Update<T>& u, const uint16_t* upper,
                                              Sink& sink, int64_t g0, int64_t g1) {
  scan_groups<T, Fused, 2>(u, upper, sink, g0, g1);
}
#endif

// f(a, b, level) over the chunks of groups [g0, g1), one sink per thread.
template <class Sink, class F>
void run_chunks(int64_t g0, int64_t g1, std::vector<Sink>& sinks, const F& f) {
  const int64_t nchunks = ceil_div(g1 - g0, kChunkGroups);
  const int nt = static_cast<int>(sinks.size());
  const int level = simd_level();
  for_each_chunk(nchunks, nt, [&](int64_t ch, int tid) {
    const int64_t a = g0 + ch * kChunkGroups, b = std::min(g1, a + kChunkGroups);
    f(sinks[tid], a, b, level);
  });
}

// A scoring pass over groups [g0, g1) with one sink per thread (sinks[t] for thread t), storing
// the upper halves into `store` when non-null.
template <class T, class Sink>
void run_pass(const Update<T>& u, bool fused, uint16_t* store, std::vector<Sink>& sinks,
              int64_t g0, int64_t g1) {
  run_chunks(g0, g1, sinks, [&](Sink& sink, int64_t a, int64_t b, int level) {
#if PK_HAVE_SIMD_VARIANT
    if (level >= 2) {
      if (fused) {
        update_avx512<T, true>(u, sink, store, a, b);
      } else {
        update_avx512<T, false>(u, sink, store, a, b);
      }
      return;
    }
    if (level >= 1) {
      if (fused) {
        update_simd<T, true>(u, sink, store, a, b);
      } else {
        update_simd<T, false>(u, sink, store, a, b);
      }
      return;
    }
#endif
    (void)level;
    if (fused) {
      update_plain<T, true>(u, sink, store, a, b);
    } else {
      update_plain<T, false>(u, sink, store, a, b);
    }
  });
}

// A scan of stored upper halves over groups [g0, g1).
template <class T, class Sink>
void run_scan(const Update<T>& u, bool fused, const uint16_t* upper, std::vector<Sink>& sinks,
              int64_t g0, int64_t g1) {
  run_chunks(g0, g1, sinks, [&](Sink& sink, int64_t a, int64_t b, int level) {
#if PK_HAVE_SIMD_VARIANT
    if (level >= 2) {
      if (fused) {
        scan_avx512<T, true>(u, upper, sink, a, b);
      } else {
        scan_avx512<T, false>(u, upper, sink, a, b);
      }
      return;
    }
    if (level >= 1) {
      if (fused) {
        scan_simd<T, true>(u, upper, sink, a, b);
      } else {
        scan_simd<T, false>(u, upper, sink, a, b);
      }
      return;
    }
#endif
    (void)level;
    if (fused) {
      scan_plain<T, true>(u, upper, sink, a, b);
    } else {
      scan_plain<T, false>(u, upper, sink, a, b);
    }
  });
}

int pass_threads(int64_t ngroups) { return threads_for(ceil_div(ngroups, kChunkGroups)); }

// Groups per counting round: a thread counts at most this many elements into its uint32 row
// before the rows are added to the int64 result.
inline constexpr int64_t kRoundGroups = (int64_t{1} << 31) / kGroupSize;

// A histogram pass: make_sink(row, thread) builds a thread's sink on its zeroed uint32 row; the rows are
// summed into hist (nbins int64, integer sums: exact in any order).
template <bool Scan, class T, class MakeSink>
void run_counted(const Update<T>& u, bool fused, uint16_t* upper, int64_t nbins, int64_t* hist,
                 const MakeSink& make_sink) {
  const int nt = pass_threads(u.ngroups);
  std::vector<uint32_t> rows(static_cast<size_t>(nt) * nbins);
  using Sink = decltype(make_sink(rows.data(), 0));
  std::vector<Sink> sinks;
  for (int t = 0; t < nt; ++t) sinks.push_back(make_sink(rows.data() + t * nbins, t));
  for (int64_t b = 0; b < nbins; ++b) hist[b] = 0;
  for (int64_t g0 = 0; g0 < u.ngroups; g0 += kRoundGroups) {
    if (g0 > 0) std::fill(rows.begin(), rows.end(), 0u);
    const int64_t g1 = std::min(u.ngroups, g0 + kRoundGroups);
    if constexpr (Scan) {
      run_scan(u, fused, upper, sinks, g0, g1);
    } else {
      run_pass(u, fused, upper, sinks, g0, g1);
    }
    for (int t = 0; t < nt; ++t) {
      const uint32_t* row = rows.data() + t * nbins;
      for (int64_t b = 0; b < nbins; ++b) hist[b] += row[b];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Gather: the candidate (and momentum) of every element set in the new bitmask, written in flat
// order. Touches only the kept elements; w0 of the kept untracked ones comes from one scattered
// Philox call per group.
// ---------------------------------------------------------------------------------------------
template <class T, bool Fused>
PK_INLINE void gather_groups(const Update<T>& u, const uint8_t* new_bits, const int64_t* new_ptr,
                             T* out_values, T* out_mom, int64_t g0, int64_t g1) {
  const float sp = u.scale_prev;
  const T wd = u.wd, neg_lr = u.neg_lr, mu = u.mu;
  const bool have_tracked = u.tracked_c != nullptr && (out_mom == nullptr || u.tracked_m);
  uint64_t tw[kGroupWords], nw[kGroupWords];
  alignas(64) int32_t idx[kGroupSize + kIdxPad];
  alignas(64) float w0[kGroupSize + kIdxPad];
  for (int64_t g = g0; g < g1; ++g) {
    int64_t o = new_ptr[g];
    if (new_ptr[g + 1] == o) continue;
    const int64_t base = g * kGroupSize;
    const int len = group_len(u.n, base);
    int64_t r0;
    if (!open_group(u, g, len, tw, &r0)) continue;
    load_group_bits(new_bits, u.nbytes, g, len, nw);
    if (have_tracked && nw[0] == tw[0] && nw[1] == tw[1] && nw[2] == tw[2] && nw[3] == tw[3]) {
      // The group keeps exactly its tracked elements (the common case once training settles).
      const int64_t cnt = new_ptr[g + 1] - o;
      std::memcpy(out_values + o, u.tracked_c + r0, sizeof(T) * cnt);
      if (out_mom) std::memcpy(out_mom + o, u.tracked_m + r0, sizeof(T) * cnt);
      continue;
    }
    int cnt = 0;
    for (int k = 0; k < kGroupWords; ++k) {
      for (uint64_t b = nw[k] & ~tw[k]; b; b &= b - 1) idx[cnt++] = k * 64 + ctz64(b);
    }
    if (cnt) {
      for (int q = cnt; q < cnt + kIdxPad; ++q) idx[q] = idx[cnt - 1];
      u.init_idx(u.key, base, idx, cnt, u.bound, w0);
    }
    const T* gr = u.grad + base;
    int q = 0;
    int64_t before = r0;  // first value index of word k's tracked elements
    for (int k = 0; k < kGroupWords; ++k) {
      for (uint64_t b = nw[k]; b; b &= b - 1) {
        const int bit = ctz64(b);
        const int j = k * 64 + bit;
        const bool tracked = (tw[k] >> bit) & 1;
        const int64_t rank = before + popcount64(tw[k] & ((uint64_t{1} << bit) - 1));
        if (tracked && have_tracked) {  // computed by the step's first pass
          out_values[o] = u.tracked_c[rank];
          if (out_mom) out_mom[o] = u.tracked_m[rank];
          ++o;
          continue;
        }
        const T W = tracked ? u.values[rank] : static_cast<T>(w0[q++] * sp);
        const T gp = u.has_wd ? add_scaled<Fused>(gr[j], W, wd) : gr[j];
        T mm = gp;
        if (u.mom && tracked) {
          const T decayed = u.mom[rank] * mu;
          mm = decayed + gp;
        }
        out_values[o] = add_scaled<Fused>(W, mm, neg_lr);
        if (out_mom) out_mom[o] = mm;
        ++o;
      }
      before += popcount64(tw[k]);
    }
  }
}

template <class T, bool Fused>
PK_NOINLINE void gather_plain(const Update<T>& u, const uint8_t* nb, const int64_t* np, T* ov,
                              T* om, int64_t g0, int64_t g1) {
  gather_groups<T, Fused>(u, nb, np, ov, om, g0, g1);
}

#if PK_HAVE_SIMD_VARIANT
template <class T, bool Fused>
PK_NOINLINE PK_SIMD_TARGET void gather_simd(const Update<T>& u, const uint8_t* nb,
                                            const int64_t* np, T* ov, T* om, int64_t g0,
                                            int64_t g1) {
  gather_groups<T, Fused>(u, nb, np, ov, om, g0, g1);
}

template <class T, bool Fused>
PK_NOINLINE PK_AVX512_TARGET void gather_avx512(const Update<T>& u, const uint8_t* nb,
                                                const int64_t* np, T* ov, T* om, int64_t g0,
                                                int64_t g1) {
  gather_groups<T, Fused>(u, nb, np, ov, om, g0, g1);
}
#endif

// ---------------------------------------------------------------------------------------------
// Dense candidates: c, m, s (and the tracked flags) straight into the outputs.
// ---------------------------------------------------------------------------------------------
template <class T, bool Fused>
PK_INLINE void dense_groups(const Update<T>& u, T* c, T* m, float* s, uint8_t* tracked,
                            int64_t g0, int64_t g1) {
  alignas(64) float w0[kGroupSize];
  alignas(64) T cl[kGroupSize];
  alignas(64) T ml[kGroupSize];
  uint64_t tw[kGroupWords];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * kGroupSize;
    const int len = group_len(u.n, base);
    int64_t r0;
    if (!open_group(u, g, len, tw, &r0)) continue;
    if (c && m) {
      score_group<T, Fused, true>(u, base, len, tw, r0, w0, s + base, c + base, m + base);
    } else if (c || m) {
      score_group<T, Fused, true>(u, base, len, tw, r0, w0, s + base, c ? c + base : cl,
                                  m ? m + base : ml);
    } else {
      score_group<T, Fused, false>(u, base, len, tw, r0, w0, s + base, cl, ml);
    }
    if (tracked) {
      uint8_t* const out = tracked + base;
      for (int j = 0; j < len; ++j) out[j] = static_cast<uint8_t>((tw[j >> 6] >> (j & 63)) & 1);
    }
  }
}

template <class T, bool Fused>
PK_NOINLINE void dense_plain(const Update<T>& u, T* c, T* m, float* s, uint8_t* tr, int64_t g0,
                             int64_t g1) {
  dense_groups<T, Fused>(u, c, m, s, tr, g0, g1);
}

#if PK_HAVE_SIMD_VARIANT
template <class T, bool Fused>
PK_NOINLINE PK_SIMD_TARGET void dense_simd(const Update<T>& u, T* c, T* m, float* s,
                                           uint8_t* tr, int64_t g0, int64_t g1) {
  dense_groups<T, Fused>(u, c, m, s, tr, g0, g1);
}
#endif

// ---------------------------------------------------------------------------------------------
// Materialize: scale * w0 (exact +0 when scale == 0, as the reference's zeros), tracked values in.
// ---------------------------------------------------------------------------------------------
template <class T>
struct MaterializeArgs {
  PhiloxKey key;
  InitBlockFn init_block;
  float bound, scale;
  int64_t n, nbytes;
  const T* values;
  int64_t nvalues;
  const uint8_t* bits;
  const int64_t* ptr;
  T* out;
  std::atomic<int64_t>* bad;
};

template <class T>
PK_INLINE void materialize_groups(const MaterializeArgs<T>& a, int64_t g0, int64_t g1) {
  alignas(64) float w0[kGroupSize];
  uint64_t tw[kGroupWords];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * kGroupSize;
    const int len = group_len(a.n, base);
    load_group_bits(a.bits, a.nbytes, g, len, tw);
    const int64_t r0 = group_start(a.ptr, a.nvalues, g, group_popcount(tw));
    if (r0 < 0) {
      report_bad_group(a.bad, g);
      continue;
    }
    T* out = a.out + base;
    if (a.scale == 0.0f) {
      for (int j = 0; j < len; ++j) out[j] = T(0);
    } else {
      a.init_block(a.key, base, len, a.bound, w0);
      for (int j = 0; j < len; ++j) out[j] = static_cast<T>(w0[j] * a.scale);
    }
    int64_t r = r0;
    for (int k = 0; k < kGroupWords; ++k) {
      for (uint64_t b = tw[k]; b; b &= b - 1) out[k * 64 + ctz64(b)] = a.values[r++];
    }
  }
}

template <class T>
PK_NOINLINE void materialize_plain(const MaterializeArgs<T>& a, int64_t g0, int64_t g1) {
  materialize_groups(a, g0, g1);
}

#if PK_HAVE_SIMD_VARIANT
template <class T>
PK_NOINLINE PK_SIMD_TARGET void materialize_simd(const MaterializeArgs<T>& a, int64_t g0,
                                                 int64_t g1) {
  materialize_groups(a, g0, g1);
}
#endif

// f(g0, g1, simd, fused) over the chunks of ngroups groups.
template <class F>
void for_each_group_chunk(int64_t ngroups, const F& f) {
  const int64_t nchunks = ceil_div(ngroups, kChunkGroups);
  for_each_chunk(nchunks, threads_for(nchunks), [&](int64_t ch, int) {
    const int64_t g0 = ch * kChunkGroups;
    f(g0, std::min(ngroups, g0 + kChunkGroups));
  });
}

}  // namespace

template <class T>
void materialize(uint64_t seed, double bound, double scale, const T* values, int64_t nvalues,
                 const uint8_t* bits, const int64_t* group_ptr, int64_t numel, T* out) {
  const int64_t ngroups = ceil_div(numel, kGroupSize);
  check_header(group_ptr, ngroups, nvalues, "materialize");
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const MaterializeArgs<T> a{PhiloxKey(seed), init_block_fn(), to_f32(bound), to_f32(scale), numel,
                             ceil_div(numel, 8), values, nvalues, bits, group_ptr, out, &bad};
  const bool simd = (simd_level() >= 1);
  for_each_group_chunk(ngroups, [&](int64_t g0, int64_t g1) {
#if PK_HAVE_SIMD_VARIANT
    if (simd) {
      materialize_simd(a, g0, g1);
      return;
    }
#endif
    (void)simd;
    materialize_plain(a, g0, g1);
  });
  throw_if_bad(bad, group_ptr, "materialize");
}

// Log bins of the upper halves are exact when the lower half is shifted out.
inline bool log_bins_from_upper(const LogBins& bins) { return bins.shift >= 16; }

template <class T>
void log_histogram(const SegmentArgs<T>& seg, const StepArgs& p, const LogBins& bins,
                   int64_t* hist, uint16_t* upper, bool upper_valid) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const Update<T> u(seg, p, &bad);
  check_header(u.ptr, u.ngroups, u.nvalues, "log_histogram");
  if (upper && upper_valid && log_bins_from_upper(bins)) {
    run_counted<true>(u, p.fused, upper, bins.nbins, hist,
                      [&](uint32_t* row, int) { return LogFromUpper{row, bins}; });
  } else {
    run_counted<false>(u, p.fused, upper_valid ? nullptr : upper, bins.nbins, hist,
                       [&](uint32_t* row, int) { return LogHistSink{row, bins}; });
  }
  throw_if_bad(bad, u.ptr, "log_histogram");
}

template <class T>
void radix_histogram(const SegmentArgs<T>& seg, const StepArgs& p, int64_t high, int64_t nbins,
                     int64_t* hist, uint16_t* upper, bool upper_valid) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const Update<T> u(seg, p, &bad);
  check_header(u.ptr, u.ngroups, u.nvalues, "radix_histogram");
  const uint32_t hi = static_cast<uint32_t>(high);
  if (upper && upper_valid) {
    if (high < 0) {
      run_counted<true>(u, p.fused, upper, nbins, hist,
                        [](uint32_t* row, int) { return HighFromUpper{row}; });
    } else {
      const int nt = pass_threads(u.ngroups);
      std::vector<std::vector<uint16_t>> lows(nt);
      std::vector<LowFromUpper> sinks;
      for (int t = 0; t < nt; ++t) sinks.push_back(LowFromUpper{&lows[t], hi});
      run_scan(u, p.fused, upper, sinks, 0, u.ngroups);
      std::fill(hist, hist + nbins, int64_t{0});
      for (const auto& l : lows) {
        for (const uint16_t v : l) ++hist[v];
      }
    }
  } else if (high < 0) {
    run_counted<false>(u, p.fused, upper, nbins, hist,
                       [](uint32_t* row, int) { return RadixHighSink{row}; });
  } else {
    run_counted<false>(u, p.fused, upper, nbins, hist,
                       [hi](uint32_t* row, int) { return RadixLowSink{row, hi}; });
  }
  throw_if_bad(bad, u.ptr, "radix_histogram");
}

template <class T>
void candidates(const SegmentArgs<T>& seg, const StepArgs& p, T* c, T* m, float* s,
                uint8_t* tracked) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const Update<T> u(seg, p, &bad);
  check_header(u.ptr, u.ngroups, u.nvalues, "candidates");
  const bool simd = (simd_level() >= 1), fused = p.fused;
  for_each_group_chunk(u.ngroups, [&](int64_t g0, int64_t g1) {
#if PK_HAVE_SIMD_VARIANT
    if (simd) {
      if (fused) {
        dense_simd<T, true>(u, c, m, s, tracked, g0, g1);
      } else {
        dense_simd<T, false>(u, c, m, s, tracked, g0, g1);
      }
      return;
    }
#endif
    (void)simd;
    if (fused) {
      dense_plain<T, true>(u, c, m, s, tracked, g0, g1);
    } else {
      dense_plain<T, false>(u, c, m, s, tracked, g0, g1);
    }
  });
  throw_if_bad(bad, u.ptr, "candidates");
}

template <class T>
SelectResult compact_select(const SegmentArgs<T>& seg, const StepArgs& p, float threshold,
                            int64_t tie_quota, uint8_t* out_bits, int64_t* out_ptr,
                            const LogBins& bins, int64_t* hist, const uint16_t* upper,
                            Compaction<T>* pre) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const Update<T> u(seg, p, &bad);
  check_header(u.ptr, u.ngroups, u.nvalues, "compact");
  const int64_t ngroups = u.ngroups, nbytes = u.nbytes;
  const bool with_ties = tie_quota > 0;
  // Every entry is written by the pass (a group of an inconsistent storage raises after it).
  std::vector<int32_t> gt_count(ngroups), tie_count(with_ties ? ngroups : 0);
  std::vector<uint8_t> tie_bits(with_ties ? nbytes : 0);
  uint8_t* const tb = with_ties ? tie_bits.data() : nullptr;
  int32_t* const tc = with_ties ? tie_count.data() : nullptr;
  const int nt = pass_threads(ngroups);
  // The stored upper halves order the scores against a threshold with a clear sign bit.
  const uint32_t tbits = static_cast<uint32_t>(float_bits(threshold));
  const bool from_upper =
      upper != nullptr && (tbits >> 31) == 0 && (hist == nullptr || log_bins_from_upper(bins));
  const auto make_sink = [&](uint32_t* row, int) {
    return CompactSink{threshold, out_bits, tb, nbytes, gt_count.data(), tc, row, bins};
  };
  if (from_upper) {
    const auto make_scan = [&](uint32_t* row, int) {
      return SelectFromUpper{threshold, tbits >> 16, out_bits,  tb, nbytes, gt_count.data(),
                             tc,        row,         bins};
    };
    if (hist) {
      run_counted<true>(u, p.fused, const_cast<uint16_t*>(upper), bins.nbins, hist, make_scan);
    } else {
      std::vector<SelectFromUpper> sinks(nt, make_scan(nullptr, 0));
      run_scan(u, p.fused, upper, sinks, 0, ngroups);
    }
  } else if (pre != nullptr && !with_ties) {
    pre->threads.clear();
    pre->threads.resize(nt);
    pre->group_off.resize(ngroups);
    pre->group_thread.resize(ngroups);
    const bool with_mom = p.momentum != 0;
    // Room for a quarter more than the old tracked set (untouched room costs no memory).
    const int64_t room = u.nvalues / nt + u.nvalues / (4 * nt) + 64 * kGroupSize;
    for (auto& b : pre->threads) {
      b.vals.reset(new T[room]);
      if (with_mom) b.moms.reset(new T[room]);
      b.capacity = room;
    }
    const auto make_keep = [&](uint32_t* row, int t) {
      return CompactKeepSink<T>(make_sink(row, t), &pre->threads[t], pre->group_off.data(),
                                pre->group_thread.data(), t, with_mom);
    };
    if (hist) {
      run_counted<false>(u, p.fused, nullptr, bins.nbins, hist, make_keep);
    } else {
      std::vector<CompactKeepSink<T>> sinks;
      for (int t = 0; t < nt; ++t) sinks.push_back(make_keep(nullptr, t));
      run_pass(u, p.fused, nullptr, sinks, 0, ngroups);
    }
    throw_if_bad(bad, u.ptr, "compact");
    pre->ready = true;
  } else if (hist) {
    run_counted<false>(u, p.fused, nullptr, bins.nbins, hist, make_sink);
  } else {
    std::vector<CompactSink> sinks(nt, make_sink(nullptr, 0));
    run_pass(u, p.fused, nullptr, sinks, 0, ngroups);
  }
  throw_if_bad(bad, u.ptr, "compact");

  // The tie quota goes to the ties in flat order: a sequential prefix over the group counts.
  std::vector<int32_t> allowed(with_ties ? ngroups : 0, 0);
  int64_t ties_before = 0, total = 0;
  out_ptr[0] = 0;
  for (int64_t g = 0; g < ngroups; ++g) {
    if (with_ties) {
      const int64_t left = std::max<int64_t>(tie_quota - ties_before, 0);
      allowed[g] = static_cast<int32_t>(std::min<int64_t>(left, tie_count[g]));
      ties_before += tie_count[g];
      total += allowed[g];
    }
    total += gt_count[g];
    out_ptr[g + 1] = total;
  }
  if (with_ties && ties_before > 0 && tie_quota > 0) {
    for_each_group_chunk(ngroups, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        int left = allowed[g];
        if (!left) continue;
        const int len = group_len(u.n, g * kGroupSize);
        uint64_t eq[kGroupWords], keep[kGroupWords];
        load_group_bits(tie_bits.data(), nbytes, g, len, eq);
        load_group_bits(out_bits, nbytes, g, len, keep);
        for (int k = 0; k < kGroupWords && left; ++k) {
          for (uint64_t b = eq[k]; b && left; b &= b - 1, --left) keep[k] |= b & (~b + 1);
        }
        store_group_bits(out_bits, nbytes, g, keep);
      }
    });
  }
  return {total, with_ties ? std::min(tie_quota, ties_before) : 0};
}

template <class T>
void compact_gather(const SegmentArgs<T>& seg, const StepArgs& p, const uint8_t* new_bits,
                    const int64_t* new_ptr, T* out_values, T* out_momentum,
                    const Compaction<T>* pre) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const Update<T> u(seg, p, &bad);
  check_header(u.ptr, u.ngroups, u.nvalues, "compact");
  if (pre != nullptr && pre->ready) {
    // run_pass ran whole chunks of kChunkGroups groups, each on one thread in order, so a
    // chunk's kept entries lie together in that thread's buffer.
    for_each_group_chunk(u.ngroups, [&](int64_t g0, int64_t g1) {
      const int64_t o = new_ptr[g0], cnt = new_ptr[g1] - o;
      if (cnt == 0) return;
      const auto& buf = pre->threads[pre->group_thread[g0]];
      const int64_t at = pre->group_off[g0];
      std::memcpy(out_values + o, buf.vals.get() + at, sizeof(T) * cnt);
      if (out_momentum) std::memcpy(out_momentum + o, buf.moms.get() + at, sizeof(T) * cnt);
    });
    return;
  }
  const int level = simd_level();
  const bool simd = (level >= 1), fused = p.fused;
  for_each_group_chunk(u.ngroups, [&](int64_t g0, int64_t g1) {
#if PK_HAVE_SIMD_VARIANT
    if (level >= 2) {
      if (fused) {
        gather_avx512<T, true>(u, new_bits, new_ptr, out_values, out_momentum, g0, g1);
      } else {
        gather_avx512<T, false>(u, new_bits, new_ptr, out_values, out_momentum, g0, g1);
      }
      return;
    }
    if (simd) {
      if (fused) {
        gather_simd<T, true>(u, new_bits, new_ptr, out_values, out_momentum, g0, g1);
      } else {
        gather_simd<T, false>(u, new_bits, new_ptr, out_values, out_momentum, g0, g1);
      }
      return;
    }
#endif
    (void)simd;
    if (fused) {
      gather_plain<T, true>(u, new_bits, new_ptr, out_values, out_momentum, g0, g1);
    } else {
      gather_plain<T, false>(u, new_bits, new_ptr, out_values, out_momentum, g0, g1);
    }
  });
  throw_if_bad(bad, u.ptr, "compact");
}

#define PK_INSTANTIATE(T)                                                                      \
  template void materialize<T>(uint64_t, double, double, const T*, int64_t, const uint8_t*,    \
                               const int64_t*, int64_t, T*);                                   \
  template void log_histogram<T>(const SegmentArgs<T>&, const StepArgs&, const LogBins&,       \
                                 int64_t*, uint16_t*, bool);                                   \
  template void radix_histogram<T>(const SegmentArgs<T>&, const StepArgs&, int64_t, int64_t,   \
                                   int64_t*, uint16_t*, bool);                                 \
  template void candidates<T>(const SegmentArgs<T>&, const StepArgs&, T*, T*, float*,          \
                              uint8_t*);                                                       \
  template SelectResult compact_select<T>(const SegmentArgs<T>&, const StepArgs&, float,       \
                                          int64_t, uint8_t*, int64_t*, const LogBins&,         \
                                          int64_t*, const uint16_t*, Compaction<T>*);          \
  template void compact_gather<T>(const SegmentArgs<T>&, const StepArgs&, const uint8_t*,      \
                                  const int64_t*, T*, T*, const Compaction<T>*);

}  // namespace pk
