"""The selection rules the optimizer calls: how segments that share one budget ``k`` get their
new tracked sets (docs/training_rule.md, "Selection").

Each rule takes the step's segments (one per budgeted weight, :class:`~.ops.Segment`), their step
scalars and the budget, runs the backends' passes through :mod:`procrustes_kernels.ops`, and
returns the new tracked sets plus its own next state, returned, not applied: the optimizer writes
nothing until the whole step has succeeded, then calls :meth:`Rule.load_state_dict`.

* :class:`TopK` (DropBack, exact): a two-level radix select of the k-th largest score.
* :class:`Quantile` (Procrustes): the order-independent estimator of
  :class:`~.selection.QuantileSelector`, one pass after its warm-up.
* :class:`PaperQuantile`: the authors' sequential walk (:class:`~.selection.PaperQuantileSelector`).
* :class:`Tiles`: whole tiles, ranked exactly by their mean score (:mod:`procrustes_kernels.tiles`).

The two estimators are bounded: a step whose count falls outside :func:`budget_band`
(``floor(0.9 k)`` to ``ceil(1.1 k)``) is redone, only such steps paying more passes: first with
the threshold read from the step's own histogram (one more pass; the carried-threshold steps of
``quantile`` already have it), then, if that count is outside the band too, by the exact top-k
selection of ``k`` weights (three more). The estimator counts such steps in its ``capped`` state.
Fewer than ``floor(0.9 k)`` positive scores are all kept (nothing else could be).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import ops
from .ops import Compacted, Segment, StepParams
from .selection import PaperQuantileSelector, QuantileSelector, threshold_from_histogram
from .tiles import select_tiles, tile_element_mask, tile_scores, tile_sizes

__all__ = [
    "Rule",
    "TopK",
    "Quantile",
    "PaperQuantile",
    "Tiles",
    "NonFiniteScores",
    "budget_band",
    "budget_cap",
]

# Radix bins of the float32 bit patterns with an all-ones exponent: inf and NaN scores.
_NONFINITE_HIGH = 0x7F80


class NonFiniteScores(FloatingPointError):
    """A rule met inf / NaN scores (an update that overflowed) in segment ``segment`` of the
    step; the optimizer names the parameter and refuses the step."""

    def __init__(self, segment: int) -> None:
        super().__init__(f"non-finite scores in segment {segment}")
        self.segment = segment


Geometry = tuple[int, int, int, int]


class Rule(abc.ABC):
    """Base of the selection rules: stateless unless a subclass says otherwise."""

    @abc.abstractmethod
    def update(
        self,
        segments: Sequence[Segment],
        params: Sequence[StepParams],
        k: int,
        geometries: Sequence[Geometry],
    ) -> tuple[list[Compacted], dict | None]:
        """New tracked sets of ``segments`` within the budget ``k``, and the rule's next state
        (``None``: nothing to carry)."""

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:  # noqa: B027 (stateless by default)
        """Applies a state returned by :meth:`update` (nothing to apply for a stateless rule)."""


def budget_cap(k: int) -> int:
    """The most weights an estimated selection may track for a budget of ``k``: ``ceil(1.1 k)``."""
    return math.ceil(1.1 * k)


def budget_band(k: int) -> tuple[int, int]:
    """The counts an estimated selection may end a step with for a budget of ``k``."""
    return math.floor(0.9 * k), budget_cap(k)


def _within_band(results, plan, segments, params, k, geometries, hist=None, rethreshold=False):
    """``results`` if their count is within :func:`budget_band`, else the step redone (with the
    threshold of its own histogram ``hist`` when ``rethreshold``, then by the exact top-k),
    counted in ``plan["capped"]``."""
    low, high = budget_band(k)
    kept = sum(r.kept for r in results)
    if low <= kept <= high:
        return results, plan
    if hist is not None and kept <= high and int(hist[1:].sum()) < low:
        return results, plan  # fewer positive scores than the band's floor: all are kept
    plan = {**plan, "capped": plan["capped"] + 1}
    if rethreshold:
        theta = threshold_from_histogram(hist, float(k))
        redone = [ops.compact(s, p, theta) for s, p in zip(segments, params)]
        if low <= sum(r.kept for r in redone) <= high:
            return redone, plan
    exact, _ = TopK().update(segments, params, k, geometries)
    return exact, plan


def _float32_of_bits(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def _highest_bin_reaching(counts: np.ndarray, target: int) -> tuple[int, int]:
    """Highest bin ``b`` whose tail (bins >= b) holds ``target`` elements, and the tail above it."""
    tail = np.cumsum(counts[::-1])[::-1]
    b = int(np.nonzero(tail >= target)[0][-1])
    above = int(tail[b + 1]) if b + 1 < len(tail) else 0
    return b, above


class TopK(Rule):
    """Exact top-k over all segments by a two-level radix select on the scores' bits.

    The k-th largest score ``v`` is found from a histogram of the upper 15 bits, then one of the
    lower 16 bits within the bin that holds it; the compaction keeps scores above ``v`` and hands
    the remaining quota of ties at ``v`` to the segments in order, so ties go to the lower flat
    index across all layers. Zero scores are never kept.
    """

    def update(self, segments, params, k, geometries):
        sp = list(zip(segments, params))
        highs = [ops.radix_histogram(s, p).cpu() for s, p in sp]
        for j, h in enumerate(highs):
            if int(h[_NONFINITE_HIGH:].sum()):
                raise NonFiniteScores(j)
        high = sum(highs).numpy()
        b, above = _highest_bin_reaching(high, k)
        low = sum(ops.radix_histogram(s, p, b).cpu() for s, p in sp).numpy()
        lo, above_low = _highest_bin_reaching(low, k - above)
        v = (b << 16) | lo
        if v == 0:  # fewer than k positive scores: keep them all
            threshold, quota = 0.0, 0
        else:
            threshold, quota = _float32_of_bits(v), k - above - above_low
        results = []
        for s, p in sp:
            res = ops.compact(s, p, threshold, quota)
            quota -= res.ties_used
            results.append(res)
        return results, None


class Quantile(Rule):
    """The quantile estimator: a threshold carried across steps, the histogram of each step's
    scores gathered in the same pass as its compaction (two passes during the warm-up)."""

    def __init__(self, drift_window: int = 4, warmup_steps: int = 10) -> None:
        self.selector = QuantileSelector(drift_window, warmup_steps)

    def update(self, segments, params, k, geometries):
        sel = self.selector
        sp = list(zip(segments, params))
        if sel.two_pass:
            hist = sum(ops.log_histogram(s, p).cpu() for s, p in sp)
            theta = sel.own_threshold(hist, k)
            results = [ops.compact(s, p, theta) for s, p in sp]
        else:
            results = [ops.compact(s, p, sel.theta, with_histogram=True) for s, p in sp]
            hist = sum(r.histogram.cpu() for r in results)
        plan = sel.advance(hist, k, sum(r.kept for r in results))
        # (a two-pass step's threshold came from its own histogram already)
        return _within_band(
            results, plan, segments, params, k, geometries, hist, rethreshold=not sel.two_pass
        )

    def state_dict(self) -> dict:
        return self.selector.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.selector.load_state_dict(state)


class PaperQuantile(Rule):
    """The authors' sequential walk over all scores in flat order, on the host (C++ when built)."""

    def __init__(self) -> None:
        self.selector = PaperQuantileSelector()

    def update(self, segments, params, k, geometries):
        per_segment = [ops.scores(s, p).cpu() for s, p in zip(segments, params)]
        for j, sc in enumerate(per_segment):
            if not bool(torch.isfinite(sc).all()):
                raise NonFiniteScores(j)
        scores = torch.cat(per_segment)
        mask, plan = self.selector.step(scores, k)
        masks = torch.split(mask, [s.numel for s in segments])
        results = [
            ops.compact_mask(s, p, m.to(s.grad.device)) for s, p, m in zip(segments, params, masks)
        ]
        return _within_band(results, plan, segments, params, k, geometries)

    def state_dict(self) -> dict:
        return self.selector.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.selector.load_state_dict(state)


