// The update-pass kernels as templates over the value type (float / double); ops_f32.cpp and
// ops_f64.cpp instantiate them, so the two halves compile in parallel.
//
// Every pass walks the weight in groups of 256 elements (one group_ptr entry, 32 bytes of the
// bitmask). Per group it regenerates w0 with Philox, scatters the tracked values in, computes the
// candidate and the score in small stack buffers, and hands them to a "sink" (histogram,
// threshold compaction, dense output). So the dense gradient is read once per pass and nothing
// dense (w0, W, c, s) is ever stored. Groups are independent and every result is either per
// element or an integer count, so results never depend on the thread count or the schedule.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
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
  float bound;
  int64_t n, nbytes, ngroups;
  const T* values;
  int64_t nvalues;
  const uint8_t* bits;
  const int64_t* ptr;
  const T* grad;
  const T* mom;  // nullptr unless momentum != 0 and a buffer exists (reference: else m = g')
  float scale_prev, scale;
  bool has_wd;
  T wd, neg_lr, mu;
  std::atomic<int64_t>* bad;

  Update(const SegmentArgs<T>& s, const StepArgs& p, std::atomic<int64_t>* bad_group)
      : key(s.seed),
        init_block(init_block_fn()),
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
        scale_prev(to_f32(p.scale_prev)),
        scale(to_f32(p.scale)),
        has_wd(p.weight_decay != 0),
        wd(to_compute<T>(p.weight_decay)),
        neg_lr(to_compute<T>(-p.lr)),
        mu(to_compute<T>(p.momentum)),
        bad(bad_group) {}
};

// ---------------------------------------------------------------------------------------------
// The update pass: candidate and score of every element of groups [g0, g1), handed to a sink.
//
//   W  = tracked ? value : T(scale_prev * w0)
//   g' = weight_decay != 0 ? g.add(W, alpha=weight_decay) : g
//   m  = tracked and a momentum buffer ? momentum * m_old + g' : g'
//   c  = W.add(m, alpha=-lr)
//   s  = float32(|c - T(scale * w0)|)
// ---------------------------------------------------------------------------------------------
template <class T, bool Fused, class Sink>
PK_INLINE void update_groups(const Update<T>& u, Sink& sink, int64_t g0, int64_t g1) {
  alignas(64) float w0[kGroupSize];
  alignas(64) T W[kGroupSize];
  alignas(64) T m[kGroupSize];
  alignas(64) T c[kGroupSize];
  alignas(64) float s[kGroupSize];
  uint64_t tw[kGroupWords];
  const float sp = u.scale_prev, sc = u.scale;
  const T wd = u.wd, neg_lr = u.neg_lr, mu = u.mu;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * kGroupSize;
    const int len = static_cast<int>(std::min<int64_t>(kGroupSize, u.n - base));
    load_group_bits(u.bits, u.nbytes, g, len, tw);
    const int64_t r0 = group_start(u.ptr, u.nvalues, g, group_popcount(tw));
    if (r0 < 0) {
      report_bad_group(u.bad, g);
      continue;
    }
    u.init_block(u.key, base, len, u.bound, w0);
    for (int j = 0; j < len; ++j) W[j] = static_cast<T>(w0[j] * sp);
    int64_t r = r0;
    for (int k = 0; k < kGroupWords; ++k) {
      for (uint64_t b = tw[k]; b; b &= b - 1) W[k * 64 + ctz64(b)] = u.values[r++];
    }
    const T* gr = u.grad + base;
    if (u.has_wd) {
      for (int j = 0; j < len; ++j) m[j] = add_scaled<Fused>(gr[j], W[j], wd);
    } else {
      for (int j = 0; j < len; ++j) m[j] = gr[j];
    }
    if (u.mom) {
      r = r0;
      for (int k = 0; k < kGroupWords; ++k) {
        for (uint64_t b = tw[k]; b; b &= b - 1) {
          const int j = k * 64 + ctz64(b);
          const T decayed = u.mom[r++] * mu;  // rounded before the add, as mul() then add_()
          m[j] = decayed + m[j];
        }
      }
    }
    for (int j = 0; j < len; ++j) {
      c[j] = add_scaled<Fused>(W[j], m[j], neg_lr);
      const T target = static_cast<T>(w0[j] * sc);
      s[j] = static_cast<float>(std::fabs(c[j] - target));
    }
    sink.group(g, base, len, s, c, m, tw);
  }
}

