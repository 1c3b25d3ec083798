"""The DropBack / Procrustes optimizer (docs/training_rule.md), a ``torch.optim.Optimizer``.

One ``step()`` over all budgeted weights (:class:`~procrustes_kernels.weight.BudgetedWeight`
parameters) for weights ``W`` with dense gradient ``g`` (their ``.grad``):

1. candidate ``c = W - lr * m`` with ``m = g + weight_decay * W`` (plus momentum, kept for tracked
   weights only: a weight entering the tracked set starts from ``m = g'``);
2. score ``s = |c - d_n * w0|``, how far each weight moved from its decayed initial value;
3. selection of the new tracked set (``topk`` exact or the ``quantile`` estimator), globally over
   all layers or per layer; with ``granularity="tile"`` whole tiles are kept or dropped, ranked by
   their mean score (:mod:`procrustes_kernels.tiles`);
4. tracked weights store ``c``; every other weight is ``d_n * w0`` again, regenerated, not stored.

Every other parameter (biases, norms) trains with plain SGD of its group's settings. Everything is
computed before anything is written, so a failing step leaves model and optimizer as they were.

Budgeted weights change only here: any other optimizer's ``step()`` over a budgeted weight is
refused before it changes anything (a global step pre-hook), since a ``torch.optim`` update of the
dense weight cannot be stored on a budget.

Over 600 lines on purpose: the three parts of one
``torch.optim.Optimizer`` (argument checks, the step, ``state_dict`` with its format
migrations); the selection rules themselves are in :mod:`procrustes_kernels.rules`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .adamw import (
    AdamWMoments,
    budget_scales,
    dense_adamw,
    direction,
    factored_update,
    moments,
)
from .compute import COMPUTE_TILE_SIZES
from .gradient import is_tracked_gradient
from .ops import Compacted, Segment, StepParams
from .rules import NonFiniteScores, Rule, make_rule
from .storage import BlockStorage, unpack_bits
from .tiles import check_tile
from .weight import BudgetedWeight, is_budgeted

__all__ = ["DropBack", "Procrustes", "decay_factor", "decay_for_steps", "linear_decay_factor"]

SELECTIONS = ("topk", "quantile", "quantile_paper")
SCOPES = ("global", "layer")
GRANULARITIES = ("element", "tile")
UPDATES = ("sgd", "adamw")
# The optimizer state aligned with each budgeted weight's tracked values, per base rule.
TRACKED_MOMENTS = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}


def decay_factor(step: int, init_decay: float, zero_cutoff: float = 1e-8) -> float:
    """``d_n``: 1 for ``n <= 1``, else ``init_decay ** (n - 1)``; exactly 0 once below ``zero_cutoff``."""
    if step <= 1 or init_decay == 1.0:
        return 1.0
    d = init_decay ** (step - 1)
    return 0.0 if d < zero_cutoff else d


def linear_decay_factor(step: int, decay_steps: int) -> float:
    """``d_n`` of the linear decay: 1 for ``n <= 1``, then ``1 - (n - 1) / decay_steps``, exactly 0
    from step ``decay_steps + 1`` on (the ``decay_steps`` argument of :class:`DropBack`)."""
    if step <= 1:
        return 1.0
    return max(0.0, 1.0 - (step - 1) / decay_steps)


def decay_for_steps(steps: int, zero_cutoff: float = 1e-8) -> float:
    """Per-step ``init_decay`` that brings untracked weights to exactly zero after ``steps`` steps.

    Procrustes' 0.9 per step reaches zero after ~175 steps, which is early for short runs; this
    expresses the decay relative to the length of training instead.
    """
    if steps < 1:
        raise ValueError(f"decay_for_steps(): expected steps >= 1, got {steps}")
    if not 0 < zero_cutoff < 1:
        raise ValueError(f"decay_for_steps(): expected zero_cutoff in (0, 1), got {zero_cutoff}")
    return zero_cutoff ** (1.0 / steps)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _scalar(x: Any) -> Any:
    """A Python number for what PyTorch takes as one (numpy scalars, 0-d real tensors); anything
    else unchanged, for the checks to refuse."""
    if isinstance(x, (bool, np.bool_)):
        return x
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if (
        isinstance(x, torch.Tensor)
        and x.dim() == 0
        and not x.requires_grad
        and not x.is_complex()
        and x.dtype != torch.bool
        and x.device.type != "meta"
    ):
        return x.item()
    return x


_STATE_FORMAT = 2  # 1: the layer-based layout (sparse layers' ``values`` first, then the rest)


_SGD_DEFAULTS = {"nesterov": False, "dampening": 0, "maximize": False}


def _check_group_hyper(group: dict, name: str, update: str = "sgd") -> None:
    """Checks the hyperparameters a param group sets (torch.optim keeps them per group)."""
    for key, default in _SGD_DEFAULTS.items():
        if key in group and group[key] != default:
            raise ValueError(
                f"{name}: expected {key}={default!r} (the base rule is SGD with plain momentum or "
                f"AdamW), got {group[key]!r}"
            )
    for key in ("lr", "momentum", "weight_decay", "eps"):
        if key in group:
            group[key] = _scalar(group[key])
    if update == "adamw":
        if group.get("momentum", 0) != 0:
            raise ValueError(
                f"{name}: momentum does not apply to update='adamw' (its first moment is "
                f"betas[0]); expected momentum=0, got {group['momentum']!r}"
            )
        if "betas" in group:
            betas = group["betas"]
            ok = isinstance(betas, (tuple, list)) and len(betas) == 2
            betas = tuple(_scalar(b) for b in betas) if ok else betas
            if not ok or not all(_is_number(b) and 0 <= b < 1 for b in betas):
                raise ValueError(
                    f"{name}: expected betas to be two numbers in [0, 1), got {group['betas']!r}"
                )
            group["betas"] = (float(betas[0]), float(betas[1]))
        if "eps" in group:
            eps = group["eps"]
            if not _is_number(eps) or not eps >= 0 or not math.isfinite(eps):
                raise ValueError(f"{name}: expected eps >= 0, got {eps!r}")
    else:
        for key in ("betas", "eps"):
            if key in group:
                raise ValueError(
                    f"{name}: {key} applies to update='adamw' only; the optimizer was built "
                    f"with update={update!r}"
                )
    if "lr" in group:
        lr = group["lr"]
        if not _is_number(lr) or not lr >= 0 or not math.isfinite(lr):
            raise ValueError(f"{name}: expected lr >= 0, got {lr!r}")
    if "momentum" in group:
        mu = group["momentum"]
        if not _is_number(mu) or not 0 <= mu < 1:
            raise ValueError(f"{name}: expected momentum in [0, 1), got {mu!r}")
    if "weight_decay" in group:
        wd = group["weight_decay"]
        if not _is_number(wd) or not wd >= 0 or not math.isfinite(wd):
            raise ValueError(f"{name}: expected weight_decay >= 0, got {wd!r}")


def _first_nonfinite(tensors: list[torch.Tensor]) -> int | None:
    """Index of the first tensor holding a NaN or inf, or None; one host sync per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    bad = []
    for idx in by_device.values():
        flags = []
        for i in idx:
            t = tensors[i]
            if is_tracked_gradient(t):
                t = t.values
            t = t.detach()
            if t.is_sparse:
                t = t.coalesce().values()
            if t.numel() == 0:
                flags.append(torch.zeros((), dtype=torch.bool, device=t.device))
                continue
            lo, hi = torch.aminmax(t)  # NaN and inf propagate into min / max
            flags.append(~(torch.isfinite(lo) & torch.isfinite(hi)))
        stacked = torch.stack(flags)
        if bool(stacked.any()):
            bad += [idx[j] for j in torch.nonzero(stacked).flatten().tolist()]
    return min(bad) if bad else None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and torch.equal(a.to(b.device), b))


