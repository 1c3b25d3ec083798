// Sparse compute kernels on the compressed storage (spmm.h has the geometry and the definitions).
//
// Every kernel walks the tracked bits and, per tracked weight, runs one contiguous axpy or dot
// over a chunk of L: the forward pass and the backward-data pass keep a 64-float chunk of one
// output plane in registers and stream the input planes of the tracked weights through it (one
// load per multiply-add); the sampled weight gradient keeps one chunk of dy in registers against
// four input planes at a time. Rows (forward, SDDMM) or column blocks (backward) are split over
// threads, and L as well when there are too few of them, so no two threads write the same float.
//
// The bodies are written once on GCC vector types and compiled three times, for 4-float (SSE2),
// 8-float (AVX2) and 16-float (AVX-512) vectors, chosen by simd_level() as the update kernels do.
// Products accumulate in float32 (fused multiply-adds on AVX2 / AVX-512) in an order that depends
// on the vector width (the reference's contract: equal to the rounding of a float32 sum).
#include "spmm.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "ops.h"
#include "parallel.h"

#if PK_HAVE_SIMD_VARIANT
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments only ever cross inlined calls
#endif

namespace pk {
namespace {

// Columns per block of the backward pass (and per entry of the row offset table).
constexpr int64_t kColBlock = 32;
// Floats of L per register chunk.
constexpr int kChunk = 64;
// SDDMM over long runs: floats of L per range, and the most partial sums kept (64 MB).
constexpr int64_t kSddmmRange = 2048;
constexpr int64_t kSddmmPartials = int64_t{16} << 20;

int64_t bit_bytes(const SparseGeometry& g) { return ceil_div(g.rows * g.cols * g.ksize, 8); }

// 64-bit word w of the mask (bit e of the mask is bit e % 64 of word e / 64).
PK_INLINE uint64_t word_at(const uint8_t* bits, int64_t nbytes, int64_t w) {
  const int64_t b = w * 8;
  uint64_t x = 0;
#if PK_LITTLE_ENDIAN
  if (b + 8 <= nbytes) {
    std::memcpy(&x, bits + b, 8);
    return x;
  }
#endif
  const int64_t n = std::min<int64_t>(8, nbytes - b);
  for (int64_t i = 0; i < n; ++i) x |= static_cast<uint64_t>(bits[b + i]) << (8 * i);
  return x;
}

// f(word index, word) for the words of bits [pos, pos + len), bits outside the range cleared.
template <class F>
PK_INLINE void for_each_word(const uint8_t* bits, int64_t nbytes, int64_t pos, int64_t len,
                             const F& f) {
  if (len <= 0) return;
  const int64_t end = pos + len, w0 = pos >> 6, w1 = (end - 1) >> 6;
  for (int64_t w = w0; w <= w1; ++w) {
    uint64_t x = word_at(bits, nbytes, w);
    if (w == w0) x &= ~uint64_t{0} << (pos & 63);
    if (w == w1 && (end & 63)) x &= (uint64_t{1} << (end & 63)) - 1;
    f(w, x);
  }
}

PK_INLINE int64_t count_bits(const uint8_t* bits, int64_t nbytes, int64_t pos, int64_t len) {
  int64_t n = 0;
  for_each_word(bits, nbytes, pos, len, [&](int64_t, uint64_t x) { n += popcount64(x); });
  return n;
}

// f(j) for every set bit pos + j, j < len, ascending.
template <class F>
PK_INLINE void for_each_bit(const uint8_t* bits, int64_t nbytes, int64_t pos, int64_t len,
                            const F& f) {
  for_each_word(bits, nbytes, pos, len, [&](int64_t w, uint64_t x) {
    const int64_t at = w * 64 - pos;
    while (x) {
      f(at + ctz64(x));
      x &= x - 1;
    }
  });
}

// Value index of the first tracked element of row n: row[n]; with blocks, of its first tracked
// element at or after column block b: row[n] + rel[n * blocks + b]. Checks that the mask holds
// exactly nnz tracked elements.
struct RowOffsets {
  int64_t blocks = 0;
  std::vector<int64_t> row;
  std::vector<int32_t> rel;
  int64_t at(int64_t n, int64_t b) const { return row[n] + (b ? rel[n * blocks + b] : 0); }
};

// Tracked counts of rows [n0, n1) into r.row[n + 1] (and r.rel), in a copy per instruction set
// so the popcounts are instructions where the CPU has them.
PK_INLINE void count_rows(const SparseGeometry& g, bool with_blocks, int64_t n0, int64_t n1,
                          RowOffsets& r) {
  const int64_t nbytes = bit_bytes(g), row_len = g.cols * g.ksize, blen = kColBlock * g.ksize;
  for (int64_t n = n0; n < n1; ++n) {
    int64_t c = 0;
    if (with_blocks) {
      for (int64_t b = 0; b < r.blocks; ++b) {
        r.rel[n * r.blocks + b] = static_cast<int32_t>(c);
        c += count_bits(g.bits, nbytes, n * row_len + b * blen, std::min(blen, row_len - b * blen));
      }
    } else {
      c = count_bits(g.bits, nbytes, n * row_len, row_len);
    }
    r.row[n + 1] = c;
  }
}

using CountRows = void (*)(const SparseGeometry&, bool, int64_t, int64_t, RowOffsets&);

void count_rows_plain(const SparseGeometry& g, bool with_blocks, int64_t n0, int64_t n1,
                      RowOffsets& r) {
  count_rows(g, with_blocks, n0, n1, r);
}

#if PK_HAVE_SIMD_VARIANT
PK_SIMD_TARGET void count_rows_simd(const SparseGeometry& g, bool with_blocks, int64_t n0,
                                    int64_t n1, RowOffsets& r) {
  count_rows(g, with_blocks, n0, n1, r);
}
#endif

CountRows count_rows_fn() {
#if PK_HAVE_SIMD_VARIANT
  if (simd_level() >= 1) return count_rows_simd;
#endif
  return count_rows_plain;
}

RowOffsets row_offsets(const SparseGeometry& g, bool with_blocks) {
  RowOffsets r;
  r.blocks = ceil_div(g.cols, kColBlock);
  r.row.assign(static_cast<size_t>(g.rows + 1), 0);
  if (with_blocks) r.rel.resize(static_cast<size_t>(g.rows * r.blocks));
  const int64_t chunks = ceil_div(g.rows, 256);
  const CountRows count = count_rows_fn();
  for_each_chunk(chunks, threads_for(chunks), [&](int64_t ch, int) {
    count(g, with_blocks, ch * 256, std::min(g.rows, (ch + 1) * 256), r);
  });
  for (int64_t n = 0; n < g.rows; ++n) r.row[n + 1] += r.row[n];
  if (r.row[g.rows] != g.nnz) {
    throw std::invalid_argument("the mask holds " + std::to_string(r.row[g.rows]) +
                                " tracked weights, values has " + std::to_string(g.nnz));
  }
  return r;
}

void check(const SparseGeometry& g) {
  if (g.rows <= 0 || g.cols <= 0 || g.ksize <= 0 || g.groups <= 0 || g.rows % g.groups ||
      g.phases <= 0 || g.L < 0) {
    throw std::invalid_argument("invalid sparse geometry");
  }
  for (int64_t k = 0; k < g.ksize; ++k) {
    if (g.phase[k] < 0 || g.phase[k] >= g.phases || g.shift[k] < 0) {
      throw std::invalid_argument("expected phase in [0, phases) and shift >= 0 per position");
    }
  }
}

// Per element j of a row: its input offset within the group (plane and shift), its input plane
// within the group and its shift; built once per call so the walks never divide.
struct Columns {
  std::vector<int64_t> in_off, shift;
  std::vector<int64_t> plane;
  int64_t group_stride;
};

Columns columns(const SparseGeometry& g) {
  const int64_t row_len = g.cols * g.ksize;
  Columns t;
  t.in_off.resize(static_cast<size_t>(row_len));
  t.shift.resize(static_cast<size_t>(row_len));
  t.plane.resize(static_cast<size_t>(row_len));
  for (int64_t c = 0, j = 0; c < g.cols; ++c) {
    for (int64_t k = 0; k < g.ksize; ++k, ++j) {
      t.plane[j] = c * g.phases + g.phase[k];
      t.shift[j] = g.shift[k];
      t.in_off[j] = t.plane[j] * g.L + g.shift[k];
    }
  }
  t.group_stride = g.cols * g.phases * g.L;
  return t;
}

// Tasks over blocks of `items` (rows, or column blocks) x ranges of L. A range of L is cut so
// that the planes a task streams (`planes` of them) stay within ~256 KB of cache; items are
// batched so that there are ~8 tasks per thread (dynamic scheduling costs ~0.1 us per task).
struct Split {
  int64_t items, per, lchunks, lsize;
  int64_t item_tasks() const { return ceil_div(items, per); }
  int64_t tasks() const { return item_tasks() * lchunks; }
};

constexpr int64_t kCacheFloats = 64 * 1024;

Split split(int64_t items, int64_t planes, int64_t L) {
  const int64_t Lr = ceil_div(std::max<int64_t>(L, 1), kChunk) * kChunk;
  const int64_t fit = kCacheFloats / std::max<int64_t>(planes, 1) / kChunk * kChunk;
  // At least 256 floats: a task decodes its tracked weights once per range of L.
  const int64_t lsize = std::clamp<int64_t>(fit, std::min<int64_t>(4 * kChunk, Lr), Lr);
  const int64_t lchunks = ceil_div(std::max<int64_t>(L, 1), lsize);
  const int64_t want = 8 * static_cast<int64_t>(max_threads());
  const int64_t per = std::max<int64_t>(1, items * lchunks / want);
  return {items, per, lchunks, lsize};
}

struct Scratch {  // one thread's decoded tracked weights
  std::vector<int64_t> off;
  std::vector<float> val;
  std::vector<int64_t> idx;
  std::vector<int64_t> count;
};

// ---------------------------------------------------------------------------- vector bodies
template <int W>
struct Vec {
  typedef float type __attribute__((vector_size(W * 4)));
};

// acc + a * b (a a vector or a float) on vectors of W-float registers: one rounding (an FMA instruction) on the AVX2 and
// AVX-512 instances, a multiply and an add on the baseline one. The extension is built with
// -ffp-contract=off (the update kernels' results are bit-exact), so the fusing is spelled out.
template <int W>
struct Fused {
  template <class T>
  static PK_INLINE T madd(T acc, T a, T b) {
    return acc + a * b;
  }
  template <class T>
  static PK_INLINE T madd(T acc, float w, T b) {
    return acc + w * b;
  }
};

#if PK_HAVE_SIMD_VARIANT
template <>
struct Fused<8> {
  template <class T>
  static inline PK_SIMD_TARGET T madd(T acc, T a, T b) {
    if constexpr (sizeof(T) % 32 != 0) {
      return acc + a * b;
    } else {
      constexpr int n = sizeof(T) / 32;
      __m256 x[n], y[n], z[n];
      std::memcpy(x, &acc, sizeof acc);
      std::memcpy(y, &a, sizeof a);
      std::memcpy(z, &b, sizeof b);
      for (int i = 0; i < n; ++i) x[i] = _mm256_fmadd_ps(y[i], z[i], x[i]);
      std::memcpy(&acc, x, sizeof acc);
      return acc;
    }
  }
  template <class T>
  static inline PK_SIMD_TARGET T madd(T acc, float w, T b) {
    if constexpr (sizeof(T) % 32 != 0) {
      return acc + w * b;
    } else {
      constexpr int n = sizeof(T) / 32;
      __m256 x[n], z[n];
      std::memcpy(x, &acc, sizeof acc);
      std::memcpy(z, &b, sizeof b);
      const __m256 y = _mm256_set1_ps(w);
      for (int i = 0; i < n; ++i) x[i] = _mm256_fmadd_ps(y, z[i], x[i]);
      std::memcpy(&acc, x, sizeof acc);
      return acc;
    }
  }
};

template <>
struct Fused<16> {
  template <class T>
  static inline PK_AVX512_TARGET T madd(T acc, T a, T b) {
    if constexpr (sizeof(T) % 64 != 0) {
      return acc + a * b;
    } else {
      constexpr int n = sizeof(T) / 64;
      __m512 x[n], y[n], z[n];
      std::memcpy(x, &acc, sizeof acc);
      std::memcpy(y, &a, sizeof a);
      std::memcpy(z, &b, sizeof b);
      for (int i = 0; i < n; ++i) x[i] = _mm512_fmadd_ps(y[i], z[i], x[i]);
      std::memcpy(&acc, x, sizeof acc);
      return acc;
    }
  }
  template <class T>
  static inline PK_AVX512_TARGET T madd(T acc, float w, T b) {
    if constexpr (sizeof(T) % 64 != 0) {
      return acc + w * b;
    } else {
      constexpr int n = sizeof(T) / 64;
      __m512 x[n], z[n];
      std::memcpy(x, &acc, sizeof acc);
      std::memcpy(z, &b, sizeof b);
      const __m512 y = _mm512_set1_ps(w);
      for (int i = 0; i < n; ++i) x[i] = _mm512_fmadd_ps(y, z[i], x[i]);
      std::memcpy(&acc, x, sizeof acc);
      return acc;
    }
  }
};
#endif

template <int W>
PK_INLINE typename Vec<W>::type vload(const float* p) {
  typename Vec<W>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
PK_INLINE void vstore(float* p, typename Vec<W>::type v) {
  std::memcpy(p, &v, sizeof v);
}

template <int W>
PK_INLINE float vsum(typename Vec<W>::type v) {
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// out[l] = init + sum_e val[e] * src[off[e] + l] for l in [l0, l1): the chunk sits in registers.
// With `more`, the sum goes on from out[l] instead (a float32 partial sum stored and loaded back
// is the same float, so splitting the weights into runs gives the sums of one run).
template <int W>
PK_INLINE void axpy_rows(const float* src, const int64_t* off, const float* val, int64_t ne,
                         float init, float* out, int64_t l0, int64_t l1, bool more = false) {
  typedef typename Vec<W>::type V;
  constexpr int U = kChunk / W;
  int64_t l = l0;
  for (; l + kChunk <= l1; l += kChunk) {
    V acc[U];
    for (int u = 0; u < U; ++u) acc[u] = more ? vload<W>(out + l + u * W) : V{} + init;
    for (int64_t e = 0; e < ne; ++e) {
      const float* p = src + off[e] + l;
      const float w = val[e];
      for (int u = 0; u < U; ++u) acc[u] = Fused<W>::madd(acc[u], w, vload<W>(p + u * W));
    }
    for (int u = 0; u < U; ++u) vstore<W>(out + l + u * W, acc[u]);
  }
  for (; l + W <= l1; l += W) {
    V acc = more ? vload<W>(out + l) : V{} + init;
    for (int64_t e = 0; e < ne; ++e) acc = Fused<W>::madd(acc, val[e], vload<W>(src + off[e] + l));
    vstore<W>(out + l, acc);
  }
  for (; l < l1; ++l) {
    float acc = more ? out[l] : init;
    for (int64_t e = 0; e < ne; ++e) acc += val[e] * src[off[e] + l];
    out[l] = acc;
  }
}

// Planes whose register chunk of L, with the shifts' halo, fits in ~24 KB of L1: the input
// planes of a block of the forward pass, the dy planes (output rows) of one of the input gradient.
int64_t l1_planes(const SparseGeometry& g) {
  int64_t halo = 0;
  for (int64_t k = 0; k < g.ksize; ++k) halo = std::max(halo, g.shift[k]);
  return (24 * 1024 / 4) / (kChunk + halo);
}

// Forward: the task's rows of y over [l0, l1), by blocks of input channels, in each a register
// chunk of L at a time for all rows, so the block's planes (with the shifts' halo) stay in L1
// while every row reads them. Each output float gets the same sum, in the same order, as a
// row-by-row walk (a row's partial sum is stored in y between blocks).
template <int W>
PK_INLINE void forward_task(const SparseGeometry& g, const RowOffsets& ro, const Columns& cl,
                            const float* x,
                            const float* bias, float* y, const Split& s, int64_t task,
                            Scratch& sc) {
  const int64_t lc = task / s.item_tasks(), it = task % s.item_tasks();
  const int64_t l0 = lc * s.lsize, l1 = std::min(g.L, l0 + s.lsize);
  const int64_t row_len = g.cols * g.ksize;
  const int64_t n0 = it * s.per, n1 = std::min(g.rows, (it + 1) * s.per);
  if (n0 >= n1) return;
  const int64_t cb = std::clamp<int64_t>(l1_planes(g) / g.phases, 1, g.cols);  // channels
  const int64_t nb = ceil_div(g.cols, cb), bl = cb * g.ksize;
  // The rows' values are contiguous from ro.row[n0]; their input offsets are decoded once, with
  // each row's first entry of every channel block (sc.idx[(n - n0) * (nb + 1) + b]).
  const int64_t v0 = ro.row[n0];
  sc.off.resize(static_cast<size_t>(ro.row[n1] - v0));
  sc.idx.resize(static_cast<size_t>((n1 - n0) * (nb + 1)));
  const int64_t* in_off = cl.in_off.data();
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t base = (n / (g.rows / g.groups)) * cl.group_stride, e0 = ro.row[n] - v0;
    int64_t* off = sc.off.data() + e0;
    int64_t* first = sc.idx.data() + (n - n0) * (nb + 1);
    int64_t ne = 0, b = 0, next = bl;
    first[0] = e0;
    for_each_bit(g.bits, bit_bytes(g), n * row_len, row_len, [&](int64_t j) {
      while (j >= next) {
        first[++b] = e0 + ne;
        next += bl;
      }
      off[ne++] = base + in_off[j];
    });
    while (b < nb) first[++b] = e0 + ne;
  }
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t l = l0; l < l1; l += kChunk) {
      const int64_t le = std::min(l1, l + kChunk);
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t* first = sc.idx.data() + (n - n0) * (nb + 1);
        const int64_t e0 = first[b], e1 = first[b + 1];
        if (b > 0 && e0 == e1) continue;  // nothing of this block: the partial sum stands
        axpy_rows<W>(x, sc.off.data() + e0, g.values + v0 + e0, e1 - e0, bias ? bias[n] : 0.0f,
                     y + n * g.L, l, le, b > 0);
      }
    }
  }
}

