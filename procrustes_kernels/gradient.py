"""``TrackedGradient``: the gradient of a budgeted weight at its tracked positions only.

With ``reselect_every=R > 1`` (:class:`~procrustes_kernels.DropBack`), a step that keeps the
tracked set (``T' = T``) reads the gradient of the tracked weights only, so ``F.linear`` /
``F.conv2d`` compute just those (a sampled product, SDDMM) and the weight's ``.grad`` is a
``TrackedGradient``: a tensor of the weight's shape whose data is one value per tracked weight, in
storage order, with the weight's tracked bits. The gradient of an untracked weight is not computed.

What a PyTorch user does with gradients works on it, on the computed values:

* accumulation (a weight used twice, gradient accumulation over micro-batches): sums values; a
  dense gradient meeting it is sampled at the tracked positions (a dense ``.grad`` kept from an
  earlier backward, without ``zero_grad()``, takes the values in place and stays dense);
* ``zero_grad()`` (``set_to_none`` or not), ``detach``, ``clone``;
* ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``, ``GradScaler.unscale_``,
  ``grad.mul_`` / ``div_`` by a number, ``torch.linalg.vector_norm``, ``isfinite`` checks: on the
  computed values (a norm is the norm of the tracked weights' gradient, the only one this step
  uses).

Any other use (reading it as a dense tensor: ``grad.sum()``, ``grad[0]``, indexing, printing the
numbers, DDP's bucketed all-reduce) raises an error that says so, never a silently wrong number.
``grad.to_dense()`` is the one explicit way out: zeros at the untracked positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .storage import unpack_bits

__all__ = ["TrackedGradient", "is_tracked_gradient"]

aten = torch.ops.aten


def is_tracked_gradient(t: Any) -> bool:
    return isinstance(t, TrackedGradient)


class TrackedGradient(Tensor):
    """The gradient of a budgeted weight at its tracked positions (see the module docstring).

    ``values``: one per tracked weight (storage order); ``bits``: the weight's tracked bits when
    the gradient was computed (the same tensor object, so the optimizer can tell whether it still
    describes the weight's tracked set)."""

    values: Tensor
    bits: Tensor

    @staticmethod
    def __new__(cls, values: Tensor, bits: Tensor, shape: tuple[int, ...]) -> TrackedGradient:
        r = Tensor._make_wrapper_subclass(
            cls, tuple(shape), dtype=values.dtype, device=values.device
        )
        r.values, r.bits = values, bits
        return r

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"TrackedGradient(shape={tuple(self.shape)}, tracked={self.values.numel()}, "
            f"dtype={self.dtype})"
        )

    def to_dense(self, dtype: torch.dtype | None = None, **_: Any) -> Tensor:  # type: ignore[override]
        """The gradient as a dense tensor, zeros where it was not computed (untracked weights)."""
        with torch._C.DisableTorchFunctionSubclass():
            out = torch.zeros(self.numel(), dtype=dtype or self.dtype, device=self.device)
        out[unpack_bits(self.bits, self.numel())] = self.values.to(out.dtype)
        return out.view(self.shape)

    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        return ["values", "bits"], (tuple(self.shape),)

    @staticmethod
    def __tensor_unflatten__(inner: dict, ctx: tuple, size: Any, stride: Any) -> TrackedGradient:
        return TrackedGradient(inner["values"], inner["bits"], ctx[0])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func is Tensor.to_dense:
            return args[0].to_dense(**(kwargs or {}))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        handler = _DISPATCH.get(func)
        if handler is None:
            handler = _FOREACH.get(func.overloadpacket)
        if handler is None:
            raise RuntimeError(_dense_error(func))
        return handler(func, args, kwargs)


def _dense_error(func: Any) -> str:
    return (
        f"{func}: the gradient of this budgeted weight holds its tracked positions only (the "
        "optimizer's reselect_every > 1 keeps the tracked set on this step, so the gradient of "
        "untracked weights is not computed); it supports accumulation, zero_(), scaling by a "
        "number, norms and finiteness checks (clip_grad_norm_, GradScaler), and grad.to_dense() "
        "(zeros where it was not computed). Use reselect_every=1 for dense weight gradients."
    )


def _values_of(t: Any, like: TrackedGradient) -> Any:
    """``t`` as values aligned with ``like``: a tracked gradient's values, a dense tensor of the
    weight's shape sampled at the tracked positions, numbers and 0-d tensors as they are."""
    if isinstance(t, TrackedGradient):
        if t.bits is not like.bits and not torch.equal(t.bits, like.bits):
            raise RuntimeError(
                "cannot combine gradients of a budgeted weight taken at different tracked sets"
            )
        return t.values
    if isinstance(t, Tensor) and t.dim() > 0:
        if tuple(t.shape) != tuple(like.shape):
            raise RuntimeError(_dense_error("a broadcast with a tensor of another shape"))
        return t.reshape(-1)[unpack_bits(like.bits, like.numel())]
    return t


def _first(args: Any) -> TrackedGradient:
    for a in args:
        if isinstance(a, TrackedGradient):
            return a
    raise AssertionError("no TrackedGradient among the arguments")


def _elementwise(func: Any, args: tuple, kwargs: dict) -> TrackedGradient:
    like = _first(args)
    out = func(*[_values_of(a, like) for a in args], **kwargs)
    return TrackedGradient(out, like.bits, tuple(like.shape))


