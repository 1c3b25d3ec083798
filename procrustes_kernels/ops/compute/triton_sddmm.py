"""Triton sampled weight gradients (SDDMM): ``dL/dW`` at the tracked positions only.

One kernel serves both layers: a linear layer is a 1 x 1 convolution of a ``[M, C, 1, 1]`` input.
A program takes ``BLOCK_E`` tracked weights (their flat indices, in storage order) and sums, over
``B x OH x OW`` output positions in chunks of ``BLOCK_P``,

    g[e] = sum_p dy[b, n, oh, ow] * x[b, group(n) * Cg + c, oh * sh - ph + r * dh, ow * sw - pw + s * dw]

for weight ``e = (n, c, r, s)`` (positions outside the input count as zero), accumulating in
float32; the result has ``dy``'s dtype, as :func:`..reference.sddmm_linear` /
:func:`..reference.sddmm_conv2d` define. The flat indices come from the bits (one ``nonzero``
over the mask), cached on the bits tensor with the tracked set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...storage import unpack_bits
from ..triton_util import INTERPRETED, check_device
from .triton_common import INPUT_DTYPES

__all__ = ["sddmm_linear", "sddmm_conv2d"]

_CACHE = "_procrustes_tracked_flat"


@triton.jit
def _sddmm_kernel(
    out_ptr,
    x_ptr,
    dy_ptr,
    flat_ptr,
    nnz,
    P,  # B * OH * OW
    C,  # input channels (all groups)
    H,
    W,
    N,  # output channels
    OH,
    OW,
    CG: tl.constexpr,  # input channels per group
    NG,  # output channels per group
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < nnz
    f = tl.load(flat_ptr + e, mask=e_ok, other=0)  # int64 flat index of the weight
    KS: tl.constexpr = KH * KW
    krow = CG * KS
    n = f // krow
    j = f - n * krow
    c = j // KS
    k = j - c * KS
    r = k // KW
    s = k - r * KW
    cin = (n // NG) * CG + c
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    ohw = OH * OW
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < P
        b = p // ohw
        q = p - b * ohw
        oh = q // OW
        ow = q - oh * OW
        ih = oh[None, :] * SH - PH + r[:, None] * DH
        iw = ow[None, :] * SW - PW + s[:, None] * DW
        ok = e_ok[:, None] & p_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b64 = b.to(tl.int64)[None, :]
        x_off = ((b64 * C + cin[:, None]) * H + ih) * W + iw
        dy_off = ((b64 * N + n[:, None]) * OH + oh[None, :]) * OW + ow[None, :]
        xv = tl.load(x_ptr + x_off, mask=ok, other=0.0).to(tl.float32)
        dv = tl.load(dy_ptr + dy_off, mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(xv * dv, axis=1)
    tl.store(out_ptr + e, acc.to(out_ptr.dtype.element_ty), mask=e_ok)


def _tracked_flat(bits: Tensor, numel: int) -> Tensor:
    """Flat indices of the tracked weights, ascending (int64), cached on ``bits``."""
    version = None if bits.is_inference() else bits._version
    hit = getattr(bits, _CACHE, None)
    if version is not None and hit is not None and hit[0] == (numel, version):
        return hit[1]
    flat = unpack_bits(bits, numel).nonzero().flatten()
    if version is not None:
        setattr(bits, _CACHE, ((numel, version), flat))
    return flat


def _check(fn: str, name: str, t: object, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: expected {name} to be a Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{fn}: expected {name} with {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in INPUT_DTYPES:
        raise TypeError(
            f"{fn}: expected {name} of dtype float32, float16 or bfloat16, got {t.dtype}"
        )
    check_device(fn, t, name)
    return t.contiguous()


def _launch(x, dy, values, bits, index, kernel_size, stride, padding, dilation) -> Tensor:
    b, c, h, w = x.shape
    n, oh, ow = dy.shape[1], dy.shape[2], dy.shape[3]
    numel = index.rows * index.cols * index.ksize
    flat = _tracked_flat(bits, numel)
    if flat.numel() != values.numel():
        raise ValueError(
            f"expected values with {flat.numel()} entries (the bits' tracked count), "
            f"got {values.numel()}"
        )
    out = torch.empty(values.numel(), dtype=dy.dtype, device=dy.device)
    if out.numel() == 0:
        return out
    block_e, block_p = (16, 64) if INTERPRETED else (32, 128)
    grid = (triton.cdiv(out.numel(), block_e),)
    _sddmm_kernel[grid](
        out, x, dy, flat, out.numel(), b * oh * ow, c, h, w, n, oh, ow,
        CG=index.cols, NG=index.rows // index.groups,
        KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1],
        PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        BLOCK_E=block_e, BLOCK_P=block_p,
    )  # fmt: skip
    return out


def sddmm_linear(x: Tensor, dy: Tensor, values: Tensor, bits: Tensor, index) -> Tensor:
    """``(dy^T @ x)`` at the tracked positions, in storage order (``dy``'s dtype)."""
    fn = "sddmm_linear()"
    x, dy = _check(fn, "x", x, 2), _check(fn, "dy", dy, 2)
    if x.shape[1] != index.cols or dy.shape[1] != index.rows or x.shape[0] != dy.shape[0]:
        raise ValueError(
            f"{fn}: expected x [M, {index.cols}] and dy [M, {index.rows}], got "
            f"{tuple(x.shape)} and {tuple(dy.shape)}"
        )
    m = x.shape[0]
    return _launch(
        x.view(m, -1, 1, 1),
        dy.view(m, -1, 1, 1),
        values,
        bits,
        index,
        (1, 1),
        (1, 1),
        (0, 0),
        (1, 1),
    )


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
    """The weight gradient of a convolution at the tracked positions (storage order)."""
    fn = "sddmm_conv2d()"
    x, dy = _check(fn, "x", x, 4), _check(fn, "dy", dy, 4)
    if tuple(kernel_size)[0] * tuple(kernel_size)[1] != index.ksize:
        raise ValueError(
            f"{fn}: expected kernel_size with {index.ksize} positions, got {tuple(kernel_size)}"
        )
    if (
        x.shape[1] != index.cols * index.groups
        or dy.shape[1] != index.rows
        or x.shape[0] != dy.shape[0]
    ):
        raise ValueError(
            f"{fn}: expected x [B, {index.cols * index.groups}, H, W] and dy [B, {index.rows}, "
            f"OH, OW], got {tuple(x.shape)} and {tuple(dy.shape)}"
        )
    return _launch(x, dy, values, bits, index, tuple(kernel_size), tuple(stride), tuple(padding),
                   tuple(dilation))  # fmt: skip
