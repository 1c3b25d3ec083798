"""Triton kernels for the sparse convolution: forward and backward-data straight from the storage.

Same functions, arguments and results as :func:`.reference.sparse_conv2d` and
:func:`.reference.sparse_conv2d_t` (the definition), for CUDA tensors, and for CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1``, what the CPU tests use). No dense weight is
ever built: every program decodes the weight tiles it needs from the tracked bits and the packed
values (:mod:`.triton_common`), and skips the tiles that hold no tracked weight
(:class:`.index.TileIndex`).

Implicit GEMM. The weight is ``W[N, Cg, kh, kw]`` (flat order ``(n, c, r, s)``, ``KS = kh * kw``
kernel positions ``k = r * kw + s``), ``N`` output channels in ``groups`` groups, group ``g``
reading the input channels ``[g * Cg, (g + 1) * Cg)``. The forward pass is the GEMM

    ``out[m, n] = sum_{c, k} x[b, g * Cg + c, oh * sh - ph + r * dh, ow * sw - pw + s * dw] * W[n, c, k]``

over the ``M = B * OH * OW`` output positions ``m = (b, oh, ow)``, an input position outside the
image reading zero (zero padding). Its operand ``X[m, (c, k)]`` is never formed: each ``[BLOCK_M,
BLOCK_C]`` slice is gathered from ``x`` (arbitrary strides, so NCHW and channels_last alike) at the
kernel position it is multiplied with.

* Forward (:func:`sparse_conv2d`): a work unit is ``(m-tile, row tile gt = g * tiles_n + t)``; it
  walks the row tile's non-empty column tiles (``row_ptr`` / ``row_tiles``) and, for each, the
  kernel positions ``k = 0 .. KS-1`` in storage order (``tile_start`` once, then ``tile_at`` per
  ``k``): ``acc[BLOCK_M, BLOCK_N] += x_tile[BLOCK_M, BLOCK_C] @ w_k^T``.
* Backward data (:func:`sparse_conv2d_t`), ``dX = dY W`` on the same storage: a work unit is
  ``(m-tile of the B * H * W input positions, (group, column tile) g * tiles_c + ct)``; it walks
  the column tile's non-empty row tiles (``col_ptr`` / ``col_tiles``) with the same decode, and
  gathers ``dy`` at ``oh = (ih + ph - r * dh) / sh`` where that division is exact and in range
  (likewise ``ow``): ``acc[BLOCK_M, BLOCK_C] += dy_tile[BLOCK_M, BLOCK_N] @ w_k``.

With ``regen=`` (a :class:`~..contract.Regen`: untracked weights ``scale * w0``) both passes walk
every tile (``HAS_INIT``) and regenerate the untracked weights in the tile load
(:func:`.triton_common.regen_tile_at`); nothing of the dense weight is written to memory.

W and W^T from one storage: both passes decode the same ``[BLOCK_N, BLOCK_C]`` tile at kernel
position ``k``; the forward pass multiplies with its transpose, the backward pass with the tile as
loaded. Only the order of the walk differs (over the column tiles of a row tile, or the row tiles
of a column tile), and the tile index holds both lists.

Arithmetic contract (that of the reference): each weight is rounded to the input's dtype (to
nearest even, also under the interpreter, whose float32 -> bfloat16 cast truncates), products are
accumulated in float32 (``tl.dot`` with ``out_dtype=float32``), the bias is added in float32 and
the result is rounded once to the input's dtype. Float32 inputs use ``input_precision="tf32"``
only on CUDA with ``torch.backends.cudnn.allow_tf32`` set (as ``nn.Conv2d`` would), else "ieee".
The interpreter's ``tl.dot`` is wrong on bfloat16 operands, so there the (exactly representable)
bfloat16 operands are widened to float32 first, which multiplies them exactly as well.

Under the interpreter the tile loop is a ``while`` loop (``WHILE_LOOP``): triton 3.6's interpreter
cannot take a loaded value as a ``range`` bound (numpy 2 refuses ``int()`` of the 1-element array
it holds). Compiled, it is a ``for`` loop, which Triton can pipeline. Launches pass
``enable_fp_fusion=False`` (nothing outside ``tl.dot`` could fuse; it also keeps triton 3.9 from
warning about the changing default).

Output layout: the result mirrors the input's memory format, as ``torch.nn.functional.conv2d``
does: channels_last when the input is channels_last (and not also NCHW-contiguous), otherwise
NCHW-contiguous. Every output element is written (a unit without non-empty tiles writes zeros, or
the bias).

Launch parameters: ``block_m`` (power of two >= 16), ``num_warps``, ``num_stages``; the tile's
``BLOCK_N`` / ``BLOCK_C`` are the index's ``block_n`` / ``block_c`` (powers of two >= 16, the
smallest ``tl.dot`` shape). GPU defaults: 8 warps and 2 stages, ``BLOCK_M = 128`` forward and 64
backward. With 64 x 32 tiles (the layers default to 32 x 32), ptxas (sm_90; kernels 3x3 and 1x1,
float32 and bfloat16) allocates these without register spills under both triton 3.6 (<= 206 registers) and
3.9 (<= 255); under 3.9, 4 warps spill, as do the backward pass at ``BLOCK_M = 128`` and tiles of
64 x 64 or larger (the decode's int64 value indices and the gathers' per-element addresses live in
registers beside the accumulator). Not yet timed on a GPU. Under the interpreter, whose cost is
per program instance, the default is one m-tile of up to 256 positions. ``KS`` and ``kw`` are
constexpr (one compile per kernel size; the 3.6 interpreter needs a Python int as ``range``
bound). Offsets are int64 when a tensor spans 2**31 elements or more.

Over 600 lines on purpose: forward and backward-data kernels share
their operand helpers, and each launcher sits next to its kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import triton_util as tu
from ..contract import Regen
from ..triton_util import check_device, check_launch, default_block, nonempty, round_to
from .index import TileIndex
from .triton_common import (
    INPUT_DTYPES,
    MIN_DOT,
    allows_tf32,
    check_index_tiles,
    check_storage,
    regen_args,
    regen_constants,
    regen_tile_at,
    tile_at,
    tile_start,
)

__all__ = ["sparse_conv2d", "sparse_conv2d_t"]

# The compute functions take ``regen=`` (untracked weights regenerated, see the docstring).
regenerates = True

_BIAS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# GPU defaults (module docstring): the backward pass gathers [BLOCK_M, BLOCK_N] of dy per step,
# the forward pass [BLOCK_M, BLOCK_C] of x, so the backward pass takes the smaller m-tile.
_GPU_BLOCK_M = 128
_GPU_BLOCK_M_T = 64
_GPU_WARPS = 8
_GPU_STAGES = 2
_INTERPRETER_BLOCK_M = 256


# ---------------------------------------------------------------------------------- device helpers


@triton.jit
def _operands(a, w, DOT_F32: tl.constexpr):
    """The dot's operands: as they are, or widened to float32 (bfloat16 in the interpreter)."""
    if DOT_F32:
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    return a, w


