"""Pure-PyTorch reference of the weight ops: the definition every backend reproduces.

Two kinds of op, per sparse layer ("segment"):

* :func:`materialize` writes the effective weight: ``scale * w0`` regenerated from the seed, with the
  tracked values scattered in from the compressed storage.
* The update ops run one DropBack/Procrustes step (docs/training_rule.md) in passes over the
  dense gradient, each recomputing the candidate and the score of every weight on the fly:
  :func:`log_histogram` and :func:`radix_histogram` gather statistics of the scores, the host picks a
  threshold from them, and :func:`compact` keeps the weights above it (plus a quota of ties at it)
  and writes the new compressed tracked set and momentum.

The arithmetic of the candidate is part of the contract. The C++ backend reproduces it bit for
bit (including whether this PyTorch build fuses ``a.add(b, alpha=s)`` into one multiply-add); the
Triton kernels round each operation separately and agree to ~1 ulp::

    W  = tracked ? value : cast(scale_prev * w0)     (cast: to the layer dtype, then compute dtype)
    g' = g + weight_decay * W
    m  = tracked and momentum != 0 ? momentum * m_old + g' : g'
    c  = W - lr * m
    s  = float32(|c - cast(scale * w0)|)

computed in float32 (float64 for float64 layers); scores are float32 so that every backend can bin
them on their bit pattern.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ...philox import init_values
from ...storage import group_pointers, pack_bits, unpack_bits
from ..contract import (
    GROUP_SIZE,
    RADIX_HIGH_BINS,
    RADIX_LOW_BINS,
    Compacted,
    Segment,
    StepParams,
    check_range,
    score_histogram,
)

__all__ = [
    "materialize",
    "candidates",
    "scores",
    "log_histogram",
    "radix_histogram",
    "compact",
    "compact_mask",
    "paper_walk",
]


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
    """Flat effective weight of ``dtype``: tracked values, else ``scale * w0``; the elements
    ``[start, start + count)`` of the weight's ``numel`` (whole groups, :func:`check_range`),
    all of them by default."""
    start, count = check_range("materialize()", start, count, numel)
    device = values.device
    stop = start + count
    if scale == 0.0:
        out = torch.zeros(count, dtype=dtype, device=device)
    else:
        w0 = init_values(seed, count, bound, start=start, device=device)
        out = (w0 * torch.tensor(scale, dtype=torch.float32, device=device)).to(dtype)
    if count == 0:
        return out
    first = start // 8  # a group starts on a byte
    mask = unpack_bits(bits[first : (stop + 7) // 8], stop - first * 8)
    v0 = int(group_ptr[start // GROUP_SIZE])
    v1 = int(group_ptr[-(-stop // GROUP_SIZE)])
    out[mask] = values[v0:v1].to(dtype)
    return out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def candidates(seg: Segment, p: StepParams) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c, m, s, tracked)`` for every weight of the segment (flat, transient)."""
    device = seg.grad.device
    cdt = _compute_dtype(seg.values.dtype)
    w0 = init_values(seg.seed, seg.numel, seg.bound, device=device)
    tracked = unpack_bits(seg.bits, seg.numel)
    vdt = (
        seg.values.dtype
    )  # untracked weights round to the layer dtype, as the forward pass sees them
    W = (w0 * torch.tensor(seg.scale_prev, dtype=torch.float32, device=device)).to(vdt).to(cdt)
    W[tracked] = seg.values.to(cdt)
    g = seg.grad.reshape(-1).to(cdt)
    if p.weight_decay != 0:
        g = g.add(W, alpha=p.weight_decay)
    m = g
    if p.momentum != 0 and seg.momentum is not None and seg.momentum.numel():
        m = g.clone()
        m[tracked] = seg.momentum.to(cdt).mul(p.momentum).add_(g[tracked])
    c = W.add(m, alpha=-p.lr)
    target = (w0 * torch.tensor(p.scale, dtype=torch.float32, device=device)).to(vdt).to(cdt)
    s = (c - target).abs().to(torch.float32)
    return c, m, s, tracked


