"""Pure-PyTorch reference of the sparse compute ops: the definition the Triton kernels reproduce.

The ops compute a layer's forward pass and its backward-data pass from the compressed storage. By
default every untracked weight is exactly zero (Procrustes after its decay), so only tracked values
count; with ``regen`` (a :class:`~..contract.Regen`) the untracked weights are ``scale * w0``,
regenerated from the seed as ``materialize`` writes them (DropBack, Procrustes before its decay):

* :func:`sparse_linear`: ``Y = X W^T + b``; ``x [M, cols]`` -> ``[M, rows]``
* :func:`sparse_linear_t`: ``dX = dY W``; ``dy [M, rows]`` -> ``[M, cols]``
* :func:`sparse_conv2d`: the convolution of ``x [B, C, H, W]`` with ``W`` (+ ``b``), zero padding
* :func:`sparse_conv2d_t`: its gradient with respect to the input, from ``dy [B, N, OH, OW]``
* :func:`sddmm_linear` / :func:`sddmm_conv2d`: the weight gradient at the tracked positions only,
  one float per tracked weight in storage order (a sampled dense-dense product); it does not
  depend on the weight's values, so it serves every weight, decayed or not

Arithmetic contract: each weight is rounded to the input's dtype (as a cast of the weight before an
``nn`` layer would), products are accumulated in float32, the bias is added in float32 and the
result is rounded once to the input's dtype. Accumulation order is free, so kernels agree to the
rounding of a float32 sum, not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...philox import init_values
from ...storage import unpack_bits
from ..contract import COMPUTE_DTYPES, Regen
from .index import TileIndex

__all__ = [
    "sparse_linear",
    "sparse_linear_t",
    "sparse_conv2d",
    "sparse_conv2d_t",
    "sddmm_linear",
    "sddmm_conv2d",
    "dense_weight",
]

# The compute functions take ``regen=`` (untracked weights regenerated, see the docstring).
regenerates = True


def _check_input(fn: str, name: str, t: object, ndim: int, dim: int, size: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: expected {name} to be a Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{fn}: expected {name} with {ndim} dims, got shape {tuple(t.shape)}")
    if t.shape[dim] != size:
        raise ValueError(
            f"{fn}: expected {name}.shape[{dim}] == {size}, got shape {tuple(t.shape)}"
        )
    if t.dtype not in COMPUTE_DTYPES:
        raise TypeError(
            f"{fn}: expected {name} of dtype float32, float16 or bfloat16, got {t.dtype}"
        )
    return t


def dense_weight(
    values: Tensor, bits: Tensor, index: TileIndex, dtype: torch.dtype, regen: Regen | None = None
) -> Tensor:
    """The weight as a dense float32 matrix ``[rows, cols * ksize]``: the tracked values, zeros
    elsewhere (or with ``regen`` ``scale * w0`` rounded to the values' dtype), each weight then
    rounded to ``dtype``."""
    numel = index.rows * index.cols * index.ksize
    if values.numel() != index.nnz:
        raise ValueError(
            f"expected values with {index.nnz} entries (the index's tracked count), got {values.numel()}"
        )
    if regen is None:
        w = torch.zeros(numel, dtype=torch.float32, device=values.device)
    else:
        w0 = init_values(regen.seed, numel, regen.bound, device=values.device)
        w = w0 * regen.scale.to(device=values.device, dtype=torch.float32)
        w = w.to(values.dtype).to(dtype).to(torch.float32)
    w[unpack_bits(bits, numel)] = values.to(dtype).to(torch.float32)
    return w.view(index.rows, index.cols * index.ksize)


def _finish(out: Tensor, bias: Tensor | None, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    if bias is not None:
        out = out + bias.to(torch.float32).view(shape)
    return out.to(dtype)


def sparse_linear(
    x: Tensor,
    values: Tensor,
    bits: Tensor,
    index: TileIndex,
    bias: Tensor | None = None,
    *,
    regen: Regen | None = None,
) -> Tensor:
    """``x @ W^T + bias`` from the compressed weight (``index.ksize == 1``, ``groups == 1``)."""
    fn = "sparse_linear()"
    x = _check_input(fn, "x", x, 2, 1, index.cols)
    w = dense_weight(values, bits, index, x.dtype, regen)
    return _finish(x.to(torch.float32) @ w.T, bias, x.dtype, (1, -1))


def sparse_linear_t(
    dy: Tensor, values: Tensor, bits: Tensor, index: TileIndex, *, regen: Regen | None = None
) -> Tensor:
    """``dy @ W`` (the input gradient of :func:`sparse_linear`)."""
    fn = "sparse_linear_t()"
    dy = _check_input(fn, "dy", dy, 2, 1, index.rows)
    w = dense_weight(values, bits, index, dy.dtype, regen)
    return (dy.to(torch.float32) @ w).to(dy.dtype)


def _conv_weight(
    values: Tensor,
    bits: Tensor,
    index: TileIndex,
    dtype: torch.dtype,
    kernel_size,
    regen: Regen | None,
) -> Tensor:
    kh, kw = kernel_size
    if kh * kw != index.ksize:
        raise ValueError(
            f"expected kernel_size with {index.ksize} positions (the index's ksize), got {tuple(kernel_size)}"
        )
    return dense_weight(values, bits, index, dtype, regen).view(index.rows, index.cols, kh, kw)


def sparse_conv2d(
    x: Tensor,
    values: Tensor,
    bits: Tensor,
    index: TileIndex,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    bias: Tensor | None = None,
    *,
    regen: Regen | None = None,
) -> Tensor:
    """``conv2d(x, W, bias, stride, padding, dilation, index.groups)`` from the compressed weight."""
    fn = "sparse_conv2d()"
    x = _check_input(fn, "x", x, 4, 1, index.cols * index.groups)
    w = _conv_weight(values, bits, index, x.dtype, kernel_size, regen)
    out = F.conv2d(x.to(torch.float32), w, None, stride, padding, dilation, index.groups)
    return _finish(out, bias, x.dtype, (1, -1, 1, 1))


def sparse_conv2d_t(
    dy: Tensor,
    values: Tensor,
    bits: Tensor,
    index: TileIndex,
    input_hw: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    *,
    regen: Regen | None = None,
) -> Tensor:
    """Gradient of :func:`sparse_conv2d` with respect to its input ``[B, C, H, W]``."""
    fn = "sparse_conv2d_t()"
    dy = _check_input(fn, "dy", dy, 4, 1, index.rows)
    w = _conv_weight(values, bits, index, dy.dtype, kernel_size, regen)
    size = (dy.shape[0], index.cols * index.groups, *input_hw)
    dx = torch.nn.grad.conv2d_input(
        size, w, dy.to(torch.float32), stride, padding, dilation, index.groups
    )
    return dx.to(dy.dtype)


def _tracked_of(grad: Tensor, values: Tensor, bits: Tensor, dtype: torch.dtype) -> Tensor:
    numel = grad.numel()
    picked = grad.reshape(-1)[unpack_bits(bits, numel)]
    if picked.numel() != values.numel():
        raise ValueError(
            f"expected values with {picked.numel()} entries (the bits' tracked count), "
            f"got {values.numel()}"
        )
    return picked.to(dtype)


def sddmm_linear(x: Tensor, dy: Tensor, values: Tensor, bits: Tensor, index) -> Tensor:
    """``(dy^T @ x)`` at the tracked positions, in storage order."""
    fn = "sddmm_linear()"
    x = _check_input(fn, "x", x, 2, 1, index.cols)
    dy = _check_input(fn, "dy", dy, 2, 1, index.rows)
    if x.shape[0] != dy.shape[0]:
        raise ValueError(
            f"{fn}: expected x and dy with the same rows, got {tuple(x.shape)} and {tuple(dy.shape)}"
        )
    grad = dy.to(torch.float32).t() @ x.to(torch.float32)
    return _tracked_of(grad, values, bits, dy.dtype)


def sddmm_conv2d(
    x: Tensor,
    dy: Tensor,
    values: Tensor,
    bits: Tensor,
    index,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> Tensor:
    """The weight gradient of :func:`sparse_conv2d` at the tracked positions (storage order)."""
    fn = "sddmm_conv2d()"
    x = _check_input(fn, "x", x, 4, 1, index.cols * index.groups)
    dy = _check_input(fn, "dy", dy, 4, 1, index.rows)
    shape = (index.rows, index.cols, *kernel_size)
    grad = torch.nn.grad.conv2d_weight(
        x.to(torch.float32), shape, dy.to(torch.float32), stride, padding, dilation, index.groups
    )
    return _tracked_of(grad, values, bits, dy.dtype)