template <int W>
PK_INLINE void backward_block(const SparseGeometry& g, const RowOffsets& ro, const Columns& cl,
                              const float* dy, float* dx, int64_t grp, int64_t b, int64_t l0,
                              int64_t l1, Scratch& sc);

// Backward-data: the input planes of blocks of columns of one group, over a range of L.
template <int W>
PK_INLINE void backward_task(const SparseGeometry& g, const RowOffsets& ro, const Columns& cl,
                             const float* dy,
                             float* dx, const Split& s, int64_t task, Scratch& sc) {
  const int64_t lc = task / s.item_tasks(), it = task % s.item_tasks();
  const int64_t l0 = lc * s.lsize, l1 = std::min(g.L, l0 + s.lsize);
  for (int64_t item = it * s.per; item < std::min(s.items, (it + 1) * s.per); ++item) {
    backward_block<W>(g, ro, cl, dy, dx, item / ro.blocks, item % ro.blocks, l0, l1, sc);
  }
}

template <int W>
PK_INLINE void backward_block(const SparseGeometry& g, const RowOffsets& ro, const Columns& cl,
                              const float* dy, float* dx, int64_t grp, int64_t b, int64_t l0,
                              int64_t l1, Scratch& sc) {
  const int64_t row_len = g.cols * g.ksize, rpg = g.rows / g.groups, nbytes = bit_bytes(g);
  const int64_t c0 = b * kColBlock, ncols = std::min(kColBlock, g.cols - c0);
  const int64_t planes = ncols * g.phases, len = ncols * g.ksize;
  const int64_t rb = std::clamp<int64_t>(l1_planes(g), 1, rpg);  // output rows per block
  const int64_t nrb = ceil_div(rpg, rb);
  // Bucket the block's tracked weights by (row block, input plane), rows ascending in each:
  // count, then place.
  const int64_t buckets = nrb * planes;
  sc.count.assign(static_cast<size_t>(buckets + 1), 0);
  const int64_t* plane = cl.plane.data() + c0 * g.ksize;  // block-relative planes below
  const int64_t* shift = cl.shift.data() + c0 * g.ksize;
  const int64_t p0 = c0 * g.phases, nfirst = grp * rpg;
  for (int64_t n = nfirst; n < nfirst + rpg; ++n) {
    int64_t* cnt = sc.count.data() + (n - nfirst) / rb * planes + 1;
    for_each_bit(g.bits, nbytes, n * row_len + c0 * g.ksize, len,
                 [&](int64_t j) { ++cnt[plane[j] - p0]; });
  }
  for (int64_t q = 0; q < buckets; ++q) sc.count[q + 1] += sc.count[q];
  const int64_t total = sc.count[buckets];
  sc.off.resize(static_cast<size_t>(total));
  sc.val.resize(static_cast<size_t>(total));
  sc.idx.assign(sc.count.begin(), sc.count.end() - 1);
  for (int64_t n = nfirst; n < nfirst + rpg; ++n) {
    int64_t vi = ro.at(n, b);
    int64_t* at = sc.idx.data() + (n - nfirst) / rb * planes;
    for_each_bit(g.bits, nbytes, n * row_len + c0 * g.ksize, len, [&](int64_t j) {
      const int64_t e = at[plane[j] - p0]++;
      sc.off[e] = n * g.L - shift[j];
      sc.val[e] = g.values[vi++];
    });
  }
  // By row blocks, in each a register chunk of L at a time for all planes (a plane's partial sum
  // is stored in dx between row blocks: the same sums in the same order as one walk).
  float* base = dx + (grp * g.cols + c0) * g.phases * g.L;
  for (int64_t r = 0; r < nrb; ++r) {
    const int64_t* cnt = sc.count.data() + r * planes;
    for (int64_t l = l0; l < l1; l += kChunk) {
      const int64_t le = std::min(l1, l + kChunk);
      for (int64_t p = 0; p < planes; ++p) {
        const int64_t e0 = cnt[p], e1 = cnt[p + 1];
        if (r > 0 && e0 == e1) continue;
        axpy_rows<W>(dy, sc.off.data() + e0, sc.val.data() + e0, e1 - e0, 0.0f, base + p * g.L,
                     l, le, r > 0);
      }
    }
  }
}