@triton.jit
def _positions(mt, M, D1, D2, BLOCK_M: tl.constexpr, OFFS64: tl.constexpr):
    """Positions ``m = (b, i, j)`` of m-tile ``mt`` (``i < D1``, ``j < D2``) and their mask."""
    if OFFS64:
        m = mt.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    j = m % D2
    q = m // D2
    return q // D1, q % D1, j, m < M


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _conv_tile(
    acc, e, x_ptr, values_ptr, bits_ptr, row_off_ptr, row_tiles_ptr, n, n_ok, cc, c_first, x_b,
    ih0, iw0, m_ok, H, W, sxc, sxh, sxw, cols, KROW, TILES_C, DH, DW, seed, bound, scale,
    KS: tl.constexpr, KW: tl.constexpr, HAS_INIT: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, OFFS64: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Forward step: ``acc += x_tile @ W_tile^T`` over the kernel, for entry ``e`` of
    ``row_tiles`` (a non-empty column tile of the unit's row tile), or with ``HAS_INIT`` column
    tile ``e`` (untracked weights regenerated)."""
    xdt = x_ptr.dtype.element_ty
    if HAS_INIT:
        ct = e
    else:
        ct = tl.load(row_tiles_ptr + e)
    c = ct * BLOCK_C + cc
    c_ok = c < cols
    valid = n_ok[:, None] & c_ok[None, :]
    idx = tile_start(bits_ptr, row_off_ptr, n, c, ct, valid, KROW, KS, TILES_C)
    if OFFS64:
        x_c = (c_first + c).to(tl.int64) * sxc
    else:
        x_c = (c_first + c) * sxc
    for k in range(KS):
        if HAS_INIT:
            w, idx = regen_tile_at(
                values_ptr, bits_ptr, idx, n, c, k, valid, KROW, KS, seed, bound, scale
            )
        else:
            w, idx = tile_at(values_ptr, bits_ptr, idx, n, c, k, valid, KROW, KS)
        w = round_to(w, xdt)
        r = k // KW
        s = k % KW
        ih = ih0 + r * DH
        iw = iw0 + s * DW
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_off = x_b + ih * sxh + iw * sxw
        xt = tl.load(
            x_ptr + (x_off[:, None] + x_c[None, :]),
            mask=ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        a, wt = _operands(xt, w, DOT_F32)
        acc = tl.dot(a, tl.trans(wt), acc, input_precision=PRECISION, out_dtype=tl.float32)
    return acc


@triton.jit
def _conv_t_tile(
    acc, e, dy_ptr, values_ptr, bits_ptr, row_off_ptr, col_tiles_ptr, g, c, c_ok, ct, nn, dy_b,
    th0, tw0, m_ok, OH, OW, sdc, sdh, sdw, rpg, KROW, TILES_C, SH, SW, DH, DW, seed, bound, scale,
    KS: tl.constexpr, KW: tl.constexpr, HAS_INIT: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, OFFS64: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Backward-data step: ``acc += dy_tile @ W_tile`` over the kernel, for entry ``e`` of
    ``col_tiles`` (a non-empty row tile of the unit's column tile), or with ``HAS_INIT`` row tile
    ``e`` of the group (untracked weights regenerated)."""
    ddt = dy_ptr.dtype.element_ty
    if HAS_INIT:
        t = e
    else:
        t = tl.load(col_tiles_ptr + e)
    n_loc = t * BLOCK_N + nn
    n_ok = n_loc < rpg
    n = g * rpg + n_loc
    valid = n_ok[:, None] & c_ok[None, :]
    idx = tile_start(bits_ptr, row_off_ptr, n, c, ct, valid, KROW, KS, TILES_C)
    if OFFS64:
        dy_n = n.to(tl.int64) * sdc
    else:
        dy_n = n * sdc
    for k in range(KS):
        if HAS_INIT:
            w, idx = regen_tile_at(
                values_ptr, bits_ptr, idx, n, c, k, valid, KROW, KS, seed, bound, scale
            )
        else:
            w, idx = tile_at(values_ptr, bits_ptr, idx, n, c, k, valid, KROW, KS)
        w = round_to(w, ddt)
        r = k // KW
        s = k % KW
        th = th0 - r * DH
        tw = tw0 - s * DW
        oh = th // SH
        ow = tw // SW
        ok = m_ok & (th >= 0) & (tw >= 0) & (oh < OH) & (ow < OW)
        ok = ok & (oh * SH == th) & (ow * SW == tw)
        dy_m = dy_b + oh * sdh + ow * sdw
        dyt = tl.load(
            dy_ptr + (dy_m[:, None] + dy_n[None, :]),
            mask=ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        a, wt = _operands(dyt, w, DOT_F32)
        acc = tl.dot(a, wt, acc, input_precision=PRECISION, out_dtype=tl.float32)
    return acc


@triton.jit
def _sparse_conv2d_kernel(
    out_ptr,
    x_ptr,
    values_ptr,
    bits_ptr,
    row_off_ptr,
    row_ptr_ptr,
    row_tiles_ptr,
    bias_ptr,
    scale_ptr,
    M,
    H,
    W,
    OH,
    OW,
    sxb,
    sxc,
    sxh,
    sxw,
    sob,
    soc,
    soh,
    sow,
    rpg,
    cols,
    KROW,
    TILES_N,
    TILES_C,
    NGT,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    seed,
    bound,
    KS: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[b, n, oh, ow]`` for one unit ``(m-tile, row tile gt)``, ``pid = mt * NGT + gt``.

    Consecutive programs share the m-tile, so its input gathers are reused from L2 by every row
    tile; the (sparse) weight is small enough to stay there too. With ``HAS_INIT`` every column
    tile is visited and the untracked weights are ``scale * w0``, regenerated in the tile loads.
    """
    pid = tl.program_id(0)
    mt = pid // NGT
    gt = pid % NGT
    g = gt // TILES_N
    t = gt % TILES_N

    b, oh, ow, m_ok = _positions(mt, M, OH, OW, BLOCK_M, OFFS64)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_b = b * sxb

    n_loc = t * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n_loc < rpg
    n = g * rpg + n_loc
    cc = tl.arange(0, BLOCK_C)
    c_first = g * cols  # the group's first input channel

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    seed, bound, scale = regen_constants(seed, bound, scale_ptr, HAS_INIT)
    if HAS_INIT:
        start = 0
        end = TILES_C
    else:
        start = tl.load(row_ptr_ptr + gt)
        end = tl.load(row_ptr_ptr + gt + 1)
    if WHILE_LOOP:
        e = start
        while e < end:
            acc = _conv_tile(
                acc, e, x_ptr, values_ptr, bits_ptr, row_off_ptr, row_tiles_ptr, n, n_ok, cc,
                c_first, x_b, ih0, iw0, m_ok, H, W, sxc, sxh, sxw, cols, KROW, TILES_C, DH, DW,
                seed, bound, scale, KS, KW, HAS_INIT, DOT_F32, PRECISION, OFFS64, BLOCK_C,
            )  # fmt: skip
            e += 1
    else:
        for e in range(start, end):
            acc = _conv_tile(
                acc, e, x_ptr, values_ptr, bits_ptr, row_off_ptr, row_tiles_ptr, n, n_ok, cc,
                c_first, x_b, ih0, iw0, m_ok, H, W, sxc, sxh, sxw, cols, KROW, TILES_C, DH, DW,
                seed, bound, scale, KS, KW, HAS_INIT, DOT_F32, PRECISION, OFFS64, BLOCK_C,
            )  # fmt: skip

    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    if OFFS64:
        o_n = n.to(tl.int64) * soc
    else:
        o_n = n * soc
    o_m = b * sob + oh * soh + ow * sow
    tl.store(
        out_ptr + (o_m[:, None] + o_n[None, :]),
        round_to(acc, out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _sparse_conv2d_t_kernel(
    dx_ptr,
    dy_ptr,
    values_ptr,
    bits_ptr,
    row_off_ptr,
    col_ptr_ptr,
    col_tiles_ptr,
    scale_ptr,
    M,
    H,
    W,
    OH,
    OW,
    sdb,
    sdc,
    sdh,
    sdw,
    sxb,
    sxc,
    sxh,
    sxw,
    rpg,
    cols,
    KROW,
    TILES_C,
    TILES_N,
    NGC,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    seed,
    bound,
    KS: tl.constexpr,
    KW: tl.constexpr,
    HAS_INIT: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``dx[b, c, ih, iw]`` for one unit ``(m-tile, gc = g * tiles_c + ct)``, ``pid = mt * NGC + gc``."""
    pid = tl.program_id(0)
    mt = pid // NGC
    gc = pid % NGC
    g = gc // TILES_C
    ct = gc % TILES_C

    b, ih, iw, m_ok = _positions(mt, M, H, W, BLOCK_M, OFFS64)
    th0 = ih + PH
    tw0 = iw + PW
    dy_b = b * sdb

    c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < cols
    nn = tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    seed, bound, scale = regen_constants(seed, bound, scale_ptr, HAS_INIT)
    if HAS_INIT:
        start = 0
        end = TILES_N
    else:
        start = tl.load(col_ptr_ptr + gc)
        end = tl.load(col_ptr_ptr + gc + 1)
    if WHILE_LOOP:
        e = start
        while e < end:
            acc = _conv_t_tile(
                acc, e, dy_ptr, values_ptr, bits_ptr, row_off_ptr, col_tiles_ptr, g, c, c_ok, ct,
                nn, dy_b, th0, tw0, m_ok, OH, OW, sdc, sdh, sdw, rpg, KROW, TILES_C, SH, SW, DH,
                DW, seed, bound, scale, KS, KW, HAS_INIT, DOT_F32, PRECISION, OFFS64, BLOCK_N,
            )  # fmt: skip
            e += 1
    else:
        for e in range(start, end):
            acc = _conv_t_tile(
                acc, e, dy_ptr, values_ptr, bits_ptr, row_off_ptr, col_tiles_ptr, g, c, c_ok, ct,
                nn, dy_b, th0, tw0, m_ok, OH, OW, sdc, sdh, sdw, rpg, KROW, TILES_C, SH, SW, DH,
                DW, seed, bound, scale, KS, KW, HAS_INIT, DOT_F32, PRECISION, OFFS64, BLOCK_N,
            )  # fmt: skip

    if OFFS64:
        x_c = (g * cols + c).to(tl.int64) * sxc
    else:
        x_c = (g * cols + c) * sxc
    x_m = b * sxb + ih * sxh + iw * sxw
    tl.store(
        dx_ptr + (x_m[:, None] + x_c[None, :]),
        round_to(acc, dx_ptr.dtype.element_ty),
        mask=m_ok[:, None] & c_ok[None, :],
    )


# ---------------------------------------------------------------------------------------- launchers


def _check_activation(fn: str, name: str, t: object, channels: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: expected {name} to be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(
            f"{fn}: expected {name} with 4 dims [B, C, H, W], got shape {tuple(t.shape)}"
        )
    if t.shape[1] != channels:
        raise ValueError(
            f"{fn}: expected {name}.shape[1] == {channels}, got shape {tuple(t.shape)}"
        )
    if t.dtype not in INPUT_DTYPES:
        raise TypeError(
            f"{fn}: expected {name} of dtype float32, float16 or bfloat16, got {t.dtype}"
        )
    check_device(fn, t, name)
    return t


def _pair(fn: str, name: str, v: object, minimum: int) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else v
    ok = isinstance(pair, tuple | list) and len(pair) == 2
    ok = ok and all(isinstance(p, int) and not isinstance(p, bool) for p in pair)
    if not ok:
        raise TypeError(f"{fn}: expected {name} to be an int or a pair of ints, got {v!r}")
    if min(pair) < minimum:
        raise ValueError(f"{fn}: expected {name} entries >= {minimum}, got {tuple(pair)}")
    return int(pair[0]), int(pair[1])


def _check_kernel_size(fn: str, kernel_size: object, index: TileIndex) -> tuple[int, int]:
    kh, kw = _pair(fn, "kernel_size", kernel_size, 1)
    if kh * kw != index.ksize:
        raise ValueError(
            f"{fn}: expected kernel_size with {index.ksize} positions (the index's ksize), "
            f"got {(kh, kw)}"
        )
    return kh, kw


def _check_bias(fn: str, bias: object, rows: int, device: torch.device) -> Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, Tensor):
        raise TypeError(f"{fn}: expected bias to be a Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (rows,):
        raise ValueError(f"{fn}: expected bias of shape ({rows},), got {tuple(bias.shape)}")
    if bias.dtype not in _BIAS_DTYPES:
        raise TypeError(f"{fn}: expected bias of a floating dtype, got {bias.dtype}")
    if bias.device != device:
        raise ValueError(f"{fn}: expected bias on {device} (the input's device), got {bias.device}")
    return bias.contiguous()


def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _memory_format(t: Tensor) -> torch.memory_format:
    """channels_last for a channels_last tensor that is not also NCHW-contiguous, as torch does."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _span(t: Tensor) -> int:
    """Elements between a tensor's first and one past its last element (its offsets' range)."""
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and not tu.INTERPRETED:
        return "tf32" if allows_tf32("conv") else "ieee"
    return "ieee"


def _launch_config(
    fn: str,
    m: int,
    device: torch.device,
    gpu_block_m: int,
    block_m: int | None,
    num_warps: int | None,
    num_stages: int | None,
) -> tuple[int, int, int]:
    check_launch(fn, block_m, num_warps, num_stages, block_min=MIN_DOT)
    if block_m is None:
        block_m = default_block(m, MIN_DOT, gpu_block_m, _INTERPRETER_BLOCK_M, shrink=False)
    if num_warps is None:
        num_warps = _GPU_WARPS
    if num_stages is None:
        num_stages = _GPU_STAGES
    return block_m, num_warps, num_stages


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
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> Tensor:
    """``conv2d(x, W, bias, stride, padding, dilation, index.groups)`` from the compressed weight.

    Args:
        x: input ``[B, index.cols * index.groups, H, W]`` (float32, float16 or bfloat16), any
            strides (NCHW and channels_last alike).
        values, bits, index: the compressed weight ``[index.rows, index.cols, kh, kw]``.
        kernel_size, stride, padding, dilation: as for ``conv2d`` (an int or a pair each);
            ``kh * kw`` must equal ``index.ksize``.
        bias: optional ``[index.rows]``, added in float32.
        regen: None (untracked weights are zeros; tiles without a tracked weight are skipped)
            or a :class:`~..contract.Regen`: untracked weights are ``scale * w0``, regenerated
            in every tile load, and every tile is visited.
        block_m, num_warps, num_stages: launch parameters (module docstring).

    Returns:
        ``[B, index.rows, OH, OW]`` of ``x.dtype``, in ``x``'s memory format.
    """
    fn = "sparse_conv2d()"
    index = check_index_tiles(fn, index)
    x = _check_activation(fn, "x", x, index.cols * index.groups)
    kh, kw = _check_kernel_size(fn, kernel_size, index)
    sh, sw = _pair(fn, "stride", stride, 1)
    ph, pw = _pair(fn, "padding", padding, 0)
    dh, dw = _pair(fn, "dilation", dilation, 1)
    values, bits = check_storage(fn, values, bits, index, "x", x.device)
    bias = _check_bias(fn, bias, index.rows, x.device)
    scale, seed, bound = regen_args(fn, regen, x.device)
    nb, _, h, w = x.shape
    oh, ow = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
    if oh <= 0 or ow <= 0:
        raise ValueError(
            f"{fn}: expected a positive output size, got {(oh, ow)} from input {(h, w)}, "
            f"kernel_size {(kh, kw)}, stride {(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}"
        )
    out = torch.empty(
        (nb, index.rows, oh, ow), dtype=x.dtype, device=x.device, memory_format=_memory_format(x)
    )
    m = nb * oh * ow
    if m == 0:
        return out
    block_m, num_warps, num_stages = _launch_config(
        fn, m, x.device, _GPU_BLOCK_M, block_m, num_warps, num_stages
    )
    ngt = index.groups * index.tiles_n
    grid = (triton.cdiv(m, block_m) * ngt,)
    _sparse_conv2d_kernel[grid](
        out,
        x,
        values,
        bits,
        index.row_off,
        index.row_ptr,
        nonempty(index.row_tiles),
        values if bias is None else bias,
        values if scale is None else scale,
        m,
        h,
        w,
        oh,
        ow,
        *x.stride(),
        *out.stride(),
        index.rows_per_group,
        index.cols,
        index.cols * index.ksize,
        index.tiles_n,
        index.tiles_c,
        ngt,
        sh,
        sw,
        ph,
        pw,
        dh,
        dw,
        seed,
        bound,
        KS=index.ksize,
        KW=kw,
        HAS_BIAS=bias is not None,
        HAS_INIT=scale is not None,
        WHILE_LOOP=tu.INTERPRETED,
        DOT_F32=tu.INTERPRETED and x.dtype == torch.bfloat16,
        PRECISION=_precision(x.dtype, x.device),
        OFFS64=tu.needs_offs64(_span(x), out.numel()),
        BLOCK_M=block_m,
        BLOCK_N=index.block_n,
        BLOCK_C=index.block_c,
        num_warps=num_warps,
        num_stages=num_stages,
        enable_fp_fusion=False,
    )
    return out


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
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> Tensor:
    """Gradient of :func:`sparse_conv2d` with respect to its input, from the same storage.

    Args:
        dy: output gradient ``[B, index.rows, OH, OW]``, any strides; ``(OH, OW)`` must be the
            output size of a ``conv2d`` of ``input_hw`` with these parameters.
        input_hw: the input's ``(H, W)`` (positive ints).
        others: as for :func:`sparse_conv2d`.

    Returns:
        ``[B, index.cols * index.groups, H, W]`` of ``dy.dtype``, in ``dy``'s memory format.
    """
    fn = "sparse_conv2d_t()"
    index = check_index_tiles(fn, index)
    dy = _check_activation(fn, "dy", dy, index.rows)
    h, w = _pair(fn, "input_hw", input_hw, 1)
    kh, kw = _check_kernel_size(fn, kernel_size, index)
    sh, sw = _pair(fn, "stride", stride, 1)
    ph, pw = _pair(fn, "padding", padding, 0)
    dh, dw = _pair(fn, "dilation", dilation, 1)
    values, bits = check_storage(fn, values, bits, index, "dy", dy.device)
    scale, seed, bound = regen_args(fn, regen, dy.device)
    oh, ow = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
    if oh <= 0 or ow <= 0:
        raise ValueError(
            f"{fn}: expected a positive output size, got {(oh, ow)} from input_hw {(h, w)}, "
            f"kernel_size {(kh, kw)}, stride {(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}"
        )
    if tuple(dy.shape[2:]) != (oh, ow):
        raise ValueError(
            f"{fn}: expected dy of spatial size {(oh, ow)} (the output size for input_hw "
            f"{(h, w)}), got shape {tuple(dy.shape)}"
        )
    nb = dy.shape[0]
    dx = torch.empty(
        (nb, index.cols * index.groups, h, w),
        dtype=dy.dtype,
        device=dy.device,
        memory_format=_memory_format(dy),
    )
    m = nb * h * w
    if m == 0:
        return dx
    block_m, num_warps, num_stages = _launch_config(
        fn, m, dy.device, _GPU_BLOCK_M_T, block_m, num_warps, num_stages
    )
    ngc = index.groups * index.tiles_c
    grid = (triton.cdiv(m, block_m) * ngc,)
    _sparse_conv2d_t_kernel[grid](
        dx,
        dy,
        values,
        bits,
        index.row_off,
        index.col_ptr,
        nonempty(index.col_tiles),
        values if scale is None else scale,
        m,
        h,
        w,
        oh,
        ow,
        *dy.stride(),
        *dx.stride(),
        index.rows_per_group,
        index.cols,
        index.cols * index.ksize,
        index.tiles_c,
        index.tiles_n,
        ngc,
        sh,
        sw,
        ph,
        pw,
        dh,
        dw,
        seed,
        bound,
        KS=index.ksize,
        KW=kw,
        HAS_INIT=scale is not None,
        WHILE_LOOP=tu.INTERPRETED,
        DOT_F32=tu.INTERPRETED and dy.dtype == torch.bfloat16,
        PRECISION=_precision(dy.dtype, dy.device),
        OFFS64=tu.needs_offs64(_span(dy), dx.numel()),
        BLOCK_M=block_m,
        BLOCK_N=index.block_n,
        BLOCK_C=index.block_c,
        num_warps=num_warps,
        num_stages=num_stages,
        enable_fp_fusion=False,
    )
    return dx
