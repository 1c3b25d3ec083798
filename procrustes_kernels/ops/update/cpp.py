"""C++/OpenMP backend of the weight ops, for CPU tensors (the compiled ``procrustes_kernels._C``).

Same functions and results as :mod:`.reference`, plus :func:`paper_walk` (the authors' sequential
quantile walk), :func:`philox_uniform` and thread controls. Each update op is one pass over the
dense gradient that regenerates ``w0`` on the fly, so nothing dense is materialised but the
outputs asked for, and 2 bytes per weight that live for one step: the first histogram pass of a
step stores the upper 16 bits of every score in ``Segment.scratch`` (the optimizer builds fresh
segments every step); the later passes of the same step (:func:`radix_histogram` with ``high``,
:func:`compact`) read those instead of recomputing Philox and the candidate for every weight, and
recompute the exact score only where the upper bits tie with the bin or threshold in question (a
fraction of a percent of the weights); :func:`compact` then drops them. Stored scores are used
only while the segment's tensors (same objects, same in-place versions), scalars and
:class:`StepParams` are those they were computed from. Results are identical with and without
them, and for every thread count.

Bit-identical to the reference, including the rounding of the candidate: PyTorch's CPU
``a.add(b, alpha=s)`` is one fused multiply-add in its AVX2 / AVX-512 kernels and two roundings in
its generic one, and the kernels do whatever this PyTorch build does (probed once).

float32 and float64 segments run in C++ (:func:`accepts`: the dispatcher of :mod:`..dispatch`
sends other dtypes, float16, bfloat16 or mixed, to the reference). Tensors must be CPU and
contiguous; wrong dtypes, layouts or sizes raise ``TypeError`` / ``ValueError``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from ...philox import seed_words
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

try:
    from ... import _C
except ImportError as err:  # the dispatcher turns this into one warning and uses the reference
    raise ImportError(
        "procrustes_kernels.ops.update.cpp: the compiled extension procrustes_kernels._C is not "
        f"built ({err}). Build it with `pip install -e .` or `python setup.py build_ext "
        "--inplace` (needs a C++17 compiler)."
    ) from err

# The constants the kernels were compiled with must be the package's (ops/contract.py).
_CONTRACT = {
    "GROUP_SIZE": GROUP_SIZE,
    "RADIX_HIGH_BINS": RADIX_HIGH_BINS,
    "RADIX_LOW_BINS": RADIX_LOW_BINS,
    "HIST_SHIFT": HIST_SHIFT,
    "HIST_BASE": HIST_BASE,
    "HIST_BINS": HIST_BINS,
}
_mismatch = {
    k: (getattr(_C, k, None), v) for k, v in _CONTRACT.items() if getattr(_C, k, None) != v
}
if _mismatch:
    raise ImportError(
        "procrustes_kernels.ops.update.cpp: _C was built with other constants than the package "
        f"uses ({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in _mismatch.items())}); rebuild "
        "the extension"
    )

__all__ = [
    "accepts",
    "materialize",
    "candidates",
    "scores",
    "log_histogram",
    "radix_histogram",
    "compact",
    "compact_mask",
    "paper_walk",
    "philox_uniform",
    "available_threads",
    "num_threads",
    "set_num_threads",
]

_NATIVE = (torch.float32, torch.float64)
_NATIVE_SET = frozenset(_NATIVE)
_HIST = {
    "hist_shift": HIST_SHIFT,
    "hist_base": HIST_BASE,
    "hist_bins": HIST_BINS,
}


# ---------------------------------------------------------------------------------------- threads
def available_threads() -> int:
    """Processors the kernels can use here."""
    return _C.hardware_threads()


def num_threads() -> int:
    """Threads the kernels use now."""
    return _C.max_threads()


def set_num_threads(n: int) -> None:
    """Threads the kernels use (``0``: back to the OpenMP default, ``OMP_NUM_THREADS`` or all).

    Results do not depend on it.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"set_num_threads(): expected an int >= 0, got {n!r}")
    _C.set_max_threads(n)


# ------------------------------------------------------------------------------------------ checks
def accepts(dtypes: set[torch.dtype]) -> bool:
    """Whether the kernels take a call whose floating tensors have ``dtypes``: one dtype, float32
    or float64."""
    return len(dtypes) <= 1 and dtypes <= _NATIVE_SET


