"""Triton kernels for the weight ops: the ``"triton"`` backend of :mod:`procrustes_kernels.ops`.

Same functions, arguments and results as :mod:`.reference` (the definition), for CUDA tensors, and
for CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, what the CPU tests use).

Every kernel walks the flat weight in tiles of whole 256-element storage groups, viewed as a
``[BLOCK // 256, 256]`` tile whose row ``r`` is group ``pid * BLOCK // 256 + r``. A tracked
element's index into the packed values is then ``group_ptr[group]`` plus an exclusive ``cumsum`` of
the tile's tracked bits along the row, so no kernel needs anything but its own tile and one pointer
per group. The initial values ``w0`` are regenerated with ``tl.rand`` where they are needed, and the
update kernels recompute candidate and score per element from the gradient (read once per pass):
neither ``w0`` nor the effective weight is ever materialised densely.

Kernels (private, ``@triton.jit``) and the launchers that allocate and launch them:

* :func:`_materialize_kernel` <- :func:`materialize`
* :func:`_score_stats_kernel` <- :func:`log_histogram`, :func:`radix_histogram`
* :func:`_scores_kernel` <- :func:`scores` (every element's score, for selections that need them
  all at once: the tile granularity of the optimizer, ``quantile_paper``)
* :func:`_compact_count_kernel`, :func:`_compact_write_kernel` <- :func:`compact` (a count pass,
  prefix sums over the per-group counts with torch, a write pass)

Block sizes are launch parameters (``block``, ``num_warps``): powers of two of at least 256
elements. The defaults suit a GPU; on CPU tensors the interpreter's cost is per program instance,
so the default there is one large block.

Scalars: the float32 ones (bound, scales, threshold) are rounded on the host and cast to float32 in
the kernel, because the interpreter hands float arguments over as Python floats and would compute
scalar-by-scalar products in float64. ``lr``, ``momentum`` and ``weight_decay`` travel as the int64
bit pattern of their float64 value (Triton has no float64 scalar arguments) and are rounded to the
compute dtype in the kernel, as torch rounds a Python scalar to the tensor's dtype.

Every launch passes ``enable_fp_fusion=False``. The reference rounds ``scale * w0`` before it
subtracts it from the candidate; fused into a multiply-add, the exact zero score of a weight that did
not move would become a rounding residue, and zero scores are never kept. Unfused, the GPU does the
same roundings as the interpreter.

Over 600 lines on purpose: the five kernels share the device helpers
at the top, and each launcher sits next to the kernel whose arguments it builds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import triton_util as tu
from ..contract import (
    GROUP_SIZE,
    HIST_BASE,
    HIST_BINS,
    HIST_SHIFT,
    RADIX_HIGH_BINS,
    RADIX_LOW_BINS,
    Compacted,
    Segment,
    StepParams,
    check_range,
)
from ..triton_util import (
    check_device,
    check_launch,
    default_block,
    f32,
    f64_bits,
    nonempty,
    round_to,
)

__all__ = ["materialize", "scores", "log_histogram", "radix_histogram", "compact"]

_GROUP = tl.constexpr(GROUP_SIZE)
# Bytes of the bit mask per group (GROUP_SIZE is a multiple of 8, so groups start on byte borders).
_GROUP_BYTES = tl.constexpr(GROUP_SIZE // 8)

# Log bins of selection.score_histogram, cut on the float32 bit pattern.
_HIST_SHIFT = tl.constexpr(HIST_SHIFT)
_HIST_BASE = tl.constexpr(HIST_BASE)
_HIST_BINS = tl.constexpr(HIST_BINS)
# tl.histogram wants a power-of-two bin count; bins past HIST_BINS stay empty (the bin is clamped).
_HIST_PAD = tl.constexpr(triton.next_power_of_2(HIST_BINS))

_MODE_LOG, _MODE_RADIX_HIGH, _MODE_RADIX_LOW = 0, 1, 2

_GPU_BLOCK = 1024
_GPU_WARPS = 4
_INTERPRETER_BLOCK = 1 << 16  # ~44 ms per 1M elements instead of ~570 ms at 1024 (docs/dispatch.md)


# ---------------------------------------------------------------------------------- device helpers


@triton.jit
def _tile(pid, numel, ROWS: tl.constexpr, OFFS64: tl.constexpr):
    """Groups, in-row columns, flat offsets and in-range mask of tile ``pid``.

    ``OFFS64`` makes the offsets int64 (weights of 2**31 elements or more); ``tl.rand`` gives the
    same numbers for int32 and int64 offsets below 2**31.
    """
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, _GROUP)
    if OFFS64:
        group = pid.to(tl.int64) * ROWS + rows
    else:
        group = pid * ROWS + rows
    offs = group[:, None] * _GROUP + cols[None, :]
    return group, cols, offs, offs < numel


@triton.jit
def _tracked_rank(bits_ptr, group_ptr_ptr, group, cols, offs, in_range, ngroups):
    """Tracked bit of every element and, for tracked ones, its index into the packed values.

    ``tracked[e] = bit (e % 8) of bits[e // 8]``;
    ``rank[e] = group_ptr[e // 256] + sum(tracked[group start .. e - 1])``.
    """
    byte = tl.load(bits_ptr + offs // 8, mask=in_range, other=0).to(tl.int32)
    # Rows start at multiples of 256, so the column's bit position is the element's.
    tracked = ((byte >> (cols % 8)[None, :]) & 1) != 0
    t = tracked.to(tl.int32)
    base = tl.load(group_ptr_ptr + group, mask=group < ngroups, other=0)
    return tracked, base[:, None] + (tl.cumsum(t, axis=1) - t)


@triton.jit
def _init_values(seed, offs, bound):
    """``w0 = (2 * u - 1) * bound`` in float32 with ``u = tl.rand(seed, offs)``, in this order."""
    u = tl.rand(seed, offs)
    return (2.0 * u - 1.0) * bound


@triton.jit
def _f64_arg(bits):
    """A float64 scalar passed as its int64 bit pattern (Triton passes Python floats as fp32)."""
    return tl.cast(bits, tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _step_tile(
    offs,
    in_range,
    tracked,
    rank,
    values_ptr,
    mom_ptr,
    grad_ptr,
    seed,
    bound,
    scale_prev,
    scale,
    lr_bits,
    mu_bits,
    wd_bits,
    CDT: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOM: tl.constexpr,
):
    """Candidate ``c``, momentum ``m`` and float32 score ``s`` of every element of a tile.

    In the compute dtype ``CDT`` (float32, or float64 for float64 layers)::

        W  = tracked ? values[rank] : CDT(VDT(scale_prev * w0))     (VDT: the values' dtype)
        g' = g + wd * W                                       (HAS_WD)
        m  = tracked ? mu * mom[rank] + g' : g'               (HAS_MOM, else m = g')
        c  = W + (-lr) * m
        s  = float32(|c - CDT(VDT(scale * w0))|)

    ``w0 * scale_prev`` and ``w0 * scale`` are float32 products, as in the reference; without
    ``HAS_INIT`` both scales are 0 and ``w0`` is not generated.
    """
    live = in_range & tracked
    if HAS_INIT:
        w0 = _init_values(seed, offs, bound)
        # Rounded to the layer dtype first: the untracked weights the forward pass used.
        untracked = round_to(w0 * scale_prev, values_ptr.dtype.element_ty).to(CDT)
        target = round_to(w0 * scale, values_ptr.dtype.element_ty).to(CDT)
    else:
        untracked = tl.zeros(offs.shape, CDT)
        target = tl.zeros(offs.shape, CDT)
    v = tl.load(values_ptr + rank, mask=live, other=0.0).to(CDT)
    w = tl.where(tracked, v, untracked)
    g = tl.load(grad_ptr + offs, mask=in_range, other=0.0).to(CDT)
    if HAS_WD:
        g = g + _f64_arg(wd_bits).to(CDT) * w
    m = g
    if HAS_MOM:
        mom = tl.load(mom_ptr + rank, mask=live, other=0.0).to(CDT)
        m = tl.where(tracked, mom * _f64_arg(mu_bits).to(CDT) + g, g)
    c = w + (-_f64_arg(lr_bits).to(CDT)) * m
    s = tl.abs(c - target).to(tl.float32)
    return c, m, s


@triton.jit
def _add_log_histogram(
    hist_ptr,
    s,
    in_range,
    SHIFT: tl.constexpr,
    BASE: tl.constexpr,
    NBINS: tl.constexpr,
    PAD: tl.constexpr,
    LOCAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Add the scores of a tile to the global log histogram.

    ``bin = clamp((bits(s) >> SHIFT) - BASE, 0, NBINS - 1)``. ``LOCAL``: count the tile with
    ``tl.histogram`` and add only its non-empty bins, else one atomic add per element.
    """
    bins = (s.to(tl.int32, bitcast=True) >> SHIFT) - BASE
    bins = tl.minimum(tl.maximum(bins, 0), NBINS - 1)
    if LOCAL:
        counts = tl.histogram(tl.reshape(bins, (BLOCK,)), PAD, mask=tl.reshape(in_range, (BLOCK,)))
        idx = tl.arange(0, PAD)
        tl.atomic_add(
            hist_ptr + idx, counts.to(tl.int64), mask=(counts != 0) & (idx < NBINS), sem="relaxed"
        )
    else:
        ones = tl.full(bins.shape, 1, tl.int64)
        tl.atomic_add(hist_ptr + bins, ones, mask=in_range, sem="relaxed")


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _materialize_kernel(
    out_ptr,
    values_ptr,
    bits_ptr,
    group_ptr_ptr,
    seed,
    bound,
    scale,
    first_group,
    stop,
    ngroups,
    HAS_INIT: tl.constexpr,
    SCALE_IS_PTR: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out[e - start] = tracked[e] ? values[rank[e]] : OUT(float32(scale * w0[e]))`` for the
    elements ``e`` in ``[start, stop)``, ``start = first_group * 256``.

    ``w0[e] = (2 * tl.rand(seed, e) - 1) * bound`` (float32); without ``HAS_INIT`` (scale 0) the
    untracked elements are +0 and nothing is generated. With ``SCALE_IS_PTR`` the scale is read
    from a float32 device scalar (no host read of the decay factor).
    """
    group, cols, offs, _ = _tile(tl.program_id(0), stop, BLOCK // _GROUP, OFFS64)
    group += first_group
    offs += first_group * _GROUP
    in_range = offs < stop
    tracked, rank = _tracked_rank(bits_ptr, group_ptr_ptr, group, cols, offs, in_range, ngroups)
    out_ty = out_ptr.dtype.element_ty
    v = round_to(tl.load(values_ptr + rank, mask=in_range & tracked, other=0.0), out_ty)
    if HAS_INIT:
        w0 = _init_values(seed, offs, tl.cast(bound, tl.float32))
        if SCALE_IS_PTR:
            s = tl.load(scale).to(tl.float32)
        else:
            s = tl.cast(scale, tl.float32)
        init = round_to(w0 * s, out_ty)
    else:
        init = tl.zeros(offs.shape, out_ty)
    tl.store(out_ptr + (offs - first_group * _GROUP), tl.where(tracked, v, init), mask=in_range)


@triton.jit
def _score_stats_kernel(
    hist_ptr,
    values_ptr,
    mom_ptr,
    bits_ptr,
    group_ptr_ptr,
    grad_ptr,
    seed,
    bound,
    scale_prev,
    scale,
    lr_bits,
    mu_bits,
    wd_bits,
    numel,
    ngroups,
    high,
    MODE: tl.constexpr,
    LOCAL_HIST: tl.constexpr,
    CDT: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOM: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Histogram of the scores ``s`` (see :func:`_step_tile`), added into ``hist`` (int64).

    ``MODE`` 0: log bins ``clamp((bits(s) >> 18) - BASE, 0, HIST_BINS - 1)``;
    1: ``bits(s) >> 16`` (radix high); 2: ``bits(s) & 0xFFFF`` over ``bits(s) >> 16 == high``.
    """
    group, cols, offs, in_range = _tile(tl.program_id(0), numel, BLOCK // _GROUP, OFFS64)
    tracked, rank = _tracked_rank(bits_ptr, group_ptr_ptr, group, cols, offs, in_range, ngroups)
    _, _, s = _step_tile(
        offs,
        in_range,
        tracked,
        rank,
        values_ptr,
        mom_ptr,
        grad_ptr,
        seed,
        tl.cast(bound, tl.float32),
        tl.cast(scale_prev, tl.float32),
        tl.cast(scale, tl.float32),
        lr_bits,
        mu_bits,
        wd_bits,
        CDT,
        HAS_INIT,
        HAS_WD,
        HAS_MOM,
    )
    if MODE == 0:
        _add_log_histogram(
            hist_ptr, s, in_range, _HIST_SHIFT, _HIST_BASE, _HIST_BINS, _HIST_PAD, LOCAL_HIST, BLOCK
        )
    else:
        bits = s.to(tl.int32, bitcast=True)
        # |.| leaves the sign bit clear; the guard only keeps a stray pattern inside the table.
        ok = in_range & (bits >= 0)
        ones = tl.full(bits.shape, 1, tl.int64)
        if MODE == 1:
            tl.atomic_add(hist_ptr + (bits >> 16), ones, mask=ok, sem="relaxed")
        else:
            ok = ok & ((bits >> 16) == high)
            tl.atomic_add(hist_ptr + (bits & 0xFFFF), ones, mask=ok, sem="relaxed")


@triton.jit
def _scores_kernel(
    out_ptr,
    values_ptr,
    mom_ptr,
    bits_ptr,
    group_ptr_ptr,
    grad_ptr,
    seed,
    bound,
    scale_prev,
    scale,
    lr_bits,
    mu_bits,
    wd_bits,
    numel,
    ngroups,
    CDT: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOM: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out[e] = s[e]`` (float32) for every element: the score of :func:`_step_tile`."""
    group, cols, offs, in_range = _tile(tl.program_id(0), numel, BLOCK // _GROUP, OFFS64)
    tracked, rank = _tracked_rank(bits_ptr, group_ptr_ptr, group, cols, offs, in_range, ngroups)
    _, _, s = _step_tile(
        offs,
        in_range,
        tracked,
        rank,
        values_ptr,
        mom_ptr,
        grad_ptr,
        seed,
        tl.cast(bound, tl.float32),
        tl.cast(scale_prev, tl.float32),
        tl.cast(scale, tl.float32),
        lr_bits,
        mu_bits,
        wd_bits,
        CDT,
        HAS_INIT,
        HAS_WD,
        HAS_MOM,
    )
    tl.store(out_ptr + offs, s, mask=in_range)


@triton.jit
def _compact_count_kernel(
    kept_ptr,
    ties_ptr,
    hist_ptr,
    values_ptr,
    mom_ptr,
    bits_ptr,
    group_ptr_ptr,
    grad_ptr,
    seed,
    bound,
    scale_prev,
    scale,
    lr_bits,
    mu_bits,
    wd_bits,
    threshold,
    numel,
    ngroups,
    COUNT_TIES: tl.constexpr,
    WITH_HIST: tl.constexpr,
    LOCAL_HIST: tl.constexpr,
    CDT: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOM: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per group ``q``: ``kept[q] = #{e in q: s[e] > threshold}``, ``ties[q] = #{s[e] == threshold}``
    (``COUNT_TIES``); ``WITH_HIST`` also adds the scores to the log histogram ``hist``."""
    group, cols, offs, in_range = _tile(tl.program_id(0), numel, BLOCK // _GROUP, OFFS64)
    tracked, rank = _tracked_rank(bits_ptr, group_ptr_ptr, group, cols, offs, in_range, ngroups)
    _, _, s = _step_tile(
        offs,
        in_range,
        tracked,
        rank,
        values_ptr,
        mom_ptr,
        grad_ptr,
        seed,
        tl.cast(bound, tl.float32),
        tl.cast(scale_prev, tl.float32),
        tl.cast(scale, tl.float32),
        lr_bits,
        mu_bits,
        wd_bits,
        CDT,
        HAS_INIT,
        HAS_WD,
        HAS_MOM,
    )
    thr = tl.cast(threshold, tl.float32)
    in_groups = group < ngroups
    tl.store(kept_ptr + group, tl.sum((in_range & (s > thr)).to(tl.int32), axis=1), mask=in_groups)
    if COUNT_TIES:
        tie = (in_range & (s == thr)).to(tl.int32)
        tl.store(ties_ptr + group, tl.sum(tie, axis=1), mask=in_groups)
    if WITH_HIST:
        _add_log_histogram(
            hist_ptr, s, in_range, _HIST_SHIFT, _HIST_BASE, _HIST_BINS, _HIST_PAD, LOCAL_HIST, BLOCK
        )


@triton.jit
def _compact_write_kernel(
    out_values_ptr,
    out_mom_ptr,
    out_bits_ptr,
    out_group_ptr_ptr,
    allow_ptr,
    values_ptr,
    mom_ptr,
    bits_ptr,
    group_ptr_ptr,
    grad_ptr,
    seed,
    bound,
    scale_prev,
    scale,
    lr_bits,
    mu_bits,
    wd_bits,
    threshold,
    numel,
    ngroups,
    nbytes,
    TIES: tl.constexpr,
    WRITE_MOM: tl.constexpr,
    CDT: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOM: tl.constexpr,
    OFFS64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Write the new tracked set: ``keep[e] = s[e] > threshold`` or (``TIES``) ``s[e] == threshold``
    and ``e`` is among the first ``allow[q]`` ties of its group ``q``.

    Kept elements go to ``out_values[out_group_ptr[q] + #{kept before e in q}] = c[e]`` (and ``m[e]``
    to ``out_mom`` with ``WRITE_MOM``); ``out_bits`` gets every byte of the packed keep mask.
    """
    pid = tl.program_id(0)
    group, cols, offs, in_range = _tile(pid, numel, BLOCK // _GROUP, OFFS64)
    tracked, rank = _tracked_rank(bits_ptr, group_ptr_ptr, group, cols, offs, in_range, ngroups)
    c, m, s = _step_tile(
        offs,
        in_range,
        tracked,
        rank,
        values_ptr,
        mom_ptr,
        grad_ptr,
        seed,
        tl.cast(bound, tl.float32),
        tl.cast(scale_prev, tl.float32),
        tl.cast(scale, tl.float32),
        lr_bits,
        mu_bits,
        wd_bits,
        CDT,
        HAS_INIT,
        HAS_WD,
        HAS_MOM,
    )
    thr = tl.cast(threshold, tl.float32)
    in_groups = group < ngroups
    keep = in_range & (s > thr)
    if TIES:
        tie = (in_range & (s == thr)).to(tl.int32)
        allow = tl.load(allow_ptr + group, mask=in_groups, other=0)
        keep = keep | ((tie != 0) & ((tl.cumsum(tie, axis=1) - tie) < allow[:, None]))
    k = keep.to(tl.int32)
    base = tl.load(out_group_ptr_ptr + group, mask=in_groups, other=0)
    pos = base[:, None] + (tl.cumsum(k, axis=1) - k)
    tl.store(out_values_ptr + pos, round_to(c, out_values_ptr.dtype.element_ty), mask=keep)
    if WRITE_MOM:
        tl.store(out_mom_ptr + pos, round_to(m, out_mom_ptr.dtype.element_ty), mask=keep)
    nb: tl.constexpr = (BLOCK // _GROUP) * _GROUP_BYTES
    packed = tl.sum(tl.reshape(k << (cols % 8)[None, :], (nb, 8)), axis=1)
    if OFFS64:
        byte = pid.to(tl.int64) * nb + tl.arange(0, nb)
    else:
        byte = pid * nb + tl.arange(0, nb)
    tl.store(out_bits_ptr + byte, packed.to(tl.uint8), mask=byte < nbytes)


# ---------------------------------------------------------------------------------------- launchers


def _launch_config(
    fn: str, numel: int, block: int | None, num_warps: int | None
) -> tuple[int, int]:
    """Block (elements, whole storage groups) and warps from the overrides and the defaults."""
    check_launch(fn, block, num_warps, block_name="block", block_min=GROUP_SIZE)
    if block is None:
        block = default_block(numel, GROUP_SIZE, _GPU_BLOCK, _INTERPRETER_BLOCK)
    return block, _GPU_WARPS if num_warps is None else num_warps


def _compute_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _step_args(fn: str, seg: Segment, p: StepParams) -> tuple[list, dict]:
    """Tensor and scalar arguments shared by the update kernels, and their constexpr flags."""
    numel = seg.numel
    grad = seg.grad.reshape(-1)
    if grad.numel() != numel:
        raise ValueError(f"{fn}: expected grad with numel = {numel} elements, got {grad.numel()}")
    check_device(fn, grad)
    for name, t in (("values", seg.values), ("bits", seg.bits), ("group_ptr", seg.group_ptr)):
        if t.device != grad.device:
            raise ValueError(f"{fn}: expected {name} on {grad.device}, got {t.device}")
    has_mom = p.momentum != 0 and seg.momentum is not None and seg.momentum.numel() > 0
    mom = seg.momentum.contiguous() if has_mom else seg.values
    scale_prev, scale = f32(seg.scale_prev), f32(p.scale)
    args = [
        nonempty(seg.values.contiguous()),
        nonempty(mom),
        seg.bits.contiguous(),
        seg.group_ptr.contiguous(),
        grad.contiguous(),
        seg.seed,
        f32(seg.bound),
        scale_prev,
        scale,
        f64_bits(p.lr),
        f64_bits(p.momentum),
        f64_bits(p.weight_decay),
    ]
    flags = {
        "CDT": _compute_dtype(seg.values.dtype),
        "HAS_INIT": not (scale_prev == 0.0 and scale == 0.0),
        "HAS_WD": p.weight_decay != 0,
        "HAS_MOM": has_mom,
        "OFFS64": tu.needs_offs64(numel),
    }
    return args, flags


def materialize(
    seed: int,
    bound: float,
    scale: float | Tensor,
    values: Tensor,
    bits: Tensor,
    group_ptr: Tensor,
    numel: int,
    dtype: torch.dtype,
    start: int = 0,
    count: int | None = None,
    *,
    has_init: bool | None = None,
    block: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """Flat effective weight of ``dtype``: tracked values, else ``scale * w0``; elements
    ``[start, start + count)`` of the ``numel`` (whole groups), all of them by default.

    ``scale`` may be a 0-d float32 tensor on the device (read by the kernel, no host read); then
    ``has_init`` says whether it is non-zero (False: untracked weights are +0, nothing generated).
    """
    fn = "materialize()"
    check_device(fn, values)
    start, count = check_range(fn, start, count, numel)
    out = torch.empty(count, dtype=dtype, device=values.device)
    if count == 0:
        return out
    block, num_warps = _launch_config(fn, count, block, num_warps)
    scale_is_ptr = isinstance(scale, Tensor)
    if scale_is_ptr:
        if has_init is None:
            raise ValueError(f"{fn}: expected has_init with a tensor scale")
        scale = scale.to(device=values.device, dtype=torch.float32).reshape(1)
    else:
        scale = f32(scale)
        has_init = scale != 0.0
    _materialize_kernel[(triton.cdiv(count, block),)](
        out,
        nonempty(values.contiguous()),
        bits.contiguous(),
        group_ptr.contiguous(),
        seed,
        f32(bound),
        scale,
        start // GROUP_SIZE,
        start + count,
        triton.cdiv(numel, GROUP_SIZE),
        HAS_INIT=bool(has_init),
        SCALE_IS_PTR=scale_is_ptr,
        OFFS64=tu.needs_offs64(numel),
        BLOCK=block,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return out


def scores(
    seg: Segment,
    p: StepParams,
    *,
    block: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """Float32 score of every weight of the segment (``numel`` elements, on the segment's device).

    One pass over the gradient. Equal to :func:`.reference.scores` up to the rounding of the
    candidate (the reference may fuse ``W - lr * m`` into one multiply-add, the kernel rounds twice:
    half an ulp of ``lr * m`` plus one of ``c``, which is many ulps of ``c`` where it cancels,
    ``W ~ lr * m``, and of a small score ``|c - d_n w0|``; tests/helpers/tolerances.py states the
    bound), and exactly 0 where the reference's score is 0 (an untouched weight's candidate is its
    untracked value, exactly).
    """
    fn = "scores()"
    args, flags = _step_args(fn, seg, p)
    out = torch.empty(seg.numel, dtype=torch.float32, device=seg.grad.device)
    if seg.numel == 0:
        return out
    block, num_warps = _launch_config(fn, seg.numel, block, num_warps)
    _scores_kernel[(triton.cdiv(seg.numel, block),)](
        out,
        *args,
        seg.numel,
        triton.cdiv(seg.numel, GROUP_SIZE),
        **flags,
        BLOCK=block,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return out


def _score_stats(
    fn: str,
    seg: Segment,
    p: StepParams,
    mode: int,
    nbins: int,
    high: int,
    block: int | None,
    num_warps: int | None,
    local_hist: bool,
) -> Tensor:
    args, flags = _step_args(fn, seg, p)
    hist = torch.zeros(nbins, dtype=torch.int64, device=seg.grad.device)
    if seg.numel == 0:
        return hist
    block, num_warps = _launch_config(fn, seg.numel, block, num_warps)
    _score_stats_kernel[(triton.cdiv(seg.numel, block),)](
        hist,
        *args,
        seg.numel,
        triton.cdiv(seg.numel, GROUP_SIZE),
        high,
        MODE=mode,
        LOCAL_HIST=local_hist,
        **flags,
        BLOCK=block,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return hist


def log_histogram(
    seg: Segment,
    p: StepParams,
    *,
    block: int | None = None,
    num_warps: int | None = None,
    local_hist: bool = False,
) -> Tensor:
    """Score counts over the log-spaced bins of :mod:`procrustes_kernels.selection` (int64).

    ``local_hist=True`` counts each block with ``tl.histogram`` and adds its non-empty bins; the
    default adds one atomic per element: the ``tl.histogram`` of 2080 (padded to 4096) bins holds
    128 bins per thread and spills registers on sm_90 (255 registers plus stack, triton 3.6).
    """
    return _score_stats(
        "log_histogram()", seg, p, _MODE_LOG, HIST_BINS, 0, block, num_warps, local_hist
    )


def radix_histogram(
    seg: Segment,
    p: StepParams,
    high: int | None = None,
    *,
    block: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """Counts of the scores' float32 bit patterns, for an exact radix select of the k-th largest.

    ``high=None``: counts per upper 15 bits (:data:`RADIX_HIGH_BINS` bins); otherwise counts per
    lower 16 bits among the scores whose upper bits equal ``high`` (:data:`RADIX_LOW_BINS` bins).
    """
    fn = "radix_histogram()"
    if high is None:
        mode, nbins, high = _MODE_RADIX_HIGH, RADIX_HIGH_BINS, 0
    elif 0 <= high < RADIX_HIGH_BINS:
        mode, nbins = _MODE_RADIX_LOW, RADIX_LOW_BINS
    else:
        raise ValueError(f"{fn}: expected high in [0, {RADIX_HIGH_BINS}), got {high}")
    return _score_stats(fn, seg, p, mode, nbins, high, block, num_warps, False)


def compact(
    seg: Segment,
    p: StepParams,
    threshold: float,
    tie_quota: int = 0,
    with_histogram: bool = False,
    *,
    block: int | None = None,
    num_warps: int | None = None,
    local_hist: bool = False,
) -> Compacted:
    """Keep the weights whose score is ``> threshold``, plus the first ``tie_quota`` (by flat
    index) whose score equals it; return the new compressed tracked set and momentum.

    ``threshold`` is a float32 value; ``with_histogram`` also returns the scores' log histogram,
    computed in the count pass (``local_hist`` as in :func:`log_histogram`). Two passes over the
    gradient: per-group counts of kept scores and of ties, then (after prefix sums over the groups
    and the tie quota handed out in flat order) the write of values, momentum and bits.
    """
    fn = "compact()"
    args, flags = _step_args(fn, seg, p)
    device, numel = seg.grad.device, seg.numel
    ngroups = triton.cdiv(numel, GROUP_SIZE)
    nbytes = (numel + 7) // 8
    thr = f32(threshold)
    ties = tie_quota > 0
    block, num_warps = _launch_config(fn, max(numel, 1), block, num_warps)
    grid = (triton.cdiv(numel, block),)

    kept = torch.empty(ngroups, dtype=torch.int32, device=device)
    tie_counts = torch.empty(ngroups, dtype=torch.int32, device=device) if ties else kept
    hist = torch.zeros(HIST_BINS if with_histogram else 1, dtype=torch.int64, device=device)
    if numel:
        _compact_count_kernel[grid](
            kept,
            tie_counts,
            hist,
            *args,
            thr,
            numel,
            ngroups,
            COUNT_TIES=ties,
            WITH_HIST=with_histogram,
            LOCAL_HIST=local_hist,
            **flags,
            BLOCK=block,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )

    counts = kept.to(torch.int64)
    allow = kept  # unused without ties
    if ties:
        t = tie_counts.to(torch.int64)
        # The quota goes to ties in flat order: group q gets what the groups before it left over.
        before = torch.cumsum(t, 0) - t
        allow64 = (tie_quota - before).clamp_(min=0).minimum(t)
        counts += allow64
        allow = allow64.to(torch.int32)
    group_ptr = torch.zeros(ngroups + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=group_ptr[1:])
    if ties:
        nnz, ties_used = torch.stack([group_ptr[-1], allow64.sum()]).tolist()
    else:
        nnz, ties_used = int(group_ptr[-1]), 0

    values = torch.empty(nnz, dtype=seg.values.dtype, device=device)
    momentum = torch.empty_like(values) if p.momentum != 0 else None
    bits = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if numel:
        _compact_write_kernel[grid](
            nonempty(values),
            nonempty(values if momentum is None else momentum),
            bits,
            group_ptr,
            allow,
            *args,
            thr,
            numel,
            ngroups,
            nbytes,
            TIES=ties,
            WRITE_MOM=momentum is not None,
            **flags,
            BLOCK=block,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )
    return Compacted(
        values,
        bits,
        group_ptr,
        momentum,
        ties_used=ties_used,
        histogram=hist if with_histogram else None,
    )
