"""Triton kernels of the sparse linear layer: ``Y = X W^T + b`` and ``dX = dY W`` from the
compressed weight.

Same functions, arguments and results as :mod:`.reference` (the definition), for CUDA
tensors, and for CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, what the CPU tests
use). The dense ``W`` is never materialised: every kernel decodes the ``[block_n, block_c]`` weight
tiles it needs from the flat values, the tracked bits and the :class:`.index.TileIndex`
(:func:`.triton_common.tile_start` / :func:`.triton_common.tile_at`, ``ksize == 1``),
and visits only the tiles that hold at least one tracked weight.

Kernels (private, ``@triton.jit``) and the launchers that allocate and launch them:

* :func:`_linear_kernel` <- :func:`sparse_linear`. A work unit is (m-tile of ``BLOCK_M`` rows of
  ``x``, row tile ``rt`` of ``block_n`` weight rows): it walks the row tile's non-empty column tiles
  ``index.row_tiles[index.row_ptr[rt]:index.row_ptr[rt + 1]]``, decodes each weight tile ``w
  [BLOCK_N, BLOCK_C]`` and accumulates ``x_tile @ w^T`` into a float32 ``[BLOCK_M, BLOCK_N]`` tile,
  then adds the bias and writes ``Y[m-tile, row tile]`` once.
* :func:`_linear_t_kernel` <- :func:`sparse_linear_t`. A unit is (m-tile, column tile ``ct``): it
  walks the column tile's non-empty row tiles ``index.col_tiles[index.col_ptr[ct]:...]``, decodes
  the same tiles from the same storage and accumulates ``dy_tile @ w`` into ``[BLOCK_M, BLOCK_C]``.

A unit whose row (column) tile holds no tracked weight still runs: it writes zeros (plus the bias),
so every output element is written by exactly one unit and the output needs no zero fill.

Regeneration (``regen=``, a :class:`~..contract.Regen`): where the untracked weights are
``scale * w0`` (DropBack, Procrustes before its decay), ``HAS_INIT`` kernels walk every tile of
the row (column) tile instead of the non-empty ones and decode each with
:func:`.triton_common.regen_tile_at`, which draws the untracked weights from the seed in the tile
load: the dense weight exists only as the tile in registers. The cost is a Philox draw per weight
per m-tile, so the schedules are built from equal per-tile work (cached apart).

Schedules (``schedule=``):

* ``"grid"``: one program per unit, in natural order (unit id ``tile * m_tiles + m_tile``, the
  encoding of :class:`.index.Schedule`); the hardware scheduler hands out the programs.
* ``"balanced"`` (default) / ``"unbalanced"``: a persistent kernel of ``programs`` programs (default
  two per SM on CUDA, 4 under the interpreter); program ``p`` runs the units
  ``units[ptr[p]:ptr[p + 1]]`` of :func:`.index.build_schedule` over the per-tile work
  (:meth:`~.index.TileIndex.row_tile_work` forward, :meth:`~.index.TileIndex.col_tile_work`
  backward). ``"balanced"`` deals the units heaviest first in snake order, as the Procrustes
  accelerator balances its half-tiles, so that a few dense row tiles do not make one program the
  long pole; ``"unbalanced"`` is the plain contiguous split it is measured against.

  Schedules are cached in a small module-level dict keyed on ``(id(index), pass, m_tiles,
  programs, balanced)``, so that a training step (one index per optimizer step, many forward and
  backward calls) builds each one once. An entry holds a weak reference to its index and is used
  only while that reference still points at the very same index (an id can be reused once an index
  is freed); beyond :data:`_SCHEDULE_CACHE_SIZE` entries the least recently used one goes.
  :func:`clear_schedule_cache` empties it.

Arithmetic contract (that of :mod:`.reference`): each weight is rounded to the input's
dtype, products are accumulated in float32 by ``tl.dot`` (``out_dtype=float32``), the bias is added
in float32 and the result is rounded once to the input's dtype. float32 inputs use the ``"tf32"``
dot precision only on a GPU with ``torch.backends.cuda.matmul.allow_tf32`` set, else ``"ieee"``.
Under the interpreter the operands of the dot are upcast to float32 (exact for float16 / bfloat16
values, and the interpreter's bfloat16 dot is wrong, docs/dispatch.md); on a GPU float16 / bfloat16
operands go to the tensor cores as they are. Roundings to bfloat16 are done to nearest even on the
bit pattern (the interpreter truncates a plain conversion). Accumulation order is free, so results
agree with the reference to the rounding of a float32 sum, not bit for bit.

Tile shape: ``BLOCK_N = index.block_n`` and ``BLOCK_C = index.block_c``, powers of two of at least
16 (the smallest ``tl.dot`` operand); ``block_m`` (rows of ``x`` per unit, a power of two >= 16),
``num_warps``, ``num_stages`` and ``programs`` are keyword overrides of the per-device defaults.
Offsets into ``x`` and the output are int64 when ``M * K`` or ``M * N`` reach ``2**31`` (weight
offsets always are, in the decode helpers). Every launch passes ``enable_fp_fusion=False``, as
:mod:`..update.triton_kernels` does.

Loops whose bounds are loaded (the tiles of a unit, the units of a persistent program) are ``for``
loops when compiled (the form Triton's software pipeliner works on; not measured on a GPU yet) and
``while`` loops under the interpreter, whose triton 3.6 version cannot take a loaded
scalar as a ``range`` bound (:data:`_WHILE_LOOPS`); the loop bodies are shared.

Over 600 lines on purpose: forward and backward kernels share their
loop bodies, and their launchers and the schedule cache belong with them.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import triton_util as tu
from ..contract import Regen
from ..triton_util import check_device, check_launch, default_block, nonempty, round_to
from .index import Schedule, TileIndex, build_schedule
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

__all__ = ["sparse_linear", "sparse_linear_t", "clear_schedule_cache"]

# The compute functions take ``regen=`` (untracked weights regenerated, see the docstring).
regenerates = True

_SCHEDULES_KINDS = ("grid", "balanced", "unbalanced")

_GPU_BLOCK_M = 128
_GPU_STAGES = 3
_GPU_PROGRAMS_PER_SM = 2
# The interpreter's cost is per program instance and per op, nearly whatever the tile size: fewer,
# larger m-tiles are cheaper, and a few persistent programs are enough to exercise the schedules.
_INTERPRETER_BLOCK_M = 128
_INTERPRETER_PROGRAMS = 4

_SCHEDULE_CACHE_SIZE = 512
_SCHEDULES: OrderedDict[tuple, tuple[weakref.ref, Schedule]] = OrderedDict()


# ---------------------------------------------------------------------------------- device helpers


@triton.jit
def _weight_tile(
    values_ptr,
    bits_ptr,
    row_off_ptr,
    n,
    c,
    ct,
    N,
    K,
    TILES_C,
    seed,
    bound,
    scale,
    W_DT: tl.constexpr,
    DOT_F32: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    """The weights ``W[n, c]`` of one tile (``[BLOCK_N, BLOCK_C]``, 0 where out of range; where
    untracked 0, or with ``HAS_INIT`` ``scale * w0`` regenerated here), rounded to ``W_DT`` (the
    input's dtype), then to float32 with ``DOT_F32``."""
    valid = (n < N)[:, None] & (c < K)[None, :]
    idx = tile_start(bits_ptr, row_off_ptr, n, c, ct, valid, K, 1, TILES_C)
    if HAS_INIT:
        w, _ = regen_tile_at(values_ptr, bits_ptr, idx, n, c, 0, valid, K, 1, seed, bound, scale)
    else:
        w, _ = tile_at(values_ptr, bits_ptr, idx, n, c, 0, valid, K, 1)
    w = round_to(w, W_DT)
    if DOT_F32:
        w = w.to(tl.float32)
    return w


@triton.jit
def _linear_step(
    i,
    acc,
    x_rows,
    m_ok,
    rn,
    values_ptr,
    bits_ptr,
    row_off_ptr,
    row_tiles_ptr,
    N,
    K,
    TILES_C,
    seed,
    bound,
    scale,
    X_DT: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_INIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``acc + x[:, tile] @ w^T`` for the ``i``-th non-empty tile (column tile ``row_tiles[i]``),
    or with ``HAS_INIT`` column tile ``i``."""
    if HAS_INIT:
        ct = i
    else:
        ct = tl.load(row_tiles_ptr + i)
    c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    w = _weight_tile(
        values_ptr, bits_ptr, row_off_ptr, rn, c, ct, N, K, TILES_C, seed, bound, scale, X_DT,
        DOT_F32, HAS_INIT,
    )  # fmt: skip
    xt = tl.load(x_rows + c[None, :], mask=m_ok[:, None] & (c < K)[None, :], other=0.0)
    if DOT_F32:
        xt = xt.to(tl.float32)
    return tl.dot(xt, tl.trans(w), acc, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def _linear_unit(
    j,
    sched_units_ptr,
    y_ptr,
    x_ptr,
    values_ptr,
    bits_ptr,
    row_off_ptr,
    row_ptr_ptr,
    row_tiles_ptr,
    bias_ptr,
    M,
    N,
    K,
    m_tiles,
    TILES_C,
    seed,
    bound,
    scale,
    PERSISTENT: tl.constexpr,
    WHILE_LOOPS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``Y[m-tile, row tile] = X[m-tile] W[row tile]^T + b`` over the row tile's non-empty tiles
    (with ``HAS_INIT`` all of them), for unit ``sched_units[j]`` (``PERSISTENT``) or ``j``."""
    if PERSISTENT:
        unit = tl.load(sched_units_ptr + j)
    else:
        unit = j
    rt = unit // m_tiles
    mt = unit % m_tiles
    rm = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = rt * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    if OFFS64:
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
        y_rows = y_ptr + rm.to(tl.int64)[:, None] * N
    else:
        x_rows = x_ptr + rm[:, None] * K
        y_rows = y_ptr + rm[:, None] * N
    x_dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_INIT:
        lo = 0
        hi = TILES_C
    else:
        lo = tl.load(row_ptr_ptr + rt)
        hi = tl.load(row_ptr_ptr + rt + 1)
    if WHILE_LOOPS:
        i = lo
        while i < hi:
            acc = _linear_step(
                i, acc, x_rows, m_ok, rn, values_ptr, bits_ptr, row_off_ptr, row_tiles_ptr, N, K,
                TILES_C, seed, bound, scale, x_dt, DOT_F32, PRECISION, HAS_INIT, BLOCK_C,
            )  # fmt: skip
            i += 1
    else:
        for i in range(lo, hi):
            acc = _linear_step(
                i, acc, x_rows, m_ok, rn, values_ptr, bits_ptr, row_off_ptr, row_tiles_ptr, N, K,
                TILES_C, seed, bound, scale, x_dt, DOT_F32, PRECISION, HAS_INIT, BLOCK_C,
            )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = round_to(acc, y_ptr.dtype.element_ty)
    tl.store(y_rows + rn[None, :], out, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _linear_t_step(
    i,
    acc,
    dy_rows,
    m_ok,
    c,
    ct,
    values_ptr,
    bits_ptr,
    row_off_ptr,
    col_tiles_ptr,
    N,
    K,
    TILES_C,
    seed,
    bound,
    scale,
    DY_DT: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_INIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``acc + dy[:, tile] @ w`` for the ``i``-th non-empty tile (row tile ``col_tiles[i]``), or
    with ``HAS_INIT`` row tile ``i``."""
    if HAS_INIT:
        t = i
    else:
        t = tl.load(col_tiles_ptr + i)
    rn = t * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _weight_tile(
        values_ptr, bits_ptr, row_off_ptr, rn, c, ct, N, K, TILES_C, seed, bound, scale, DY_DT,
        DOT_F32, HAS_INIT,
    )  # fmt: skip
    dyt = tl.load(dy_rows + rn[None, :], mask=m_ok[:, None] & (rn < N)[None, :], other=0.0)
    if DOT_F32:
        dyt = dyt.to(tl.float32)
    return tl.dot(dyt, w, acc, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def _linear_t_unit(
    j,
    sched_units_ptr,
    dx_ptr,
    dy_ptr,
    values_ptr,
    bits_ptr,
    row_off_ptr,
    col_ptr_ptr,
    col_tiles_ptr,
    M,
    N,
    K,
    m_tiles,
    TILES_C,
    TILES_N,
    seed,
    bound,
    scale,
    PERSISTENT: tl.constexpr,
    WHILE_LOOPS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``dX[m-tile, column tile] = dY[m-tile] W[:, column tile]`` over the column tile's non-empty
    row tiles (with ``HAS_INIT`` all of them), for unit ``sched_units[j]`` (``PERSISTENT``) or
    ``j``."""
    if PERSISTENT:
        unit = tl.load(sched_units_ptr + j)
    else:
        unit = j
    ct = unit // m_tiles
    mt = unit % m_tiles
    rm = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = rm < M
    c_ok = c < K
    if OFFS64:
        dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * N
        dx_rows = dx_ptr + rm.to(tl.int64)[:, None] * K
    else:
        dy_rows = dy_ptr + rm[:, None] * N
        dx_rows = dx_ptr + rm[:, None] * K
    dy_dt = dy_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    if HAS_INIT:
        lo = 0
        hi = TILES_N
    else:
        lo = tl.load(col_ptr_ptr + ct)
        hi = tl.load(col_ptr_ptr + ct + 1)
    if WHILE_LOOPS:
        i = lo
        while i < hi:
            acc = _linear_t_step(
                i, acc, dy_rows, m_ok, c, ct, values_ptr, bits_ptr, row_off_ptr, col_tiles_ptr, N,
                K, TILES_C, seed, bound, scale, dy_dt, DOT_F32, PRECISION, HAS_INIT, BLOCK_N,
            )  # fmt: skip
            i += 1
    else:
        for i in range(lo, hi):
            acc = _linear_t_step(
                i, acc, dy_rows, m_ok, c, ct, values_ptr, bits_ptr, row_off_ptr, col_tiles_ptr, N,
                K, TILES_C, seed, bound, scale, dy_dt, DOT_F32, PRECISION, HAS_INIT, BLOCK_N,
            )  # fmt: skip
    out = round_to(acc, dx_ptr.dtype.element_ty)
    tl.store(dx_rows + c[None, :], out, mask=m_ok[:, None] & c_ok[None, :])


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _units(sched_ptr_ptr, PERSISTENT: tl.constexpr):
    """``[lo, hi)``: this program's range of positions in the schedule (``PERSISTENT``), or its
    own unit ``[pid, pid + 1)``."""
    pid = tl.program_id(0)
    if PERSISTENT:
        lo = tl.load(sched_ptr_ptr + pid)
        hi = tl.load(sched_ptr_ptr + pid + 1)
    else:
        lo = pid
        hi = pid + 1
    return lo, hi


@triton.jit
def _linear_kernel(
    y_ptr,
    x_ptr,
    values_ptr,
    bits_ptr,
    row_off_ptr,
    row_ptr_ptr,
    row_tiles_ptr,
    bias_ptr,
    sched_ptr_ptr,
    sched_units_ptr,
    scale_ptr,
    M,
    N,
    K,
    m_tiles,
    TILES_C,
    seed,
    bound,
    PERSISTENT: tl.constexpr,
    WHILE_LOOPS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Forward units: program ``pid`` runs unit ``pid`` (grid), or with ``PERSISTENT`` the units
    ``sched_units[sched_ptr[pid]:sched_ptr[pid + 1]]`` in order. With ``HAS_INIT`` the untracked
    weights are ``scale * w0`` (``scale_ptr``, ``seed``, ``bound``), regenerated in the tile
    loads, and every tile is visited."""
    lo, hi = _units(sched_ptr_ptr, PERSISTENT)
    seed, bound, scale = regen_constants(seed, bound, scale_ptr, HAS_INIT)
    if WHILE_LOOPS:
        j = lo
        while j < hi:
            _linear_unit(
                j, sched_units_ptr, y_ptr, x_ptr, values_ptr, bits_ptr, row_off_ptr, row_ptr_ptr,
                row_tiles_ptr, bias_ptr, M, N, K, m_tiles, TILES_C, seed, bound, scale,
                PERSISTENT, WHILE_LOOPS, HAS_BIAS, HAS_INIT, DOT_F32, PRECISION, OFFS64, BLOCK_M,
                BLOCK_N, BLOCK_C,
            )  # fmt: skip
            j += 1
    else:
        for j in range(lo, hi):
            _linear_unit(
                j, sched_units_ptr, y_ptr, x_ptr, values_ptr, bits_ptr, row_off_ptr, row_ptr_ptr,
                row_tiles_ptr, bias_ptr, M, N, K, m_tiles, TILES_C, seed, bound, scale,
                PERSISTENT, WHILE_LOOPS, HAS_BIAS, HAS_INIT, DOT_F32, PRECISION, OFFS64, BLOCK_M,
                BLOCK_N, BLOCK_C,
            )  # fmt: skip


@triton.jit
def _linear_t_kernel(
    dx_ptr,
    dy_ptr,
    values_ptr,
    bits_ptr,
    row_off_ptr,
    col_ptr_ptr,
    col_tiles_ptr,
    sched_ptr_ptr,
    sched_units_ptr,
    scale_ptr,
    M,
    N,
    K,
    m_tiles,
    TILES_C,
    TILES_N,
    seed,
    bound,
    PERSISTENT: tl.constexpr,
    WHILE_LOOPS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward-data units, scheduled and regenerating as in :func:`_linear_kernel`."""
    lo, hi = _units(sched_ptr_ptr, PERSISTENT)
    seed, bound, scale = regen_constants(seed, bound, scale_ptr, HAS_INIT)
    if WHILE_LOOPS:
        j = lo
        while j < hi:
            _linear_t_unit(
                j, sched_units_ptr, dx_ptr, dy_ptr, values_ptr, bits_ptr, row_off_ptr, col_ptr_ptr,
                col_tiles_ptr, M, N, K, m_tiles, TILES_C, TILES_N, seed, bound, scale, PERSISTENT,
                WHILE_LOOPS, HAS_INIT, DOT_F32, PRECISION, OFFS64, BLOCK_M, BLOCK_N, BLOCK_C,
            )  # fmt: skip
            j += 1
    else:
        for j in range(lo, hi):
            _linear_t_unit(
                j, sched_units_ptr, dx_ptr, dy_ptr, values_ptr, bits_ptr, row_off_ptr, col_ptr_ptr,
                col_tiles_ptr, M, N, K, m_tiles, TILES_C, TILES_N, seed, bound, scale, PERSISTENT,
                WHILE_LOOPS, HAS_INIT, DOT_F32, PRECISION, OFFS64, BLOCK_M, BLOCK_N, BLOCK_C,
            )  # fmt: skip


# ---------------------------------------------------------------------------------------- launchers

# Loops over loaded bounds are ``while`` loops under the interpreter: triton 3.6's interpreter
# cannot take a loaded scalar as a ``range`` bound (numpy 2 refuses int() of its 1-element array).
# Compiled, they are ``for`` loops, which the pipeliner handles. A module constant: tests run the
# ``for`` form under the interpreter too, where triton allows it.
_WHILE_LOOPS = tu.INTERPRETED


def clear_schedule_cache() -> None:
    """Forget every cached schedule (see the module docstring)."""
    _SCHEDULES.clear()


def _schedule(
    index: TileIndex,
    backward: bool,
    m_tiles: int,
    programs: int,
    balanced: bool,
    every: bool = False,
) -> Schedule:
    """The cached :func:`build_schedule` of ``index``'s forward (row tile) or backward (column
    tile) work: its non-empty tiles, or with ``every`` all of them (the regenerating kernels)."""
    key = (id(index), backward, m_tiles, programs, balanced, every)
    hit = _SCHEDULES.get(key)
    if hit is not None and hit[0]() is index:
        _SCHEDULES.move_to_end(key)
        return hit[1]
    work = index.col_tile_work() if backward else index.row_tile_work()
    if every:
        work = torch.full_like(work, index.tiles_n if backward else index.tiles_c)
    sched = build_schedule(work, m_tiles, programs, balanced=balanced)
    _SCHEDULES[key] = (weakref.ref(index), sched)
    _SCHEDULES.move_to_end(key)
    while len(_SCHEDULES) > _SCHEDULE_CACHE_SIZE:
        _SCHEDULES.popitem(last=False)  # least recently used
    return sched


def _check_args(
    fn: str, name: str, inp: object, dim: str, values: object, bits: object, index: object
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate the input (``[M, index.<dim>]``), the storage and the index; return the input and
    the storage ready for a launch."""
    index = check_index_tiles(fn, index)
    if index.ksize != 1 or index.groups != 1:
        raise ValueError(
            f"{fn}: expected index with ksize == 1 and groups == 1 (a linear layer), "
            f"got ksize={index.ksize}, groups={index.groups}"
        )
    k = getattr(index, dim)
    if not isinstance(inp, Tensor):
        raise TypeError(f"{fn}: expected {name} to be a Tensor, got {type(inp).__name__}")
    if inp.dim() != 2 or inp.shape[1] != k:
        raise ValueError(
            f"{fn}: expected {name} of shape [M, {k}] (index.{dim} = {k}), got {tuple(inp.shape)}"
        )
    if inp.dtype not in INPUT_DTYPES:
        raise TypeError(
            f"{fn}: expected {name} of dtype float32, float16 or bfloat16, got {inp.dtype}"
        )
    device = inp.device
    check_device(fn, inp, name)
    values, bits = check_storage(fn, values, bits, index, name, device)
    return inp, values, bits


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_config(
    fn: str,
    m: int,
    out_cols: int,
    device: torch.device,
    schedule: str,
    block_m: int | None,
    num_warps: int | None,
    num_stages: int | None,
    programs: int | None,
) -> tuple[int, int, int, int]:
    """``(block_m, num_warps, num_stages, programs)`` from the overrides and per-device defaults."""
    if schedule not in _SCHEDULES_KINDS:
        raise ValueError(
            f"{fn}: expected schedule one of {', '.join(map(repr, _SCHEDULES_KINDS))}, got {schedule!r}"
        )
    check_launch(fn, block_m, num_warps, num_stages, block_min=MIN_DOT)
    if block_m is None:
        block_m = default_block(m, MIN_DOT, _GPU_BLOCK_M, _INTERPRETER_BLOCK_M)
    if num_warps is None:
        num_warps = 8 if block_m * out_cols >= 128 * 128 else 4
    if num_stages is None:
        num_stages = _GPU_STAGES
    if programs is None:
        if tu.INTERPRETED:
            programs = _INTERPRETER_PROGRAMS
        else:
            programs = _GPU_PROGRAMS_PER_SM * _sm_count(device)
    elif not isinstance(programs, int) or isinstance(programs, bool) or programs < 1:
        raise ValueError(f"{fn}: expected programs a positive int, got {programs!r}")
    return block_m, num_warps, num_stages, programs


def _dot_config(dtype: torch.dtype) -> tuple[bool, str]:
    """``(DOT_F32, PRECISION)``: whether the dot's operands are upcast to float32 (under the
    interpreter), and the float32 dot precision."""
    tf32 = dtype == torch.float32 and not tu.INTERPRETED and allows_tf32("matmul")
    return tu.INTERPRETED, "tf32" if tf32 else "ieee"


def _grid_and_schedule(
    index: TileIndex,
    backward: bool,
    tiles: int,
    m_tiles: int,
    schedule: str,
    programs: int,
    every: bool,
) -> tuple[tuple[int], Tensor | None, Tensor | None]:
    if schedule == "grid":
        return (tiles * m_tiles,), None, None
    sched = _schedule(index, backward, m_tiles, programs, schedule == "balanced", every)
    return (sched.programs,), sched.ptr, sched.units


def sparse_linear(
    x: Tensor,
    values: Tensor,
    bits: Tensor,
    index: TileIndex,
    bias: Tensor | None = None,
    *,
    regen: Regen | None = None,
    schedule: str = "balanced",
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    programs: int | None = None,
) -> Tensor:
    """``x @ W^T + bias`` (``[M, index.rows]``, ``x``'s dtype) from the compressed weight.

    Args:
        x: ``[M, index.cols]`` float32 / float16 / bfloat16.
        values: the tracked weights in flat row-major order (``index.nnz`` of float32 / float16 /
            bfloat16); each is rounded to ``x``'s dtype.
        bits: uint8 tracked-bit mask of the ``rows * cols`` weights.
        index: the weight's :class:`TileIndex` (``ksize == 1``, ``groups == 1``, ``block_n`` and
            ``block_c`` powers of two >= 16).
        bias: optional ``[index.rows]``, added in float32.
        regen: None (untracked weights are zeros: the tiles without a tracked weight are
            skipped) or a :class:`~..contract.Regen`: untracked weights are ``scale * w0``,
            regenerated in every tile load, and every tile is visited.
        schedule: ``"grid"``, ``"balanced"`` or ``"unbalanced"`` (module docstring).
        block_m, num_warps, num_stages, programs: launch overrides (module docstring).
    """
    fn = "sparse_linear()"
    x, values, bits = _check_args(fn, "x", x, "cols", values, bits, index)
    device = x.device
    scale, seed, bound = regen_args(fn, regen, device)
    m, n, k = x.shape[0], index.rows, index.cols
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(
                f"{fn}: expected bias to be a Tensor or None, got {type(bias).__name__}"
            )
        if bias.dim() != 1 or bias.shape[0] != n:
            raise ValueError(f"{fn}: expected bias of shape [{n}], got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"{fn}: expected a floating-point bias, got {bias.dtype}")
        if bias.device != device:
            raise ValueError(f"{fn}: expected bias on x's device {device}, got {bias.device}")
    block_m, num_warps, num_stages, programs = _launch_config(
        fn, m, index.block_n, device, schedule, block_m, num_warps, num_stages, programs
    )
    y = torch.empty(m, n, dtype=x.dtype, device=device)
    if m == 0:
        return y
    m_tiles = triton.cdiv(m, block_m)
    grid, sched_ptr, sched_units = _grid_and_schedule(
        index, False, index.tiles_n, m_tiles, schedule, programs, scale is not None
    )
    dot_f32, precision = _dot_config(x.dtype)
    dummy = index.row_ptr
    _linear_kernel[grid](
        y,
        x.contiguous(),
        values,
        bits,
        index.row_off,
        index.row_ptr,
        nonempty(index.row_tiles),
        x if bias is None else bias.contiguous(),
        dummy if sched_ptr is None else sched_ptr,
        dummy if sched_units is None else sched_units,
        x if scale is None else scale,
        m,
        n,
        k,
        m_tiles,
        index.tiles_c,
        seed,
        bound,
        PERSISTENT=sched_ptr is not None,
        WHILE_LOOPS=_WHILE_LOOPS,
        HAS_BIAS=bias is not None,
        HAS_INIT=scale is not None,
        DOT_F32=dot_f32,
        PRECISION=precision,
        OFFS64=tu.needs_offs64(m * k, m * n),
        BLOCK_M=block_m,
        BLOCK_N=index.block_n,
        BLOCK_C=index.block_c,
        num_warps=num_warps,
        num_stages=num_stages,
        enable_fp_fusion=False,
    )
    return y


def sparse_linear_t(
    dy: Tensor,
    values: Tensor,
    bits: Tensor,
    index: TileIndex,
    *,
    regen: Regen | None = None,
    schedule: str = "balanced",
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    programs: int | None = None,
) -> Tensor:
    """``dy @ W`` (``[M, index.cols]``, ``dy``'s dtype): the input gradient of
    :func:`sparse_linear`, from the same storage. Arguments as in :func:`sparse_linear`, with
    ``dy`` of shape ``[M, index.rows]``."""
    fn = "sparse_linear_t()"
    dy, values, bits = _check_args(fn, "dy", dy, "rows", values, bits, index)
    device = dy.device
    scale, seed, bound = regen_args(fn, regen, device)
    m, n, k = dy.shape[0], index.rows, index.cols
    block_m, num_warps, num_stages, programs = _launch_config(
        fn, m, index.block_c, device, schedule, block_m, num_warps, num_stages, programs
    )
    dx = torch.empty(m, k, dtype=dy.dtype, device=device)
    if m == 0:
        return dx
    m_tiles = triton.cdiv(m, block_m)
    grid, sched_ptr, sched_units = _grid_and_schedule(
        index, True, index.tiles_c, m_tiles, schedule, programs, scale is not None
    )
    dot_f32, precision = _dot_config(dy.dtype)
    dummy = index.col_ptr
    _linear_t_kernel[grid](
        dx,
        dy.contiguous(),
        values,
        bits,
        index.row_off,
        index.col_ptr,
        nonempty(index.col_tiles),
        dummy if sched_ptr is None else sched_ptr,
        dummy if sched_units is None else sched_units,
        dy if scale is None else scale,
        m,
        n,
        k,
        m_tiles,
        index.tiles_c,
        index.tiles_n,
        seed,
        bound,
        PERSISTENT=sched_ptr is not None,
        WHILE_LOOPS=_WHILE_LOOPS,
        HAS_INIT=scale is not None,
        DOT_F32=dot_f32,
        PRECISION=precision,
        OFFS64=tu.needs_offs64(m * k, m * n),
        BLOCK_M=block_m,
        BLOCK_N=index.block_n,
        BLOCK_C=index.block_c,
        num_warps=num_warps,
        num_stages=num_stages,
        enable_fp_fusion=False,
    )
    return dx
