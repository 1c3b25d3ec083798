"""Selecting the tracked set from the scores (docs/training_rule.md, "Selection").

Three rules, all returning a boolean mask over a flat score vector:

* :func:`topk_mask` (DropBack, exact): the ``k`` largest scores among the positive ones, ties at the
  k-th score resolved towards the lower flat index.
* :class:`QuantileSelector` (Procrustes, this project's order-independent estimator): every score is
  compared with a threshold ``theta`` fixed for the whole pass, and the same pass builds a histogram
  of the scores over log-spaced bins from which the next step's ``theta`` is read. The bins are cut on
  the float32 bit pattern (exponent plus the top mantissa bits), so every backend bins every score
  identically with integer operations alone.
* :class:`PaperQuantileSelector`: a faithful port of the authors' sequential estimator, kept for
  comparison with the paper (it walks the scores one by one, so no GPU can run it as written).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .ops.contract import HIST_BASE, HIST_BINS, HIST_SHIFT, score_histogram

__all__ = [
    "topk_mask",
    "HIST_BINS",
    "score_histogram",
    "bin_edges",
    "threshold_from_histogram",
    "QuantileSelector",
    "PaperQuantileSelector",
]


def _float32(x: float) -> float:
    """Round a Python float to the nearest float32 (thresholds are float32 on every backend)."""
    return float(np.float32(x))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exact DropBack selection: the ``k`` largest positive scores, ties to the lower index.

    Args:
        scores: 1-D floating tensor (non-negative in practice).
        k: number of elements to keep, ``0 <= k``; fewer are kept when fewer scores are positive.

    Returns:
        Boolean mask with the same length as ``scores``.
    """
    if scores.dim() != 1:
        raise ValueError(f"topk_mask(): expected 1-D scores, got shape {tuple(scores.shape)}")
    if k < 0:
        raise ValueError(f"topk_mask(): expected k >= 0, got {k}")
    n = scores.numel()
    if k == 0 or n == 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    k = min(k, n)
    kth = torch.topk(scores, k, sorted=False).values.min()
    if kth <= 0:
        # Fewer than k positive scores: keep all positive ones (zero scores never count).
        return scores > 0
    mask = scores > kth
    remaining = k - int(mask.sum())
    if remaining > 0:
        ties = torch.nonzero(scores == kth).flatten()[:remaining]
        mask[ties] = True
    return mask


def bin_edges(b: int) -> tuple[float, float]:
    """Lower and upper score edge of bin ``b`` (bin 0 starts at 0: it also holds tiny scores)."""
    lo_bits = (b + HIST_BASE) << HIST_SHIFT
    hi_bits = (b + 1 + HIST_BASE) << HIST_SHIFT
    as_float = np.array([lo_bits, hi_bits], dtype=np.int32).view(np.float32)
    lo = 0.0 if b == 0 else float(as_float[0])
    return lo, float(as_float[1])


def threshold_from_histogram(hist: torch.Tensor, target: float) -> float:
    """Score above which the histogram's upper tail holds ``target`` elements.

    Linear interpolation inside the bin where the tail count crosses ``target``; 0.0 when the whole
    histogram holds fewer than ``target`` elements (then every positive score is kept). The result
    is rounded to float32.
    """
    counts = hist.detach().to("cpu", torch.int64).numpy()
    tail = np.cumsum(counts[::-1])[::-1]  # tail[b] = elements in bins >= b
    if target <= 0:
        return math.inf
    if tail[0] < target:
        return 0.0
    # Highest bin whose tail reaches the target: the crossing happens inside it.
    b = int(np.nonzero(tail >= target)[0][-1])
    above = int(tail[b + 1]) if b + 1 < len(tail) else 0
    lo, hi = bin_edges(b)
    frac = (target - above) / counts[b]
    return _float32(hi - frac * (hi - lo))


