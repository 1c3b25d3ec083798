"""Converting a model: ``sparsify`` puts weights on a budget in place, ``densify`` takes them off,
``set_compute`` picks their compute path.

Modules keep their class: only their weight parameters are swapped for
:class:`~procrustes_kernels.weight.BudgetedWeight` parameters (see :mod:`procrustes_kernels.layers`
for the seeds, the initial distributions and ``SparseLinear`` / ``SparseConv2d``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .compute import check_compute, check_compute_tile
from .layers import (
    LINEAR_BLOCK,
    SparseConv2d,
    SparseLinear,
    _load_old_layout,
    _new_weight,
    _seeded_bias,
    _watch_old_layout,
    _xavier_bound,
    _zero_param,
)
from .philox import derive_seed
from .weight import BudgetedWeight, check_loadable, check_seed, is_budgeted

__all__ = ["sparsify", "densify", "set_compute"]


def _targets(module: nn.Module) -> list[tuple[str, float | None]]:
    """``(parameter name, init bound)`` of the weights ``sparsify`` budgets in ``module``
    (bound None: ``1 / sqrt(fan_in)``, the default of ``nn.Linear`` / ``nn.Conv2d``)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return [("weight", None)]
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            e = module.embed_dim
            return [("in_proj_weight", _xavier_bound(e, 3 * e))]
        return [
            (n, _xavier_bound(module._parameters[n].shape[1], module.embed_dim))
            for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        ]
    return []


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every place (module, name) that holds each parameter: a tied weight has several."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((module, name))
    return out


def _device_of(device: Any, fn: str) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.empty(0, device=device).device if str(device) != "meta" else None
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{fn}: expected device to be a torch device, got {device!r}") from err


