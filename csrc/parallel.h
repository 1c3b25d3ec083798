// Chunked OpenMP loops shared by the kernel files.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops.h"

namespace pk {

// Groups per scheduled chunk: 4096 elements, small enough to balance two to dozens of threads and
// large enough that scheduling costs nothing.
inline constexpr int64_t kChunkGroups = 16;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int threads_for(int64_t nchunks) {
  const int64_t t = std::min<int64_t>(max_threads(), nchunks);
  return static_cast<int>(std::max<int64_t>(t, 1));
}

// f(chunk, thread) for every chunk, each chunk exactly once, thread < nt.
template <class F>
void for_each_chunk(int64_t nchunks, int nt, const F& f) {
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
      for (int64_t ch = 0; ch < nchunks; ++ch) f(ch, tid);
    }
    return;
  }
#endif
  for (int64_t ch = 0; ch < nchunks; ++ch) f(ch, 0);
}

}  // namespace pk
