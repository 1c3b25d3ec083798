"""Helpers shared by the sparse compute kernels: decoding a weight tile from the storage (device)
and the host-side checks of their arguments (the plumbing of every Triton kernel is in
:mod:`..triton_util`).

A tile is ``[BN, BC]`` (rows ``n`` x columns ``c``) at one kernel position ``k`` of ``KS``
(:mod:`.index`). Element ``(n, c, k)`` sits at flat index ``f = n * KROW + c * KS + k``
(``KROW = cols * KS``); its tracked bit is bit ``f % 8`` of byte ``f // 8``, and its value, when
tracked, is ``values[row_off[n, ct] + (tracked bits of row n from the tile's first column up to f)]``.

:func:`tile_start` counts, per (row, column) pair, the tracked bits of the whole kernel and returns
the value index of the pair's first tracked element (``row_off`` plus an exclusive ``cumsum`` along
the columns). :func:`tile_at` then loads the tile at kernel position ``k`` and advances those
indices by the bits it consumed; walking ``k = 0 .. KS-1`` in order visits the tracked elements in
storage order. The same decode serves ``W`` (forward) and ``W^T`` (backward data): the caller only
transposes the loaded tile.

:func:`regen_tile_at` is :func:`tile_at` for a weight whose untracked elements are not zeros but
``scale * w0[f]`` (:class:`~..contract.Regen`): it regenerates them in the tile load, from the seed
and the flat index ``f`` (``w0[f] = (2 * tl.rand(seed, f) - 1) * bound``, float32, rounded to the
values' dtype after the product with ``scale``: what ``materialize`` writes), so the dense weight
is never stored anywhere, not even a tile of it in global memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contract import COMPUTE_DTYPES, Regen
from ..triton_util import f32, is_pow2_at_least, nonempty, round_to
from .index import TileIndex

__all__ = [
    "tile_start",
    "tile_at",
    "tile_bits",
    "regen_tile_at",
    "regen_constants",
    "regen_args",
    "allows_tf32",
    "INPUT_DTYPES",
    "check_index_tiles",
    "check_storage",
]


def allows_tf32(kind: str) -> bool:
    """Whether PyTorch's settings let float32 products of ``kind`` (``"matmul"`` or ``"conv"``)
    run in TF32, as cuBLAS / cuDNN would for the dense layer.

    Reads the ``fp32_precision`` settings where this PyTorch has them (reading the legacy
    ``allow_tf32`` flags raises once the new ones are in use), the legacy flags otherwise.
    """
    if kind == "matmul":
        new, legacy = (
            lambda: torch.backends.cuda.matmul.fp32_precision,
            lambda: torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        new, legacy = (
            lambda: torch.backends.cudnn.conv.fp32_precision,
            lambda: torch.backends.cudnn.allow_tf32,
        )
    try:
        precision = new()
    except AttributeError:
        precision = "none"
    if precision == "none":  # not set for this op: the global setting, then the legacy flag
        try:
            precision = torch.backends.fp32_precision
        except AttributeError:
            precision = "none"
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(legacy())
    except RuntimeError:
        return False


@triton.jit
def tile_bits(bits_ptr, n, c, k, valid, KROW, KS):
    """Tracked bits (int32 0/1) of elements ``(n[:, None], c[None, :], k)``; 0 where not ``valid``."""
    f = n.to(tl.int64)[:, None] * KROW + c.to(tl.int64)[None, :] * KS + k
    byte = tl.load(bits_ptr + (f >> 3), mask=valid, other=0).to(tl.int32)
    return (byte >> (f & 7).to(tl.int32)) & 1


@triton.jit
def tile_start(bits_ptr, row_off_ptr, n, c, ct, valid, KROW, KS, TILES_C):
    """Value index of the first tracked element of every (row, column) pair of the tile."""
    counts = tl.zeros(valid.shape, dtype=tl.int32)
    for k in range(KS):
        counts += tile_bits(bits_ptr, n, c, k, valid, KROW, KS)
    excl = tl.cumsum(counts, axis=1) - counts
    row_valid = tl.max(valid.to(tl.int32), axis=1) > 0
    base = tl.load(row_off_ptr + n.to(tl.int64) * TILES_C + ct, mask=row_valid, other=0)
    return base.to(tl.int64)[:, None] + excl


@triton.jit
def tile_at(values_ptr, bits_ptr, index, n, c, k, valid, KROW, KS):
    """``(tile, next_index)``: the weights at kernel position ``k`` (0 where untracked or not
    ``valid``) and the value indices advanced past them."""
    bit = tile_bits(bits_ptr, n, c, k, valid, KROW, KS)
    w = tl.load(values_ptr + index, mask=valid & (bit != 0), other=0.0)
    return w, index + bit


@triton.jit
def regen_tile_at(values_ptr, bits_ptr, index, n, c, k, valid, KROW, KS, seed, bound, scale):
    """:func:`tile_at` with every untracked element regenerated: ``scale * w0[f]`` (``scale`` and
    ``bound`` float32 scalars), rounded to the values' dtype; 0 where not ``valid``."""
    f = n.to(tl.int64)[:, None] * KROW + c.to(tl.int64)[None, :] * KS + k
    byte = tl.load(bits_ptr + (f >> 3), mask=valid, other=0).to(tl.int32)
    bit = (byte >> (f & 7).to(tl.int32)) & 1
    tracked = bit != 0
    vdt = values_ptr.dtype.element_ty
    v = tl.load(values_ptr + index, mask=valid & tracked, other=0.0)
    w0 = (2.0 * tl.rand(seed, f) - 1.0) * bound
    init = round_to(w0 * scale, vdt)
    w = tl.where(tracked, v, tl.where(valid, init, tl.zeros(init.shape, vdt)))
    return w, index + bit


