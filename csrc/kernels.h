// The weight ops of ops.h as templates over the value type (float / double); ops_f32.cpp and
// ops_f64.cpp instantiate them, so the two halves compile in parallel.
//
// One op is one or more passes over the weight (passes.h), which regenerate w0 with Philox and
// compute the candidate and score of every element on the fly (score.h: the reference's
// arithmetic) and hand the scores of each group to a sink (sinks.h: histograms, the threshold
// bitmask; masks.h: their SIMD compares). The dense gradient is read once per pass and nothing
// dense is stored except, when the caller passes a buffer, the upper 16 bits of every score (2
// bytes per weight, for one step): the later passes of the same step then scan those and
// recompute only the few exact scores they cannot decide from them (see Segment.scratch in
// procrustes_kernels/ops/update/cpp.py). Groups are independent and every result is either per
// element or an integer count, so results never depend on the thread count, the schedule or the
// instruction set.
//
// This file holds the checks of the storage header and the ops themselves: which passes, with
// which sinks, and the sequential steps between them (the tie quota's prefix over the groups).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "ops.h"
#include "parallel.h"
#include "passes.h"
#include "philox.h"
#include "score.h"
#include "sinks.h"

namespace pk {
namespace {

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

}  // namespace

template <class T>
void materialize(uint64_t seed, double bound, double scale, const T* values, int64_t nvalues,
                 const uint8_t* bits, const int64_t* group_ptr, int64_t numel, int64_t start,
                 int64_t count, T* out) {
  const int64_t ngroups = ceil_div(numel, kGroupSize);
  check_header(group_ptr, ngroups, nvalues, "materialize");
  const int64_t stop = start + count;
  if (start < 0 || count < 0 || stop > numel || (start != numel && start % kGroupSize != 0) ||
      (stop != numel && stop % kGroupSize != 0)) {
    throw std::invalid_argument(
        "materialize(): expected 0 <= start <= start + count <= numel with start and start + "
        "count multiples of " + std::to_string(kGroupSize) + " (or numel), got "
        "start=" + std::to_string(start) + ", count=" + std::to_string(count) + ", numel=" +
        std::to_string(numel));
  }
  if (count == 0) return;
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const MaterializeArgs<T> a{PhiloxKey(seed), init_block_fn(), to_f32(bound),  to_f32(scale),
                             numel,           ceil_div(numel, 8), values,      nvalues,
                             bits,            group_ptr,          out,         start,
                             &bad};
  const int level = simd_level();
  const int64_t first = start / kGroupSize;
  for_each_group_chunk(ceil_div(stop, kGroupSize) - first, [&](int64_t g0, int64_t g1) {
    int64_t lo = first + g0, hi = first + g1;
    run_isa<MaterializePass<T>>(level, false, a, lo, hi);
  });
  throw_if_bad(bad, group_ptr, "materialize");
}

// Log bins of the upper halves are exact when the lower half is shifted out (as for the
// package's bins: the later passes of a step then read the stored upper halves).
inline constexpr bool log_bins_from_upper(const LogBins& bins) {
  return bins.shift >= kRadixLowBits;
}
static_assert(log_bins_from_upper(LogBins{kHistShift, kHistBase, kHistBins}),
              "the package's log bins are exact from the stored upper halves");

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
  const Update<T> u(seg, p, &bad, false);  // every candidate out, the signs of zeros included
  check_header(u.ptr, u.ngroups, u.nvalues, "candidates");
  const int level = simd_level();
  for_each_group_chunk(u.ngroups, [&](int64_t g0, int64_t g1) {
    run_isa<DensePass<T>>(level, p.fused, u, c, m, s, tracked, g0, g1);
  });
  throw_if_bad(bad, u.ptr, "candidates");
}

template <class T>
SelectResult compact_select(const SegmentArgs<T>& seg, const StepArgs& p, float threshold,
                            int64_t tie_quota, uint8_t* out_bits, int64_t* out_ptr,
                            const LogBins& bins, int64_t* hist, const uint16_t* upper,
                            Compaction<T>* pre) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const Update<T> u(seg, p, &bad, keeps_positive_scores(threshold, tie_quota));
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
                    const Compaction<T>* pre, bool zero_ok) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const Update<T> u(seg, p, &bad, zero_ok);
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
  for_each_group_chunk(u.ngroups, [&](int64_t g0, int64_t g1) {
    run_isa<GatherPass<T>>(level, p.fused, u, new_bits, new_ptr, out_values, out_momentum, g0, g1);
  });
  throw_if_bad(bad, u.ptr, "compact");
}

#define PK_INSTANTIATE(T)                                                                      \
  template void materialize<T>(uint64_t, double, double, const T*, int64_t, const uint8_t*,    \
                               const int64_t*, int64_t, int64_t, int64_t, T*);                 \
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
                                  const int64_t*, T*, T*, const Compaction<T>*, bool);

}  // namespace pk