@functools.cache
def _add_alpha_is_fused(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build rounds ``a.add(b, alpha=s)`` once (an FMA) for ``dtype``."""
    eps = 2.0**-12 if dtype == torch.float32 else 2.0**-27
    x = 1.0 + eps  # x * x = 1 + 2 eps + eps**2; eps**2 is lost unless the multiply-add is fused
    n = 67  # through both the vectorised body and the scalar tail
    r = torch.full((n,), -1.0, dtype=dtype).add(torch.full((n,), x, dtype=dtype), alpha=x)
    return bool((r != 2 * eps).all())


def _check_cpu_tensor(fn: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}(): expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{fn}(): expected {name} on the CPU, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{fn}(): expected {name} to be contiguous")
    return t


def _check_dtype(fn: str, name: str, t: Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{fn}(): expected {name} of dtype {dtype}, got {t.dtype}")


def _check_storage(fn: str, values: object, bits: object, group_ptr: object) -> None:
    values = _check_cpu_tensor(fn, "values", values)
    if not values.is_floating_point():
        raise TypeError(f"{fn}(): expected values of a floating dtype, got {values.dtype}")
    _check_dtype(fn, "bits", _check_cpu_tensor(fn, "bits", bits), torch.uint8)
    _check_dtype(fn, "group_ptr", _check_cpu_tensor(fn, "group_ptr", group_ptr), torch.int64)


def _check_segment(fn: str, seg: Segment) -> None:
    """A segment the kernels take (CPU, contiguous, one dtype: float32 or float64)."""
    if not isinstance(seg, Segment):
        raise TypeError(f"{fn}(): expected a Segment, got {type(seg).__name__}")
    _check_storage(fn, seg.values, seg.bits, seg.group_ptr)
    grad = _check_cpu_tensor(fn, "grad", seg.grad)
    if not grad.is_floating_point():
        raise TypeError(f"{fn}(): expected grad of a floating dtype, got {grad.dtype}")
    if seg.momentum is not None:
        mom = _check_cpu_tensor(fn, "momentum", seg.momentum)
        if not mom.is_floating_point():
            raise TypeError(f"{fn}(): expected momentum of a floating dtype, got {mom.dtype}")
    if not accepts(seg.dtypes):
        raise TypeError(
            f"{fn}(): expected values, grad and momentum of one dtype, float32 or float64, got "
            f"{sorted(map(str, seg.dtypes))} (other dtypes run in the reference)"
        )


def _seed(seed: int) -> int:
    k0, k1 = seed_words(seed)  # the range checks and uint64 reinterpretation of philox.py
    return k0 | (k1 << 32)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


def _seg_kwargs(seg: Segment, p: StepParams) -> dict:
    return {
        "values": _np(seg.values),
        "bits": _np(seg.bits),
        "group_ptr": _np(seg.group_ptr),
        "grad": _np(seg.grad),
        "momentum": None if seg.momentum is None else _np(seg.momentum),
        "seed": _seed(seg.seed),
        "bound": float(seg.bound),
        "numel": int(seg.numel),
        "scale_prev": float(seg.scale_prev),
        "lr": float(p.lr),
        "mu": float(p.momentum),
        "wd": float(p.weight_decay),
        "scale": float(p.scale),
        "fused": _add_alpha_is_fused(seg.values.dtype),
    }


# ---------------------------------------------------------------------------------- stored scores
_SCRATCH_KEY = "cpp_scores"


def _tensor_state(t: Tensor | None) -> tuple | None:
    return None if t is None else (t._version, t.data_ptr())


class _StoredScores:
    """One step's scores of a segment, with what they were computed from."""

    __slots__ = ("params", "scalars", "tensors", "states", "kwargs", "call", "valid")

    def __init__(self, seg: Segment, p: StepParams) -> None:
        self.call = _seg_kwargs(seg, p)  # the segment's arguments, reused by the later passes
        self.params = p
        self.scalars = (seg.seed, seg.bound, seg.numel, seg.scale_prev)
        self.tensors = (seg.values, seg.bits, seg.group_ptr, seg.grad, seg.momentum)
        self.states = tuple(_tensor_state(t) for t in self.tensors)
        nv, vdt = seg.values.numel(), _np(seg.values).dtype
        self.kwargs = {
            "scores": np.empty(int(seg.numel), dtype=np.uint16),  # the scores' upper halves
            # the tracked weights' candidates and new momenta (the size of the tracked set)
            "tracked_c": np.empty(nv, dtype=vdt),
            "tracked_m": np.empty(nv, dtype=vdt) if p.momentum != 0 else None,
        }
        self.valid = False

    def matches(self, seg: Segment, p: StepParams) -> bool:
        tensors = (seg.values, seg.bits, seg.group_ptr, seg.grad, seg.momentum)
        return (
            self.valid
            and type(p) is type(self.params)
            and p == self.params
            and self.scalars == (seg.seed, seg.bound, seg.numel, seg.scale_prev)
            and all(a is b for a, b in zip(tensors, self.tensors))
            and self.states == tuple(_tensor_state(t) for t in tensors)
        )


def _scratch(seg: Segment) -> dict | None:
    scratch = getattr(seg, "scratch", None)
    return scratch if isinstance(scratch, dict) else None


def _stored(seg: Segment, p: StepParams) -> _StoredScores | None:
    """This step's stored scores of ``seg``, when they are still its scores."""
    scratch = _scratch(seg)
    entry = None if scratch is None else scratch.get(_SCRATCH_KEY)
    if isinstance(entry, _StoredScores) and entry.matches(seg, p):
        return entry
    return None


def _scores_kwargs(seg: Segment, p: StepParams) -> tuple[dict, _StoredScores | None]:
    """All arguments of a histogram pass: reading the stored scores, or storing new ones.

    Returns the keyword arguments and the new entry to record once the pass has succeeded.
    """
    entry = _stored(seg, p)
    if entry is not None:
        return {**entry.call, **entry.kwargs, "scores_valid": True}, None
    scratch = _scratch(seg)
    if scratch is None:
        return _seg_kwargs(seg, p), None
    scratch.pop(_SCRATCH_KEY, None)  # stale: free it before allocating the new one
    entry = _StoredScores(seg, p)
    return {**entry.call, **entry.kwargs, "scores_valid": False}, entry


def _record(seg: Segment, entry: _StoredScores | None) -> None:
    if entry is not None:
        entry.valid = True
        seg.scratch[_SCRATCH_KEY] = entry


def _float32(x: float) -> float:
    """float32 rounding as the reference's ``torch.tensor(x, dtype=torch.float32)``."""
    return float(torch.tensor(x, dtype=torch.float32))


# ---------------------------------------------------------------------------------------- the ops
def materialize(
    seed: int,
    bound: float,
    scale: float,
    values: Tensor,
    bits: Tensor,
    group_ptr: Tensor,
    numel: int,
    dtype: torch.dtype,
    start: int = 0,
    count: int | None = None,
) -> Tensor:
    """Flat effective weight: tracked values, else ``scale * w0``; elements ``[start, start +
    count)`` of the ``numel`` (whole groups), all of them by default."""
    fn = "materialize"
    _check_storage(fn, values, bits, group_ptr)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"{fn}(): expected numel >= 0 (an int), got {numel!r}")
    start, count = check_range(f"{fn}()", start, count, numel)
    if not accepts({values.dtype, dtype}):
        raise TypeError(
            f"{fn}(): expected values and dtype both float32 or both float64, got "
            f"{values.dtype} / {dtype} (other dtypes run in the reference)"
        )
    out = torch.empty(count, dtype=dtype)
    _C.materialize(
        seed=_seed(seed),
        bound=float(bound),
        scale=float(scale),
        values=_np(values),
        bits=_np(bits),
        group_ptr=_np(group_ptr),
        numel=int(numel),
        out=out.numpy(),
        start=start,
        count=count,
    )
    return out


