// The pass drivers: every op walks the weight in groups of 256 elements (one group_ptr entry, 32
// bytes of the bitmask), in chunks of kChunkGroups groups scheduled over the threads. A scoring
// pass regenerates w0 of a group with Philox, computes the score of every element (score.h) and
// hands the scores to the thread's sink (sinks.h); the step's first pass also stores the upper
// halves of the scores, and the later passes scan those instead. The compaction's gather, the
// dense candidates() and materialize() walk the groups the same way. Every pass is compiled once
// per instruction set and picked at run time by run_isa().
//
// The compaction writes the kept values last. Without a tie quota, the scoring pass itself
// collects the kept candidates (CompactKeepSink); otherwise the gather recomputes the kept
// elements only (taking the tracked ones from the first pass of the step when it kept them), with
// the w0 of newly kept elements from a scattered-offset Philox in SIMD.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "masks.h"
#include "ops.h"
#include "parallel.h"
#include "philox.h"
#include "score.h"
#include "sinks.h"

namespace pk {
namespace {

// ---------------------------------------------------------------------------------------------
// Instruction-set dispatch: the one place that maps simd_level() (0 portable, 1 AVX2 + FMA, 2
// AVX-512) and StepArgs::fused to the compiled instance of a pass. A pass is a type K with
//
//   template <bool Fused, int Isa> static PK_INLINE void groups(IsaTag<Isa>, args...)
//
// that runs its groups with the masks of instruction set Isa (masks.h) and the candidate rounding
// Fused, plus an overload for IsaTag<2> where the pass has AVX-512 code of its own; K::kMaxIsa is
// the highest set it has an instance for (a lower one serves the levels above it) and
// K::kFusedMatters whether Fused changes anything. run_isa<K>(level, fused, args...) calls the
// instance; each is inlined into an out-of-line function compiled for its set (on_portable,
// on_avx2, on_avx512), so that everything it inlines (scores, sinks, masks) is compiled for that
// set too. These take pointers and integers by value and anything else by reference, as
// hand-written ones would.
// ---------------------------------------------------------------------------------------------
template <int Isa>
using IsaTag = std::integral_constant<int, Isa>;

template <class A>
using PassArg = std::conditional_t<std::is_scalar_v<A>, std::remove_cv_t<A>, A&>;

template <class K, bool Fused, class... A>
PK_NOINLINE void on_portable(A... a) {
  K::template groups<Fused>(IsaTag<0>{}, a...);
}

#if PK_HAVE_SIMD_VARIANT
template <class K, bool Fused, class... A>
PK_NOINLINE PK_SIMD_TARGET void on_avx2(A... a) {
  K::template groups<Fused>(IsaTag<1>{}, a...);
}

template <class K, bool Fused, class... A>
PK_NOINLINE PK_AVX512_TARGET void on_avx512(A... a) {
  K::template groups<Fused>(IsaTag<2>{}, a...);
}
#endif

template <class K, int Isa, bool Fused, class... A>
PK_INLINE void run_compiled(A&... a) {
#if PK_HAVE_SIMD_VARIANT
  if constexpr (Isa == 2) {
    on_avx512<K, Fused, PassArg<A>...>(a...);
  } else if constexpr (Isa == 1) {
    on_avx2<K, Fused, PassArg<A>...>(a...);
  } else {
    on_portable<K, Fused, PassArg<A>...>(a...);
  }
#else
  on_portable<K, Fused, PassArg<A>...>(a...);
#endif
}

// K's groups(args...) for simd level `level` (simd_level(), read once per op) and rounding `fused`.
template <class K, class... A>
PK_INLINE void run_isa(int level, bool fused, A&... a) {
  const auto run = [&](auto isa) {
    constexpr int kIsa = decltype(isa)::value;
    if constexpr (K::kFusedMatters) {
      if (fused) {
        run_compiled<K, kIsa, true>(a...);
        return;
      }
    }
    run_compiled<K, kIsa, false>(a...);
  };
#if PK_HAVE_SIMD_VARIANT
  if constexpr (K::kMaxIsa >= 2) {
    if (level >= 2) {
      run(IsaTag<2>{});
      return;
    }
  }
  if (level >= 1) {
    run(IsaTag<1>{});
    return;
  }
#endif
  (void)level;
  run(IsaTag<0>{});
}

// ---------------------------------------------------------------------------------------------
// Scoring passes: compute the scores of groups [g0, g1) and hand each group to the sink (storing
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

#if PK_HAVE_SIMD_VARIANT
// The AVX-512 pass (simd level 2) is software-pipelined: while it counts the scores of group g
// (scalar loads, adds and stores), it generates w0 of group g + 1 (vector multiplies), in
// alternating pieces of kCountPart elements, so the two kinds of work can overlap in the core. It
// is out of line itself, the scoring passes' AVX-512 instance (on_avx512() only jumps to it), so
// that this loop is compiled as a function of its own.
template <class T, bool Fused, class Sink>
PK_NOINLINE PK_AVX512_TARGET void update_groups_avx512(const Update<T>& u, Sink& sink,
                                                     uint16_t* store, int64_t g0, int64_t g1) {
  constexpr bool kCM = Sink::kWantCM;
  alignas(64) float w0[2][kGroupSize];
  alignas(64) float s[kGroupSize];
  alignas(64) T c[kCM ? kGroupSize : 1];
  alignas(64) T m[kCM ? kGroupSize : 1];
  uint64_t tw[kGroupWords];
  uint32_t rk_hi = static_cast<uint32_t>(static_cast<uint64_t>(g0 * kGroupSize) >> 32);
  RoundKeys rk(u.key, rk_hi);
  if (u.zero_init) {
    std::memset(w0, 0, sizeof w0);  // and nothing writes them again
  } else if (g0 < g1) {
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
        if (!u.zero_init) w0_block32_avx512(rk, nlo + static_cast<uint32_t>(j0), u.bound, nxt + j0);
        for (size_t b = 0; b < kCountPart * sizeof(T); b += 64) {
          __builtin_prefetch(ngrad + j0 * sizeof(T) + b);
        }
      }
      if (ok && j0 < len) sink.count(s + j0, std::min(kCountPart, len - j0));
    }
    if (next && !next_full && !u.zero_init) {
      u.init_block(u.key, nbase, group_len(u.n, nbase), u.bound, nxt);
    }
    if (ok) {
      sink.template body<2>(g, len, s);
      if constexpr (kCM) sink.template collect<2>(g, c, m);
    }
  }
}
#endif