template <class T, bool Fused, class Sink>
PK_NOINLINE void update_plain(const Update<T>& u, Sink& sink, int64_t g0, int64_t g1) {
  update_groups<T, Fused>(u, sink, g0, g1);
}

#if PK_HAVE_SIMD_VARIANT
template <class T, bool Fused, class Sink>
PK_NOINLINE PK_SIMD_TARGET void update_simd(const Update<T>& u, Sink& sink, int64_t g0,
                                            int64_t g1) {
  update_groups<T, Fused>(u, sink, g0, g1);
}
#endif

// One update pass over a segment with one sink per thread (sinks[t] for thread t).
template <class T, class Sink>
void run_update(const Update<T>& u, bool fused, std::vector<Sink>& sinks) {
  const int64_t nchunks = ceil_div(u.ngroups, kChunkGroups);
  const int nt = static_cast<int>(sinks.size());
  const bool simd = (simd_level() >= 1);
  for_each_chunk(nchunks, nt, [&](int64_t ch, int tid) {
    const int64_t g0 = ch * kChunkGroups, g1 = std::min(u.ngroups, g0 + kChunkGroups);
    Sink& sink = sinks[tid];
#if PK_HAVE_SIMD_VARIANT
    if (simd) {
      if (fused) {
        update_simd<T, true>(u, sink, g0, g1);
      } else {
        update_simd<T, false>(u, sink, g0, g1);
      }
      return;
    }
#endif
    (void)simd;
    if (fused) {
      update_plain<T, true>(u, sink, g0, g1);
    } else {
      update_plain<T, false>(u, sink, g0, g1);
    }
  });
}

int update_threads(int64_t ngroups) { return threads_for(ceil_div(ngroups, kChunkGroups)); }

// ---------------------------------------------------------------------------------------------
// Sinks. Each copies its fields to locals first: the histogram stores could alias the sink
// itself as far as the compiler knows, which would reload every field once per element. Bins and
// flags are computed into small arrays by loops that vectorise, then counted or packed.
// ---------------------------------------------------------------------------------------------

// Log-bin index of every score of a group (clamped as selection.score_histogram does).
PK_INLINE void log_bins_of(const float* s, int len, const LogBins& bins, int32_t* out) {
  const int shift = bins.shift;
  const int64_t base = bins.base, top = bins.nbins - 1;
  for (int j = 0; j < len; ++j) {
    int64_t b = static_cast<int64_t>(float_bits(s[j]) >> shift) - base;
    b = b < 0 ? 0 : b;
    out[j] = static_cast<int32_t>(b > top ? top : b);
  }
}

PK_INLINE void count_bins(const int32_t* idx, int len, int64_t* hist) {
  for (int j = 0; j < len; ++j) ++hist[idx[j]];
}

PK_INLINE void pack_group_flags(uint8_t* f, int len, uint64_t* w) {
  for (int j = len; j < kGroupSize; ++j) f[j] = 0;
  for (int k = 0; k < kGroupWords; ++k) w[k] = pack_flags64(f + 64 * k);
}

struct LogHistSink {
  int64_t* hist;
  LogBins bins;
  template <class T>
  PK_INLINE void group(int64_t, int64_t, int len, const float* s, const T*, const T*,
                       const uint64_t*) {
    alignas(64) int32_t idx[kGroupSize];
    log_bins_of(s, len, bins, idx);
    count_bins(idx, len, hist);
  }
};