def sparsify(
    model: nn.Module,
    seed: int = 0,
    *,
    filter: Callable[[str, nn.Module], bool] | None = None,
    linear_block_size: int = LINEAR_BLOCK,
    device: Any = None,
) -> nn.Module:
    """Put the weights of ``model`` on a budget, in place: modules keep their class.

    Converted: the ``weight`` of every ``nn.Linear`` (subclasses included, e.g.
    ``MultiheadAttention.out_proj``) and ``nn.Conv2d``, and the input projections of every
    ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight``). Each becomes a
    :class:`~procrustes_kernels.weight.BudgetedWeight` parameter (see
    :func:`~procrustes_kernels.is_budgeted`).

    DropBack regenerates untracked weights from their initial value, so that value must be a pure
    function of a seed: **the converted weights and their modules' biases are re-initialised**
    from ``derive_seed(seed, position)`` (position = order of the converted weights in
    ``model.named_modules()``), with PyTorch's default distribution for each: U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) for linear and conv weights (the bias continues the weight's stream),
    ``xavier_uniform_``'s bound and zero biases for attention projections. Trained weights of the
    original modules are not kept. Weights that are budgeted already are left alone, and a position
    whose seed one of them has is skipped (so sparsifying a grown model again gives the new weights
    streams of their own).

    A weight tied between modules (an embedding and an output head) stays one shared parameter,
    budgeted wherever it is used (the embedding then reads the effective weight).

    Args:
        model: the model to convert (modified in place and returned).
        seed: model seed; the same seed gives the same network on every backend and machine.
        filter: optional ``filter(qualified_name, module) -> bool``; modules for which it returns
            False keep dense weights.
        linear_block_size: storage block length of linear and attention weights.
        device: where the budgeted weights (and the converted modules' biases) live; default:
            where each original weight is. Required for a model built on the meta device: its
            dense weights are then never allocated (other modules on the meta device are moved
            with ``to_empty`` and ``reset_parameters()`` where they define it).
    """
    fn = "sparsify()"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected model to be an nn.Module, got {type(model).__name__}")
    seed = check_seed(seed, fn)
    if not isinstance(linear_block_size, int) or linear_block_size <= 0:
        raise ValueError(
            f"{fn}: expected linear_block_size to be a positive int, got {linear_block_size!r}"
        )
    target_device = _device_of(device, fn)
    holders = _holders(model)
    out_projs = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}

    # Plan first (filter calls, checks), then convert: a failing check changes nothing.
    plan = []
    seen: set[int] = set()
    for qname, module in model.named_modules():
        targets = _targets(module)
        if not targets or (filter is not None and not filter(qname, module)):
            continue
        for pname, bound in targets:
            if parametrize.is_parametrized(module, pname):
                raise ValueError(
                    f"{fn}: '{qname}.{pname}' is parametrized (weight_norm, spectral_norm, ...); "
                    "sparsify the model first and register the parametrization after, or leave "
                    "the module out with filter="
                )
            old = module._parameters.get(pname)
            if old is None and isinstance(getattr(module, pname, None), torch.Tensor):
                raise ValueError(
                    f"{fn}: '{qname}.{pname}' is not a parameter but computed (the hooks of "
                    "nn.utils.weight_norm / spectral_norm?); sparsify the model first and add "
                    "them after, or leave the module out with filter="
                )
            if old is None or is_budgeted(old) or id(old) in seen:
                continue
            if not old.dtype.is_floating_point:
                raise TypeError(
                    f"{fn}: expected '{qname}.{pname}' to be a floating-point weight, got {old.dtype}"
                )
            if isinstance(old, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"{fn}: '{qname}.{pname}' is not initialised yet (a lazy module); run one "
                    "forward pass before sparsify so that its shape is known"
                )
            if old.device.type == "meta" and target_device is None:
                raise ValueError(
                    f"{fn}: '{qname}.{pname}' is on the meta device; pass device= to build its "
                    "budgeted weight there (its dense weight is never allocated)"
                )
            seen.add(id(old))
            plan.append((module, pname, old, bound))

    # Positions count the converted weights; one whose seed a budgeted weight of the model already
    # has (a second sparsify of a grown model) moves on, so no two weights share a stream.
    taken = {p.seed for p in model.parameters() if is_budgeted(p)}
    position = 0
    for module, pname, old, bound in plan:
        while derive_seed(seed, position) in taken:
            position += 1
        wseed = derive_seed(seed, position)
        taken.add(wseed)
        conv = isinstance(module, nn.Conv2d) and pname == "weight"
        new = _new_weight(
            old,
            seed=wseed,
            bound=bound,
            block_size=math.prod(old.shape[2:]) if conv else linear_block_size,
            groups=module.groups if conv else 1,
            device=target_device,
        )
        for holder, name in holders[id(old)]:
            setattr(holder, name, new)
        dev = new.values.device
        w = new
        if isinstance(module, nn.MultiheadAttention):
            for bname in ("in_proj_bias",):
                b = module._parameters.get(bname)
                if b is not None and pname in ("in_proj_weight", "q_proj_weight"):
                    module._parameters[bname] = _zero_param(b, dev)
            for bname in ("bias_k", "bias_v"):
                b = module._parameters.get(bname)
                if b is not None and b.device.type == "meta":
                    p = torch.empty(b.shape, dtype=b.dtype, device=dev)
                    nn.init.xavier_normal_(p)
                    module._parameters[bname] = nn.Parameter(p, b.requires_grad)
        elif module._parameters.get("bias") is not None:
            b = module._parameters["bias"]
            module.bias = (
                _zero_param(b, dev) if id(module) in out_projs else _seeded_bias(w, b, dev)
            )
        _watch_old_layout(module)

    if target_device is not None:
        _materialise_meta(model, target_device)
    if not model.__dict__.get("_pk_checks_loads", False):
        model.register_load_state_dict_pre_hook(_check_checkpoint)
        model._pk_checks_loads = True
    return model