@triton.jit
def regen_constants(seed, bound, scale_ptr, HAS_INIT: tl.constexpr):
    """``(seed, bound, scale)`` for the tile loads: float32 scalars, read once per program (the
    scale from the device); unused zeros without ``HAS_INIT``."""
    if HAS_INIT:
        scale = tl.load(scale_ptr).to(tl.float32)
        bnd = tl.cast(bound, tl.float32)
    else:
        scale = 0.0
        bnd = 0.0
    return seed, bnd, scale


# ------------------------------------------------------------------------- host-side argument checks

INPUT_DTYPES = COMPUTE_DTYPES
MIN_DOT = 16  # the smallest tl.dot operand side


def check_index_tiles(fn: str, index: object) -> TileIndex:
    """``index`` is a :class:`TileIndex` whose tile sides can be ``tl.dot`` operands."""
    if not isinstance(index, TileIndex):
        raise TypeError(f"{fn}: expected index to be a TileIndex, got {type(index).__name__}")
    for name in ("block_n", "block_c"):
        v = getattr(index, name)
        if not is_pow2_at_least(v, MIN_DOT):
            raise ValueError(
                f"{fn}: expected index.{name} to be a power of two >= {MIN_DOT} (the tile is a "
                f"tl.dot operand), got {v}; rebuild the index with build_tile_index(..., "
                f"{name}=...)"
            )
    return index


def check_storage(
    fn: str, values: object, bits: object, index: TileIndex, input_name: str, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Values and bits of the compressed weight described by ``index``, on the input's device;
    returns them ready for a launch (contiguous, ``values`` never empty)."""
    if not isinstance(values, Tensor):
        raise TypeError(f"{fn}: expected values to be a Tensor, got {type(values).__name__}")
    if values.dtype not in INPUT_DTYPES:
        raise TypeError(
            f"{fn}: expected values of dtype float32, float16 or bfloat16, got {values.dtype}"
        )
    if values.numel() != index.nnz:
        raise ValueError(
            f"{fn}: expected values with index.nnz = {index.nnz} entries, got {values.numel()}"
        )
    if not isinstance(bits, Tensor) or bits.dtype != torch.uint8:
        raise TypeError(f"{fn}: expected bits to be a uint8 tensor, got {bits!r:.80}")
    numel = index.rows * index.cols * index.ksize
    nbytes = (numel + 7) // 8
    if bits.dim() != 1 or bits.numel() != nbytes:
        raise ValueError(
            f"{fn}: expected bits with {nbytes} bytes (one bit per weight, {numel} weights), "
            f"got shape {tuple(bits.shape)}"
        )
    named = [("values", values), ("bits", bits)]
    named += [(f"index.{k}", getattr(index, k)) for k in ("row_off", "row_ptr", "row_tiles")]
    named += [(f"index.{k}", getattr(index, k)) for k in ("col_ptr", "col_tiles")]
    for name, t in named:
        if t.device != device:
            raise ValueError(
                f"{fn}: expected {name} on {input_name}'s device {device}, got {t.device}"
            )
    return nonempty(values.reshape(-1).contiguous()), bits.contiguous()


def regen_args(fn: str, regen: object, device: torch.device) -> tuple[Tensor | None, int, float]:
    """``(scale, seed, bound)`` of a launch from ``regen`` (a :class:`Regen` or None; scale a
    1-element float32 tensor on ``device``, or None without ``regen``)."""
    if regen is None:
        return None, 0, 0.0
    if not isinstance(regen, Regen):
        raise TypeError(f"{fn}: expected regen to be a Regen or None, got {type(regen).__name__}")
    scale = regen.scale
    if not isinstance(scale, Tensor) or scale.numel() != 1 or not scale.is_floating_point():
        raise ValueError(
            f"{fn}: expected regen.scale to be a 1-element float tensor, got {scale!r:.80}"
        )
    if scale.device != device:
        raise ValueError(
            f"{fn}: expected regen.scale on the input's device {device}, got {scale.device}"
        )
    seed = regen.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"{fn}: expected regen.seed an int in [-2**63, 2**64), got {seed!r}")
    return scale.to(torch.float32).reshape(1).contiguous(), seed, f32(regen.bound)