def _inplace(func: Any, args: tuple, kwargs: dict) -> Tensor:
    target = args[0]
    if not isinstance(target, TrackedGradient):
        if func in (aten.add_.Tensor, aten.sub_.Tensor) and len(args) == 2:
            # A dense gradient (kept from before, without zero_grad()) accumulates the sampled
            # values at their positions; it stays dense and keeps its other entries.
            g = args[1]
            flat = target.view(-1)
            mask = unpack_bits(g.bits, g.numel())
            alpha = kwargs.get("alpha", 1) * (1 if func is aten.add_.Tensor else -1)
            flat[mask] = flat[mask].add(g.values.to(target.dtype), alpha=alpha)
            return target
        raise RuntimeError(_dense_error(func))
    func(target.values, *[_values_of(a, target) for a in args[1:]], **kwargs)
    return target


def _reduce(func: Any, args: tuple, kwargs: dict) -> Tensor:
    # Norms / any / all / isfinite-style reductions over the computed values.
    g = args[0]
    if kwargs.get("dim") not in (None, [], ()) or (len(args) > 2 and args[2] not in (None, [])):
        raise RuntimeError(_dense_error(func))
    return func(g.values, *args[1:], **kwargs)


def _detach(func: Any, args: tuple, kwargs: dict) -> TrackedGradient:
    g = args[0]
    return TrackedGradient(g.values.detach(), g.bits, tuple(g.shape))


def _clone(func: Any, args: tuple, kwargs: dict) -> TrackedGradient:
    g = args[0]
    return TrackedGradient(g.values.clone(), g.bits, tuple(g.shape))


def _like(func: Any, args: tuple, kwargs: dict) -> TrackedGradient:
    # zeros_like / empty_like of a tracked gradient: the same positions.
    g = args[0]
    kwargs = {k: v for k, v in kwargs.items() if k != "memory_format"}
    return TrackedGradient(func(g.values, **kwargs), g.bits, tuple(g.shape))


def _copy(func: Any, args: tuple, kwargs: dict) -> Tensor:
    dst, src = args[0], args[1]
    if isinstance(dst, TrackedGradient):
        dst.values.copy_(_values_of(src, dst))
        return dst
    raise RuntimeError(_dense_error(func))


def _amp_unscale(func: Any, args: tuple, kwargs: dict) -> Any:
    grads, found_inf, inv_scale = args
    inner = [g.values if isinstance(g, TrackedGradient) else g for g in grads]
    func(inner, found_inf, inv_scale)
    return None


_DISPATCH = {
    aten.detach.default: _detach,
    aten.clone.default: _clone,
    aten.zeros_like.default: _like,
    aten.empty_like.default: _like,
    aten.copy_.default: _copy,
    aten.zero_.default: _inplace,
    aten.fill_.Scalar: _inplace,
    aten.add_.Tensor: _inplace,
    aten.sub_.Tensor: _inplace,
    aten.mul_.Tensor: _inplace,
    aten.mul_.Scalar: _inplace,
    aten.div_.Tensor: _inplace,
    aten.div_.Scalar: _inplace,
    aten.clamp_.default: _inplace,
    aten.clamp_.Tensor: _inplace,
    aten.add.Tensor: _elementwise,
    aten.sub.Tensor: _elementwise,
    aten.mul.Tensor: _elementwise,
    aten.mul.Scalar: _elementwise,
    aten.div.Tensor: _elementwise,
    aten.div.Scalar: _elementwise,
    aten.neg.default: _elementwise,
    aten.abs.default: _elementwise,
    aten.clamp.default: _elementwise,
    aten.linalg_vector_norm.default: _reduce,
    aten.norm.Scalar: _reduce,
    aten.isfinite.default: _elementwise,
    aten.ne.Scalar: _elementwise,
    aten.ne.Tensor: _elementwise,
    aten.eq.Tensor: _elementwise,
    aten.bitwise_and.Tensor: _elementwise,
    aten.bitwise_or.Tensor: _elementwise,
    aten.bitwise_not.default: _elementwise,
    aten.logical_and.default: _elementwise,
    aten.logical_not.default: _elementwise,
    aten.eq.Scalar: _elementwise,
    aten.gt.Scalar: _elementwise,
    aten.lt.Scalar: _elementwise,
    aten.ge.Scalar: _elementwise,
    aten.le.Scalar: _elementwise,
    aten.isnan.default: _elementwise,
    aten.isinf.default: _elementwise,
    aten.all.default: _reduce,
    aten.any.default: _reduce,
    aten._amp_foreach_non_finite_check_and_unscale_.default: _amp_unscale,
}


def _unrolled(single: Any) -> Any:
    """A ``_foreach_*`` op as the single-tensor op on each element."""

    def run(func: Any, args: tuple, kwargs: dict) -> Any:
        tensors, rest = args[0], args[1:]
        out = []
        for i, t in enumerate(tensors):
            extra = [r[i] if isinstance(r, (list, tuple)) else r for r in rest]
            out.append(single(t, *extra, **kwargs))
        return None if func._schema.name.endswith("_") else out

    return run


def _norm(t: Tensor, ord: Any = 2, dtype: Any = None) -> Tensor:
    return torch.linalg.vector_norm(t, ord, dtype=dtype)


_FOREACH = {
    aten._foreach_norm: _unrolled(_norm),
    aten._foreach_mul_: _unrolled(lambda t, s: t.mul_(s)),
    aten._foreach_mul: _unrolled(lambda t, s: t.mul(s)),
    aten._foreach_div_: _unrolled(lambda t, s: t.div_(s)),
    aten._foreach_add_: _unrolled(lambda t, s, alpha=1: t.add_(s, alpha=alpha)),
    aten._foreach_zero_: _unrolled(lambda t: t.zero_()),
    aten._foreach_clamp_min_: _unrolled(lambda t, s: t.clamp_(min=s)),
    aten._foreach_clamp_max_: _unrolled(lambda t, s: t.clamp_(max=s)),
}
