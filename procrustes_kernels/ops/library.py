"""The kernels as ``torch.library`` custom ops (namespace ``procrustes``), and the functions the
rest of the package calls them through.

Every op of :data:`.contract.UPDATE_OPS` and :data:`.contract.COMPUTE_OPS` is a custom op whose
implementation asks :func:`.dispatch.kernel` for the backend (Triton for CUDA, C++ for CPU, the
reference otherwise or where a backend lacks the op, or the one forced by ``PROCRUSTES_BACKEND`` /
``use_backend``), and whose fake implementation gives shapes and dtypes for tracing without running
a kernel. That is what PyTorch's dispatcher, ``torch.compile`` and ``torch.export`` see.

The functions below (``materialize``, ``scores``, ``compact``, ``sparse_linear``, ...) are the
package's entry points. They take the library's own types (:class:`~.contract.Segment`,
:class:`~.contract.StepParams`) and go through the custom op when anything may be watching:
tracing, fake tensors, a dispatch mode, tensor subclasses. Otherwise (:func:`eager`) they call the
implementation directly: a custom op costs ~25 us of Python per call, more than a small layer's
kernel, and the C++ backend keeps per-step scratch in the segment between the passes of a step,
which an op's flat argument list cannot carry (results are identical with and without it).

Ops that are part of a differentiable computation (``materialize`` in the effective weight,
``sparse_linear`` / ``sparse_conv2d``) are differentiated in :mod:`procrustes_kernels.functional`,
whose autograd functions call the input-gradient ops; the update ops run under ``no_grad``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .compute.index import cached_tile_index
from .contract import (
    GROUP_SIZE,
    HIST_BINS,
    RADIX_HIGH_BINS,
    RADIX_LOW_BINS,
    Compacted,
    Regen,
    Segment,
    StepParams,
)
from .dispatch import backend_for, kernel

__all__ = [
    "eager",
    "materialize",
    "scores",
    "log_histogram",
    "radix_histogram",
    "compact",
    "compact_mask",
    "paper_walk",
    "sparse_linear",
    "sparse_linear_t",
    "sparse_conv2d",
    "sparse_conv2d_t",
    "sddmm_linear",
    "sddmm_conv2d",
    "sampled_linear_backward",
]

_I64 = 2**63


def eager(*tensors: Tensor | None) -> bool:
    """Whether a call on ``tensors`` may skip the dispatcher and run the implementation directly:
    plain tensors, no tracing, no dispatch mode."""
    for t in tensors:
        if t is not None and (type(t) is not Tensor or t.is_meta):
            return False
    return (
        torch._C._len_torch_dispatch_stack() == 0
        and torch._ops._len_torch_dispatch_stack_pre_dispatch() == 0
        and not torch.compiler.is_compiling()
    )


def _i64(seed: int) -> int:
    """A seed in [-2**63, 2**64) as the int64 with the same uint64 bits (an op's ``int``)."""
    return seed - 2**64 if seed >= _I64 else seed


def _define(name: str, schema: str, impl) -> torch._ops.OpOverload:
    """Registers ``procrustes::<name>`` with one implementation for every device (it dispatches
    through :func:`.dispatch.kernel` itself) and returns the op. Differentiation is not the op's:
    the library's autograd functions call the input-gradient ops (see the module docstring), so
    the op carries no autograd wrapper and costs ~3 us of dispatch where ``torch.library.custom_op``
    costs ~15."""
    qualname = f"procrustes::{name}"
    torch.library.define(qualname, schema)
    torch.library.impl(qualname, "default", func=impl)
    return getattr(torch.ops.procrustes, name).default


def _fake(op: torch._ops.OpOverload):
    """Registers the decorated function as ``op``'s fake implementation (shapes for tracing)."""

    def register(fn):
        torch.library.register_fake(op, fn)
        return fn

    return register


def _dynamic():
    """A size only known when the kernel has run (a fake implementation's output size)."""
    return torch.library.get_ctx().new_dynamic_size()


# ------------------------------------------------------------------------------------ materialise
def _materialize(
    values: Tensor,
    bits: Tensor,
    group_ptr: Tensor,
    scale: Tensor,
    seed: int,
    bound: float,
    numel: int,
    has_init: bool,
    start: int = 0,
    count: int = -1,
) -> Tensor:
    device = values.device
    dtype = values.dtype
    impl = kernel("materialize", device, {dtype})
    part = (start, None if count < 0 else count)
    if backend_for(device) == "triton":
        return impl(
            seed, bound, scale, values, bits, group_ptr, numel, dtype, *part, has_init=has_init
        )
    # CPU backends take the scale as a number: reading a CPU scalar is no device synchronisation.
    s = float(scale) if has_init else 0.0
    return impl(seed, bound, s, values, bits, group_ptr, numel, dtype, *part)


_materialize_op = _define(
    "materialize",
    "(Tensor values, Tensor bits, Tensor group_ptr, Tensor scale, int seed, float bound, "
    "int numel, bool has_init, int start=0, int count=-1) -> Tensor",
    _materialize,
)


@_fake(_materialize_op)
def _(values, bits, group_ptr, scale, seed, bound, numel, has_init, start=0, count=-1):
    return values.new_empty(numel - start if count < 0 else count)


def materialize(
    values: Tensor,
    bits: Tensor,
    group_ptr: Tensor,
    scale: Tensor,
    seed: int,
    bound: float,
    numel: int,
    has_init: bool,
    start: int = 0,
    count: int = -1,
) -> Tensor:
    """Flat effective weight (the dtype of ``values``): tracked values, every other weight
    ``scale * w0``; elements ``[start, start + count)`` of the weight's ``numel`` (whole groups
    of :data:`~.contract.GROUP_SIZE`; ``count`` -1: up to ``numel``), all of them by default.
    ``scale`` is a 0-d float32 tensor, read by the kernel, so the decay factor changing from step
    to step is data, not a constant of a traced graph; ``has_init`` (``scale != 0``) is the one
    thing the host decides."""
    args = (values, bits, group_ptr, scale)
    if eager(*args):
        return _materialize(*args, seed, bound, numel, has_init, start, count)
    return _materialize_op(*args, _i64(seed), bound, numel, has_init, start, count)


# ------------------------------------------------------------------------------ the update passes
# A segment and its step's scalars as an op's flat arguments (the schema below), and back.
_SEGMENT = (
    "Tensor values, Tensor bits, Tensor group_ptr, Tensor grad, Tensor? momentum, int seed, "
    "float bound, int numel, float scale_prev, float lr, float mu, float wd, float scale"
)
_NSEG = 13


def _flat(seg: Segment, p: StepParams) -> tuple:
    return (
        seg.values,
        seg.bits,
        seg.group_ptr,
        seg.grad,
        seg.momentum,
        _i64(seg.seed),
        float(seg.bound),
        int(seg.numel),
        float(seg.scale_prev),
        float(p.lr),
        float(p.momentum),
        float(p.weight_decay),
        float(p.scale),
    )


def _unflat(args: Sequence) -> tuple[Segment, StepParams]:
    values, bits, group_ptr, grad, momentum, seed, bound, numel, scale_prev, lr, mu, wd, d = args
    seg = Segment(seed, bound, numel, values, bits, group_ptr, grad, momentum, scale_prev)
    return seg, StepParams(lr, mu, wd, d)


def _impl(op: str, seg: Segment):
    return kernel(op, seg.grad.device, seg.dtypes)


def _eager_segment(seg: Segment, *more: Tensor | None) -> bool:
    return isinstance(seg, Segment) and eager(
        seg.values, seg.bits, seg.group_ptr, seg.grad, seg.momentum, *more
    )


def _check_segment(fn: str, seg: object, p: object) -> None:
    if not isinstance(seg, Segment):
        raise TypeError(f"{fn}(): expected seg to be a Segment, got {type(seg).__name__}")
    if not isinstance(p, StepParams):
        raise TypeError(f"{fn}(): expected p to be a StepParams, got {type(p).__name__}")


def _update_op(name: str, extra: str, returns: str, impl, fake):
    """A custom op over a segment's flat arguments plus ``extra`` ones."""
    op = _define(name, f"({_SEGMENT}{extra}) -> {returns}", impl)
    _fake(op)(fake)
    return op


def _scores_impl(*args):
    seg, p = _unflat(args)
    return _impl("scores", seg)(seg, p)


def _log_histogram_impl(*args):
    seg, p = _unflat(args)
    return _impl("log_histogram", seg)(seg, p)


def _radix_histogram_impl(*args):
    seg, p = _unflat(args[:_NSEG])
    high = args[_NSEG]
    return _impl("radix_histogram", seg)(seg, p, None if high < 0 else high)


def _compact_out(res: Compacted, like: Tensor) -> tuple[Tensor, ...]:
    empty = like.new_empty(0)
    hist = res.histogram if res.histogram is not None else empty.new_empty(0, dtype=torch.int64)
    ties = torch.tensor(res.ties_used, dtype=torch.int64)
    mom = res.momentum if res.momentum is not None else empty
    return res.values, res.bits, res.group_ptr, mom, ties, hist


def _compact_impl(*args):
    seg, p = _unflat(args[:_NSEG])
    threshold, tie_quota, with_histogram = args[_NSEG:]
    res = _impl("compact", seg)(seg, p, threshold, tie_quota, with_histogram)
    return _compact_out(res, seg.values)


def _compact_mask_impl(*args):
    seg, p = _unflat(args[:_NSEG])
    res = _impl("compact_mask", seg)(seg, p, args[_NSEG])
    return _compact_out(res, seg.values)[:4]


def _storage_fakes(values: Tensor, numel: int, mu: float) -> tuple[Tensor, ...]:
    n = _dynamic()
    nbytes = (numel + 7) // 8
    ngroups = -(-numel // GROUP_SIZE)
    return (
        values.new_empty(n),
        values.new_empty(nbytes, dtype=torch.uint8),
        values.new_empty(ngroups + 1, dtype=torch.int64),
        values.new_empty(n if mu != 0 else 0),
    )


def _compact_fake(*args):
    values, numel, mu = args[0], args[7], args[10]
    with_histogram = args[_NSEG + 2]
    hist = values.new_empty(HIST_BINS if with_histogram else 0, dtype=torch.int64)
    ties = torch.empty((), dtype=torch.int64)
    return (*_storage_fakes(values, numel, mu), ties, hist)


_scores_op = _update_op(
    "scores", "", "Tensor", _scores_impl, lambda *a: a[3].new_empty(a[7], dtype=torch.float32)
)
_log_histogram_op = _update_op(
    "log_histogram",
    "",
    "Tensor",
    _log_histogram_impl,
    lambda *a: a[3].new_empty(HIST_BINS, dtype=torch.int64),
)
_radix_histogram_op = _update_op(
    "radix_histogram",
    ", int high",
    "Tensor",
    _radix_histogram_impl,
    lambda *a: a[3].new_empty(
        RADIX_HIGH_BINS if a[_NSEG] < 0 else RADIX_LOW_BINS, dtype=torch.int64
    ),
)
_compact_op = _update_op(
    "compact",
    ", float threshold, int tie_quota, bool with_histogram",
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _compact_impl,
    _compact_fake,
)
_compact_mask_op = _update_op(
    "compact_mask",
    ", Tensor keep",
    "(Tensor, Tensor, Tensor, Tensor)",
    _compact_mask_impl,
    lambda *a: _storage_fakes(a[0], a[7], a[10]),
)


def _compacted(out: Sequence[Tensor], p: StepParams) -> Compacted:
    values, bits, group_ptr, mom = out[:4]
    res = Compacted(values, bits, group_ptr, mom if p.momentum != 0 else None)
    if len(out) > 4:
        res.ties_used = int(out[4])
        res.histogram = out[5] if out[5].numel() else None
    return res


def scores(seg: Segment, p: StepParams) -> Tensor:
    """Float32 score of every weight of the segment (see :mod:`.update.reference`)."""
    _check_segment("scores", seg, p)
    if _eager_segment(seg):
        return _impl("scores", seg)(seg, p)
    return _scores_op(*_flat(seg, p))


def log_histogram(seg: Segment, p: StepParams) -> Tensor:
    """Score counts over the log bins of :mod:`.contract` (int64, :data:`HIST_BINS`)."""
    _check_segment("log_histogram", seg, p)
    if _eager_segment(seg):
        return _impl("log_histogram", seg)(seg, p)
    return _log_histogram_op(*_flat(seg, p))


def radix_histogram(seg: Segment, p: StepParams, high: int | None = None) -> Tensor:
    """Counts of the scores' float32 bit patterns: per upper 15 bits (``high=None``), or per
    lower 16 bits among the scores whose upper bits are ``high``."""
    _check_segment("radix_histogram", seg, p)
    if high is not None and (isinstance(high, bool) or not isinstance(high, int)):
        raise TypeError(f"radix_histogram(): expected high to be an int or None, got {high!r}")
    if _eager_segment(seg):
        return _impl("radix_histogram", seg)(seg, p, high)
    return _radix_histogram_op(*_flat(seg, p), -1 if high is None else high)


def compact(
    seg: Segment, p: StepParams, threshold: float, tie_quota: int = 0, with_histogram: bool = False
) -> Compacted:
    """Keep the weights whose score is ``> threshold`` plus the first ``tie_quota`` ties at it;
    the new compressed tracked set and momentum (and the scores' log histogram if asked for)."""
    _check_segment("compact", seg, p)
    if _eager_segment(seg):
        return _impl("compact", seg)(seg, p, threshold, tie_quota, with_histogram)
    quota = min(int(tie_quota), _I64 - 1)
    out = _compact_op(*_flat(seg, p), float(threshold), quota, bool(with_histogram))
    return _compacted(out, p)


def compact_mask(seg: Segment, p: StepParams, keep: Tensor) -> Compacted:
    """Compaction with an explicit keep mask (selections that need all scores at once)."""
    _check_segment("compact_mask", seg, p)
    if _eager_segment(seg, keep):
        return _impl("compact_mask", seg)(seg, p, keep)
    return _compacted(_compact_mask_op(*_flat(seg, p), keep), p)


def _paper_walk_impl(scores: Tensor, theta: float, lam: float, k: int) -> tuple[Tensor, Tensor]:
    mask, theta = kernel("paper_walk", scores.device)(scores, theta, lam, k)
    return mask, torch.tensor(theta, dtype=torch.float64)


_paper_walk_op = _define(
    "paper_walk",
    "(Tensor scores, float theta, float lam, int k) -> (Tensor, Tensor)",
    _paper_walk_impl,
)


@_fake(_paper_walk_op)
def _(scores, theta, lam, k):
    return scores.new_empty(scores.shape, dtype=torch.bool), scores.new_empty(
        (), dtype=torch.float64
    )


def paper_walk(scores: Tensor, theta: float, lam: float, k: int) -> tuple[Tensor, float]:
    """The authors' sequential quantile walk (see :func:`.update.reference.paper_walk`)."""
    if not isinstance(scores, Tensor):
        raise TypeError(
            f"paper_walk(): expected scores to be a Tensor, got {type(scores).__name__}"
        )
    if eager(scores):
        return kernel("paper_walk", scores.device)(scores, theta, lam, k)
    mask, out = _paper_walk_op(scores, float(theta), float(lam), int(k))
    return mask, float(out)


# ---------------------------------------------------------------------------- sparse compute ops
# The weight travels as its compressed storage plus its geometry; the tile index is built inside
# the op from the bits (cached on the bits tensor), so a traced graph holds no data-dependent
# index and the same graph serves every tracked set.
_GEOMETRY = "int rows, int cols, int ksize, int groups, int block_n, int block_c"
# A weight whose untracked elements are ``scale * w0`` (a Regen): its constants, keyword-only.
_REGEN = "*, Tensor? regen_scale=None, int regen_seed=0, float regen_bound=0.0"


class Geometry(NamedTuple):
    """A weight's matrix geometry and compute tile: what kernels that walk the bits themselves
    (the C++ ones, ``takes_geometry``) take instead of a :class:`~.compute.index.TileIndex`."""

    rows: int
    cols: int
    ksize: int
    groups: int
    block_n: int
    block_c: int


def _impl_and_index(
    op: str,
    x: Tensor,
    values: Tensor,
    bits: Tensor,
    geometry: Sequence[int],
    regen: Regen | None = None,
):
    impl = kernel(op, x.device, {x.dtype, values.dtype}, regen=regen is not None)
    if getattr(sys.modules.get(impl.__module__), "takes_geometry", False):
        return impl, Geometry(*geometry)
    return impl, cached_tile_index(bits, *geometry)


def _regen(regen_scale: Tensor | None, regen_seed: int, regen_bound: float) -> Regen | None:
    """The :class:`Regen` of an op's keyword arguments (None without a scale)."""
    if regen_scale is None:
        return None
    return Regen(regen_scale, regen_seed % 2**64, regen_bound)


def _regen_kwargs(regen: Regen | None) -> dict:
    """An op's keyword arguments for ``regen`` (none without it)."""
    if regen is None:
        return {}
    return {"regen_scale": regen.scale, "regen_seed": _i64(regen.seed), "regen_bound": regen.bound}


def _with_regen(regen: Regen | None) -> dict:
    """The ``regen=`` keyword of a kernel call (none without it: the C++ kernels lack it)."""
    return {} if regen is None else {"regen": regen}


def _sparse_linear_impl(x, values, bits, bias, *geometry, **regen_args):
    regen = _regen(**regen_args) if regen_args else None
    impl, index = _impl_and_index("sparse_linear", x, values, bits, geometry, regen)
    return impl(x, values, bits, index, bias, **_with_regen(regen))


def _sparse_linear_t_impl(dy, values, bits, *geometry, **regen_args):
    regen = _regen(**regen_args) if regen_args else None
    impl, index = _impl_and_index("sparse_linear_t", dy, values, bits, geometry, regen)
    return impl(dy, values, bits, index, **_with_regen(regen))


def _sparse_conv2d_impl(x, values, bits, bias, *args, **regen_args):
    regen = _regen(**regen_args) if regen_args else None
    geometry, (kernel_size, stride, padding, dilation) = args[:6], args[6:]
    impl, index = _impl_and_index("sparse_conv2d", x, values, bits, geometry, regen)
    return impl(
        x,
        values,
        bits,
        index,
        tuple(kernel_size),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        bias=bias,
        **_with_regen(regen),
    )


def _sparse_conv2d_t_impl(dy, values, bits, *args, **regen_args):
    regen = _regen(**regen_args) if regen_args else None
    geometry, (hw, kernel_size, stride, padding, dilation) = args[:6], args[6:]
    impl, index = _impl_and_index("sparse_conv2d_t", dy, values, bits, geometry, regen)
    return impl(
        dy,
        values,
        bits,
        index,
        tuple(hw),
        tuple(kernel_size),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        **_with_regen(regen),
    )


def _sddmm_linear_impl(x, dy, values, bits, *geometry):
    impl, index = _impl_and_index("sddmm_linear", x, values, bits, geometry)
    return impl(x, dy, values, bits, index)


def _sddmm_conv2d_impl(x, dy, values, bits, *args):
    geometry, (kernel_size, stride, padding, dilation) = args[:6], args[6:]
    impl, index = _impl_and_index("sddmm_conv2d", x, values, bits, geometry)
    return impl(
        x,
        dy,
        values,
        bits,
        index,
        tuple(kernel_size),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
    )


_CONV = "int[] kernel_size, int[] stride, int[] padding, int[] dilation"
_sparse_linear_op = _define(
    "sparse_linear",
    f"(Tensor x, Tensor values, Tensor bits, Tensor? bias, {_GEOMETRY}, {_REGEN}) -> Tensor",
    _sparse_linear_impl,
)
_sparse_linear_t_op = _define(
    "sparse_linear_t",
    f"(Tensor dy, Tensor values, Tensor bits, {_GEOMETRY}, {_REGEN}) -> Tensor",
    _sparse_linear_t_impl,
)
_sparse_conv2d_op = _define(
    "sparse_conv2d",
    f"(Tensor x, Tensor values, Tensor bits, Tensor? bias, {_GEOMETRY}, {_CONV}, {_REGEN}) "
    "-> Tensor",
    _sparse_conv2d_impl,
)
_sparse_conv2d_t_op = _define(
    "sparse_conv2d_t",
    f"(Tensor dy, Tensor values, Tensor bits, {_GEOMETRY}, int[] input_hw, {_CONV}, {_REGEN}) "
    "-> Tensor",
    _sparse_conv2d_t_impl,
)


_sddmm_linear_op = _define(
    "sddmm_linear",
    f"(Tensor x, Tensor dy, Tensor values, Tensor bits, {_GEOMETRY}) -> Tensor",
    _sddmm_linear_impl,
)
_sddmm_conv2d_op = _define(
    "sddmm_conv2d",
    f"(Tensor x, Tensor dy, Tensor values, Tensor bits, {_GEOMETRY}, {_CONV}) -> Tensor",
    _sddmm_conv2d_impl,
)


@_fake(_sddmm_linear_op)
def _(x, dy, values, bits, *geometry):
    return values.new_empty(values.shape, dtype=dy.dtype)


@_fake(_sddmm_conv2d_op)
def _(x, dy, values, bits, *args):
    return values.new_empty(values.shape, dtype=dy.dtype)


def _out_size(size, k, stride, pad, dil):
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


@_fake(_sparse_linear_op)
def _(x, values, bits, bias, rows, cols, ksize, groups, block_n, block_c, **regen):
    return x.new_empty(x.shape[0], rows)


@_fake(_sparse_linear_t_op)
def _(dy, values, bits, rows, cols, ksize, groups, block_n, block_c, **regen):
    return dy.new_empty(dy.shape[0], cols)


@_fake(_sparse_conv2d_op)
def _(
    x,
    values,
    bits,
    bias,
    rows,
    cols,
    ksize,
    groups,
    bn,
    bc,
    kernel_size,
    stride,
    padding,
    dilation,
    **regen,
):
    oh, ow = (
        _out_size(x.shape[2 + i], kernel_size[i], stride[i], padding[i], dilation[i])
        for i in range(2)
    )
    return x.new_empty(x.shape[0], rows, oh, ow)


@_fake(_sparse_conv2d_t_op)
def _(
    dy,
    values,
    bits,
    rows,
    cols,
    ksize,
    groups,
    bn,
    bc,
    input_hw,
    kernel_size,
    stride,
    padding,
    dilation,
    **regen,
):
    return dy.new_empty(dy.shape[0], cols * groups, input_hw[0], input_hw[1])


def _scale_of(regen: Regen | None) -> Tensor | None:
    return None if regen is None else regen.scale


def sparse_linear(
    x: Tensor,
    values: Tensor,
    bits: Tensor,
    bias: Tensor | None,
    geometry: Sequence[int],
    regen: Regen | None = None,
) -> Tensor:
    """``x @ W^T + bias`` from the compressed weight; ``geometry`` is ``(rows, cols, ksize,
    groups, block_n, block_c)`` of the weight and its compute tile. With ``regen`` the untracked
    weights are ``scale * w0``, regenerated inside the kernel (Triton; the reference defines it;
    a backend without such kernels runs the reference)."""
    kw = _regen_kwargs(regen)
    if eager(x, values, bits, bias, _scale_of(regen)):
        return _sparse_linear_impl(x, values, bits, bias, *geometry, **kw)
    return _sparse_linear_op(x, values, bits, bias, *geometry, **kw)


def sparse_linear_t(
    dy: Tensor,
    values: Tensor,
    bits: Tensor,
    geometry: Sequence[int],
    regen: Regen | None = None,
) -> Tensor:
    """``dy @ W`` (the input gradient of :func:`sparse_linear`)."""
    kw = _regen_kwargs(regen)
    if eager(dy, values, bits, _scale_of(regen)):
        return _sparse_linear_t_impl(dy, values, bits, *geometry, **kw)
    return _sparse_linear_t_op(dy, values, bits, *geometry, **kw)


def sparse_conv2d(
    x: Tensor,
    values: Tensor,
    bits: Tensor,
    bias: Tensor | None,
    geometry: Sequence[int],
    conv: Sequence[Sequence[int]],
    regen: Regen | None = None,
) -> Tensor:
    """``conv2d`` from the compressed weight; ``conv`` is ``(kernel_size, stride, padding,
    dilation)``; ``regen`` as for :func:`sparse_linear`."""
    conv = [list(c) for c in conv]
    kw = _regen_kwargs(regen)
    if eager(x, values, bits, bias, _scale_of(regen)):
        return _sparse_conv2d_impl(x, values, bits, bias, *geometry, *conv, **kw)
    return _sparse_conv2d_op(x, values, bits, bias, *geometry, *conv, **kw)


def sparse_conv2d_t(
    dy: Tensor,
    values: Tensor,
    bits: Tensor,
    geometry: Sequence[int],
    input_hw: Sequence[int],
    conv: Sequence[Sequence[int]],
    regen: Regen | None = None,
) -> Tensor:
    """Gradient of :func:`sparse_conv2d` with respect to its input."""
    conv = [list(c) for c in conv]
    kw = _regen_kwargs(regen)
    if eager(dy, values, bits, _scale_of(regen)):
        return _sparse_conv2d_t_impl(dy, values, bits, *geometry, list(input_hw), *conv, **kw)
    return _sparse_conv2d_t_op(dy, values, bits, *geometry, list(input_hw), *conv, **kw)


def sddmm_linear(
    x: Tensor, dy: Tensor, values: Tensor, bits: Tensor, geometry: Sequence[int]
) -> Tensor:
    """``dy^T @ x`` at the tracked positions of the weight (one value per entry of ``values``,
    storage order): the weight gradient of :func:`sparse_linear` where the optimizer reads it."""
    if eager(x, dy, values, bits):
        return _sddmm_linear_impl(x, dy, values, bits, *geometry)
    return _sddmm_linear_op(x, dy, values, bits, *geometry)


def sddmm_conv2d(
    x: Tensor,
    dy: Tensor,
    values: Tensor,
    bits: Tensor,
    geometry: Sequence[int],
    conv: Sequence[Sequence[int]],
) -> Tensor:
    """The weight gradient of :func:`sparse_conv2d` at the tracked positions (storage order)."""
    conv = [list(c) for c in conv]
    if eager(x, dy, values, bits):
        return _sddmm_conv2d_impl(x, dy, values, bits, *geometry, *conv)
    return _sddmm_conv2d_op(x, dy, values, bits, *geometry, *conv)


def sampled_linear_backward(
    x: Tensor,
    dy: Tensor,
    values: Tensor,
    bits: Tensor,
    geometry: Sequence[int],
    need_dx: bool,
    regen: Regen | None = None,
) -> tuple[Tensor | None, Tensor]:
    """``(sparse_linear_t(dy, regen) if need_dx, sddmm_linear(x, dy))``: one call where the C++
    kernels run both (eager, float32, no ``regen``), which then lay ``dy`` out for them once."""
    if regen is None and eager(x, dy, values, bits):
        impl, index = _impl_and_index("sddmm_linear", x, values, bits, geometry)
        t_impl, _ = _impl_and_index("sparse_linear_t", dy, values, bits, geometry)
        fused = getattr(sys.modules[impl.__module__], "sampled_linear_backward", None)
        if fused is not None and t_impl.__module__ == impl.__module__:
            return fused(x, dy, values, bits, index, need_dx)
    dx = sparse_linear_t(dy, values, bits, geometry, regen) if need_dx else None
    return dx, sddmm_linear(x, dy, values, bits, geometry)
