// The parts of the C++ backend that do not depend on the value type: thread and ISA settings,
// raw Philox, bitmask packing and the paper's sequential quantile walk.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "common.h"
#include "ops.h"
#include "parallel.h"
#include "philox.h"

namespace pk {
namespace {

std::atomic<int> g_threads{0};  // 0: not set yet, use the OpenMP default
std::atomic<int> g_simd_cap{2};

int cpu_simd_level() {
#if PK_HAVE_SIMD_VARIANT
  __builtin_cpu_init();  // the checks include the OS's support for the AVX / AVX-512 state
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi") &&
                    __builtin_cpu_supports("bmi2");
  if (!avx2) return 0;
  return __builtin_cpu_supports("avx512f") ? 2 : 1;
#else
  return 0;
#endif
}

const int g_cpu_simd_level = cpu_simd_level();

PK_NOINLINE void philox_plain(PhiloxKey key, const int32_t* off32, const int64_t* off64,
                              int64_t i0, int64_t i1, float* out) {
  if (off32) {
    for (int64_t i = i0; i < i1; ++i) {
      // An int32 offset's high counter word is 0, even for negative offsets (philox.py).
      out[i] = uniform_of_word(philox_word(key, static_cast<uint32_t>(off32[i]), 0));
    }
  } else {
    for (int64_t i = i0; i < i1; ++i) {
      const uint64_t o = static_cast<uint64_t>(off64[i]);
      out[i] = uniform_of_word(
          philox_word(key, static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32)));
    }
  }
}

}  // namespace

int hardware_threads() {
#ifdef _OPENMP
  return omp_get_num_procs();
#else
  return 1;
#endif
}

int max_threads() {
  const int t = g_threads.load(std::memory_order_relaxed);
  if (t > 0) return t;
#ifdef _OPENMP
  return omp_get_max_threads();  // OMP_NUM_THREADS, else the cores
#else
  return 1;
#endif
}

void set_max_threads(int n) { g_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }

int max_simd_level() { return g_cpu_simd_level; }
int simd_level() { return std::min(g_cpu_simd_level, g_simd_cap.load(std::memory_order_relaxed)); }
void set_simd_level(int level) { g_simd_cap.store(std::max(level, 0), std::memory_order_relaxed); }

InitBlockFn init_block_fn() {
#if PK_HAVE_SIMD_VARIANT
  switch (simd_level()) {
    case 2:
      return init_values_block_avx512;
    case 1:
      return init_values_block_avx2;
    default:
      break;
  }
#endif
  return init_values_block_plain;
}

InitIdxFn init_idx_fn() {
#if PK_HAVE_SIMD_VARIANT
  switch (simd_level()) {
    case 2:
      return init_values_idx_avx512;
    case 1:
      return init_values_idx_avx2;
    default:
      break;
  }
#endif
  return init_values_idx_plain;
}

void philox_uniform(uint64_t seed, const int32_t* off32, const int64_t* off64, int64_t n,
                    float* out) {
  constexpr int64_t kChunk = 1 << 14;
  const PhiloxKey key(seed);
  const int64_t nchunks = ceil_div(n, kChunk);
  for_each_chunk(nchunks, threads_for(nchunks), [&](int64_t ch, int) {
    philox_plain(key, off32, off64, ch * kChunk, std::min(n, (ch + 1) * kChunk), out);
  });
}

int64_t mask_select(const uint8_t* keep, int64_t numel, uint8_t* out_bits, int64_t* out_ptr) {
  const int64_t ngroups = ceil_div(numel, kGroupSize), nbytes = ceil_div(numel, 8);
  std::vector<int32_t> count(ngroups, 0);
  const int64_t nchunks = ceil_div(ngroups, kChunkGroups);
  for_each_chunk(nchunks, threads_for(nchunks), [&](int64_t ch, int) {
    const int64_t g1 = std::min(ngroups, (ch + 1) * kChunkGroups);
    for (int64_t g = ch * kChunkGroups; g < g1; ++g) {
      const int64_t base = g * kGroupSize;
      const int len = static_cast<int>(std::min<int64_t>(kGroupSize, numel - base));
      alignas(64) uint8_t f[kGroupSize];
      uint64_t w[kGroupWords];
      for (int j = 0; j < len; ++j) f[j] = keep[base + j] != 0;
      for (int j = len; j < kGroupSize; ++j) f[j] = 0;
      for (int k = 0; k < kGroupWords; ++k) w[k] = pack_flags64(f + 64 * k);
      store_group_bits(out_bits, nbytes, g, w);
      count[g] = group_popcount(w);
    }
  });
  out_ptr[0] = 0;
  for (int64_t g = 0; g < ngroups; ++g) out_ptr[g + 1] = out_ptr[g] + count[g];
  return out_ptr[ngroups];
}

template <class S>
double paper_walk(const S* scores, int64_t n, double theta, double up, double down,
                  uint8_t* mask) {
  // Sequential by definition: element i's comparison depends on every earlier element.
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = static_cast<double>(scores[i]) > theta;
    mask[i] = keep;
    theta *= keep ? up : down;
  }
  return theta;
}

template double paper_walk<float>(const float*, int64_t, double, double, double, uint8_t*);
template double paper_walk<double>(const double*, int64_t, double, double, double, uint8_t*);

}  // namespace pk