// SDDMM: the partial dot products over [l0, l1) of every tracked weight of one row, written to
// out[value index] (the driver sums the ranges when L is cut).
template <int W>
PK_INLINE void sddmm_task(const SparseGeometry& g, const RowOffsets& ro, const Columns& cl,
                          const float* dy, const float* x, float* out, int64_t n, int64_t l0,
                          int64_t l1, Scratch& sc) {
  typedef typename Vec<W>::type V;
  const int64_t row_len = g.cols * g.ksize, grp = n / (g.rows / g.groups), L = l1 - l0;
  x += l0;
  dy += l0;
  sc.off.resize(static_cast<size_t>(row_len));
  int64_t ne = 0;
  const int64_t* in_off = cl.in_off.data();
  const int64_t base = grp * cl.group_stride;
  for_each_bit(g.bits, bit_bytes(g), n * row_len, row_len,
               [&](int64_t j) { sc.off[ne++] = base + in_off[j]; });
  const float* d = dy + n * g.L;
  float* o = out + ro.row[n];
  int64_t e = 0;
  constexpr int kE = 8;  // weights per pass over L: independent sums that hide the FMA latency
  for (; e + kE <= ne; e += kE) {
    const float* p[kE];
    V a[kE];
    for (int k = 0; k < kE; ++k) {
      p[k] = x + sc.off[e + k];
      a[k] = V{};
    }
    int64_t l = 0;
    for (; l + W <= L; l += W) {
      const V dv = vload<W>(d + l);
      for (int k = 0; k < kE; ++k) a[k] = Fused<W>::madd(a[k], dv, vload<W>(p[k] + l));
    }
    for (int k = 0; k < kE; ++k) {
      float sk = vsum<W>(a[k]);
      for (int64_t r = l; r < L; ++r) sk += d[r] * p[k][r];
      o[e + k] = sk;
    }
  }
  for (; e < ne; ++e) {
    const float* p = x + sc.off[e];
    V a{};
    int64_t l = 0;
    for (; l + W <= L; l += W) a = Fused<W>::madd(a, vload<W>(d + l), vload<W>(p + l));
    float s = vsum<W>(a);
    for (; l < L; ++l) s += d[l] * p[l];
    o[e] = s;
  }
}