class QuantileSelector:
    """Order-independent quantile estimator carrying ``theta`` across steps.

    Step ``t`` keeps the scores strictly above ``theta_t`` and, from the same scores, computes
    ``theta_(t+1)``: the threshold whose histogram tail holds ``aim`` elements. ``aim`` is the
    budget ``k`` corrected for drift: ``count_t / aim_(t-1)`` measures how far the distribution moved
    between two steps (plus the interpolation bias); its geometric mean over the last
    ``drift_window`` steps divides ``k``.

    The first ``warmup_steps`` steps (at least the first, which has no ``theta`` yet) read their
    threshold from their own histogram instead, a second pass over the scores: early in training
    the scores move fastest (momentum builds up, the init decay starts at step 2), and a threshold
    carried from the previous step would overshoot the budget several times over. The drift is
    measured only on steps that use the carried threshold: with exact top-k selection the tracked
    set churns more than under a fixed threshold, and its drift would mislead the correction.

    All of this is host arithmetic on integer counts, so every backend carries the same ``theta``.
    """

    def __init__(self, drift_window: int = 4, warmup_steps: int = 10) -> None:
        if drift_window < 1:
            raise ValueError(f"QuantileSelector(): expected drift_window >= 1, got {drift_window}")
        if warmup_steps < 1:
            raise ValueError(f"QuantileSelector(): expected warmup_steps >= 1, got {warmup_steps}")
        self.drift_window = drift_window
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.theta: float | None = None
        self.aim: float | None = None
        self.ratios: list[float] = []
        self.capped = 0  # steps whose count went over the hard cap (redone exactly)

    @property
    def two_pass(self) -> bool:
        """Whether the next step reads its threshold from its own histogram."""
        return self.theta is None or self.steps < self.warmup_steps

    def own_threshold(self, hist: torch.Tensor, k: int) -> float:
        """Threshold of a two-pass step, from that step's own histogram."""
        return threshold_from_histogram(hist, float(k))

    def advance(self, hist: torch.Tensor, k: int, kept: int) -> dict:
        """The state after a step that kept ``kept`` scores and binned them into ``hist``.

        Returned, not applied (see ``load_state_dict``): the optimizer applies it only once the
        whole step succeeded, so a failure leaves the estimator as it was.
        """
        ratios = list(self.ratios)
        if not self.two_pass and self.aim and kept > 0:
            ratios = (ratios + [kept / self.aim])[-self.drift_window :]
        drift = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else 1.0
        aim = min(max(k / drift, 1.0), float(max(int(hist.sum()), 1)))
        return {
            "steps": self.steps + 1,
            "theta": threshold_from_histogram(hist, aim),
            "aim": aim,
            "ratios": ratios,
            "capped": self.capped,
        }

    def step(self, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
        """Mask of one step over a flat score vector and the next state (not applied)."""
        hist = score_histogram(scores)
        theta = self.own_threshold(hist, k) if self.two_pass else self.theta
        mask = scores > theta
        return mask, self.advance(hist, k, int(mask.sum()))

    def select(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """One step that also advances the state."""
        mask, state = self.step(scores, k)
        self.load_state_dict(state)
        return mask

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "theta": self.theta,
            "aim": self.aim,
            "ratios": list(self.ratios),
            "capped": self.capped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.theta = state["theta"]
        self.aim = state["aim"]
        self.ratios = list(state["ratios"])[-self.drift_window :]
        self.capped = int(state.get("capped", 0))  # checkpoints from before the cap have none


class PaperQuantileSelector:
    """The authors' sequential quantile estimator (qe-cpp), for comparison with the paper.

    Walks the scores in flat order: an element is kept when ``score > theta``; after each element
    ``theta *= 1 + lam * q`` if it was kept, else ``theta *= 1 - lam * (1 - q)``, with
    ``q = 1 - k / N``. ``theta`` carries across steps. The kept count is only approximately ``k``
    and converges slowly on large tensors (see docs); it is not the default.
    """

    def __init__(self, theta0: float = 1e-2, lam: float = 1e-6) -> None:
        if not theta0 > 0:
            raise ValueError(f"PaperQuantileSelector(): expected theta0 > 0, got {theta0}")
        if not 0 < lam < 1:
            raise ValueError(f"PaperQuantileSelector(): expected lam in (0, 1), got {lam}")
        self.theta0 = theta0
        self.lam = lam
        self.theta = theta0
        self.capped = 0  # steps whose count went over the hard cap (redone exactly)

    def step(self, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
        """Mask of one sequential pass and the next state (not applied); the walk runs in the
        CPU backend (C++ when built)."""
        from . import ops

        mask, theta = ops.paper_walk(scores, self.theta, self.lam, k)
        return mask, {"theta": theta, "capped": self.capped}

    def select(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        mask, state = self.step(scores, k)
        self.load_state_dict(state)
        return mask

    def state_dict(self) -> dict:
        return {"theta": self.theta, "capped": self.capped}

    def load_state_dict(self, state: dict) -> None:
        self.theta = state["theta"]
        self.capped = int(state.get("capped", 0))