def candidates(seg: Segment, p: StepParams) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c, m, s, tracked)`` for every weight of the segment (flat, transient)."""
    _check_segment("candidates", seg)
    n = int(seg.numel)
    c = torch.empty(n, dtype=seg.values.dtype)
    m = torch.empty(n, dtype=seg.values.dtype)
    s = torch.empty(n, dtype=torch.float32)
    tracked = torch.empty(n, dtype=torch.bool)
    _C.candidates(
        **_seg_kwargs(seg, p),
        c_out=c.numpy(),
        m_out=m.numpy(),
        s_out=s.numpy(),
        tracked_out=tracked.numpy(),
    )
    return c, m, s, tracked


def scores(seg: Segment, p: StepParams) -> Tensor:
    """Float32 score of every weight of the segment."""
    _check_segment("scores", seg)
    s = torch.empty(int(seg.numel), dtype=torch.float32)
    _C.candidates(**_seg_kwargs(seg, p), c_out=None, m_out=None, s_out=s.numpy(), tracked_out=None)
    return s


def log_histogram(seg: Segment, p: StepParams) -> Tensor:
    """Score counts over the log-spaced bins of :mod:`procrustes_kernels.selection` (int64)."""
    _check_segment("log_histogram", seg)
    kw, entry = _scores_kwargs(seg, p)
    hist = torch.from_numpy(_C.log_histogram(**kw, **_HIST))
    _record(seg, entry)
    return hist


def radix_histogram(seg: Segment, p: StepParams, high: int | None = None) -> Tensor:
    """Counts of the scores' float32 bit patterns (see :func:`.reference.radix_histogram`)."""
    _check_segment("radix_histogram", seg)
    if high is not None and (isinstance(high, bool) or not isinstance(high, int)):
        raise TypeError(f"radix_histogram(): expected high to be an int or None, got {high!r}")
    if high is not None and not 0 <= high < RADIX_HIGH_BINS:
        return torch.zeros(RADIX_LOW_BINS, dtype=torch.int64)  # no score has these upper bits
    kw, entry = _scores_kwargs(seg, p)
    hist = torch.from_numpy(_C.radix_histogram(**kw, high=-1 if high is None else high))
    _record(seg, entry)
    return hist


