"""``F.linear`` / ``F.conv2d`` with a budgeted weight: all of the library's autograd code.

:class:`~procrustes_kernels.weight.BudgetedWeight` routes these two functions here (its
``__torch_function__``); every other op on a budgeted weight is differentiated by PyTorch on the
materialised effective weight. Both paths leave the dense gradient of the effective weight in
``weight.grad``, through autograd:

* materialise (``"dense"``): the effective weight is regenerated a panel of output rows at a time
  and each panel is consumed at once (:class:`_SparseLinearFn` / :class:`_SparseConv2dFn` with
  :mod:`procrustes_kernels.panels`, forward and input gradient), so no dense copy of the weight
  exists; a weight of one panel, or in a compiled graph, is written whole by
  :class:`_EffectiveWeight` (its backward passes the gradient through unchanged), then the nn op
  runs (cuBLAS / cuDNN);
* sparse kernels (``"sparse"``): :class:`_SparseLinearFn` / :class:`_SparseConv2dFn` compute the
  output and the input gradient from the compressed weight (where its untracked weights are
  ``scale * w0``, the Triton kernels regenerate them in their tile loads: ``weight.regen()``);
  the weight gradient stays a dense GEMM (``dY^T X`` / cuDNN's weight gradient), since the
  optimizer scores every weight.

:func:`procrustes_kernels.compute.choose_path` picks the path per call and records it in
``weight.last_path``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from . import ops, panels
from .compute import (
    SPARSE_DTYPES,
    autocast_on,
    choose_path,
    conv_grid_overhead,
    dense_tracked_grad,
    input_dtype,
)
from .ops.compute import reference
from .ops.contract import Regen
from .ops.library import Geometry

__all__ = ["linear", "conv2d"]


def _budgeted(t: Any) -> bool:
    from .weight import BudgetedWeight

    return isinstance(t, BudgetedWeight)


class _EffectiveWeight(torch.autograd.Function):
    """The dense effective weight of a budgeted weight, differentiable: the gradient of the output
    is the gradient of the weight."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor) -> Tensor:  # type: ignore[override]
        return weight.effective()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def effective_weight(weight: Tensor) -> Tensor:
    """The effective weight as a plain tensor that autograd differentiates back to ``weight``."""
    return _EffectiveWeight.apply(weight)


def _no_autocast(t: Tensor) -> torch.autocast:
    # The kernels define their own precision; autocast must not recast what runs inside.
    return torch.autocast(t.device.type, enabled=False)