class Tiles(Rule):
    """Whole ``tile = (rows, cols)`` tiles kept or dropped by mean score within the budget (exact,
    no estimator state); each weight is then compacted with the expanded mask."""

    def __init__(self, tile: tuple[int, int]) -> None:
        self.tile = tile
        self._sizes: dict[Geometry, torch.Tensor] = {}

    def _tile_sizes(self, geo: Geometry) -> torch.Tensor:
        if geo not in self._sizes:
            self._sizes[geo] = tile_sizes(geo, self.tile)
        return self._sizes[geo]

    def update(self, segments, params, k, geometries):
        # One weight's element scores at a time; only its tile means (a ~1/1000 of it) stay.
        means = [
            tile_scores(ops.scores(s, p), geo, self.tile).cpu()
            for s, p, geo in zip(segments, params, geometries)
        ]
        for j, m in enumerate(means):
            if not bool(torch.isfinite(m).all()):
                raise NonFiniteScores(j)
        kept = select_tiles(means, k, [self._tile_sizes(geo) for geo in geometries])
        results = [
            ops.compact_mask(s, p, tile_element_mask(t.to(s.grad.device), geo, self.tile))
            for s, p, geo, t in zip(segments, params, geometries, kept)
        ]
        return results, None


def make_rule(selection: str, granularity: str, tile: tuple[int, int], **quantile: Any) -> Rule:
    """The rule of an optimizer's configuration (``quantile``: the estimator's settings)."""
    if granularity == "tile":
        return Tiles(tile)
    if selection == "quantile":
        return Quantile(**quantile)
    if selection == "quantile_paper":
        return PaperQuantile()
    return TopK()
