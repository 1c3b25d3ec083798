// The weight ops of the C++ backend on raw buffers (procrustes_kernels/ops/update/reference.py is
// the definition). bindings.cpp checks dtypes and sizes before calling in; what these functions
// check themselves (storage consistency) is reported as std::invalid_argument, which pybind11
// turns into ValueError. Nothing here touches Python, so callers may release the GIL around them.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "philox.h"

namespace pk {

struct StepArgs {
  double lr, momentum, weight_decay;
  double scale;       // d_n: the score's reference point
  double scale_prev;  // d_(n-1): untracked weights before the step
  // Whether torch's `a.add(b, alpha=s)` rounds once (an FMA) on this machine: true on its AVX2 /
  // AVX-512 kernels, false on the generic one. The reference's candidate arithmetic inherits it.
  bool fused;
};

template <class T>
struct SegmentArgs {
  uint64_t seed;
  double bound;
  int64_t numel;
  const T* values;
  int64_t nvalues;
  const uint8_t* bits;        // ceil(numel / 8) bytes
  const int64_t* group_ptr;   // ceil(numel / 256) + 1 entries
  const T* grad;              // numel
  const T* momentum;          // nvalues, or nullptr when there is no buffer
  // Optional step space, nvalues each (tracked_m only with momentum): the tracked elements'
  // candidates and new momenta, written by a scoring pass that stores the score upper halves and
  // read by compact_gather(), which then touches the gradient only for newly kept elements.
  T* tracked_c = nullptr;
  T* tracked_m = nullptr;
};

// Log-spaced score bins of selection.py: clamp((bits >> shift) - base, 0, nbins - 1).
struct LogBins {
  int shift;
  int64_t base;
  int64_t nbins;
};

struct SelectResult {
  int64_t kept;
  int64_t ties_used;
};

// Threads used by every kernel (results never depend on it).
int max_threads();
void set_max_threads(int n);
int hardware_threads();
// Instruction set of the kernels (results never depend on it either): 0 baseline, 1 AVX2 + FMA,
// 2 the same with AVX-512 Philox. set_simd_level caps it; it never exceeds the CPU's.
int simd_level();
int max_simd_level();
void set_simd_level(int level);

// The Philox block generator of the current simd level, and its scattered-offset twin.
InitBlockFn init_block_fn();
InitIdxFn init_idx_fn();

// u for each offset; exactly one of off32 / off64 is non-null.
void philox_uniform(uint64_t seed, const int32_t* off32, const int64_t* off64, int64_t n,
                    float* out);

// Elements [start, start + count) of the effective weight (numel elements in all) into out[0, count):
// start is a multiple of the group size, start + count one too or numel (whole groups are walked).
template <class T>
void materialize(uint64_t seed, double bound, double scale, const T* values, int64_t nvalues,
                 const uint8_t* bits, const int64_t* group_ptr, int64_t numel, int64_t start,
                 int64_t count, T* out);

// The scoring passes take an optional buffer `upper` of numel uint16: the upper 16 bits of this
// step's scores. With upper_valid the pass reads them (and recomputes the exact scores of the few
// elements it needs); otherwise it computes the scores and, when the buffer is given, stores
// their upper halves there for the next passes of the step.
template <class T>
void log_histogram(const SegmentArgs<T>& seg, const StepArgs& p, const LogBins& bins,
                   int64_t* hist, uint16_t* upper, bool upper_valid);

// high < 0: counts of bits >> 16 (nbins = kRadixHighBins = 2**15); else counts of bits & 0xFFFF
// among the scores with bits >> 16 == high (nbins = kRadixLowBins = 2**16).
template <class T>
void radix_histogram(const SegmentArgs<T>& seg, const StepArgs& p, int64_t high, int64_t nbins,
                     int64_t* hist, uint16_t* upper, bool upper_valid);

// Dense outputs of reference.candidates; c, m and tracked may be null (scores only).
template <class T>
void candidates(const SegmentArgs<T>& seg, const StepArgs& p, T* c, T* m, float* s,
                uint8_t* tracked);

// What compact_select() hands to compact_gather(). Without a tie quota the pass that computes
// the scores knows the kept set as it goes, and collects the kept candidates and momenta per
// thread (`ready`); the gather then only copies them into place instead of recomputing them.
template <class T>
struct Compaction {
  struct Buffer {  // one thread's kept entries, in the order in which it ran its groups
    std::unique_ptr<T[]> vals, moms;
    int64_t size = 0, capacity = 0;
  };
  std::vector<Buffer> threads;
  std::vector<int64_t> group_off;      // per group: its first entry in its thread's buffer
  std::vector<int32_t> group_thread;   // per group: the thread that ran it
  bool ready = false;
};

// First half of compact(): the new bitmask and group pointers (and the log histogram when hist
// is non-null), from this step's stored upper halves when `upper` is non-null (and the
// threshold's sign bit is clear), else computing the scores (and filling `pre` when it is
// non-null and there is no tie quota). compact_gather() then fills the kept values and momentum,
// from `pre` when it is ready.
template <class T>
SelectResult compact_select(const SegmentArgs<T>& seg, const StepArgs& p, float threshold,
                            int64_t tie_quota, uint8_t* out_bits, int64_t* out_ptr,
                            const LogBins& bins, int64_t* hist, const uint16_t* upper,
                            Compaction<T>* pre);

// The bitmask and group pointers of an explicit keep mask (one byte per element).
int64_t mask_select(const uint8_t* keep, int64_t numel, uint8_t* out_bits, int64_t* out_ptr);

// True when a compaction at this threshold and tie quota keeps only positive scores, so no kept
// candidate is a zero whose sign the skipped w0 would decide (see Update::zero_init).
inline bool keeps_positive_scores(float threshold, int64_t tie_quota) {
  return threshold > 0.0f || (threshold == 0.0f && tie_quota == 0);
}

// zero_ok: the kept set holds positive scores only (keeps_positive_scores()).
template <class T>
void compact_gather(const SegmentArgs<T>& seg, const StepArgs& p, const uint8_t* new_bits,
                    const int64_t* new_ptr, T* out_values, T* out_momentum,
                    const Compaction<T>* pre, bool zero_ok);

// PaperQuantileSelector's sequential walk; returns the final theta.
template <class S>
double paper_walk(const S* scores, int64_t n, double theta, double up, double down,
                  uint8_t* mask);

}  // namespace pk