def scores(seg: Segment, p: StepParams) -> Tensor:
    """Float32 score of every weight of the segment."""
    return candidates(seg, p)[2]


def log_histogram(seg: Segment, p: StepParams) -> Tensor:
    """Score counts over the log-spaced bins of :mod:`procrustes_kernels.selection` (int64)."""
    return score_histogram(scores(seg, p))


def _score_bits(s: Tensor) -> Tensor:
    return s.contiguous().view(torch.int32).to(torch.int64)


def radix_histogram(seg: Segment, p: StepParams, high: int | None = None) -> Tensor:
    """Counts of the scores' float32 bit patterns, for an exact radix select of the k-th largest.

    ``high=None``: counts per upper 15 bits (``bits >> 16``, :data:`RADIX_HIGH_BINS` bins; scores
    are non-negative, so the sign bit is 0). Otherwise: counts per lower 16 bits among the scores
    whose upper bits equal ``high`` (:data:`RADIX_LOW_BINS` bins).
    """
    bits = _score_bits(scores(seg, p))
    if high is None:
        return torch.bincount(bits >> 16, minlength=RADIX_HIGH_BINS)
    low = bits[(bits >> 16) == high] & 0xFFFF
    return torch.bincount(low, minlength=RADIX_LOW_BINS)


def _compacted(seg: Segment, p: StepParams, c: Tensor, m: Tensor, keep: Tensor) -> Compacted:
    values = c[keep].to(seg.values.dtype)
    bits = pack_bits(keep)
    momentum = m[keep].to(seg.values.dtype) if p.momentum != 0 else None
    return Compacted(values, bits, group_pointers(bits, seg.numel), momentum)


def compact(
    seg: Segment, p: StepParams, threshold: float, tie_quota: int = 0, with_histogram: bool = False
) -> Compacted:
    """Keep the weights whose score is ``> threshold``, plus the first ``tie_quota`` (by flat
    index) whose score equals it; return the new compressed tracked set and momentum.

    ``threshold`` is a float32 value; ``with_histogram`` also returns the scores' log histogram,
    computed in the same pass (the quantile estimator's next threshold comes from it).
    """
    c, m, s, _ = candidates(seg, p)
    thr = torch.tensor(threshold, dtype=torch.float32, device=s.device)
    keep = s > thr
    ties_used = 0
    if tie_quota > 0:
        ties = torch.nonzero(s == thr).flatten()[:tie_quota]
        keep[ties] = True
        ties_used = ties.numel()
    out = _compacted(seg, p, c, m, keep)
    out.ties_used = ties_used
    if with_histogram:
        out.histogram = score_histogram(s)
    return out


def compact_mask(seg: Segment, p: StepParams, keep: Tensor) -> Compacted:
    """Compaction with an explicit keep mask (for selections that need all scores at once)."""
    c, m, _, _ = candidates(seg, p)
    return _compacted(seg, p, c, m, keep.reshape(-1))


def paper_walk(scores: Tensor, theta: float, lam: float, k: int) -> tuple[Tensor, float]:
    """The authors' sequential quantile walk over ``scores`` in flat order, from ``theta``.

    An element is kept when ``score > theta``; after each element ``theta *= 1 + lam * q`` if it
    was kept, else ``theta *= 1 - lam * (1 - q)``, with ``q = 1 - k / N``, in float64. Returns the
    mask (on ``scores.device``) and the final ``theta``.
    """
    n = scores.numel()
    q = 1.0 - k / n if n else 0.0
    up, down = 1.0 + lam * q, 1.0 - lam * (1.0 - q)
    kept = np.zeros(n, dtype=np.bool_)
    for i, s in enumerate(scores.detach().to("cpu", torch.float64).reshape(-1).numpy().tolist()):
        if s > theta:
            kept[i] = True
            theta *= up
        else:
            theta *= down
    return torch.from_numpy(kept).to(scores.device), theta