def _remap_momentum(
    buf: torch.Tensor, old_bits: torch.Tensor, new_bits: torch.Tensor, numel: int
) -> torch.Tensor:
    """Momentum of tracked set ``old_bits`` re-aligned to ``new_bits``: weights tracked in both keep
    theirs, newly tracked ones start from 0 (so their next ``m`` is ``g'``, as for a weight
    entering the tracked set)."""
    dense = torch.zeros(numel, dtype=buf.dtype, device=buf.device)
    dense[unpack_bits(old_bits.to(buf.device), numel)] = buf
    return dense[unpack_bits(new_bits.to(buf.device), numel)]


class DropBack(Optimizer):
    """Trains budgeted weights on a weight budget (DropBack; Procrustes with its settings).

    A ``torch.optim.Optimizer``: it takes ``model.parameters()`` or param groups, and works with
    ``zero_grad()``, ``torch.optim.lr_scheduler``, ``add_param_group``, ``state_dict()``,
    gradient clipping and ``torch.amp.GradScaler``. Budgeted weights (see
    :func:`~procrustes_kernels.sparsify`) get the DropBack rule; every other parameter plain SGD
    with its group's ``lr``, ``momentum`` and ``weight_decay``.

    Args:
        params: an iterable of parameters or of param group dicts, as for every torch optimizer
            (an ``nn.Module`` is accepted too and stands for its ``parameters()``, with names
            for error messages). At least one budgeted weight.
        lr: learning rate (per group; works with ``torch.optim.lr_scheduler``).
        budget: tracked weights, a fraction in (0, 1] of all budgeted weights of all groups or an
            int count; global over all groups, or per weight with ``scope="layer"``.
        momentum: SGD momentum (per group); kept for tracked weights only. Must be 0 with
            ``update="adamw"``.
        weight_decay: L2 penalty added to the gradient (per group); with ``update="adamw"`` the
            decoupled weight decay of ``torch.optim.AdamW`` (``W -= lr * weight_decay * W``).
        init_decay: per-step decay of the initial values of untracked weights, in (0, 1]
            (1: DropBack; 0.9: Procrustes): ``d_n = init_decay ** (n - 1)``. A weight's decay
            factor never goes back up: each step uses ``min(d_n, weight.scale_value)``, so a
            model loaded after its decay (untracked weights zero) stays decayed under a fresh
            optimizer.
        decay_steps: instead of ``init_decay``, a linear decay relative to the length of training:
            ``d_n = 1 - (n - 1) / decay_steps``, exactly 0 from step ``decay_steps + 1`` on
            (:func:`linear_decay_factor`). Keeps the initial values useful for longer than an
            exponential decay reaching zero at the same step; the recommended Procrustes setting
            for runs of a few thousand steps is ``decay_steps`` = half of the training steps.
        selection: ``"topk"`` (exact), ``"quantile"`` (order-independent estimator carrying a
            threshold across steps) or ``"quantile_paper"`` (the authors' sequential walk).
        scope: ``"global"`` (one budget over all budgeted weights) or ``"layer"`` (each weight
            keeps its share).
        zero_cutoff: decay factors below this become exactly 0 (untracked weights are then zeros).
        drift_window: steps over which the quantile estimator averages the count drift.
        quantile_warmup: first selecting steps (with ``reselect_every = R``, the first
            ``R * quantile_warmup`` steps) in which the quantile estimator reads its threshold from
            the step's own scores (a second pass) rather than carrying it from the last selection.
        granularity: ``"element"`` (default: single weights are tracked) or ``"tile"`` (whole tiles
            are tracked or regenerated, the unit of the sparse compute kernels). A tile's score is
            the mean of its weights' scores (float64 sum over the tile's weights); tiles are ranked
            exactly, descending (ties: earlier weight, then lower tile index), tiles of score 0 are
            never kept, and tiles are taken while the tracked count stays within the budget (per
            scope), stopping at the first tile that does not fit. ``selection`` does not apply
            here (each of its values is accepted and has no effect): tile scores are few (~1/1000
            of the weights) and are ranked exactly. See :mod:`procrustes_kernels.tiles`.
        tile: ``(rows, cols)`` of a tile with ``granularity="tile"``: ``rows`` output features /
            channels of one group times ``cols`` input features / channels per group, each with its
            whole kernel (all ``kh * kw`` positions); cut per group, the last tiles of a weight are
            partial where the sizes do not divide (the tiles of ``ops.compute.index.tile_mask``
            with ``block_n, block_c = tile``). Positive ints; ignored with
            ``granularity="element"``. When both are kernel tile sizes (16, 32 or 64), the weights'
            ``compute_tile`` is set to ``tile``, so the sparse kernels skip exactly the dropped tiles.
        update: the base rule, ``"sgd"`` (SGD with momentum, the papers') or ``"adamw"``
            (AdamW: tracked weights keep both moments; untracked weights are scored by the
            AdamW step they would take, from a factored second moment of ``O(rows + cols)`` per
            weight, :mod:`procrustes_kernels.adamw`). Every other parameter then trains with
            ``torch.optim.AdamW``'s rule of its group's settings.
        betas: AdamW's ``(beta1, beta2)`` (per group; default ``(0.9, 0.999)``), only with
            ``update="adamw"``.
        eps: AdamW's ``eps`` (per group; default ``1e-8``), only with ``update="adamw"``.

    Gradients are the parameters' ``.grad`` (for a budgeted weight: the dense gradient of its
    effective weight). A parameter whose ``.grad`` is None (frozen, or unused this step) is skipped
    as ``torch.optim.SGD`` skips it; a skipped budgeted weight keeps its tracked set and decay
    factor, and its tracked weights still count against a global budget.
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        budget: float | int,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        init_decay: float = 1.0,
        selection: str = "topk",
        scope: str = "global",
        *,
        zero_cutoff: float = 1e-8,
        drift_window: int = 4,
        quantile_warmup: int = 10,
        granularity: str = "element",
        tile: tuple[int, int] = (32, 32),
        decay_steps: int | None = None,
        update: str = "sgd",
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        reselect_every: int = 1,
    ) -> None:
        name = type(self).__name__ + "()"
        reselect_every = _scalar(reselect_every)
        if (
            isinstance(reselect_every, bool)
            or not isinstance(reselect_every, int)
            or reselect_every < 1
        ):
            raise ValueError(
                f"{name}: expected reselect_every to be an int >= 1, got {reselect_every!r}"
            )
        if reselect_every > 1 and update != "sgd":
            raise ValueError(
                f"{name}: reselect_every > 1 is defined for update='sgd' (the factored second "
                f"moment of update={update!r} needs every weight's gradient at every step); got "
                f"reselect_every={reselect_every}"
            )
        self.reselect_every = reselect_every
        if not isinstance(update, str) or update not in UPDATES:
            raise ValueError(f"{name}: expected update in {UPDATES}, got {update!r}")
        lr, momentum, weight_decay = _scalar(lr), _scalar(momentum), _scalar(weight_decay)
        budget, init_decay, zero_cutoff = _scalar(budget), _scalar(init_decay), _scalar(zero_cutoff)
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        if update == "adamw":
            defaults["betas"] = (0.9, 0.999) if betas is None else betas
            defaults["eps"] = 1e-8 if eps is None else eps
        else:
            defaults.update({k: v for k, v in (("betas", betas), ("eps", eps)) if v is not None})
        _check_group_hyper(defaults, name, update)
        self.update = update
        if not _is_number(init_decay) or not 0 < init_decay <= 1:
            raise ValueError(f"{name}: expected init_decay in (0, 1], got {init_decay!r}")
        decay_steps = None if decay_steps is None else _scalar(decay_steps)
        if decay_steps is not None:
            if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
                raise ValueError(
                    f"{name}: expected decay_steps to be a positive int or None, got {decay_steps!r}"
                )
            if init_decay != 1.0:
                raise ValueError(
                    f"{name}: expected either init_decay or decay_steps, got init_decay="
                    f"{init_decay!r} and decay_steps={decay_steps!r}"
                )
        drift_window, quantile_warmup = _scalar(drift_window), _scalar(quantile_warmup)
        for key, v in (("drift_window", drift_window), ("quantile_warmup", quantile_warmup)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected {key} to be an int >= 1, got {v!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"{name}: expected selection in {SELECTIONS}, got {selection!r}")
        if scope not in SCOPES:
            raise ValueError(f"{name}: expected scope in {SCOPES}, got {scope!r}")
        if not _is_number(zero_cutoff) or not 0 <= zero_cutoff < 1:
            raise ValueError(f"{name}: expected zero_cutoff in [0, 1), got {zero_cutoff!r}")
        if not isinstance(granularity, str) or granularity not in GRANULARITIES:
            raise ValueError(
                f"{name}: expected granularity in {GRANULARITIES}, got {granularity!r}"
            )
        tile = check_tile(tile, name)
        if isinstance(budget, bool) or not _is_number(budget):
            raise TypeError(
                f"{name}: expected budget to be a float in (0, 1] or an int count, got {budget!r}"
            )
        if isinstance(budget, float) and not 0 < budget <= 1:
            raise ValueError(f"{name}: expected a fractional budget in (0, 1], got {budget}")

        self._names: dict[int, str] = {}
        if isinstance(params, nn.Module):
            self._names = {id(p): n for n, p in params.named_parameters()}
            params = list(params.parameters())
        self._budget_spec = budget
        self.init_decay = float(init_decay)
        self.decay_steps = decay_steps
        self.selection = selection
        self.scope = scope
        self.zero_cutoff = float(zero_cutoff)
        self.granularity = granularity
        self.tile = tile
        self._drift_window, self._warmup = drift_window, quantile_warmup
        self.weights: list[BudgetedWeight] = []
        # Per weight with momentum: the bits its buffer is aligned with (None: trust the count).
        self._momentum_bits: list[torch.Tensor | None] = []  # aligned with self.weights
        # The "dropback" entry of state_dict(): one dict refreshed in place after every step, so a
        # state_dict taken earlier and saved later is consistent with the live momentum buffers it
        # references (as torch.optim's state_dicts are).
        self._live_state: dict[str, Any] = {}
        # The selection rule of each budget: one shared by all weights, or one per weight.
        self.rules: list[Rule] = [self._new_rule()] if scope == "global" else []
        super().__init__(params, defaults)
        if not self.weights:
            raise ValueError(
                f"{name}: expected parameters with budgeted weights, found none (convert the "
                "model with procrustes_kernels.sparsify(model) first, then pass "
                "model.parameters())"
            )
        if isinstance(budget, int) and not 1 <= budget <= self.total_weights:
            raise ValueError(
                f"{name}: expected an int budget in [1, {self.total_weights}], got {budget}"
            )
        self.step_count = 0
        self.tracked_count = sum(w.nnz for w in self.weights)
        self._set_sampled_grads()

    def reselects(self, step: int) -> bool:
        """Whether step ``step`` (1-based) selects a new tracked set: every ``reselect_every``-th
        step from the first; the others keep it (``T' = T``)."""
        return (step - 1) % self.reselect_every == 0

    def _set_sampled_grads(self) -> None:
        """Tell every weight whether the next backward needs its gradient at its tracked positions
        only (the next step keeps the tracked set) or everywhere."""
        sampled = not self.reselects(self.step_count + 1)
        for w in self.weights:
            w.set_sampled_grad(sampled)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch.optim semantics); its budgeted weights join the budget."""
        name = f"{type(self).__name__}.add_param_group()"
        if not isinstance(param_group, dict):
            raise TypeError(f"{name}: expected a dict, got {type(param_group).__name__}")
        _check_group_hyper(param_group, name, self.update)
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if is_budgeted(p) and not any(p is q for q in self.weights):
                self.weights.append(p)
                self._momentum_bits.append(None)
                if hasattr(self, "step_count"):
                    p.set_sampled_grad(not self.reselects(self.step_count + 1))
                if self.scope == "layer":
                    self.rules.append(self._new_rule())
                if self.granularity == "tile" and all(v in COMPUTE_TILE_SIZES for v in self.tile):
                    # The sparse compute kernels then skip exactly the tiles the selection dropped.
                    p.compute_tile = self.tile

    # -- configuration -----------------------------------------------------------------------------
    @property
    def total_weights(self) -> int:
        """Number of budgeted weights over all groups."""
        return sum(w.weight_numel for w in self.weights)

    @property
    def budget(self) -> int:
        """The budget as a count of tracked weights (a fractional budget of the current total)."""
        if isinstance(self._budget_spec, int):
            return self._budget_spec
        return max(1, round(self._budget_spec * self.total_weights))

    @property
    def layer_budgets(self) -> list[int] | None:
        """Per-weight budgets under ``scope="layer"`` (None under the global scope)."""
        if self.scope == "global":
            return None
        share = self.budget / self.total_weights
        return [max(1, round(w.weight_numel * share)) for w in self.weights]

    @property
    def capped_steps(self) -> int:
        """Steps on which an estimated selection (``quantile``, ``quantile_paper``) counted more
        than ``ceil(1.1 * k)`` weights for a budget ``k`` and was redone by the exact top-k (per
        budget: summed over the layers' budgets under ``scope="layer"``)."""
        return sum(getattr(getattr(r, "selector", None), "capped", 0) for r in self.rules)

    @property
    def layer_counts(self) -> list[int]:
        """Tracked weights per budgeted weight, in ``self.weights`` order."""
        return [w.nnz for w in self.weights]

    def _new_rule(self) -> Rule:
        return make_rule(
            self.selection,
            self.granularity,
            self.tile,
            drift_window=self._drift_window,
            warmup_steps=self._warmup,
        )

    def _param_name(self, p: torch.Tensor) -> str:
        name = self._names.get(id(p))
        if name is not None:
            return f"'{name}'"
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
        return f"a parameter of shape {tuple(p.shape)}"

    # -- gradients ---------------------------------------------------------------------------------
    def _check_grads(self) -> None:
        name = f"{type(self).__name__}.step()"
        with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not with_grad:
            raise RuntimeError(
                f"{name}: no parameter has a gradient; call loss.backward() before step()"
            )
        bad = _first_nonfinite([p.grad for p in with_grad])
        if bad is not None:
            raise FloatingPointError(
                f"{name}: non-finite gradient in {self._param_name(with_grad[bad])}; "
                "model and optimizer left unchanged"
            )
        for group in self.param_groups:
            for p in group["params"]:
                if (
                    p.grad is not None
                    and p.grad.is_sparse
                    and self.update == "adamw"
                    and not is_budgeted(p)
                ):
                    raise ValueError(
                        f"{name}: {self._param_name(p)} has a sparse gradient, which the AdamW "
                        "update does not take (as torch.optim.AdamW; torch.optim.SparseAdam "
                        "does)"
                    )
                if p.grad is not None and p.grad.is_sparse and group["weight_decay"] != 0:
                    raise ValueError(
                        f"{name}: {self._param_name(p)} has a sparse gradient, which "
                        "weight_decay != 0 cannot be added to (as in torch.optim.SGD); expected "
                        "weight_decay=0 for its group"
                    )

    # -- the step ----------------------------------------------------------------------------------
    # The step is driven from the host (the selection reads histograms and counts between its
    # passes), so torch.compile runs it eagerly: a compiled training loop gets one graph break
    # here, and its forward / backward stay compiled.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One DropBack/Procrustes step over the budgeted weights plus SGD on the other parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_step_hyper()
        self._check_grads()
        self._check_stored()
        n = self.step_count + 1
        d_n = self.decay_at(n)
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        active = [i for i, w in enumerate(self.weights) if w.grad is not None]
        if not self.reselects(n):
            self._keep_step(n, d_n, active, group_of)
            return loss
        for i in active:
            if is_tracked_gradient(self.weights[i].grad):
                raise RuntimeError(
                    f"{type(self).__name__}.step(): step {n} selects a new tracked set, which "
                    f"needs the dense gradient of {self._param_name(self.weights[i])}, but its "
                    ".grad holds the tracked positions only (computed before the previous step, "
                    "or under another optimizer); run forward and backward again after the "
                    "previous step(); model and optimizer left unchanged"
                )
        adamw = self.update == "adamw"
        segments, params, grads, adam = [], [], [], []
        for i in active:
            w = self.weights[i]
            grad = w.grad.to_dense() if w.grad.is_sparse else w.grad
            grad = grad.reshape(-1).contiguous()
            group = group_of[id(w)]
            mu = 0.0 if adamw else group["momentum"]
            bufs = self._tracked_moments(i, w) if adamw or mu != 0 else {}
            if adamw:
                # AdamW's direction takes the gradient's place in the passes (momentum 0).
                state = self.state[w]
                moment = AdamWMoments(
                    step=int(state["step"].item()) if "step" in state else 0,
                    exp_avg=bufs.get("exp_avg"),
                    exp_avg_sq=bufs.get("exp_avg_sq"),
                    row=state.get("exp_avg_row"),
                    col=state.get("exp_avg_col"),
                )
                tracked = unpack_bits(w.bits.to(grad.device), w.weight_numel)
                beta1, beta2 = group["betas"]
                row, col = factored_update(moment.row, moment.col, grad, w.shape[0], beta2)
                grads.append(grad)
                adam.append((moment, tracked, row, col))
            segments.append(
                Segment(
                    seed=w.seed,
                    bound=w.bound,
                    numel=w.weight_numel,
                    values=w.values,
                    bits=w.bits,
                    group_ptr=w.group_ptr,
                    grad=grad,
                    momentum=bufs.get("momentum_buffer"),
                    scale_prev=w.scale_value,
                )
            )
            params.append(
                StepParams(
                    lr=group["lr"],
                    momentum=mu,
                    weight_decay=group["weight_decay"],
                    # The decay belongs to the weight: it never goes back up, so a decayed model
                    # under a fresh optimizer keeps its untracked weights where they are.
                    scale=min(d_n, w.scale_value),
                )
            )

        if adamw:
            groups = [group_of[id(self.weights[i])] for i in active]
            self._adamw_directions(segments, grads, adam, groups)
        # Everything new is computed first; nothing is written until all of it succeeded.
        results: list[Compacted] = []
        plans: list[tuple[int, dict | None]] = []
        if self.scope == "global" and active:
            # Skipped (gradient-less) weights keep their tracked sets inside the one budget.
            held = sum(w.nnz for i, w in enumerate(self.weights) if w.grad is None)
            k = self.budget - held
            if k <= 0:
                results = [self._nothing_tracked(s) for s in segments]
            else:
                results, plan = self._update(segments, active, params, k, self.rules[0])
                plans.append((0, plan))
        elif active:
            budgets = self.layer_budgets
            for j, i in enumerate(active):
                res, plan = self._update([segments[j]], [i], [params[j]], budgets[i], self.rules[i])
                results += res
                plans.append((i, plan))

        # AdamW: the new tracked weights keep this step's moments; the factored estimate takes g^2.
        new_moments = [
            self._adamw_state(self.weights[i], grad, res, *state, group_of[id(self.weights[i])])
            for i, grad, res, state in zip(active, grads, results, adam)
        ]
        dense = self._dense_updates()
        # One reduction per new tensor and one host read: a non-finite update refuses the step.
        checked = [
            (self.weights[i], "candidate weights", r.values) for i, r in zip(active, results)
        ]
        checked += [
            (self.weights[i], "momentum", r.momentum)
            for i, r in zip(active, results)
            if r.momentum is not None
        ]
        checked += [
            (self.weights[i], key, t)
            for i, moment in zip(active, new_moments)
            for key, t in moment.items()
            if key != "step"
        ]
        checked += [(p, what, t) for p, news in dense for what, t in news.items()]
        self._refuse_nonfinite(checked, "the update")

        for j, (i, p, res) in enumerate(zip(active, params, results)):
            w = self.weights[i]
            w.set_tracked(
                BlockStorage(
                    w._shape, w.block_size, res.values, res.bits, res.group_ptr, validate=False
                ),
                scale=p.scale,
            )
            if adamw:
                self.state[w].update(new_moments[j])
                self._momentum_bits[i] = w.bits
            elif p.momentum != 0:
                self.state[w]["momentum_buffer"] = res.momentum
                self._momentum_bits[i] = w.bits
            else:
                self.state[w].pop("momentum_buffer", None)
                self._momentum_bits[i] = None
        for i, plan in plans:
            if plan is not None:
                self.rules[i].load_state_dict(plan)
        for p, news in dense:
            p.copy_(news.pop("param"))
            self.state[p].update(news)
        self._finish_step(n)
        return loss

    def _finish_step(self, n: int) -> None:
        self.step_count = n
        self.tracked_count = sum(w.nnz for w in self.weights)
        self._set_sampled_grads()
        self._refresh_live_state()

    def _keep_step(self, n: int, d_n: float, active: list[int], group_of: dict) -> None:
        """A step that keeps every tracked set (``reselect_every > 1``, docs/training_rule.md):
        each tracked weight takes the base update (SGD with momentum and weight decay, the same
        arithmetic as a selecting step's candidate), each untracked weight is ``d_n * w0`` (the
        new decay factor). Reads the gradient at the tracked positions only: a
        :class:`~procrustes_kernels.gradient.TrackedGradient`, or a dense one sampled there."""
        news = []
        for i in active:
            w = self.weights[i]
            group = group_of[id(w)]
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            g = self._tracked_grad(w)
            cdt = torch.float64 if w.values.dtype == torch.float64 else torch.float32
            W = w.values.to(cdt)
            g = g.to(cdt)
            if wd != 0:
                g = g.add(W, alpha=wd)
            m = g
            bufs = self._tracked_moments(i, w) if mu != 0 else {}
            buf = bufs.get("momentum_buffer")
            if mu != 0 and buf is not None and buf.numel():
                m = buf.to(cdt).mul(mu).add_(g)
            c = W.add(m, alpha=-lr).to(w.values.dtype)
            news.append((i, c, m.to(w.values.dtype) if mu != 0 else None, min(d_n, w.scale_value)))
        dense = self._dense_updates()
        checked = [(self.weights[i], "candidate weights", c) for i, c, _, _ in news]
        checked += [(self.weights[i], "momentum", m) for i, _, m, _ in news if m is not None]
        checked += [(p, what, t) for p, upd in dense for what, t in upd.items()]
        self._refuse_nonfinite(checked, "the update")
        for i, c, m, scale in news:
            w = self.weights[i]
            w.set_tracked(
                BlockStorage(w._shape, w.block_size, c, w.bits, w.group_ptr, validate=False),
                scale=scale,
            )
            if m is not None:
                self.state[w]["momentum_buffer"] = m
                self._momentum_bits[i] = w.bits
            else:
                self.state[w].pop("momentum_buffer", None)
                self._momentum_bits[i] = None
        for p, upd in dense:
            p.copy_(upd.pop("param"))
            self.state[p].update(upd)
        self._finish_step(n)

    def _tracked_grad(self, w: BudgetedWeight) -> torch.Tensor:
        """``w.grad`` at ``w``'s tracked positions, in storage order."""
        grad = w.grad
        if is_tracked_gradient(grad):
            if grad.bits is not w.bits and not _same_bits(grad.bits, w.bits):
                raise RuntimeError(
                    f"{type(self).__name__}.step(): the gradient of {self._param_name(w)} was "
                    "taken at another tracked set than the weight's (its tracked set was "
                    "replaced after backward); run forward and backward again; model and "
                    "optimizer left unchanged"
                )
            return grad.values
        if grad.is_sparse:
            grad = grad.to_dense()
        return grad.reshape(-1)[unpack_bits(w.bits.to(grad.device), w.weight_numel)]

    def _tracked_moments(self, i: int, w: BudgetedWeight) -> dict[str, torch.Tensor]:
        """The optimizer state aligned with weight ``i``'s tracked values (momentum, or AdamW's
        two moments), moved to the weight's current tracked set if it was replaced outside
        step()."""
        out = {}
        ref = self._momentum_bits[i]
        for key in TRACKED_MOMENTS[self.update]:
            buf = self.state[w].get(key)
            if buf is None:
                continue
            if ref is not None and not _same_bits(ref, w.bits):
                # The tracked set was replaced outside step() (a model checkpoint loaded under a
                # live optimizer, reset_tracked): move each moment to its weight's new position.
                buf = _remap_momentum(buf, ref, w.bits, w.weight_numel)
            if buf.numel() != w.nnz:
                raise RuntimeError(
                    f"{type(self).__name__}.step(): the {key} of {self._param_name(w)} has "
                    f"{buf.numel()} entries but the weight tracks {w.nnz}: its tracked set was "
                    "replaced outside step() (load the optimizer state saved with it)"
                )
            out[key] = buf
        return out

    def _adamw_directions(
        self, segments: list[Segment], grads: list, adam: list, groups: list[dict]
    ) -> None:
        """AdamW's direction takes each gradient's place in the passes (with momentum 0); under
        the global scope untracked weights' directions carry their layer's gradient scale."""
        if self.scope == "global":
            scales = budget_scales(
                [a[2] for a in adam],
                [seg.numel for seg in segments],
                [a[0].step + 1 for a in adam],
                [g["betas"][1] for g in groups],
            )
        else:
            scales = [None] * len(adam)
        for seg, grad, (moment, tracked, row, col), group, f in zip(
            segments, grads, adam, groups, scales
        ):
            beta1, beta2 = group["betas"]
            m, v = moments(grad, tracked, moment, row, col, beta1, beta2)
            d = direction(m, v, moment.step, beta1, beta2, group["eps"])
            if f is not None:
                d = torch.where(tracked, d, d * f)
            seg.grad = d.to(grad.dtype)

    @staticmethod
    def _adamw_state(
        w: BudgetedWeight,
        grad: torch.Tensor,
        res: Compacted,
        moment: AdamWMoments,
        tracked: torch.Tensor,
        row: torch.Tensor,
        col: torch.Tensor,
        group: dict,
    ) -> dict[str, torch.Tensor]:
        """The AdamW state of ``w`` after a step that chose ``res`` (nothing written yet)."""
        beta1, beta2 = group["betas"]
        m, v = moments(grad, tracked, moment, row, col, beta1, beta2)
        keep = unpack_bits(res.bits.to(m.device), w.weight_numel)
        dtype = w.values.dtype
        return {
            "step": torch.tensor(float(moment.step + 1)),
            "exp_avg": m[keep].to(dtype),
            "exp_avg_sq": v[keep].to(dtype),
            "exp_avg_row": row,
            "exp_avg_col": col,
        }

    @staticmethod
    def _nothing_tracked(seg: Segment) -> Compacted:
        empty = BlockStorage.empty(
            (seg.numel,), 1, dtype=seg.values.dtype, device=seg.values.device
        )
        return Compacted(empty.values, empty.bits, empty.group_ptr, None)

    def _update(
        self,
        segments: list[Segment],
        ids: list[int],
        params: list[StepParams],
        k: int,
        rule: Rule,
    ) -> tuple[list[Compacted], dict | None]:
        """New tracked sets of ``segments`` (of weights ``ids``) sharing one budget ``k``, and
        the rule's next state (:mod:`procrustes_kernels.rules`)."""
        geometries = [self.weights[i].geometry for i in ids]
        try:
            return rule.update(segments, params, k, geometries)
        except NonFiniteScores as e:
            raise FloatingPointError(
                f"{type(self).__name__}.step(): the update of "
                f"{self._param_name(self.weights[ids[e.segment]])} is not finite (inf / NaN "
                "scores: lr x gradient overflowed); model and optimizer left unchanged"
            ) from None

    def _dense_updates(self) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The base rule (SGD, or torch.optim.AdamW's) on every parameter that is not budgeted,
        computed out of place (``"param"``: the new value, the rest: its new state), written only
        once the whole step has succeeded. The same ops as the in-place rules, so the same bits."""
        out = []
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if is_budgeted(p) or p.grad is None:
                    continue
                if self.update == "adamw":
                    news = dense_adamw(
                        p, p.grad, self.state[p], lr, group["betas"], group["eps"], wd
                    )
                    out.append((p, news))
                    continue
                news = {}
                d_p = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                if mu != 0:
                    buf = self.state[p].get("momentum_buffer")
                    buf = torch.clone(d_p).detach() if buf is None else buf.mul(mu).add(d_p)
                    news["momentum_buffer"] = d_p = buf
                news["param"] = p.add(d_p, alpha=-lr)
                out.append((p, news))
        return out

    def _refuse_nonfinite(self, checked: list[tuple[torch.Tensor, str, torch.Tensor]], what: str):
        """FloatingPointError naming the first parameter and tensor holding a NaN or inf."""
        bad = _first_nonfinite([t for _, _, t in checked])
        if bad is None:
            return
        p, name, _ = checked[bad]
        raise FloatingPointError(
            f"{type(self).__name__}.step(): {what} of {self._param_name(p)} is not finite "
            f"(its new {name}: lr x gradient overflowed, or a non-finite value in its state); "
            "model and optimizer left unchanged"
        )

    def _check_step_hyper(self) -> None:
        """The groups' hyperparameters as the step finds them (a scheduler or a user may have set
        them since the last check): non-finite ones raise FloatingPointError, others out of
        range ValueError, before anything changes."""
        name = f"{type(self).__name__}.step()"
        for gi, group in enumerate(self.param_groups):
            keys = ["lr", "momentum", "weight_decay"]
            if self.update == "adamw":
                keys += ["eps", "betas"]
            for key in keys:
                values = group.get(key)
                values = values if isinstance(values, (tuple, list)) else (values,)
                for v in values:
                    v = _scalar(v)
                    if _is_number(v) and not math.isfinite(v):
                        raise FloatingPointError(
                            f"{name}: param_groups[{gi}]['{key}'] is {group[key]!r}; expected a "
                            "finite value (model and optimizer left unchanged)"
                        )
            _check_group_hyper(group, f"{name}: param_groups[{gi}]", self.update)

    def _check_stored(self) -> None:
        """The tracked values and moments the step starts from are finite (a NaN there would drop
        its weight silently): one reduction each."""
        checked = []
        for w in self.weights:
            if w.grad is None:
                continue
            checked.append((w, "tracked values", w.values))
            for key in TRACKED_MOMENTS[self.update]:
                if key in self.state[w]:
                    checked.append((w, key, self.state[w][key]))
        bad = _first_nonfinite([t for _, _, t in checked])
        if bad is not None:
            w, what, _ = checked[bad]
            raise FloatingPointError(
                f"{type(self).__name__}.step(): the {what} of {self._param_name(w)} are not "
                "finite (a corrupted checkpoint or state); model and optimizer left unchanged"
            )

    def decay_at(self, step: int) -> float:
        """``d_n``, the factor of the initial values of untracked weights after step ``step``."""
        if self.decay_steps is not None:
            return linear_decay_factor(step, self.decay_steps)
        return decay_factor(step, self.init_decay, self.zero_cutoff)

    # -- state -------------------------------------------------------------------------------------
    def _refresh_live_state(self) -> dict[str, Any]:
        live = self.__dict__.setdefault("_live_state", {})
        live.clear()
        live.update(self._extra_state())
        return live

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state plus a ``"dropback"`` entry (step, selection state, configuration).
        Like torch.optim's, it references the live state (momentum buffers, and this entry, which
        each step refreshes in place): ``copy.deepcopy`` it for a snapshot."""
        sd = super().state_dict()
        sd["dropback"] = self._refresh_live_state()
        return sd

    def _extra_state(self) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "step": self.step_count,
            "selection": self.selection,
            "scope": self.scope,
            "budget": self.budget,
            "init_decay": self.init_decay,
            "decay_steps": self.decay_steps,
            "granularity": self.granularity,
            "tile": self.tile,
            "tracked_count": self.tracked_count,
            "selectors": [r.state_dict() for r in self.rules],
            "update": self.update,
            "reselect_every": self.reselect_every,
        }

    def _from_layer_layout(self, state_dict: dict[str, Any], name: str) -> dict[str, Any]:
        """A state of the layer-based layout (the sparse layers' ``values`` first, then every
        other parameter in model order) renumbered to this optimizer's parameter order."""
        if len(self.param_groups) != 1 or len(state_dict["param_groups"]) != 1:
            raise ValueError(
                f"{name}: this checkpoint has the layer-based layout of procrustes_kernels 0.1; "
                "it converts into an optimizer built on model.parameters() (one param group); "
                "build the optimizer that way, load, then add groups"
            )
        current = self.param_groups[0]["params"]
        n_budgeted = sum(1 for p in current if is_budgeted(p))
        old_index, b, o = [], 0, n_budgeted
        for p in current:
            if is_budgeted(p):
                old_index.append(b)
                b += 1
            else:
                old_index.append(o)
                o += 1
        state = {
            j: state_dict["state"][old]
            for j, old in enumerate(old_index)
            if old in state_dict["state"]
        }
        group = {**state_dict["param_groups"][0], "params": list(range(len(current)))}
        return {**state_dict, "state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        name = f"{type(self).__name__}.load_state_dict()"
        if "dropback" not in state_dict:
            raise ValueError(
                f"{name}: expected a state_dict saved by DropBack (no 'dropback' entry)"
            )
        extra = state_dict["dropback"]
        self._check_extra_state(extra, name)
        if extra.get("format", 1) == 1:
            state_dict = self._from_layer_layout(state_dict, name)
        # Checkpoints from before the tile granularity were element-granular.
        saved = {**extra, "granularity": extra.get("granularity", "element")}
        # ... and decayed exponentially (no decay_steps), and before AdamW, with SGD.
        saved["decay_steps"] = extra.get("decay_steps")
        saved["update"] = extra.get("update", "sgd")
        saved["reselect_every"] = extra.get("reselect_every", 1)  # ... and reselected every step
        keys = ["update", "selection", "scope", "granularity", "init_decay", "decay_steps"]
        keys.append("reselect_every")
        keys.append("budget")
        if self.granularity == "tile" and saved["granularity"] == "tile":
            saved["tile"] = tuple(extra.get("tile", ()))
            keys.append("tile")
        for key in keys:
            if saved[key] != getattr(self, key):
                raise ValueError(
                    f"{name}: expected {key}={getattr(self, key)!r} as configured, "
                    f"checkpoint has {saved[key]!r}"
                )
        # Moments of tracked weights must line up with the model's tracked sets.
        saved_state = state_dict["state"]
        current = [p for g in self.param_groups for p in g["params"]]
        for idx, p in enumerate(current):
            if not is_budgeted(p):
                continue
            for key in TRACKED_MOMENTS[self.update]:
                buf = saved_state.get(idx, {}).get(key)
                if buf is not None and buf.numel() != p.nnz:
                    what = "momentum" if key == "momentum_buffer" else key
                    raise ValueError(
                        f"{name}: {what} of {self._param_name(p)} has {buf.numel()} entries but "
                        f"the weight tracks {p.nnz}; load the model's state_dict first"
                    )
        rest = {k: v for k, v in state_dict.items() if k != "dropback"}
        super().load_state_dict(rest)
        # The loaded buffers belong to the model state loaded before them (the count check above
        # holds them to it): align them with the current tracked sets.
        key = TRACKED_MOMENTS[self.update][0]
        self._momentum_bits = [w.bits if key in self.state[w] else None for w in self.weights]
        self.step_count = int(extra["step"])
        self.tracked_count = int(extra["tracked_count"])
        for rule, state in zip(self.rules, extra["selectors"]):
            if state is not None:
                rule.load_state_dict(state)
        self._set_sampled_grads()

    def _check_extra_state(self, extra: Any, name: str) -> None:
        """The checkpoint's ``"dropback"`` entry, checked whole before anything is applied."""
        if not isinstance(extra, dict):
            raise ValueError(
                f"{name}: expected the 'dropback' entry to be a dict, got {extra!r:.80}"
            )
        missing = [k for k in ("step", "tracked_count", "selectors", "budget") if k not in extra]
        if missing:
            raise ValueError(f"{name}: the checkpoint's 'dropback' entry lacks {missing}")
        for key in ("step", "tracked_count"):
            v = extra[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected {key} to be an int >= 0, got {v!r}")
        saved = extra["selectors"]
        if not isinstance(saved, list) or len(saved) != len(self.rules):
            raise ValueError(
                f"{name}: expected {len(self.rules)} selection states (one per budget of "
                f"scope={self.scope!r}), got {saved!r:.80}"
            )
        for i, (rule, state) in enumerate(zip(self.rules, saved)):
            want = rule.state_dict()
            ok = (
                state is None
                if want is None
                # (checkpoints from before the budget cap have no "capped" count)
                else isinstance(state, dict) and set(state) in (set(want), set(want) - {"capped"})
            )
            if not ok:
                raise ValueError(
                    f"{name}: selection state {i} does not fit the {type(rule).__name__} rule: "
                    f"expected {None if want is None else sorted(want)}, got {state!r:.80}"
                )

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults / state / param_groups; copies and pickles need the rest
        # (parameter names are keyed by object id, which a copy does not keep).
        state = super().__getstate__()
        # torch.optim does not copy hooks either (its __setstate__ makes empty ones).
        mine = {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}
        mine.pop("_names", None)
        return {**mine, **state}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._names = {}

    def __repr__(self) -> str:
        g = self.param_groups[0]
        tile = f", tile={self.tile}" if self.granularity == "tile" else ""
        if self.reselect_every > 1:
            tile += f", reselect_every={self.reselect_every}"
        groups = f", groups={len(self.param_groups)}" if len(self.param_groups) > 1 else ""
        base = (
            f"update='adamw', betas={g['betas']}, eps={g['eps']}"
            if self.update == "adamw"
            else f"momentum={g['momentum']}"
        )
        return (
            f"{type(self).__name__}(lr={g['lr']}, budget={self.budget}/{self.total_weights}, "
            f"{base}, weight_decay={g['weight_decay']}{groups}, "
            f"init_decay={self.init_decay}, decay_steps={self.decay_steps}, "
            f"selection={self.selection!r}, scope={self.scope!r}, "
            f"granularity={self.granularity!r}{tile}, "
            f"step={self.step_count}, tracked={self.tracked_count})"
        )


def _refuse_foreign_optimizers(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """Global ``step`` pre-hook: any other optimizer's step over a budgeted weight is refused
    before it changes anything (it would update the dense weight in place, which a budget cannot
    store)."""
    if isinstance(optimizer, DropBack):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(p, BudgetedWeight):
                raise TypeError(
                    f"{type(optimizer).__name__}.step(): a parameter of shape {tuple(p.shape)} is "
                    "a budgeted weight, which only pk.DropBack / pk.Procrustes can train (they "
                    "store its tracked set and train every other parameter with SGD); use "
                    "pk.DropBack(model.parameters(), lr=..., budget=...) or pk.Procrustes(...), "
                    "or pk.densify(model) to train the dense model with this optimizer"
                )


register_optimizer_step_pre_hook(_refuse_foreign_optimizers)


class Procrustes(DropBack):
    """DropBack with the Procrustes settings: decaying initial values and quantile selection.

    Same arguments as :class:`DropBack` (``granularity`` and ``tile`` through the keywords);
    defaults ``init_decay=0.9`` (per step, as in the paper) and ``selection="quantile"`` (which
    ``granularity="tile"`` does not use). For short runs pass ``decay_steps`` (a linear decay to
    zero at that step; half the training steps is the recommended setting) instead of
    ``init_decay``; :func:`decay_for_steps` gives an exponential decay reaching zero at a chosen step.
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        budget: float | int,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        init_decay: float | None = None,
        selection: str = "quantile",
        scope: str = "global",
        **kw: Any,
    ) -> None:
        if init_decay is None:  # the paper's 0.9, unless a linear decay is asked for
            init_decay = 1.0 if kw.get("decay_steps") is not None else 0.9
        super().__init__(
            params, lr, budget, momentum, weight_decay, init_decay, selection, scope, **kw
        )