struct RadixHighSink {
  int64_t* hist;
  template <class T>
  PK_INLINE void group(int64_t, int64_t, int len, const float* s, const T*, const T*,
                       const uint64_t*) {
    alignas(64) int32_t idx[kGroupSize];
    // Scores are |.|, so the sign bit is 0 and the index is below 2**15.
    for (int j = 0; j < len; ++j) idx[j] = (float_bits(s[j]) >> 16) & 0x7FFF;
    count_bins(idx, len, hist);
  }
};

struct RadixLowSink {
  int64_t* hist;
  int64_t high;
  template <class T>
  PK_INLINE void group(int64_t, int64_t, int len, const float* s, const T*, const T*,
                       const uint64_t*) {
    int64_t* const h = hist;
    const int64_t hi = high;
    for (int j = 0; j < len; ++j) {
      const uint32_t b = static_cast<uint32_t>(float_bits(s[j]));
      if (static_cast<int64_t>(b >> 16) == hi) ++h[b & 0xFFFFu];
    }
  }
};

// First pass of compact(): bits of s > threshold, per-group counts of those and of the ties.
struct CompactSink {
  float thr;
  uint8_t* out_bits;
  uint8_t* tie_bits;  // nullptr when there is no tie quota
  int64_t nbytes;
  int32_t* gt_count;
  int32_t* tie_count;
  int64_t* hist;  // nullptr unless the log histogram is asked for
  LogBins bins;
  template <class T>
  PK_INLINE void group(int64_t g, int64_t, int len, const float* s, const T*, const T*,
                       const uint64_t*) {
    const float t = thr;
    alignas(64) uint8_t f[kGroupSize];
    uint64_t w[kGroupWords];
    for (int j = 0; j < len; ++j) f[j] = s[j] > t;
    pack_group_flags(f, len, w);
    store_group_bits(out_bits, nbytes, g, w);
    gt_count[g] = group_popcount(w);
    if (tie_bits) {
      for (int j = 0; j < len; ++j) f[j] = s[j] == t;
      pack_group_flags(f, len, w);
      store_group_bits(tie_bits, nbytes, g, w);
      tie_count[g] = group_popcount(w);
    }
    if (hist) {
      alignas(64) int32_t idx[kGroupSize];
      log_bins_of(s, len, bins, idx);
      count_bins(idx, len, hist);
    }
  }
};

template <class T>
struct DenseSink {
  T* c;
  T* m;
  float* s;
  uint8_t* tracked;
  PK_INLINE void group(int64_t, int64_t base, int len, const float* sg, const T* cg, const T* mg,
                       const uint64_t* tw) {
    std::memcpy(s + base, sg, sizeof(float) * len);
    if (c) std::memcpy(c + base, cg, sizeof(T) * len);
    if (m) std::memcpy(m + base, mg, sizeof(T) * len);
    if (tracked) {
      uint8_t* const out = tracked + base;
      for (int j = 0; j < len; ++j) out[j] = static_cast<uint8_t>((tw[j >> 6] >> (j & 63)) & 1);
    }
  }
};

// Sums per-thread histogram rows into out (integer sums: exact in any order).
void reduce_rows(const std::vector<int64_t>& rows, int nt, int64_t nbins, int64_t* out) {
  for (int64_t b = 0; b < nbins; ++b) out[b] = 0;
  for (int t = 0; t < nt; ++t) {
    const int64_t* row = rows.data() + t * nbins;
    for (int64_t b = 0; b < nbins; ++b) out[b] += row[b];
  }
}

