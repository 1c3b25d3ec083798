"""Dense GEMMs with a budgeted weight that regenerate it a panel at a time, never whole.

DropBack's promise is that an untracked weight's initial value is regenerated at every use and
never stored. Where a layer computes with its dense effective weight (the materialise path: the
untracked weights are ``scale * w0 != 0``, or the layer is too dense for the sparse kernels), the
functions here write that weight a panel of output rows at a time (:meth:`Panels.rows`: tracked
values, else ``scale * w0``, by the ``materialize`` op over a range of whole groups) and consume
each panel at once in the GEMM / convolution of those rows:

* forward ``Y[:, rows] = X W[rows]^T`` (:func:`linear`), ``Y[:, channels] = conv(X, W[channels])``
  (:func:`conv2d`);
* input gradient ``dX = sum over panels dY[:, rows] W[rows]`` (:func:`linear_t`,
  :func:`conv2d_input`), regenerating the panels again (nothing of the weight is saved for
  backward but its compressed storage); float16 / bfloat16 inputs sum the panels in float32 and
  round once.

So no dense copy of a layer's weight exists in forward or backward, only one panel of about
:data:`PANEL_WEIGHTS` weights (the layer's weight gradient, on a step that reselects the tracked
set, is dense by definition and is not built here). A weight of one panel or less is written whole,
as the plain materialise path does. Numbers: the same products, each output element's sum over the
input dimension in the GEMM's order; the input gradient adds the panels' contributions in order, so
it differs from one dense GEMM by the rounding of a float32 sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .storage import GROUP_SIZE

__all__ = ["PANEL_WEIGHTS", "Panels", "linear", "linear_t", "conv2d", "conv2d_input"]

# Weights per panel: 2 MiB of float32, a block of output rows that stays in the cache between its
# regeneration and its GEMM. A 4096 x 4096 SparseLinear pass (batch 64, 2 cores) with panels of
# 2**16 / 2**17 / 2**18 / 2**19 / 2**20 / 2**21 weights took 1.75 / 1.35 / 1.07 / 0.88 / 0.86 /
# 0.94x the time of the whole materialised weight: small panels make small GEMMs.
PANEL_WEIGHTS = 1 << 19


class Panels:
    """The dense effective weight of a budgeted weight, by blocks of output rows.

    Holds the compressed storage and the regeneration constants of the weight at construction
    (the forward pass's, also for its backward pass). ``rows(r0, r1)`` writes rows ``[r0, r1)``;
    iterating gives the panels ``(r0, r1)`` in order. A panel's row count is a multiple of
    :attr:`multiple`: its first element starts a group of the storage, and a grouped convolution's
    panel holds whole groups.
    """

    def __init__(self, weight: Any, dtype: torch.dtype, panel_weights: int | None = None) -> None:
        shape = tuple(weight._shape)
        self.shape = shape
        self.dtype = dtype
        # The input gradient sums the panels' products: in float32 for half-precision inputs, so
        # that it is rounded once, as one GEMM with float32 accumulation rounds it.
        self.acc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self.row_len = math.prod(shape[1:])
        self.nrows = shape[0]
        self._args = weight._materialize_args()  # this call's storage, also for its backward
        groups = weight.groups if len(shape) == 4 else 1
        per_group = shape[0] // groups if groups > 1 else 1
        align = GROUP_SIZE // math.gcd(self.row_len, GROUP_SIZE)
        self.multiple = math.lcm(align, per_group)
        target = PANEL_WEIGHTS if panel_weights is None else panel_weights
        height = max(1, target // max(self.row_len, 1)) // self.multiple * self.multiple
        self.height = min(self.nrows, max(self.multiple, height))

    @property
    def whole(self) -> bool:
        """Whether the weight is one panel (then it is written whole)."""
        return self.height >= self.nrows

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for r0 in range(0, self.nrows, self.height):
            yield r0, min(self.nrows, r0 + self.height)

    def rows(self, r0: int, r1: int, dtype: torch.dtype | None = None) -> Tensor:
        """Rows ``[r0, r1)`` of the effective weight, shaped ``(r1 - r0, *shape[1:])``, rounded to
        the compute dtype (then converted to ``dtype``)."""
        start, count = r0 * self.row_len, (r1 - r0) * self.row_len
        flat = ops.materialize(*self._args, start, count)
        w = flat.view(r1 - r0, *self.shape[1:]).to(self.dtype)
        return w if dtype is None else w.to(dtype)


def linear(x2d: Tensor, panels: Panels, bias: Tensor | None) -> Tensor:
    """``x2d @ W^T + bias`` (``x2d``: ``[M, in_features]``)."""
    if panels.whole:
        return F.linear(x2d, panels.rows(0, panels.nrows), bias)
    out = x2d.new_empty(x2d.shape[0], panels.nrows)
    for r0, r1 in panels:
        w = panels.rows(r0, r1)
        if bias is None:
            torch.mm(x2d, w.t(), out=out[:, r0:r1])
        else:
            torch.addmm(bias[r0:r1], x2d, w.t(), out=out[:, r0:r1])
    return out


def linear_t(dy: Tensor, panels: Panels) -> Tensor:
    """``dy @ W`` (``dy``: ``[M, out_features]``), the input gradient of :func:`linear`."""
    if panels.whole:
        return dy.mm(panels.rows(0, panels.nrows))
    acc = panels.acc_dtype
    dy = dy.to(acc)
    dx = None
    for r0, r1 in panels:
        w = panels.rows(r0, r1, acc)
        if dx is None:
            dx = dy[:, r0:r1].mm(w)
        else:
            dx.addmm_(dy[:, r0:r1], w)
    return dx.to(panels.dtype)


def _group_slices(panels: Panels, r0: int, r1: int, groups: int) -> tuple[slice, int]:
    """The input channels and the groups of output channels ``[r0, r1)``."""
    if groups == 1:
        return slice(None), 1
    per_group = panels.nrows // groups
    cin = panels.shape[1]
    g0, g1 = r0 // per_group, r1 // per_group
    return slice(g0 * cin, g1 * cin), g1 - g0


def conv2d(
    x: Tensor, panels: Panels, bias: Tensor | None, stride, padding, dilation, groups: int
) -> Tensor:
    """``F.conv2d(x, W, bias, ...)``, a panel of output channels at a time (``x``: 4-d)."""
    if panels.whole:
        w = panels.rows(0, panels.nrows)
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)
    out = None
    for r0, r1 in panels:
        cin, g = _group_slices(panels, r0, r1, groups)
        xs = x if groups == 1 else x[:, cin]
        b = None if bias is None else bias[r0:r1]
        y = F.conv2d(xs, panels.rows(r0, r1), b, stride, padding, dilation, g)
        if out is None:
            out = y.new_empty(y.shape[0], panels.nrows, *y.shape[2:])
        out[:, r0:r1] = y
    return out


def conv2d_input(
    input_shape, dy: Tensor, panels: Panels, stride, padding, dilation, groups: int
) -> Tensor:
    """The input gradient of :func:`conv2d` (``padding`` as numbers)."""
    if panels.whole:
        w = panels.rows(0, panels.nrows)
        return torch.nn.grad.conv2d_input(input_shape, w, dy, stride, padding, dilation, groups)
    acc = panels.acc_dtype
    dy = dy.to(acc)
    dx = None
    for r0, r1 in panels:
        cin, g = _group_slices(panels, r0, r1, groups)
        w = panels.rows(r0, r1, acc)
        if groups == 1:
            part = torch.nn.grad.conv2d_input(
                input_shape, w, dy[:, r0:r1], stride, padding, dilation, 1
            )
            dx = part if dx is None else dx.add_(part)
        else:
            if dx is None:
                dx = dy.new_empty(input_shape)
            shape = (input_shape[0], cin.stop - cin.start, *input_shape[2:])
            dx[:, cin] = torch.nn.grad.conv2d_input(
                shape, w, dy[:, r0:r1], stride, padding, dilation, g
            )
    return dx.to(panels.dtype)
