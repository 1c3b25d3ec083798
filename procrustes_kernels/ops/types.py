"""Data passed between the optimizer and the backends' weight ops."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["Segment", "StepParams", "Compacted", "RADIX_HIGH_BINS", "RADIX_LOW_BINS"]

# Radix select on non-negative float32 scores: 15 upper bits (the sign bit is 0), then 16 lower.
RADIX_HIGH_BINS = 1 << 15
RADIX_LOW_BINS = 1 << 16


@dataclass
class Segment:
    """One sparse layer's weight as the update ops see it: flat, with its compressed tracked set."""

    seed: int
    bound: float
    numel: int
    values: Tensor  # tracked values, ascending flat index
    bits: Tensor  # uint8 tracked-bit mask
    group_ptr: Tensor  # int64 pointers, one per 256 elements (+1)
    grad: Tensor  # dense gradient of the effective weight, numel elements, contiguous
    momentum: Tensor | None = None  # aligned with values; None when there is no buffer
    scale_prev: float = 1.0  # d_(n-1): untracked weights are scale_prev * w0 before the step
    scratch: dict = field(
        default_factory=dict
    )  # per-step space a backend may use between the passes of one step


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
