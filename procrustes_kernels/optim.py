"""The DropBack / Procrustes optimizer (docs: algorithm section 1), reference path.

One ``step()`` over all sparse layers of a model, for weights ``W`` with dense gradient ``g``:

1. candidate ``c = W - lr * m`` with ``m = g + weight_decay * W`` (plus momentum, kept for tracked
   weights only: a weight entering the tracked set starts from ``m = g'``);
2. score ``s = |c - d_n * w0|``, how far each weight moved from its decayed initial value;
3. selection of the new tracked set (``topk`` exact or the ``quantile`` estimator), globally over
   all layers or per layer; with ``granularity="tile"`` whole tiles are kept or dropped, ranked by
   their mean score (:mod:`procrustes_kernels.tiles`);
4. tracked weights store ``c``; every other weight is ``d_n * w0`` again, regenerated, not stored.

Every other parameter of the model (biases, norms) trains with plain SGD of the same settings.
Everything is computed before anything is written, so a failing step leaves model and optimizer
as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from .compute import COMPUTE_TILE_SIZES
from .layers import SparseLayer
from .ops import Compacted, Segment, StepParams, get_ops, reference
from .selection import PaperQuantileSelector, QuantileSelector
from .storage import BlockStorage
from .tiles import check_tile, select_tiles, tile_element_mask, tile_scores, tile_sizes

__all__ = ["DropBack", "Procrustes", "decay_factor", "decay_for_steps", "linear_decay_factor"]

SELECTIONS = ("topk", "quantile", "quantile_paper")
SCOPES = ("global", "layer")
GRANULARITIES = ("element", "tile")


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


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: one min/max reduction (NaN and inf propagate into it),
    no boolean tensor of the gradient's size."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _float32_of_bits(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def _highest_bin_reaching(counts: np.ndarray, target: int) -> tuple[int, int]:
    """Highest bin ``b`` whose tail (bins >= b) holds ``target`` elements, and the tail above it."""
    tail = np.cumsum(counts[::-1])[::-1]
    b = int(np.nonzero(tail >= target)[0][-1])
    above = int(tail[b + 1]) if b + 1 < len(tail) else 0
    return b, above


def _select_topk(segments: list[Segment], p: StepParams, k: int) -> list[Compacted]:
    """Exact top-k over all ``segments`` by a two-level radix select on the scores' bits.

    The k-th largest score ``v`` is found from a histogram of the upper 15 bits, then one of the
    lower 16 bits within the bin that holds it; the compaction keeps scores above ``v`` and hands
    the remaining quota of ties at ``v`` to the segments in order, so ties go to the lower flat
    index across all layers. Zero scores are never kept.
    """
    ops = [get_ops(s.grad.device) for s in segments]
    high = sum(o.radix_histogram(s, p).cpu() for o, s in zip(ops, segments)).numpy()
    b, above = _highest_bin_reaching(high, k)
    low = sum(o.radix_histogram(s, p, b).cpu() for o, s in zip(ops, segments)).numpy()
    lo, above_low = _highest_bin_reaching(low, k - above)
    v = (b << 16) | lo
    if v == 0:  # fewer than k positive scores: keep them all
        threshold, quota = 0.0, 0
    else:
        threshold, quota = _float32_of_bits(v), k - above - above_low
    results = []
    for o, s in zip(ops, segments):
        res = o.compact(s, p, threshold, quota)
        quota -= res.ties_used
        results.append(res)
    return results


class DropBack(Optimizer):
    """Trains a model's sparse layers on a weight budget (DropBack; Procrustes with its settings).

    Args:
        model: module containing :class:`SparseLinear` / :class:`SparseConv2d` layers (see
            :func:`sparsify`). Its other parameters train with plain SGD of the same settings.
        lr: learning rate (works with ``torch.optim.lr_scheduler``).
        budget: tracked weights, a fraction in (0, 1] of all budgeted weights or an int count.
        momentum: SGD momentum; kept for tracked weights only.
        weight_decay: L2 penalty added to the gradient.
        init_decay: per-step decay of the initial values of untracked weights, in (0, 1]
            (1: DropBack; 0.9: Procrustes): ``d_n = init_decay ** (n - 1)``.
        decay_steps: instead of ``init_decay``, a linear decay relative to the length of training:
            ``d_n = 1 - (n - 1) / decay_steps``, exactly 0 from step ``decay_steps + 1`` on
            (:func:`linear_decay_factor`). Keeps the initial values useful for longer than an
            exponential decay reaching zero at the same step; the recommended Procrustes setting
            for runs of a few thousand steps is ``decay_steps`` = half of the training steps.
        selection: ``"topk"`` (exact), ``"quantile"`` (order-independent estimator carrying a
            threshold across steps) or ``"quantile_paper"`` (the authors' sequential walk).
        scope: ``"global"`` (one budget over all layers) or ``"layer"`` (each layer keeps its share).
        zero_cutoff: decay factors below this become exactly 0 (untracked weights are then zeros).
        drift_window: steps over which the quantile estimator averages the count drift.
        quantile_warmup: first steps in which the quantile estimator reads its threshold from
            the step's own scores (a second pass) rather than carrying it from the last step.
        granularity: ``"element"`` (default: single weights are tracked) or ``"tile"`` (whole tiles
            are tracked or regenerated, the unit of the sparse compute kernels). A tile's score is
            the mean of its weights' scores (float64 sum over the tile's weights); tiles are ranked
            exactly, descending (ties: earlier layer, then lower tile index), tiles of score 0 are
            never kept, and tiles are taken while the tracked count stays within the budget (per
            scope), stopping at the first tile that does not fit. ``selection`` does not apply
            here (each of its values is accepted and has no effect): tile scores are few (~1/1000
            of the weights) and are ranked exactly. See :mod:`procrustes_kernels.tiles`.
        tile: ``(rows, cols)`` of a tile with ``granularity="tile"``: ``rows`` output features /
            channels of one group times ``cols`` input features / channels per group, each with its
            whole kernel (all ``kh * kw`` positions); cut per group, the last tiles of a layer are
            partial where the sizes do not divide (the tiles of ``ops.sparse_index.tile_mask``
            with ``block_n, block_c = tile``). Positive ints; ignored with
            ``granularity="element"``. When both are kernel tile sizes (16, 32 or 64), the layers'
            ``compute_tile`` is set to ``tile``, so the sparse kernels skip exactly the dropped tiles.

    The dense gradient of each sparse layer's effective weight is kept in ``layer.dense_grad``
    between ``backward()`` and ``step()`` (for data parallel training, all-reduce
    :meth:`dense_grads` before ``step()``); ``step()`` consumes and drops it.
    """

    def __init__(
        self,
        model: nn.Module,
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
    ) -> None:
        name = type(self).__name__ + "()"
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{name}: expected model to be an nn.Module, got {type(model).__name__}"
            )
        if not _is_number(lr) or not lr >= 0 or not math.isfinite(lr):
            raise ValueError(f"{name}: expected lr >= 0, got {lr!r}")
        if not _is_number(momentum) or not 0 <= momentum < 1:
            raise ValueError(f"{name}: expected momentum in [0, 1), got {momentum!r}")
        if not _is_number(weight_decay) or not weight_decay >= 0 or not math.isfinite(weight_decay):
            raise ValueError(f"{name}: expected weight_decay >= 0, got {weight_decay!r}")
        if not _is_number(init_decay) or not 0 < init_decay <= 1:
            raise ValueError(f"{name}: expected init_decay in (0, 1], got {init_decay!r}")
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

        self.layers: list[SparseLayer] = []
        self.layer_names: list[str] = []
        for mod_name, module in model.named_modules():
            if isinstance(module, SparseLayer):
                self.layers.append(module)
                self.layer_names.append(mod_name or type(module).__name__)
        if not self.layers:
            raise ValueError(
                f"{name}: expected a model with SparseLinear / SparseConv2d layers, found none "
                "(convert it with procrustes_kernels.sparsify(model) first)"
            )
        self.total_weights = sum(layer.numel for layer in self.layers)
        self.budget = self._budget_count(budget, name)
        self.init_decay = float(init_decay)
        self.decay_steps = decay_steps
        self.selection = selection
        self.scope = scope
        self.zero_cutoff = float(zero_cutoff)
        self.granularity = granularity
        self.tile = tile
        if scope == "global":
            self.layer_budgets = None
        else:
            share = self.budget / self.total_weights
            self.layer_budgets = [max(1, round(layer.numel * share)) for layer in self.layers]

        sparse_ids = {id(layer.values) for layer in self.layers}
        params = [layer.values for layer in self.layers]
        params += [p for p in model.parameters() if id(p) not in sparse_ids]
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self._sparse_ids = sparse_ids
        self.step_count = 0
        n_sel = 1 if scope == "global" else len(self.layers)
        self.selectors = [self._new_selector(drift_window, quantile_warmup) for _ in range(n_sel)]
        # Tile geometry of each layer (fixed: the weight shapes do not change).
        self._tile_geometry = [layer.matrix_geometry for layer in self.layers]
        self._tile_sizes = (
            [tile_sizes(geo, tile) for geo in self._tile_geometry]
            if granularity == "tile"
            else None
        )
        if granularity == "tile" and all(v in COMPUTE_TILE_SIZES for v in tile):
            # The sparse compute kernels then skip exactly the tiles the selection dropped.
            for layer in self.layers:
                layer.compute_tile = tile
        self.tracked_count = sum(layer.nnz for layer in self.layers)

    # -- configuration -----------------------------------------------------------------------------
    def _budget_count(self, budget: Any, name: str) -> int:
        total = self.total_weights
        if isinstance(budget, bool) or not _is_number(budget):
            raise TypeError(
                f"{name}: expected budget to be a float in (0, 1] or an int count, got {budget!r}"
            )
        if isinstance(budget, int):
            if not 1 <= budget <= total:
                raise ValueError(f"{name}: expected an int budget in [1, {total}], got {budget}")
            return budget
        if not 0 < budget <= 1:
            raise ValueError(f"{name}: expected a fractional budget in (0, 1], got {budget}")
        return max(1, round(budget * total))

    def _new_selector(
        self, drift_window: int, warmup: int
    ) -> QuantileSelector | PaperQuantileSelector | None:
        if self.granularity == "tile":  # tiles are ranked exactly: no estimator state
            return None
        if self.selection == "quantile":
            return QuantileSelector(drift_window, warmup)
        if self.selection == "quantile_paper":
            return PaperQuantileSelector()
        return None

    # -- gradients ---------------------------------------------------------------------------------
    def dense_grads(self) -> list[torch.Tensor]:
        """The sparse layers' dense weight gradients (for an all-reduce before ``step()``)."""
        return [layer.dense_grad for layer in self.layers if layer.dense_grad is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for layer in self.layers:
            if set_to_none or layer.dense_grad is None:
                layer.dense_grad = None
            else:
                layer.dense_grad.zero_()

    def _checked_grads(self) -> list[torch.Tensor]:
        grads = []
        for layer, lname in zip(self.layers, self.layer_names):
            g = layer.dense_grad
            if g is None:
                g = torch.zeros(
                    layer.weight_shape, dtype=layer.values.dtype, device=layer.values.device
                )
            elif not _all_finite(g):
                raise FloatingPointError(
                    f"{type(self).__name__}.step(): non-finite gradient in layer '{lname}'; "
                    "model and optimizer left unchanged"
                )
            grads.append(g)
        if all(layer.dense_grad is None for layer in self.layers):
            raise RuntimeError(
                f"{type(self).__name__}.step(): no sparse layer has a gradient; "
                "call loss.backward() before step()"
            )
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self._sparse_ids and p.grad is not None:
                    if not _all_finite(p.grad):
                        raise FloatingPointError(
                            f"{type(self).__name__}.step(): non-finite gradient in a dense parameter "
                            f"of shape {tuple(p.shape)}; model and optimizer left unchanged"
                        )
        return grads

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One DropBack/Procrustes step over all sparse layers plus SGD on the other parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = self._checked_grads()
        n = self.step_count + 1
        d_n = self.decay_at(n)
        params = StepParams(lr=lr, momentum=mu, weight_decay=wd, scale=d_n)
        segments = [
            Segment(
                seed=layer.seed_value,
                bound=layer.bound,
                numel=layer.numel,
                values=layer.values.detach(),
                bits=layer.mask_bits,
                group_ptr=layer.group_ptr,
                grad=g.reshape(-1).contiguous(),
                momentum=self.state[layer.values].get("momentum_buffer") if mu != 0 else None,
                scale_prev=layer.init_scale_value,
            )
            for layer, g in zip(self.layers, grads)
        ]

        # Everything new is computed first; nothing is written until all of it succeeded.
        if self.scope == "global":
            results, plans = self._update(
                segments, list(range(len(segments))), params, self.budget, self.selectors[0]
            )
            plans = [plans]
        else:
            results, plans = [], []
            for i, seg in enumerate(segments):
                res, plan = self._update(
                    [seg], [i], params, self.layer_budgets[i], self.selectors[i]
                )
                results += res
                plans.append(plan)

        for layer, res in zip(self.layers, results):
            layer.set_tracked(
                BlockStorage(
                    layer.weight_shape,
                    layer.block_size,
                    res.values,
                    res.bits,
                    res.group_ptr,
                    validate=False,
                )
            )
            layer.init_scale.fill_(d_n)
            if mu != 0:
                self.state[layer.values]["momentum_buffer"] = res.momentum
        for selector, plan in zip(self.selectors, plans):
            if plan is not None:
                selector.load_state_dict(plan)
        self._dense_sgd(lr, mu, wd)
        for layer in self.layers:
            layer.dense_grad = None
        self.step_count = n
        self.tracked_count = sum(res.kept for res in results)
        return loss

    def _update(
        self, segments: list[Segment], layer_ids: list[int], p: StepParams, k: int, selector: Any
    ) -> tuple[list[Compacted], dict | None]:
        """New tracked sets of ``segments`` (of layers ``layer_ids``) sharing one budget ``k``, and
        the selector's next state."""
        if self.granularity == "tile":
            return self._update_tiles(segments, layer_ids, p, k), None
        if self.selection == "topk":
            return _select_topk(segments, p, k), None
        if self.selection == "quantile":
            if selector.two_pass:
                hist = sum(get_ops(s.grad.device).log_histogram(s, p).cpu() for s in segments)
                theta = selector.own_threshold(hist, k)
                results = [get_ops(s.grad.device).compact(s, p, theta) for s in segments]
            else:
                results = [
                    get_ops(s.grad.device).compact(s, p, selector.theta, with_histogram=True)
                    for s in segments
                ]
                hist = sum(r.histogram.cpu() for r in results)
            return results, selector.advance(hist, k, sum(r.kept for r in results))
        # quantile_paper walks the scores one by one on the host (in C++ when it is built); scores
        # and compaction use the backend's own functions where it has them (the Triton backend has
        # no compact_mask) and the reference's otherwise.
        seg_ops = [get_ops(s.grad.device) for s in segments]
        scores = torch.cat(
            [getattr(o, "scores", reference.scores)(s, p).cpu() for o, s in zip(seg_ops, segments)]
        )
        walk = getattr(get_ops("cpu"), "paper_walk", None)
        if walk is not None:
            mask, theta = walk(scores, selector.theta, selector.lam, k)
            plan = {"theta": theta}
        else:
            mask, plan = selector.step(scores, k)
        masks = torch.split(mask, [s.numel for s in segments])
        return [
            getattr(o, "compact_mask", reference.compact_mask)(s, p, m.to(s.grad.device))
            for o, s, m in zip(seg_ops, segments, masks)
        ], plan

    def _update_tiles(
        self, segments: list[Segment], layer_ids: list[int], p: StepParams, k: int
    ) -> list[Compacted]:
        """Tile granularity: keep whole tiles by mean score within the budget ``k`` (module
        :mod:`procrustes_kernels.tiles`), then compact each layer with the expanded mask."""
        seg_ops = [get_ops(s.grad.device) for s in segments]
        geos = [self._tile_geometry[i] for i in layer_ids]
        # One layer's element scores at a time; only its tile means (a ~1/1000 of it) stay.
        means = [
            tile_scores(getattr(o, "scores", reference.scores)(s, p), geo, self.tile).cpu()
            for o, s, geo in zip(seg_ops, segments, geos)
        ]
        kept = select_tiles(means, k, [self._tile_sizes[i] for i in layer_ids])
        return [
            getattr(o, "compact_mask", reference.compact_mask)(
                s, p, tile_element_mask(t.to(s.grad.device), geo, self.tile)
            )
            for o, s, geo, t in zip(seg_ops, segments, geos, kept)
        ]

    def _dense_sgd(self, lr: float, mu: float, wd: float) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in self._sparse_ids or p.grad is None:
                    continue
                d_p = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                if mu != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d_p).detach()
                    else:
                        buf.mul_(mu).add_(d_p)
                    d_p = buf
                p.add_(d_p, alpha=-lr)

    def decay_at(self, step: int) -> float:
        """``d_n``, the factor of the initial values of untracked weights after step ``step``."""
        if self.decay_steps is not None:
            return linear_decay_factor(step, self.decay_steps)
        return decay_factor(step, self.init_decay, self.zero_cutoff)

    # -- state -------------------------------------------------------------------------------------
    @property
    def layer_counts(self) -> list[int]:
        """Tracked weights per sparse layer."""
        return [layer.nnz for layer in self.layers]

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["dropback"] = {
            "step": self.step_count,
            "selection": self.selection,
            "scope": self.scope,
            "budget": self.budget,
            "init_decay": self.init_decay,
            "decay_steps": self.decay_steps,
            "granularity": self.granularity,
            "tile": self.tile,
            "tracked_count": self.tracked_count,
            "selectors": [s.state_dict() if s is not None else None for s in self.selectors],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        name = f"{type(self).__name__}.load_state_dict()"
        if "dropback" not in state_dict:
            raise ValueError(
                f"{name}: expected a state_dict saved by DropBack (no 'dropback' entry)"
            )
        extra = state_dict["dropback"]
        # Checkpoints from before the tile granularity were element-granular.
        saved = {**extra, "granularity": extra.get("granularity", "element")}
        # ... and decayed exponentially (no decay_steps).
        saved["decay_steps"] = extra.get("decay_steps")
        keys = ["selection", "scope", "granularity", "init_decay", "decay_steps"]
        if self.granularity == "tile" and saved["granularity"] == "tile":
            saved["tile"] = tuple(extra.get("tile", ()))
            keys.append("tile")
        for key in keys:
            if saved[key] != getattr(self, key):
                raise ValueError(
                    f"{name}: expected {key}={getattr(self, key)!r} as configured, "
                    f"checkpoint has {saved[key]!r}"
                )
        # Momentum of tracked weights must line up with the model's tracked sets.
        saved_state = state_dict["state"]
        for i, layer in enumerate(self.layers):
            buf = saved_state.get(i, {}).get("momentum_buffer")
            if buf is not None and buf.numel() != layer.nnz:
                raise ValueError(
                    f"{name}: momentum of layer '{self.layer_names[i]}' has {buf.numel()} entries but "
                    f"the layer tracks {layer.nnz}; load the model's state_dict first"
                )
        rest = {k: v for k, v in state_dict.items() if k != "dropback"}
        super().load_state_dict(rest)
        self.step_count = int(extra["step"])
        self.tracked_count = int(extra["tracked_count"])
        for selector, s in zip(self.selectors, extra["selectors"]):
            if selector is not None:
                selector.load_state_dict(s)

    def __repr__(self) -> str:
        g = self.param_groups[0]
        tile = f", tile={self.tile}" if self.granularity == "tile" else ""
        return (
            f"{type(self).__name__}(lr={g['lr']}, budget={self.budget}/{self.total_weights}, "
            f"momentum={g['momentum']}, weight_decay={g['weight_decay']}, "
            f"init_decay={self.init_decay}, decay_steps={self.decay_steps}, selection={self.selection!r}, scope={self.scope!r}, "
            f"granularity={self.granularity!r}{tile}, "
            f"step={self.step_count}, tracked={self.tracked_count})"
        )


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
        model: nn.Module,
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
            model, lr, budget, momentum, weight_decay, init_decay, selection, scope, **kw
        )