// ---------------------------------------------------------------------------------------------
// Gather: the candidate (and momentum) of every element set in the new bitmask, written in flat
// order. Touches only the kept elements: Philox runs for the untracked ones among them.
// ---------------------------------------------------------------------------------------------
template <class T, bool Fused>
PK_INLINE void gather_groups(const Update<T>& u, const uint8_t* new_bits, const int64_t* new_ptr,
                             T* out_values, T* out_mom, int64_t g0, int64_t g1) {
  const float sp = u.scale_prev;
  const T wd = u.wd, neg_lr = u.neg_lr, mu = u.mu;
  uint64_t tw[kGroupWords], nw[kGroupWords];
  for (int64_t g = g0; g < g1; ++g) {
    int64_t o = new_ptr[g];
    if (new_ptr[g + 1] == o) continue;
    const int64_t base = g * kGroupSize;
    const int len = static_cast<int>(std::min<int64_t>(kGroupSize, u.n - base));
    load_group_bits(u.bits, u.nbytes, g, len, tw);
    const int64_t r0 = group_start(u.ptr, u.nvalues, g, group_popcount(tw));
    if (r0 < 0) {
      report_bad_group(u.bad, g);
      continue;
    }
    load_group_bits(new_bits, u.nbytes, g, len, nw);
    int64_t before = 0;  // tracked elements of the old storage in the words before word k
    for (int k = 0; k < kGroupWords; ++k) {
      for (uint64_t b = nw[k]; b; b &= b - 1) {
        const int bit = ctz64(b);
        const int64_t i = base + k * 64 + bit;
        const bool tracked = (tw[k] >> bit) & 1;
        const int64_t rank = r0 + before + popcount64(tw[k] & ((uint64_t{1} << bit) - 1));
        const T W = tracked ? u.values[rank]
                            : static_cast<T>(init_value(u.key, i, u.bound) * sp);
        const T gp = u.has_wd ? add_scaled<Fused>(u.grad[i], W, wd) : u.grad[i];
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
    const int len = static_cast<int>(std::min<int64_t>(kGroupSize, a.n - base));
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

}  // namespace

template <class T>
void materialize(uint64_t seed, double bound, double scale, const T* values, int64_t nvalues,
                 const uint8_t* bits, const int64_t* group_ptr, int64_t numel, T* out) {
  const int64_t ngroups = ceil_div(numel, kGroupSize);
  check_header(group_ptr, ngroups, nvalues, "materialize");
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const MaterializeArgs<T> a{PhiloxKey(seed), init_block_fn(), to_f32(bound), to_f32(scale), numel,
                             ceil_div(numel, 8), values, nvalues, bits, group_ptr, out, &bad};
  const int64_t nchunks = ceil_div(ngroups, kChunkGroups);
  const bool simd = (simd_level() >= 1);
  for_each_chunk(nchunks, threads_for(nchunks), [&](int64_t ch, int) {
    const int64_t g0 = ch * kChunkGroups, g1 = std::min(ngroups, g0 + kChunkGroups);
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

template <class T>
void log_histogram(const SegmentArgs<T>& seg, const StepArgs& p, const LogBins& bins,
                   int64_t* hist) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const Update<T> u(seg, p, &bad);
  check_header(u.ptr, u.ngroups, u.nvalues, "log_histogram");
  const int nt = update_threads(u.ngroups);
  std::vector<int64_t> rows(static_cast<size_t>(nt) * bins.nbins, 0);
  std::vector<LogHistSink> sinks;
  for (int t = 0; t < nt; ++t) sinks.push_back({rows.data() + t * bins.nbins, bins});
  run_update(u, p.fused, sinks);
  throw_if_bad(bad, u.ptr, "log_histogram");
  reduce_rows(rows, nt, bins.nbins, hist);
}

template <class T>
void radix_histogram(const SegmentArgs<T>& seg, const StepArgs& p, int64_t high, int64_t nbins,
                     int64_t* hist) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const Update<T> u(seg, p, &bad);
  check_header(u.ptr, u.ngroups, u.nvalues, "radix_histogram");
  const int nt = update_threads(u.ngroups);
  std::vector<int64_t> rows(static_cast<size_t>(nt) * nbins, 0);
  if (high < 0) {
    std::vector<RadixHighSink> sinks;
    for (int t = 0; t < nt; ++t) sinks.push_back({rows.data() + t * nbins});
    run_update(u, p.fused, sinks);
  } else {
    std::vector<RadixLowSink> sinks;
    for (int t = 0; t < nt; ++t) sinks.push_back({rows.data() + t * nbins, high});
    run_update(u, p.fused, sinks);
  }
  throw_if_bad(bad, u.ptr, "radix_histogram");
  reduce_rows(rows, nt, nbins, hist);
}

template <class T>
void candidates(const SegmentArgs<T>& seg, const StepArgs& p, T* c, T* m, float* s,
                uint8_t* tracked) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const Update<T> u(seg, p, &bad);
  check_header(u.ptr, u.ngroups, u.nvalues, "candidates");
  std::vector<DenseSink<T>> sinks(update_threads(u.ngroups), DenseSink<T>{c, m, s, tracked});
  run_update(u, p.fused, sinks);
  throw_if_bad(bad, u.ptr, "candidates");
}

template <class T>
SelectResult compact_select(const SegmentArgs<T>& seg, const StepArgs& p, float threshold,
                            int64_t tie_quota, uint8_t* out_bits, int64_t* out_ptr,
                            const LogBins& bins, int64_t* hist) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const Update<T> u(seg, p, &bad);
  check_header(u.ptr, u.ngroups, u.nvalues, "compact");
  const int64_t ngroups = u.ngroups, nbytes = u.nbytes;
  const bool with_ties = tie_quota > 0;
  std::vector<int32_t> gt_count(ngroups, 0), tie_count(with_ties ? ngroups : 0, 0);
  std::vector<uint8_t> tie_bits(with_ties ? nbytes : 0, 0);
  const int nt = update_threads(ngroups);
  std::vector<int64_t> rows(hist ? static_cast<size_t>(nt) * bins.nbins : 0, 0);
  std::vector<CompactSink> sinks;
  for (int t = 0; t < nt; ++t) {
    sinks.push_back({threshold, out_bits, with_ties ? tie_bits.data() : nullptr, nbytes,
                     gt_count.data(), with_ties ? tie_count.data() : nullptr,
                     hist ? rows.data() + t * bins.nbins : nullptr, bins});
  }
  run_update(u, p.fused, sinks);
  throw_if_bad(bad, u.ptr, "compact");
  if (hist) reduce_rows(rows, nt, bins.nbins, hist);

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
  if (with_ties) {
    const int64_t nchunks = ceil_div(ngroups, kChunkGroups);
    for_each_chunk(nchunks, threads_for(nchunks), [&](int64_t ch, int) {
      const int64_t g1 = std::min(ngroups, (ch + 1) * kChunkGroups);
      for (int64_t g = ch * kChunkGroups; g < g1; ++g) {
        int left = allowed[g];
        if (!left) continue;
        const int len = static_cast<int>(std::min<int64_t>(kGroupSize, u.n - g * kGroupSize));
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
                    const int64_t* new_ptr, T* out_values, T* out_momentum) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const Update<T> u(seg, p, &bad);
  check_header(u.ptr, u.ngroups, u.nvalues, "compact");
  const int64_t nchunks = ceil_div(u.ngroups, kChunkGroups);
  const bool simd = (simd_level() >= 1), fused = p.fused;
  for_each_chunk(nchunks, threads_for(nchunks), [&](int64_t ch, int) {
    const int64_t g0 = ch * kChunkGroups, g1 = std::min(u.ngroups, g0 + kChunkGroups);
#if PK_HAVE_SIMD_VARIANT
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
                                 int64_t*);                                                    \
  template void radix_histogram<T>(const SegmentArgs<T>&, const StepArgs&, int64_t, int64_t,   \
                                   int64_t*);                                                  \
  template void candidates<T>(const SegmentArgs<T>&, const StepArgs&, T*, T*, float*,          \
                              uint8_t*);                                                       \
  template SelectResult compact_select<T>(const SegmentArgs<T>&, const StepArgs&, float,       \
                                          int64_t, uint8_t*, int64_t*, const LogBins&,         \
                                          int64_t*);                                           \
  template void compact_gather<T>(const SegmentArgs<T>&, const StepArgs&, const uint8_t*,      \
                                  const int64_t*, T*, T*);

}  // namespace pk