// ------------------------------------------------------------- token-major linear kernels
// Linear layers (ksize 1, phases 1) in PyTorch's layout: x [L, groups * cols], y [L, rows],
// dy [L, rows], dx [L, groups * cols], in tiles of kTok tokens. A task transposes its tile into
// the thread's buffer, one kTok-float vector per feature, so every tracked weight costs one vector
// load and one multiply-add on cache-resident data; results are transposed back into the tile.
// Forward: row n's vector is the sum over its tracked columns of w * x-vector[c] (two partial sums,
// even and odd weights); backward-data: dx-vector[c] += w * dy-vector[n] for every tracked (n, c),
// rows in order. Each output float is produced by one task, so results do not depend on threads.
constexpr int kTok = 16;
typedef float Tok __attribute__((vector_size(kTok * 4)));

PK_INLINE Tok tload(const float* p) {
  Tok v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

PK_INLINE void tstore(float* p, Tok v) { std::memcpy(p, &v, sizeof v); }

// Decoded tracked columns: col[e] is the input feature (group offset included) of value e.
struct LinearIndex {
  std::vector<int64_t> row;  // rows + 1 value offsets
  std::vector<int32_t> col;
};

// Tasks: tiles of tokens x parts of the rows (forward) or of the input features (backward), at
// least kMinPart items per part, about 4 tasks per thread.
constexpr int64_t kMinPart = 64;

struct TokSplit {
  int64_t tiles, parts, items;
  int64_t part_size() const { return ceil_div(items, parts); }
};

TokSplit tok_split(int64_t L, int64_t items) {
  const int64_t tiles = ceil_div(L, kTok);
  const int64_t want = ceil_div(4 * static_cast<int64_t>(max_threads()), tiles);
  const int64_t parts = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, items / kMinPart));
  return {tiles, parts, items};
}