def _compacted(seg: Segment, out: tuple) -> Compacted:
    values, bits, group_ptr, momentum = (None if a is None else torch.from_numpy(a) for a in out)
    return Compacted(values, bits, group_ptr, momentum)


def compact(
    seg: Segment, p: StepParams, threshold: float, tie_quota: int = 0, with_histogram: bool = False
) -> Compacted:
    """Keep the weights whose score is ``> threshold``, plus the first ``tie_quota`` (by flat
    index) whose score equals it (see :func:`.reference.compact`)."""
    _check_segment("compact", seg)
    entry = _stored(seg, p)
    *storage_out, ties_used, hist = _C.compact(
        **(_seg_kwargs(seg, p) if entry is None else {**entry.call, **entry.kwargs}),
        threshold=_float32(threshold),
        tie_quota=min(int(tie_quota), 2**62),  # any quota above numel means all ties
        with_histogram=bool(with_histogram),
        **_HIST,
    )
    if entry is not None:  # the step's last pass over this segment: free the scores
        seg.scratch.pop(_SCRATCH_KEY, None)
    out = _compacted(seg, tuple(storage_out))
    out.ties_used = int(ties_used)
    if with_histogram:
        out.histogram = torch.from_numpy(hist)
    return out


def compact_mask(seg: Segment, p: StepParams, keep: Tensor) -> Compacted:
    """Compaction with an explicit keep mask (for selections that need all scores at once)."""
    _check_segment("compact_mask", seg)
    keep = _check_cpu_tensor("compact_mask", "keep", keep)
    _check_dtype("compact_mask", "keep", keep, torch.bool)
    return _compacted(seg, _C.compact_mask(**_seg_kwargs(seg, p), keep=_np(keep)))


def paper_walk(scores: Tensor, theta: float, lam: float, k: int) -> tuple[Tensor, float]:
    """:class:`~procrustes_kernels.selection.PaperQuantileSelector`'s walk from ``theta``.

    Returns the mask (on ``scores.device``) and the final ``theta``, identical to
    ``PaperQuantileSelector.step`` with ``self.theta = theta, self.lam = lam``.
    """
    if not isinstance(scores, Tensor):
        raise TypeError(
            f"paper_walk(): expected scores to be a Tensor, got {type(scores).__name__}"
        )
    if not scores.is_floating_point():
        raise TypeError(f"paper_walk(): expected floating scores, got {scores.dtype}")
    flat = scores.detach().to("cpu").reshape(-1)
    if flat.dtype not in _NATIVE:
        flat = flat.to(torch.float64)  # exact, as the selector's own float64 conversion
    flat = flat.contiguous()
    n = flat.numel()
    # The selector's own double arithmetic, so the factors are the same bits.
    q = 1.0 - k / n if n else 0.0
    up, down = 1.0 + lam * q, 1.0 - lam * (1.0 - q)
    mask = torch.empty(n, dtype=torch.bool)
    theta = _C.paper_walk(flat.numpy(), float(theta), up, down, mask.numpy())
    return mask.to(scores.device), theta


def philox_uniform(seed: int, offsets: Tensor) -> Tensor:
    """``tl.rand(seed, offsets)`` (see :func:`procrustes_kernels.philox.philox_uniform`)."""
    offsets = _check_cpu_tensor("philox_uniform", "offsets", offsets)
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"philox_uniform(): expected offsets of dtype int32 or int64, got {offsets.dtype}"
        )
    u = torch.from_numpy(_C.philox_uniform(_seed(seed), _np(offsets)))
    return u.view(offsets.shape)
