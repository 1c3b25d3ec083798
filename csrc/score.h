// The candidate and score of every element, from the scalars of one update pass (Update): the one
// place to compare with the Python reference, `candidates` in procrustes_kernels/ops/update/
// reference.py, which defines them. Every operation below is one of the reference's tensor ops on
// the same dtype, in the same order, so each rounds as it does:
//
//   W  = tracked ? value : T(scale_prev * w0)
//   g' = weight_decay != 0 ? g.add(W, alpha=weight_decay) : g
//   m  = tracked and a momentum buffer ? momentum * m_old + g' : g'
//   c  = W.add(m, alpha=-lr)
//   s  = float32(|c - T(scale * w0)|)
//
// where w0 is the element's initial value (Philox, philox.h) and `add` rounds once (an FMA) or
// twice as this PyTorch build does (StepArgs::fused, add_scaled()). The table is written out in
// each loop that applies it, so that the compiler keeps each loop's own shape: score_group_w0()
// for the elements of a group (vectorised for the untracked ones, then the tracked ones), its
// AVX-512 twin score_group_f32_avx512() for float, Exact for a few chosen elements of a group and
// gather_groups() for the kept elements of the compaction. Also here: the checks of a group's
// storage that each of them makes before reading the group's values.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "masks.h"
#include "ops.h"
#include "parallel.h"
#include "philox.h"

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
// Where both scales are zero (Procrustes after its decay) and the pass only selects (zero_ok),
// w0 is never regenerated: an untracked W and its target d_n * w0 are zeros either way (up to the
// sign of a zero, which changes no score, and no kept weight: a kept candidate is never zero).
template <class T>
struct Update {
  PhiloxKey key;
  bool zero_init;
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

  Update(const SegmentArgs<T>& s, const StepArgs& p, std::atomic<int64_t>* bad_group,
         bool zero_ok = true)
      : key(s.seed),
        zero_init(zero_ok && to_f32(p.scale_prev) == 0.0f && to_f32(p.scale) == 0.0f),
        init_block(zero_init ? zero_values_block : init_block_fn()),
        init_idx(zero_init ? zero_values_idx : init_idx_fn()),
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
// The scores of one group: first for all elements as untracked (vectorised), then again for the
// tracked ones. c and m are written only when WantCM (dense candidates() and the compaction that
// collects the kept candidates); with KeepTracked the tracked elements' c and m also go to
// Update::tracked_c / tracked_m, for the step's gather.
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

// Exact scores of the elements of group g set in want[], into s[j]; false when the group's
// storage is inconsistent (reported). The later passes of a step call it for the few elements
// whose stored upper half (sinks.h) cannot decide.
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

}  // namespace
}  // namespace pk