// The scoring passes (run_pass) and the scans of stored upper halves (run_scan).
template <class T, class Sink>
struct UpdatePass {
  static constexpr int kMaxIsa = 2;
  static constexpr bool kFusedMatters = true;
  template <bool Fused, int Isa>
  static PK_INLINE void groups(IsaTag<Isa>, const Update<T>& u, Sink& sink, uint16_t* store,
                               int64_t g0, int64_t g1) {
    update_groups<T, Fused, Isa>(u, sink, store, g0, g1);
  }
#if PK_HAVE_SIMD_VARIANT
  template <bool Fused>
  static PK_INLINE void groups(IsaTag<2>, const Update<T>& u, Sink& sink, uint16_t* store,
                               int64_t g0, int64_t g1) {
    update_groups_avx512<T, Fused>(u, sink, store, g0, g1);
  }
#endif
};

template <class T, class Sink>
struct ScanPass {
  static constexpr int kMaxIsa = 2;
  static constexpr bool kFusedMatters = true;
  template <bool Fused, int Isa>
  static PK_INLINE void groups(IsaTag<Isa>, const Update<T>& u, const uint16_t* upper, Sink& sink,
                               int64_t g0, int64_t g1) {
    scan_groups<T, Fused, Isa>(u, upper, sink, g0, g1);
  }
};

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
    run_isa<UpdatePass<T, Sink>>(level, fused, u, sink, store, a, b);
  });
}

// A scan of stored upper halves over groups [g0, g1).
template <class T, class Sink>
void run_scan(const Update<T>& u, bool fused, const uint16_t* upper, std::vector<Sink>& sinks,
              int64_t g0, int64_t g1) {
  run_chunks(g0, g1, sinks, [&](Sink& sink, int64_t a, int64_t b, int level) {
    run_isa<ScanPass<T, Sink>>(level, fused, u, upper, sink, a, b);
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

// The compaction's gather (gather_groups() in score.h).
template <class T>
struct GatherPass {
  static constexpr int kMaxIsa = 2;
  static constexpr bool kFusedMatters = true;
  template <bool Fused, int Isa>
  static PK_INLINE void groups(IsaTag<Isa>, const Update<T>& u, const uint8_t* new_bits,
                               const int64_t* new_ptr, T* out_values, T* out_mom, int64_t g0,
                               int64_t g1) {
    gather_groups<T, Fused>(u, new_bits, new_ptr, out_values, out_mom, g0, g1);
  }
};

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

template <class T>
struct DensePass {
  static constexpr int kMaxIsa = 1;
  static constexpr bool kFusedMatters = true;
  template <bool Fused, int Isa>
  static PK_INLINE void groups(IsaTag<Isa>, const Update<T>& u, T* c, T* m, float* s,
                               uint8_t* tracked, int64_t g0, int64_t g1) {
    dense_groups<T, Fused>(u, c, m, s, tracked, g0, g1);
  }
};

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
  T* out;             // element out_start of the weight is out[0]
  int64_t out_start;  // a multiple of kGroupSize
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
    T* out = a.out + (base - a.out_start);
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
struct MaterializePass {
  static constexpr int kMaxIsa = 1;
  static constexpr bool kFusedMatters = false;
  template <bool Fused, int Isa>
  static PK_INLINE void groups(IsaTag<Isa>, const MaterializeArgs<T>& a, int64_t g0, int64_t g1) {
    materialize_groups(a, g0, g1);
  }
};

// f(g0, g1) over the chunks of ngroups groups.
template <class F>
void for_each_group_chunk(int64_t ngroups, const F& f) {
  const int64_t nchunks = ceil_div(ngroups, kChunkGroups);
  for_each_chunk(nchunks, threads_for(nchunks), [&](int64_t ch, int) {
    const int64_t g0 = ch * kChunkGroups;
    f(g0, std::min(ngroups, g0 + kChunkGroups));
  });
}

}  // namespace
}  // namespace pk