float* thread_buffer(std::vector<float>& buf, int64_t n) {  // grow-only, kept between calls
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// A kTok x kTok block transposed in registers: four rounds of two-vector shuffles, round s
// swapping the off-diagonal s x s sub-blocks of every 2s x 2s block (vpermt2ps on AVX-512).
#if defined(__GNUC__) && !defined(__clang__)
typedef int32_t TokIdx __attribute__((vector_size(kTok * 4)));

template <int S, int... J>
constexpr TokIdx round_mask(bool high, std::integer_sequence<int, J...>) {
  return high ? TokIdx{((J & S) ? kTok + J : J + S)...} : TokIdx{((J & S) ? kTok + J - S : J)...};
}

template <int S>
PK_INLINE void transpose_round(Tok (&v)[kTok]) {
  constexpr TokIdx lo = round_mask<S>(false, std::make_integer_sequence<int, kTok>{});
  constexpr TokIdx hi = round_mask<S>(true, std::make_integer_sequence<int, kTok>{});
  for (int i = 0; i < kTok; ++i) {
    if (i & S) continue;
    const Tok a = v[i], b = v[i + S];
    v[i] = __builtin_shuffle(a, b, lo);
    v[i + S] = __builtin_shuffle(a, b, hi);
  }
}

PK_INLINE void transpose_block(Tok (&v)[kTok]) {
  transpose_round<8>(v);
  transpose_round<4>(v);
  transpose_round<2>(v);
  transpose_round<1>(v);
}
#else
PK_INLINE void transpose_block(Tok (&v)[kTok]) {
  for (int i = 0; i < kTok; ++i) {
    for (int j = i + 1; j < kTok; ++j) std::swap(v[i][j], v[j][i]);
  }
}
#endif

// dst[c * kTok + r] = src[r * ld + c0 + c] for c < n, r < nr; zero for nr <= r < kTok.
PK_INLINE void tile_in(const float* src, int64_t ld, int64_t nr, int64_t c0, int64_t n,
                       float* dst) {
  int64_t c = 0;
  for (; c + kTok <= n; c += kTok) {
    Tok v[kTok];
    for (int r = 0; r < kTok; ++r) v[r] = r < nr ? tload(src + r * ld + c0 + c) : Tok{};
    transpose_block(v);
    for (int j = 0; j < kTok; ++j) tstore(dst + (c + j) * kTok, v[j]);
  }
  for (int64_t r = 0; r < kTok; ++r) {
    const float* s = src + r * ld + c0;
    for (int64_t j = c; j < n; ++j) dst[j * kTok + r] = r < nr ? s[j] : 0.0f;
  }
}

// dst[r * ld + c0 + c] = src[c * kTok + r] for c < n, r < nr.
PK_INLINE void tile_out(const float* src, int64_t nr, int64_t c0, int64_t n, float* dst,
                        int64_t ld) {
  int64_t c = 0;
  for (; c + kTok <= n; c += kTok) {
    Tok v[kTok];
    for (int j = 0; j < kTok; ++j) v[j] = tload(src + (c + j) * kTok);
    transpose_block(v);
    for (int64_t r = 0; r < nr; ++r) tstore(dst + r * ld + c0 + c, v[r]);
  }
  for (int64_t r = 0; r < nr; ++r) {
    float* d = dst + r * ld + c0;
    for (int64_t j = c; j < n; ++j) d[j] = src[j * kTok + r];
  }
}

template <int W>
PK_INLINE void linear_forward_task(const SparseGeometry& g, const LinearIndex& ix,
                                   const float* x, const float* bias, float* y,
                                   const TokSplit& s, int64_t task, std::vector<float>& buf) {
  const int64_t t = task / s.parts, part = task % s.parts, X = g.groups * g.cols;
  const int64_t l0 = t * kTok, nr = std::min<int64_t>(kTok, g.L - l0);
  const int64_t n_begin = part * s.part_size(), n_end = std::min(g.rows, n_begin + s.part_size());
  float* xb = thread_buffer(buf, (X + kTok) * kTok);
  float* ob = xb + X * kTok;  // kTok rows' vectors
  tile_in(x + l0 * X, X, nr, 0, X, xb);
  const int32_t* col = ix.col.data();
  const float* val = g.values;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTok) {
    const int64_t nn = std::min<int64_t>(kTok, n_end - n0);
    for (int64_t i = 0; i < nn; ++i) {
      const int64_t n = n0 + i;
      Tok a0 = Tok{} + (bias ? bias[n] : 0.0f), a1 = Tok{};
      int64_t e = ix.row[n];
      const int64_t e1 = ix.row[n + 1];
      for (; e + 2 <= e1; e += 2) {
        a0 = Fused<W>::madd(a0, val[e], tload(xb + int64_t{col[e]} * kTok));
        a1 = Fused<W>::madd(a1, val[e + 1], tload(xb + int64_t{col[e + 1]} * kTok));
      }
      if (e < e1) a0 = Fused<W>::madd(a0, val[e], tload(xb + int64_t{col[e]} * kTok));
      tstore(ob + i * kTok, a0 + a1);
    }
    tile_out(ob, nr, n0, nn, y + l0 * g.rows, g.rows);
  }
}

