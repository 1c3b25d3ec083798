"""What every backend agrees on: the op names, the data passed to and from the weight ops, and
the constants of the score statistics.

The three backends (``update/reference.py``, ``update/cpp.py`` with ``csrc/``, and
``update/triton_kernels.py``; ``compute/`` for the sparse compute ops) import this module and the
public names of :mod:`procrustes_kernels.storage` / :mod:`procrustes_kernels.philox`, nothing of the
selection policy. The C++ extension exports the same constants and ``update/cpp.py`` checks them at
import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from ..storage import GROUP_SIZE

__all__ = [
    "UPDATE_OPS",
    "COMPUTE_OPS",
    "GRAD_OPS",
    "COMPUTE_DTYPES",
    "GROUP_SIZE",
    "Segment",
    "StepParams",
    "Compacted",
    "Regen",
    "RADIX_HIGH_BINS",
    "RADIX_LOW_BINS",
    "HIST_MANTISSA_BITS",
    "HIST_MIN_EXP",
    "HIST_MAX_EXP",
    "HIST_SHIFT",
    "HIST_BASE",
    "HIST_BINS",
    "log_bins",
    "score_histogram",
    "check_range",
]

# The weight ops (one training step's passes, and the effective weight) ...
UPDATE_OPS = (
    "materialize",
    "scores",
    "log_histogram",
    "radix_histogram",
    "compact",
    "compact_mask",
    "paper_walk",
)
# ... and the compute ops (forward / input gradient straight from the compressed weight).
COMPUTE_OPS = ("sparse_linear", "sparse_linear_t", "sparse_conv2d", "sparse_conv2d_t")
# ... and the sampled weight gradients: dL/dW at the tracked positions only (reselect_every > 1).
GRAD_OPS = ("sddmm_linear", "sddmm_conv2d")

# The input / weight dtypes of the compute ops (products accumulate in float32).
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Radix select on non-negative float32 scores: 15 upper bits (the sign bit is 0), then 16 lower.
RADIX_HIGH_BINS = 1 << 15
RADIX_LOW_BINS = 1 << 16

# Log-spaced bins on the float32 bit pattern: 2**HIST_MANTISSA_BITS bins per octave, from
# 2**HIST_MIN_EXP up to 2**HIST_MAX_EXP. Scores below the range fall into bin 0 and above it into
# the last bin; a 2.2% bin width keeps the interpolation error small next to the step-to-step
# drift. The bin of a score is ``clamp((bits >> HIST_SHIFT) - HIST_BASE, 0, HIST_BINS - 1)``, integer
# operations alone, so every backend bins every score identically.
HIST_MANTISSA_BITS = 5
HIST_MIN_EXP = -40
HIST_MAX_EXP = 25
HIST_SHIFT = 23 - HIST_MANTISSA_BITS
HIST_BASE = (127 + HIST_MIN_EXP) << HIST_MANTISSA_BITS
HIST_BINS = (HIST_MAX_EXP - HIST_MIN_EXP) << HIST_MANTISSA_BITS


class Regen(NamedTuple):
    """How the compute ops regenerate a weight's untracked elements instead of reading zeros: element
    ``f`` (flat, row-major) is ``scale * w0[f]`` rounded to the values' dtype, ``w0`` the
    weight's initial values (:func:`procrustes_kernels.philox.init_values` of ``seed`` and
    ``bound``), exactly as ``materialize`` writes it. ``scale`` is the 0-d float32 decay factor on
    the weight's device, read by the kernels (no host read)."""

    scale: Tensor
    seed: int
    bound: float


def conv_grid_dims(
    hw: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(out_hw, grid)`` of a convolution: its output size (not positive where the padded input is
    smaller than the dilated kernel) and the size of each stride phase of its padded input,
    ``ceil((H + 2 p) / s)`` by ``ceil((W + 2 p) / s)``: the grid the plane kernels walk."""
    (h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = hw, kernel_size, stride, padding, dilation
    hp, wp = h + 2 * ph, w + 2 * pw
    out_hw = ((hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1)
    return out_hw, (-(-hp // sh), -(-wp // sw))


def log_bins(scores: Tensor) -> Tensor:
    """The log bin (int64) of every score."""
    bits = scores.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return ((bits >> HIST_SHIFT) - HIST_BASE).clamp_(0, HIST_BINS - 1)


def check_range(fn: str, start: int, count: int | None, numel: int) -> tuple[int, int]:
    """``(start, count)`` of a part of a weight's ``numel`` elements that ``materialize`` writes
    (``count`` None: up to ``numel``): whole groups, so that ``start`` is a multiple of
    :data:`GROUP_SIZE` and so is ``start + count``, each unless it is ``numel``."""
    if count is None:
        count = numel - start
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, count))
    if ok:
        stop = start + count
        ok = 0 <= start <= stop <= numel
        ok = ok and all(v == numel or v % GROUP_SIZE == 0 for v in (start, stop))
    if not ok:
        raise ValueError(
            f"{fn}: expected 0 <= start <= start + count <= numel={numel}, start and start + "
            f"count multiples of {GROUP_SIZE} (or numel), got start={start!r}, "
            f"count={count!r}"
        )
    return start, count


def score_histogram(scores: Tensor) -> Tensor:
    """Counts of ``scores`` per log bin (int64, length :data:`HIST_BINS`)."""
    return torch.bincount(log_bins(scores.flatten()), minlength=HIST_BINS)


@dataclass
class Segment:
    """One sparse layer's weight as the update ops see it: flat, with its compressed tracked set."""

    seed: int
    bound: float
    numel: int
    values: Tensor  # tracked values, ascending flat index
    bits: Tensor  # uint8 tracked-bit mask
    group_ptr: Tensor  # int64 pointers, one per GROUP_SIZE elements (+1)
    grad: Tensor  # dense gradient of the effective weight, numel elements, contiguous
    momentum: Tensor | None = None  # aligned with values; None when there is no buffer
    scale_prev: float = 1.0  # d_(n-1): untracked weights are scale_prev * w0 before the step
    # Per-step space a backend may use between the passes of one step (the C++ backend keeps the
    # scores' upper halves there); the optimizer builds fresh segments every step.
    scratch: dict = field(default_factory=dict)

    @property
    def dtypes(self) -> set[torch.dtype]:
        """The floating dtypes of the segment's values, gradient and momentum."""
        out = {self.values.dtype, self.grad.dtype}
        if self.momentum is not None:
            out.add(self.momentum.dtype)
        return out


@dataclass(frozen=True)
class StepParams:
    """Scalars of one update step."""

    lr: float
    momentum: float
    weight_decay: float
    scale: float  # d_n: the score's reference point and the untracked value after the step


@dataclass
class Compacted:
    """New tracked set of a segment after a step."""

    values: Tensor
    bits: Tensor
    group_ptr: Tensor
    momentum: Tensor | None
    ties_used: int = 0
    histogram: Tensor | None = None  # log-bin score histogram, when asked for

    @property
    def kept(self) -> int:
        return self.values.numel()
