"""The AdamW update of budgeted weights (``update="adamw"``; docs/training_rule.md, "AdamW").

AdamW keeps two moments per weight. On a budget only the tracked weights keep theirs (``exp_avg``
and ``exp_avg_sq``, aligned with the tracked values), so optimizer memory stays proportional to the
budget. What the untracked weights lack is the second moment that makes a fresh Adam step
meaningful: with no history every fresh step ``g / sqrt(g^2)`` has the same magnitude and the score
``|c - d_n * w0|`` would rank nothing. Each budgeted weight therefore also keeps a factored estimate
of the second moment of *all* its weights (Adafactor's): an exponential average of the row means
and of the column means of ``g^2`` over the weight seen as ``rows x cols`` (output features by the
rest), ``O(rows + cols)`` numbers, from which ``v[i, j] ~ row[i] * col[j] / mean(row)``.

Per step (``t`` = the weight's own step count, ``bc1 = 1 - beta1^t``, ``bc2 = 1 - beta2^t``):

* the factored estimate takes this step's ``g^2``: ``row = beta2 * row + (1 - beta2) *
  rowmean(g^2)``, ``col`` likewise (zero before step 1), ``V[i, j] = row[i] * col[j] / mean(row)``;
* tracked weights with moments: ``m = beta1 * m_old + (1 - beta1) * g``,
  ``v = beta2 * v_old + (1 - beta2) * g^2`` (exact AdamW);
* every other weight: ``m = (1 - beta1) * g`` (AdamW's fresh first moment: no history) and
  ``v = V[i, j]`` (the second moment it would have, estimated from its row and column);
* direction ``D = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)``, times ``f`` (below) for untracked
  weights.

An untracked weight's direction is then the AdamW step it would take if it entered the tracked
set: its gradient relative to the typical gradient of its row and column (so even step 1 ranks the
weights, where ``g / sqrt(g^2)`` would tie them all), shrinking with the bias correction as
training goes on, as a fresh AdamW moment does. One more factor decides between layers: AdamW
moves every weight by about ``lr`` per step whatever its layer's gradient scale, so directions
alone would spread a global budget evenly over the layers, while the loss pulls much harder on
some (a small first convolution). Under ``scope="global"`` an untracked weight's direction is
therefore multiplied by ``f = sqrt(L / G)``, its layer's RMS gradient relative to the budget's
(``L`` the layer's bias-corrected mean ``g^2`` from the factored estimate, ``G`` its mean over the
budget's weights; :func:`budget_scales`): within a layer this is the AdamW step, across layers the
budget goes where the gradient is (as the SGD rule's scores do). With ``scope="layer"``, ``f = 1``.
A weight that enters keeps ``m`` and ``v`` as above (``f`` scales its first step only) and
tracked weights follow AdamW exactly from then on.

``D`` then takes the place of the gradient in the training rule's passes, with ``momentum = 0``:
the candidate ``c = W - lr * (D + weight_decay * W)`` is AdamW's decoupled step, scored, selected
and compacted by the same backend ops as the SGD rule (so every backend reproduces the AdamW
variant exactly as it reproduces SGD). After the selection the new tracked weights keep
``m`` and ``v`` and the factored estimate takes this step's ``g^2``.

Everything here is elementwise PyTorch on the gradient's device, computed before anything is
written (a step that fails leaves all state as it was).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AdamWMoments",
    "budget_scales",
    "dense_adamw",
    "direction",
    "factored_update",
    "moments",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class AdamWMoments:
    """The AdamW state of one budgeted weight before a step (from the optimizer's state)."""

    step: int  # steps this weight has taken (its bias corrections)
    exp_avg: Tensor | None  # first moments of the tracked weights (aligned with the values)
    exp_avg_sq: Tensor | None  # second moments of the tracked weights
    row: Tensor | None  # factored second moment: average row means of g^2 (rows,)
    col: Tensor | None  # ... and column means (cols,)


def moments(
    grad: Tensor,
    tracked: Tensor,
    state: AdamWMoments,
    row: Tensor,
    col: Tensor,
    beta1: float,
    beta2: float,
) -> tuple[Tensor, Tensor]:
    """Dense ``(m, v)`` of this step for every weight (flat, transient), in the compute dtype.

    ``grad`` is the flat dense gradient, ``tracked`` the flat bool mask of the tracked set that
    ``state.exp_avg`` / ``state.exp_avg_sq`` are aligned with, ``row`` / ``col`` the factored
    estimate after this step (:func:`factored_update`).
    """
    cdt = _compute_dtype(grad.dtype)
    g = grad.reshape(-1).to(cdt)
    g2 = g * g
    m = g * (1.0 - beta1)
    # V[i, j] = row[i] * col[j] / mean(row); an all-zero gradient so far gives 0.
    mean = row.mean().clamp_min(torch.finfo(row.dtype).tiny)
    v = ((row / mean)[:, None] * col[None, :]).reshape(-1).to(cdt)
    if state.exp_avg is not None and state.exp_avg.numel():
        gt, g2t = g[tracked], g2[tracked]
        m[tracked] = state.exp_avg.to(cdt) * beta1 + gt * (1.0 - beta1)
        v[tracked] = state.exp_avg_sq.to(cdt) * beta2 + g2t * (1.0 - beta2)
    return m, v


def direction(m: Tensor, v: Tensor, step: int, beta1: float, beta2: float, eps: float) -> Tensor:
    """AdamW's step direction ``(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)`` at step ``step + 1``."""
    t = step + 1
    bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
    return (m / bc1) / (v.sqrt() / math.sqrt(bc2) + eps)


def factored_update(
    row: Tensor | None, col: Tensor | None, grad: Tensor, rows: int, beta2: float
) -> tuple[Tensor, Tensor]:
    """The factored second moment after this step's gradient (row and column means of ``g^2``)."""
    cdt = _compute_dtype(grad.dtype)
    g = grad.reshape(rows, -1).to(cdt)
    g2 = g * g
    r, c = g2.mean(dim=1) * (1.0 - beta2), g2.mean(dim=0) * (1.0 - beta2)
    if row is None:
        return r, c
    return row * beta2 + r, col * beta2 + c


def dense_adamw(
    p: Tensor,
    grad: Tensor,
    state: dict,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    wd: float,
) -> dict[str, Tensor]:
    """``torch.optim.AdamW``'s update of one dense parameter (its single-tensor form, the same ops
    out of place, so the same bits): the new ``"param"`` and state, nothing written."""
    beta1, beta2 = betas
    step = state["step"] + 1 if "step" in state else torch.tensor(1.0)
    exp_avg = state.get("exp_avg")
    exp_avg_sq = state.get("exp_avg_sq")
    if exp_avg is None:
        exp_avg = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avg_sq = torch.zeros_like(p, memory_format=torch.preserve_format)
    t = int(step.item())
    param = p.mul(1 - lr * wd)
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul(grad, grad, value=1 - beta2)
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add(eps)
    param = param.addcdiv(exp_avg, denom, value=-lr / bc1)
    return {"param": param, "step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def budget_scales(
    rows: list[Tensor], numels: list[int], steps: list[int], beta2s: list[float]
) -> list[Tensor]:
    """``f = sqrt(L / G)`` of each weight sharing one budget: the RMS of its gradient relative to
    the budget's, from the factored estimates. ``L = mean(row) / bc2`` (the weight's bias-corrected
    mean ``g^2``), ``G`` the mean of ``L`` over the budget's weights weighted by their ``numels``;
    ``f = 1`` while ``G`` is 0. 0-d tensors on the rows' device (no host read)."""
    levels = [row.mean() / (1.0 - b2**t) for row, t, b2 in zip(rows, steps, beta2s)]
    total = sum(numels)
    mean = sum(level * (n / total) for level, n in zip(levels, numels))
    return [
        torch.where(mean > 0, (level / mean.clamp_min(torch.finfo(mean.dtype).tiny)).sqrt(), 1.0)
        for level in levels
    ]