template <int W>
PK_INLINE void linear_backward_task(const SparseGeometry& g, const LinearIndex& ix,
                                    const float* dy, float* dx, const TokSplit& s, int64_t task,
                                    std::vector<float>& buf) {
  const int64_t t = task / s.parts, part = task % s.parts, X = g.groups * g.cols;
  const int64_t l0 = t * kTok, nr = std::min<int64_t>(kTok, g.L - l0);
  const int64_t c_begin = part * s.part_size(), c_end = std::min(X, c_begin + s.part_size());
  if (c_begin >= c_end) return;
  const int64_t nc = c_end - c_begin, rpg = g.rows / g.groups;
  // Rows whose group's features meet [c_begin, c_end).
  const int64_t n_begin = (c_begin / g.cols) * rpg, n_end = ((c_end - 1) / g.cols + 1) * rpg;
  float* db = thread_buffer(buf, (n_end - n_begin + nc) * kTok);
  float* acc = db + (n_end - n_begin) * kTok;
  tile_in(dy + l0 * g.rows, g.rows, nr, n_begin, n_end - n_begin, db);
  std::memset(acc, 0, static_cast<size_t>(nc * kTok) * sizeof(float));
  const int32_t* col = ix.col.data();
  const float* val = g.values;
  const bool whole = s.parts == 1;
  for (int64_t n = n_begin; n < n_end; ++n) {
    int64_t e = ix.row[n], e1 = ix.row[n + 1];
    if (!whole) {  // the row's tracked columns are ascending
      e = std::lower_bound(col + e, col + e1, static_cast<int32_t>(c_begin)) - col;
      e1 = std::lower_bound(col + e, col + e1, static_cast<int32_t>(c_end)) - col;
    }
    if (e == e1) continue;
    const Tok d = tload(db + (n - n_begin) * kTok);
    // A row's tracked columns are distinct: four loads, then four stores.
    for (; e + 4 <= e1; e += 4) {
      float* p0 = acc + (col[e] - c_begin) * kTok;
      float* p1 = acc + (col[e + 1] - c_begin) * kTok;
      float* p2 = acc + (col[e + 2] - c_begin) * kTok;
      float* p3 = acc + (col[e + 3] - c_begin) * kTok;
      const Tok r0 = Fused<W>::madd(tload(p0), val[e], d);
      const Tok r1 = Fused<W>::madd(tload(p1), val[e + 1], d);
      const Tok r2 = Fused<W>::madd(tload(p2), val[e + 2], d);
      const Tok r3 = Fused<W>::madd(tload(p3), val[e + 3], d);
      tstore(p0, r0);
      tstore(p1, r1);
      tstore(p2, r2);
      tstore(p3, r3);
    }
    for (; e < e1; ++e) {
      float* p = acc + (col[e] - c_begin) * kTok;
      tstore(p, Fused<W>::madd(tload(p), val[e], d));
    }
  }
  tile_out(acc, nr, c_begin, nc, dx + l0 * X, X);
}

// ------------------------------------------------------------------ one instance per ISA
struct Kernels {
  void (*forward)(const SparseGeometry&, const RowOffsets&, const Columns&, const float*,
                  const float*, float*, const Split&, int64_t, Scratch&);
  void (*backward)(const SparseGeometry&, const RowOffsets&, const Columns&, const float*, float*,
                   const Split&, int64_t, Scratch&);
  void (*sddmm)(const SparseGeometry&, const RowOffsets&, const Columns&, const float*,
                const float*, float*, int64_t, int64_t, int64_t, Scratch&);
  void (*linear_forward)(const SparseGeometry&, const LinearIndex&, const float*, const float*,
                         float*, const TokSplit&, int64_t, std::vector<float>&);
  void (*linear_backward)(const SparseGeometry&, const LinearIndex&, const float*, float*,
                          const TokSplit&, int64_t, std::vector<float>&);
};

#define PK_SPMM_INSTANCE(NAME, TARGET, W)                                                       \
  TARGET void NAME##_forward(const SparseGeometry& g, const RowOffsets& ro, const Columns& cl,  \
                             const float* x, const float* bias, float* y, const Split& s,       \
                             int64_t t, Scratch& sc) {                                          \
    forward_task<W>(g, ro, cl, x, bias, y, s, t, sc);                                           \
  }                                                                                             \
  TARGET void NAME##_backward(const SparseGeometry& g, const RowOffsets& ro, const Columns& cl, \
                              const float* dy, float* dx, const Split& s, int64_t t,            \
                              Scratch& sc) {                                                    \
    backward_task<W>(g, ro, cl, dy, dx, s, t, sc);                                              \
  }                                                                                             \
  TARGET void NAME##_sddmm(const SparseGeometry& g, const RowOffsets& ro, const Columns& cl,    \
                           const float* dy, const float* x, float* out, int64_t n, int64_t l0,  \
                           int64_t l1, Scratch& sc) {                                           \
    sddmm_task<W>(g, ro, cl, dy, x, out, n, l0, l1, sc);                                        \
  }                                                                                             \
  TARGET void NAME##_linear_forward(const SparseGeometry& g, const LinearIndex& ix,             \
                                    const float* x, const float* bias, float* y,                \
                                    const TokSplit& s, int64_t t, std::vector<float>& buf) {    \
    linear_forward_task<W>(g, ix, x, bias, y, s, t, buf);                                        \
  }                                                                                             \
  TARGET void NAME##_linear_backward(const SparseGeometry& g, const LinearIndex& ix,            \
                                     const float* dy, float* dx, const TokSplit& s, int64_t t,  \
                                     std::vector<float>& buf) {                                 \
    linear_backward_task<W>(g, ix, dy, dx, s, t, buf);                                           \
  }                                                                                             \
  constexpr Kernels NAME##_kernels{NAME##_forward, NAME##_backward, NAME##_sddmm,               \
                                   NAME##_linear_forward, NAME##_linear_backward};

