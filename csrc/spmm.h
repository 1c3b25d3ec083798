// Sparse compute from the compressed storage (float32): the CPU kernels of the sparse compute ops
// (procrustes_kernels/ops/compute/reference.py is the definition, ops/compute/cpp.py the wrapper).
//
// One geometry serves linear and convolution layers. The weight is a matrix of `rows` rows of
// `row_len = cols * ksize` elements in storage order; element j of row n is input column
// c = j / ksize at kernel position k = j % ksize. Activations are laid out "feature-major": one
// plane of L floats per feature, the batch (and pixels) contiguous, so every tracked weight is one
// axpy or dot product over a contiguous run of L floats:
//
// * linear: planes are x^T's rows (L = tokens), phases = 1, shift = 0;
// * convolution: the input is zero-padded and split into stride x stride phase planes on the
//   output grid (L = batch * grid pixels); kernel position k reads phase plane phase[k] of its
//   channel, shifted by shift[k] floats (outputs off the valid grid are computed and dropped).
//
// Input feature c of group g starts at plane (g * cols + c) * phases. Forward, for every row n:
//   y[n*L + l] = bias[n] + sum_(tracked j) w * x[plane(c, k) * L + shift[k] + l]
// backward-data, for every input plane of (c, phase):
//   dx[plane * L + l] = sum_(tracked (n, j) of that plane) w * dy[n*L + l - shift[k]]
// and the sampled weight gradient (SDDMM), one value per tracked weight in storage order:
//   g = sum_l dy[n*L + l] * x[plane(c, k) * L + shift[k] + l].
// x needs max(shift) readable floats past its planes; dy needs max(shift) readable zeros before
// its first plane (the wrapper allocates both), and zeros wherever an output is off the grid.
#pragma once

#include <cstdint>

namespace pk {

struct SparseGeometry {
  const float* values;
  int64_t nnz;
  const uint8_t* bits;  // ceil(rows * row_len / 8) bytes
  int64_t rows, cols, ksize, groups;
  int64_t phases;
  const int32_t* phase;  // ksize entries in [0, phases)
  const int64_t* shift;  // ksize entries >= 0
  int64_t L;
};

// Validates the geometry (the bit count must equal nnz; std::invalid_argument otherwise).
void sparse_forward(const SparseGeometry& g, const float* x, const float* bias, float* y);
void sparse_backward(const SparseGeometry& g, const float* dy, float* dx);
void sparse_sddmm(const SparseGeometry& g, const float* dy, const float* x, float* out);

// Linear geometries (ksize 1, phases 1) in PyTorch's token-major layout, L tokens:
// y[L, rows] = x[L, groups * cols] W^T (+ bias) and dx[L, groups * cols] = dy[L, rows] W.
void sparse_linear_forward(const SparseGeometry& g, const float* x, const float* bias, float* y);
void sparse_linear_backward(const SparseGeometry& g, const float* dy, float* dx);
// The sampled weight gradient (as sparse_sddmm) from token-major x[L, groups * cols], dy[L, rows].
void sparse_linear_sddmm(const SparseGeometry& g, const float* x, const float* dy, float* out);

// dst[c * rows + r] = src[r * cols + c]: the layout change between PyTorch's token-major
// activations and the kernels' feature-major planes, in cache-sized tiles, threaded.
void transpose(const float* src, int64_t rows, int64_t cols, float* dst);

}  // namespace pk