def _check_checkpoint(module: nn.Module, state_dict: dict, prefix: str, *rest: Any) -> None:
    """Load pre-hook of a sparsified model: the whole checkpoint is checked before any module
    loads, so that on any error nothing changes (torch itself loads every entry it can and
    reports the rest at the end). Checked: every budgeted weight's entry (storage, shape, seed,
    decay factor, finite values; entries of the layer-based layout are converted first) and the
    shapes of the other entries. Missing and unexpected keys are torch's to report (with
    ``strict=True`` after loading the rest, as for any module: every weight is then whole)."""
    error_msgs = rest[-1]
    for qname, sub in module.named_modules():
        if is_budgeted(sub._parameters.get("weight")):
            _load_old_layout(sub, state_dict, f"{prefix}{qname}." if qname else prefix, error_msgs)
    if error_msgs:
        raise RuntimeError("load_state_dict(): " + "; ".join(error_msgs))
    own = module.state_dict(prefix=prefix, keep_vars=True)
    for key, current in own.items():
        if key not in state_dict:
            continue
        given = state_dict[key]
        if is_budgeted(current):
            try:
                check_loadable(current, given, f"'{key}'")
            except (TypeError, ValueError) as e:
                # torch's load_state_dict reports what does not load as a RuntimeError
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(module).__name__} (nothing was "
                    f"loaded): {e}"
                ) from e
        elif isinstance(given, torch.Tensor) and not isinstance(
            current, nn.parameter.UninitializedParameter
        ):
            if given.shape != current.shape:
                raise RuntimeError(
                    f"load_state_dict(): size mismatch for '{key}': the checkpoint has shape "
                    f"{tuple(given.shape)}, the model {tuple(current.shape)}"
                )


def _materialise_meta(model: nn.Module, device: torch.device) -> None:
    """Move modules still on the meta device to ``device`` and initialise them, where they can."""
    for module in model.modules():
        own = [t for t in module._parameters.values() if t is not None and not is_budgeted(t)]
        own += [t for t in module._buffers.values() if t is not None]
        if any(t.device.type == "meta" for t in own) and hasattr(module, "reset_parameters"):
            if any(is_budgeted(t) for t in module._parameters.values()):
                continue  # its remaining parameters were set by sparsify
            module.to_empty(device=device, recurse=False)
            module.reset_parameters()


def _replace_modules(
    model: nn.Module, convert: Callable[[nn.Module], nn.Module | None]
) -> nn.Module:
    """Replace submodules by ``convert(module)`` when not None (a shared module once, everywhere)."""
    converted: dict[int, nn.Module | None] = {}
    targets = []
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in converted:
            converted[id(module)] = convert(module)
        if converted[id(module)] is not None:
            targets.append((name, converted[id(module)]))
    if targets and targets[0][0] == "":
        return targets[0][1]
    for name, new in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Turn every budgeted weight of ``model`` into a dense ``nn.Parameter`` holding its effective
    weight, in place (for export and deployment). :class:`SparseLinear` / :class:`SparseConv2d`
    modules become plain ``nn.Linear`` / ``nn.Conv2d``; every other module keeps its class. Tied
    weights stay tied. Returns the model (or the new module when ``model`` itself was a sparse
    layer)."""
    holders = _holders(model)
    for places in holders.values():
        module, name = places[0]
        w = module._parameters[name]
        if not is_budgeted(w):
            continue
        dense = nn.Parameter(w.effective().clone(), requires_grad=w.requires_grad)
        for holder, hname in places:
            holder._parameters[hname] = dense

    def convert(module: nn.Module) -> nn.Module | None:
        if not isinstance(module, (SparseLinear, SparseConv2d)):
            return None
        base = nn.Linear if isinstance(module, SparseLinear) else nn.Conv2d
        plain = base.__new__(base)
        plain.__dict__.update(module.__dict__)
        plain._parameters = dict(module._parameters)
        plain._load_state_dict_pre_hooks = type(module._load_state_dict_pre_hooks)()
        plain.__dict__.pop("_pk_old_layout_hook", None)
        return plain

    return _replace_modules(model, convert)


def _budgeted_params(model: nn.Module) -> Iterator[BudgetedWeight]:
    for p in model.parameters():
        if is_budgeted(p):
            yield p


def set_compute(
    model: nn.Module, compute: str = "auto", compute_tile: tuple[int, int] | None = None
) -> nn.Module:
    """Set ``compute`` (and optionally ``compute_tile``) on every budgeted weight of ``model``.

    ``"auto"`` lets each weight choose per step between the sparse kernels and the materialise
    path, ``"dense"`` / ``"sparse"`` force one (see :mod:`procrustes_kernels.compute`). Checked
    before any weight changes.
    """
    check_compute(compute, "set_compute()")
    if compute_tile is not None:
        compute_tile = check_compute_tile(compute_tile, "set_compute()")
    for w in _budgeted_params(model):
        w.compute = compute
        if compute_tile is not None:
            w.compute_tile = compute_tile
    return model