PK_SPMM_INSTANCE(plain, , 4)
#if PK_HAVE_SIMD_VARIANT
PK_SPMM_INSTANCE(avx2, PK_SIMD_TARGET, 8)
PK_SPMM_INSTANCE(avx512, PK_AVX512_TARGET, 16)
#endif
#undef PK_SPMM_INSTANCE

const Kernels& kernels() {
#if PK_HAVE_SIMD_VARIANT
  switch (simd_level()) {
    case 2:
      return avx512_kernels;
    case 1:
      return avx2_kernels;
    default:
      break;
  }
#endif
  return plain_kernels;
}

template <class F>
void run_tasks(int64_t tasks, const F& f) {
  const int nt = threads_for(tasks);
  std::vector<Scratch> scratch(static_cast<size_t>(nt));
  for_each_chunk(tasks, nt, [&](int64_t t, int tid) { f(t, scratch[tid]); });
}

constexpr int64_t kTile = 32;

PK_INLINE void transpose_tile(const float* src, int64_t rows, int64_t cols, float* dst,
                              int64_t r0, int64_t c0) {
  const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
  if (r1 - r0 == kTile && c1 - c0 == kTile) {
    for (int64_t r = 0; r < kTile; r += 8) {
      for (int64_t c = 0; c < kTile; c += 8) {
        float blk[8][8];
        for (int i = 0; i < 8; ++i) {
          for (int j = 0; j < 8; ++j) blk[j][i] = src[(r0 + r + i) * cols + c0 + c + j];
        }
        for (int j = 0; j < 8; ++j) {
          std::memcpy(dst + (c0 + c + j) * rows + r0 + r, blk[j], sizeof blk[j]);
        }
      }
    }
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = c0; c < c1; ++c) dst[c * rows + r] = src[r * cols + c];
  }
}

PK_SIMD_TARGET void transpose_tiles_avx2(const float* src, int64_t rows, int64_t cols,
                                         float* dst, int64_t t0, int64_t t1, int64_t tc) {
  for (int64_t t = t0; t < t1; ++t) transpose_tile(src, rows, cols, dst, (t / tc) * kTile, (t % tc) * kTile);
}

void transpose_tiles_plain(const float* src, int64_t rows, int64_t cols, float* dst, int64_t t0,
                           int64_t t1, int64_t tc) {
  for (int64_t t = t0; t < t1; ++t) transpose_tile(src, rows, cols, dst, (t / tc) * kTile, (t % tc) * kTile);
}

}  // namespace

void transpose(const float* src, int64_t rows, int64_t cols, float* dst) {
  if (rows <= 0 || cols <= 0) return;
  const int64_t tr = ceil_div(rows, kTile), tc = ceil_div(cols, kTile), tiles = tr * tc;
  const int64_t per = 64;  // tiles per task: 256 KB of floats
  const int64_t tasks = ceil_div(tiles, per);
  auto fn = transpose_tiles_plain;
#if PK_HAVE_SIMD_VARIANT
  if (simd_level() >= 1) fn = transpose_tiles_avx2;
#endif
  for_each_chunk(tasks, threads_for(tasks), [&](int64_t t, int) {
    fn(src, rows, cols, dst, t * per, std::min(tiles, (t + 1) * per), tc);
  });
}

namespace {

void check_linear(const SparseGeometry& g) {
  check(g);
  if (g.ksize != 1 || g.phases != 1 || g.shift[0] != 0) {
    throw std::invalid_argument("expected a linear geometry (ksize 1, phases 1, shift 0)");
  }
}

// The tracked columns of rows [n0, n1), in a copy per instruction set as count_rows. A word's
// first eight set bits are written without a branch on their count (positions past it land in
// slots the next word overwrites, or in the eight spare slots past the end of the columns), so
// the count's misprediction is paid only by words with more; a row range stops that where the
// next range's first slots begin (another thread writes them).
PK_INLINE void decode_rows(const SparseGeometry& g, int64_t n0, int64_t n1, LinearIndex& ix) {
  const int64_t nbytes = bit_bytes(g), rpg = g.rows / g.groups;
  int32_t* const stop = ix.col.data() + ix.row[n1];
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t base = static_cast<int32_t>((n / rpg) * g.cols);
    int32_t* c = ix.col.data() + ix.row[n];
    const int64_t pos = n * g.cols;
    for_each_word(g.bits, nbytes, pos, g.cols, [&](int64_t w, uint64_t x) {
      const int32_t at = base + static_cast<int32_t>(w * 64 - pos);
      if (n1 < g.rows ? stop - c >= 8 : true) {
        int32_t* const next = c + popcount64(x);
        for (int i = 0; i < 8; ++i) {
          c[i] = at + ctz64(x | uint64_t{1} << 63);  // defined for x == 0 too
          x &= x - 1;
        }
        c += 8;
        for (; x; x &= x - 1) *c++ = at + ctz64(x);
        c = next;
      } else {
        for (; x; x &= x - 1) *c++ = at + ctz64(x);
      }
    });
  }
}

void decode_rows_plain(const SparseGeometry& g, int64_t n0, int64_t n1, LinearIndex& ix) {
  decode_rows(g, n0, n1, ix);
}

#if PK_HAVE_SIMD_VARIANT
PK_SIMD_TARGET void decode_rows_simd(const SparseGeometry& g, int64_t n0, int64_t n1,
                                     LinearIndex& ix) {
  decode_rows(g, n0, n1, ix);
}
#endif