def _cast_for_autocast(x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    dtype = input_dtype(x)
    if x.dtype != dtype:
        x = x.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return x, bias


def _check_dtype(x: Tensor, weight: Tensor, where: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point input, got {x.dtype}")
    if x.dtype != weight.values.dtype and not autocast_on(x.device.type):
        raise TypeError(f"{where}: expected input of dtype {weight.values.dtype}, got {x.dtype}")


def _geometry(weight: Any) -> tuple[int, ...]:
    return (*weight.geometry, *weight.compute_tile)


def _save(ctx: Any, regen: Regen | None, *tensors: Tensor) -> None:
    """Save ``tensors`` for backward, and the regeneration constants of the sparse kernels (the
    decay factor as a saved tensor, so that compiled graphs see it)."""
    ctx.save_for_backward(*tensors, *(() if regen is None else (regen.scale,)))
    ctx.regen_consts = None if regen is None else (regen.seed, regen.bound)


def _saved(ctx: Any) -> tuple[tuple[Tensor, ...], Regen | None]:
    saved = ctx.saved_tensors
    if ctx.regen_consts is None:
        return saved, None
    return saved[:-1], Regen(saved[-1], *ctx.regen_consts)


class _SparseLinearFn(torch.autograd.Function):
    """``x @ W^T + b`` and the input gradient from the compressed weight (``pan`` None: the sparse
    kernels) or its dense effective weight regenerated a panel at a time (``pan``, a
    :class:`~procrustes_kernels.panels.Panels`); the weight's gradient is the dense ``dY^T X``
    (the optimizer needs the gradient of every weight)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, pan):  # type: ignore[override]
        vals, bits, geo = weight.values, weight.bits, _geometry(weight)
        b = None if bias is None else bias.detach()
        regen = weight.regen() if pan is None else None
        with _no_autocast(x2d):
            if pan is None:
                out = ops.sparse_linear(x2d, vals, bits, b, geo, regen)
            else:
                out = panels.linear(x2d, pan, b)
        _save(ctx, regen, x2d, vals, bits)
        ctx.geo, ctx.pan, ctx.weight_dtype = geo, pan, vals.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        (x2d, vals, bits), regen = _saved(ctx)
        dy = dy.contiguous()
        dx = dw = dbias = None
        with _no_autocast(dy):
            if ctx.needs_input_grad[0]:
                if ctx.pan is None:
                    dx = ops.sparse_linear_t(dy, vals, bits, ctx.geo, regen)
                else:
                    dx = panels.linear_t(dy, ctx.pan)
            if ctx.needs_input_grad[1]:
                dw = dy.t().mm(x2d).to(ctx.weight_dtype)
            if ctx.needs_input_grad[2]:
                dbias = dy.sum(0).to(ctx.bias_dtype)
        return dx, dw, dbias, None


class _SparseConv2dFn(torch.autograd.Function):
    """``conv2d`` and its input gradient from the compressed weight or panels of its effective
    weight (see :class:`_SparseLinearFn`); the weight's gradient is cuDNN's / ATen's dense one."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv, groups, pan):  # type: ignore[override]
        vals, bits, geo = weight.values, weight.bits, _geometry(weight)
        _, stride, padding, dilation = conv
        b = None if bias is None else bias.detach()
        regen = weight.regen() if pan is None else None
        with _no_autocast(x):
            if pan is None:
                out = ops.sparse_conv2d(x, vals, bits, b, geo, conv, regen)
            else:
                out = panels.conv2d(x, pan, b, stride, padding, dilation, groups)
        _save(ctx, regen, x, vals, bits)
        ctx.geo, ctx.conv, ctx.groups, ctx.pan = geo, conv, groups, pan
        ctx.weight_shape, ctx.weight_dtype = tuple(weight._shape), vals.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        (x, vals, bits), regen = _saved(ctx)
        _, stride, padding, dilation = ctx.conv
        dy = dy.contiguous()
        dx = dw = dbias = None
        with _no_autocast(dy):
            if ctx.needs_input_grad[0]:
                if ctx.pan is None:
                    hw = tuple(x.shape[-2:])
                    dx = ops.sparse_conv2d_t(dy, vals, bits, ctx.geo, hw, ctx.conv, regen)
                else:
                    dx = panels.conv2d_input(
                        x.shape, dy, ctx.pan, stride, padding, dilation, ctx.groups
                    )
            if ctx.needs_input_grad[1]:
                dw = torch.nn.grad.conv2d_weight(
                    x, ctx.weight_shape, dy, stride, padding, dilation, ctx.groups
                ).to(ctx.weight_dtype)
            if ctx.needs_input_grad[2]:
                dbias = dy.sum((0, 2, 3)).to(ctx.bias_dtype)
        return dx, dw, dbias, None, None, None


def _panels(weight: Any, x: Tensor, groups: int | None = None) -> panels.Panels | None:
    """The panels of the materialise path of this call, None where the weight is written whole
    (one panel, a conv called with other groups than its weight's, compiled graphs: the
    compiler places the ``materialize`` op)."""
    if torch.compiler.is_compiling() or (groups is not None and groups != weight.groups):
        return None
    pan = panels.Panels(weight, input_dtype(x))
    return None if pan.whole else pan


def _tracked_grad(values: Tensor, weight_dtype: torch.dtype, bits: Tensor, shape) -> Tensor:
    from .gradient import TrackedGradient

    return TrackedGradient(values.to(weight_dtype), bits, tuple(shape))


class _SampledLinearFn(torch.autograd.Function):
    """``x @ W^T + b`` whose weight gradient is computed at the tracked positions only (a
    :class:`~procrustes_kernels.gradient.TrackedGradient`, by :func:`ops.sddmm_linear`): the
    weight's gradient on steps that keep the tracked set. The output and input gradient come from
    the sparse kernels (``sparse``) or the materialised effective weight."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, sparse):  # type: ignore[override]
        vals, bits, geo = weight.values, weight.bits, _geometry(weight)
        b = None if bias is None else bias.detach()
        regen = weight.regen() if sparse else None
        with _no_autocast(x2d):
            if sparse:
                out = ops.sparse_linear(x2d, vals, bits, b, geo, regen)
                ctx.panels = None
            else:
                ctx.panels = panels.Panels(weight, x2d.dtype)
                out = panels.linear(x2d, ctx.panels, None if b is None else b.to(x2d.dtype))
        _save(ctx, regen, x2d, vals, bits)
        ctx.dense_grad = not sparse and dense_tracked_grad(weight, x2d)
        ctx.geo, ctx.sparse, ctx.shape = geo, sparse, tuple(weight._shape)
        ctx.weight_dtype = vals.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        (x2d, vals, bits), regen = _saved(ctx)
        dy = dy.contiguous()
        dx = dw = dbias = None
        with _no_autocast(dy):
            if ctx.needs_input_grad[1] and ctx.sparse:
                dx, g = ops.library.sampled_linear_backward(
                    x2d, dy, vals, bits, ctx.geo, ctx.needs_input_grad[0], regen
                )
                dw = _tracked_grad(g, ctx.weight_dtype, bits, ctx.shape)
            else:
                if ctx.needs_input_grad[0]:
                    if ctx.sparse:
                        dx = ops.sparse_linear_t(dy, vals, bits, ctx.geo, regen)
                    else:
                        dx = panels.linear_t(dy, ctx.panels)
                if ctx.needs_input_grad[1]:
                    if ctx.dense_grad:
                        g = reference.sddmm_linear(x2d, dy, vals, bits, Geometry(*ctx.geo))
                    else:
                        g = ops.sddmm_linear(x2d, dy, vals, bits, ctx.geo)
                    dw = _tracked_grad(g, ctx.weight_dtype, bits, ctx.shape)
            if ctx.needs_input_grad[2]:
                dbias = dy.sum(0).to(ctx.bias_dtype)
        return dx, dw, dbias, None


class _SampledConv2dFn(torch.autograd.Function):
    """``conv2d`` whose weight gradient is computed at the tracked positions only (see
    :class:`_SampledLinearFn`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv, groups, sparse):  # type: ignore[override]
        vals, bits, geo = weight.values, weight.bits, _geometry(weight)
        b = None if bias is None else bias.detach()
        _, stride, padding, dilation = conv
        regen = weight.regen() if sparse else None
        with _no_autocast(x):
            if sparse:
                out = ops.sparse_conv2d(x, vals, bits, b, geo, conv, regen)
                ctx.panels = None
            else:
                ctx.panels = panels.Panels(weight, x.dtype)
                b = None if b is None else b.to(x.dtype)
                out = panels.conv2d(x, ctx.panels, b, stride, padding, dilation, groups)
        _save(ctx, regen, x, vals, bits)
        ctx.dense_grad = not sparse and dense_tracked_grad(weight, x)
        ctx.geo, ctx.conv, ctx.groups, ctx.sparse = geo, conv, groups, sparse
        ctx.shape, ctx.weight_dtype = tuple(weight._shape), vals.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        (x, vals, bits), regen = _saved(ctx)
        _, stride, padding, dilation = ctx.conv
        dy = dy.contiguous()
        dx = dw = dbias = None
        with _no_autocast(dy):
            if ctx.needs_input_grad[0]:
                if ctx.sparse:
                    hw = tuple(x.shape[-2:])
                    dx = ops.sparse_conv2d_t(dy, vals, bits, ctx.geo, hw, ctx.conv, regen)
                else:
                    dx = panels.conv2d_input(
                        x.shape, dy, ctx.panels, stride, padding, dilation, ctx.groups
                    )
            if ctx.needs_input_grad[1]:
                if ctx.dense_grad:
                    g = reference.sddmm_conv2d(x, dy, vals, bits, Geometry(*ctx.geo), *ctx.conv)
                else:
                    g = ops.sddmm_conv2d(x, dy, vals, bits, ctx.geo, ctx.conv)
                dw = _tracked_grad(g, ctx.weight_dtype, bits, ctx.shape)
            if ctx.needs_input_grad[2]:
                dbias = dy.sum((0, 2, 3)).to(ctx.bias_dtype)
        return dx, dw, dbias, None, None, None


def _sampled(weight: Any, x: Tensor, where: str, groups: int | None = None) -> bool:
    """Whether this call's weight gradient is taken at the tracked positions only (otherwise it
    is dense, which the optimizer samples itself: float64 weights, a conv called with other
    groups than its weight's, compiled graphs)."""
    if not (weight.sampled_grad and weight.requires_grad and torch.is_grad_enabled()):
        return False
    if input_dtype(x) not in SPARSE_DTYPES or weight.values.dtype not in SPARSE_DTYPES:
        return False
    if groups is not None and groups != weight.groups:
        return False
    # Compiled, the gradient stays dense (the optimizer samples it): same numbers, no SDDMM.
    return not torch.compiler.is_compiling()


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Any:
    """``F.linear`` with a budgeted ``weight`` (``NotImplemented`` for any other combination)."""
    if not _budgeted(weight) or _budgeted(input) or _budgeted(bias) or len(weight._shape) != 2:
        return NotImplemented
    where = "F.linear()"
    path = choose_path(weight, input, where)
    if _sampled(weight, input, where):
        out = _sparse_linear(input, weight, bias, where, path)
    elif path == "dense":
        pan = _panels(weight, input)
        if pan is None:
            out = F.linear(input, effective_weight(weight), bias)
        else:
            out = _sparse_linear(input, weight, bias, where, pan=pan)
    else:
        out = _sparse_linear(input, weight, bias, where)
    weight.last_path = path  # recorded once the call succeeded
    return out


def _sparse_linear(
    input: Tensor,
    weight: Any,
    bias: Tensor | None,
    where: str,
    sampled: str | None = None,
    pan: panels.Panels | None = None,
) -> Tensor:
    """The sparse kernels' ``F.linear``; with ``sampled`` (the path, "sparse" or "dense"), the
    weight gradient at the tracked positions only; with ``pan``, the panelled dense GEMMs."""
    _check_dtype(input, weight, where)
    out_features, in_features = weight._shape
    if input.dim() < 1 or input.shape[-1] != in_features:
        raise ValueError(
            f"{where}: expected input.shape[-1] == {in_features}, got shape {tuple(input.shape)}"
        )
    x, bias = _cast_for_autocast(input, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features).contiguous()
    if sampled is not None:
        out = _SampledLinearFn.apply(x2d, weight, bias, sampled == "sparse")
    else:
        out = _SparseLinearFn.apply(x2d, weight, bias, pan)
    return out.view(*lead, out_features)


def _conv_padding(
    padding: Any, kernel_size: tuple[int, int], dilation: tuple[int, int]
) -> tuple[list[int], bool]:
    """``F.pad`` amounts ``[left, right, top, bottom]`` of ``padding`` and whether they are
    symmetric (then the kernels pad themselves)."""
    if padding == "valid":
        return [0, 0, 0, 0], True
    if padding == "same":
        pads = []
        for d, k in zip(reversed(dilation), reversed(kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        ph, pw = _pair(padding)
        pads = [pw, pw, ph, ph]
    return pads, pads[0] == pads[1] and pads[2] == pads[3]


def _conv_cost(input: Tensor, weight: Any, stride: Any, padding: Any, dilation: Any):
    """``choose_path``'s ``conv``: the grid overhead of the C++ kernels and whether strided."""
    if input.dim() not in (3, 4):
        return 1.0, False  # the call raises later, naming the shape
    kernel_size, stride, dilation = tuple(weight._shape[2:]), _pair(stride), _pair(dilation)
    pads, symmetric = _conv_padding(padding, kernel_size, dilation)
    h, w = input.shape[-2:]
    if symmetric:  # the kernels pad
        hw, pad_hw = (h, w), (pads[2], pads[0])
    else:  # the input is padded first (see _sparse_conv2d)
        hw, pad_hw = (h + pads[2] + pads[3], w + pads[0] + pads[1]), (0, 0)
    overhead = conv_grid_overhead(hw, kernel_size, stride, pad_hw, dilation)
    return overhead, stride != (1, 1)


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Any:
    """``F.conv2d`` with a budgeted ``weight`` (``NotImplemented`` for any other combination)."""
    if not _budgeted(weight) or _budgeted(input) or _budgeted(bias) or len(weight._shape) != 4:
        return NotImplemented
    where = "F.conv2d()"
    path = choose_path(
        weight, input, where, lambda: _conv_cost(input, weight, stride, padding, dilation)
    )
    if path == "sparse" and groups != weight.groups:
        if weight.compute == "sparse":
            raise ValueError(
                f"{where}: compute='sparse' expects groups={weight.groups} (the weight's), "
                f"got {groups}"
            )
        path = "dense"
    if _sampled(weight, input, where, groups):
        out = _sparse_conv2d(input, weight, bias, stride, padding, dilation, groups, where, path)
    elif path == "dense":
        pan = _panels(weight, input, groups)
        if pan is None:
            out = F.conv2d(input, effective_weight(weight), bias, stride, padding, dilation, groups)
        else:
            args = (input, weight, bias, stride, padding, dilation, groups, where)
            out = _sparse_conv2d(*args, pan=pan)
    else:
        out = _sparse_conv2d(input, weight, bias, stride, padding, dilation, groups, where)
    weight.last_path = path  # recorded once the call succeeded
    return out


def _sparse_conv2d(
    input: Tensor,
    weight: Any,
    bias: Tensor | None,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
    where: str,
    sampled: str | None = None,
    pan: panels.Panels | None = None,
) -> Tensor:
    """The sparse kernels' ``F.conv2d`` (``sampled``, ``pan``: see :func:`_sparse_linear`)."""
    _check_dtype(input, weight, where)
    if input.dim() not in (3, 4) or input.shape[-3] != weight._shape[1] * groups:
        raise ValueError(
            f"{where}: expected input of shape [B, {weight._shape[1] * groups}, H, W], "
            f"got {tuple(input.shape)}"
        )
    x, bias = _cast_for_autocast(input, bias)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    kernel_size = tuple(weight._shape[2:])
    dilation = _pair(dilation)
    pads, symmetric = _conv_padding(padding, kernel_size, dilation)
    if not symmetric:
        x = F.pad(x, pads)
        pad_hw = (0, 0)
    else:
        pad_hw = (pads[2], pads[0])
    geo = (kernel_size, _pair(stride), pad_hw, dilation)
    if sampled is not None:
        out = _SampledConv2dFn.apply(x, weight, bias, geo, groups, sampled == "sparse")
    else:
        out = _SparseConv2dFn.apply(x, weight, bias, geo, groups, pan)
    return out.squeeze(0) if unbatched else out