LinearIndex linear_index(const SparseGeometry& g) {
  LinearIndex ix;
  ix.row = row_offsets(g, false).row;
  ix.col.resize(static_cast<size_t>(g.nnz) + 8);  // spare slots for decode_rows
  auto decode = decode_rows_plain;
#if PK_HAVE_SIMD_VARIANT
  if (simd_level() >= 1) decode = decode_rows_simd;
#endif
  const int64_t chunks = ceil_div(g.rows, 256);
  for_each_chunk(chunks, threads_for(chunks), [&](int64_t ch, int) {
    decode(g, ch * 256, std::min(g.rows, (ch + 1) * 256), ix);
  });
  return ix;
}

template <class F>
void run_tok_tasks(int64_t tasks, const F& f) {
  // Each thread's tile buffer is kept between calls up to 4 MB (a layer of 64k input features).
  constexpr size_t kKeepFloats = size_t{1} << 20;
  thread_local std::vector<float> buf;
  for_each_chunk(tasks, threads_for(tasks), [&](int64_t t, int) {
    f(t, buf);
    if (buf.size() > kKeepFloats) std::vector<float>().swap(buf);
  });
}

}  // namespace

void sparse_linear_forward(const SparseGeometry& g, const float* x, const float* bias,
                           float* y) {
  check_linear(g);
  if (g.groups * g.cols > INT32_MAX) throw std::invalid_argument("too many input features");
  const LinearIndex ix = linear_index(g);
  if (g.L == 0) return;
  const Kernels& k = kernels();
  const TokSplit s = tok_split(g.L, g.rows);
  run_tok_tasks(s.tiles * s.parts, [&](int64_t t, std::vector<float>& buf) {
    k.linear_forward(g, ix, x, bias, y, s, t, buf);
  });
}

void sparse_linear_backward(const SparseGeometry& g, const float* dy, float* dx) {
  check_linear(g);
  if (g.groups * g.cols > INT32_MAX) throw std::invalid_argument("too many input features");
  const LinearIndex ix = linear_index(g);
  if (g.L == 0) return;
  const Kernels& k = kernels();
  const TokSplit s = tok_split(g.L, g.groups * g.cols);
  run_tok_tasks(s.tiles * s.parts, [&](int64_t t, std::vector<float>& buf) {
    k.linear_backward(g, ix, dy, dx, s, t, buf);
  });
}

void sparse_linear_sddmm(const SparseGeometry& g, const float* x, const float* dy, float* out) {
  check_linear(g);
  // x^T and dy^T in the calling thread's workspace: kept between calls up to 16 MB, so steady
  // training reuses warm pages instead of faulting in fresh ones.
  constexpr size_t kKeepFloats = size_t{4} << 20;
  thread_local std::vector<float> work;
  const int64_t X = g.groups * g.cols;
  const size_t need = static_cast<size_t>(g.L * (X + g.rows) + 1);
  if (work.size() < need) work.resize(need);
  float* xt = work.data();
  float* dyt = xt + g.L * X;
  transpose(x, g.L, X, xt);
  transpose(dy, g.L, g.rows, dyt);
  try {
    sparse_sddmm(g, dyt, xt, out);
  } catch (...) {
    if (work.size() > kKeepFloats) std::vector<float>().swap(work);
    throw;
  }
  if (work.size() > kKeepFloats) std::vector<float>().swap(work);
}

void sparse_forward(const SparseGeometry& g, const float* x, const float* bias, float* y) {
  check(g);
  const RowOffsets ro = row_offsets(g, false);
  if (g.L == 0) return;
  const Columns cl = columns(g);
  const Kernels& k = kernels();
  const Split s = split(g.rows, g.cols * g.phases, g.L);
  run_tasks(s.tasks(), [&](int64_t t, Scratch& sc) { k.forward(g, ro, cl, x, bias, y, s, t, sc); });
}

void sparse_backward(const SparseGeometry& g, const float* dy, float* dx) {
  check(g);
  const RowOffsets ro = row_offsets(g, true);
  if (g.L == 0) return;
  const Columns cl = columns(g);
  const Kernels& k = kernels();
  const Split s = split(g.groups * ro.blocks, g.rows / g.groups, g.L);
  run_tasks(s.tasks(), [&](int64_t t, Scratch& sc) { k.backward(g, ro, cl, dy, dx, s, t, sc); });
}

void sparse_sddmm(const SparseGeometry& g, const float* dy, const float* x, float* out) {
  check(g);
  const RowOffsets ro = row_offsets(g, false);
  const Columns cl = columns(g);
  const Kernels& k = kernels();
  const int64_t nt = max_threads();
  // Long runs (convolutions) are cut into ranges whose input planes stay in cache; each range's
  // partial sums go to their own buffer, added up in range order (the same for every thread count).
  int64_t size = std::max<int64_t>(g.L, 1), chunks = 1;
  if (g.L > 2 * kSddmmRange) {
    size = kSddmmRange;
    chunks = ceil_div(g.L, size);
    if (chunks * g.nnz > kSddmmPartials) {
      chunks = std::max<int64_t>(1, kSddmmPartials / std::max<int64_t>(g.nnz, 1));
      size = ceil_div(g.L, chunks);
      chunks = ceil_div(g.L, size);
    }
  }
  std::vector<float> partial(static_cast<size_t>(chunks > 1 ? chunks * g.nnz : 0));
  const int64_t per = std::max<int64_t>(1, g.rows * chunks / (8 * nt));
  const int64_t row_tasks = ceil_div(g.rows, per);
  run_tasks(row_tasks * chunks, [&](int64_t t, Scratch& sc) {
    const int64_t ch = t / row_tasks, rt = t % row_tasks;
    const int64_t l0 = ch * size, l1 = std::min(g.L, l0 + size);
    float* o = chunks > 1 ? partial.data() + ch * g.nnz : out;
    for (int64_t n = rt * per; n < std::min(g.rows, (rt + 1) * per); ++n) {
      k.sddmm(g, ro, cl, dy, x, o, n, l0, l1, sc);
    }
  });
  if (chunks > 1) {
    const int64_t blocks = ceil_div(g.nnz, 4096);
    for_each_chunk(blocks, threads_for(blocks), [&](int64_t b, int) {
      for (int64_t e = b * 4096; e < std::min(g.nnz, (b + 1) * 4096); ++e) {
        float acc = 0.0f;
        for (int64_t c = 0; c < chunks; ++c) acc += partial[c * g.nnz + e];
        out[e] = acc;
      }
    });
  }
}

}  // namespace pk
