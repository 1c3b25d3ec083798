"""How a sparse layer computes its forward and backward pass: materialise + nn op, or sparse kernels.

Two paths give the same function:

* ``"dense"`` (materialise): write the effective weight, call ``F.linear`` / ``F.conv2d`` (cuBLAS /
  cuDNN). Always valid.
* ``"sparse"``: compute the forward pass and the input gradient directly from the compressed
  storage (:mod:`procrustes_kernels.ops.sparse`), skipping weight tiles with no tracked weight.
  Valid only when every untracked weight is exactly zero (``init_scale == 0``: Procrustes after its
  decay), and for float32 / float16 / bfloat16. The weight gradient stays a dense GEMM
  (``dY^T X`` / cuDNN's weight gradient): the optimizer needs the gradient of every weight.

A layer's ``compute`` attribute picks one: ``"dense"``, ``"sparse"`` (raises when the sparse path is
not valid) or ``"auto"`` (default), which takes the sparse kernels when they are valid, the Triton
kernels run (CUDA), the layer is large enough and few enough tiles hold tracked weights
(:data:`AUTO_MAX_TILE_DENSITY`, :data:`AUTO_MIN_WEIGHTS`); the choice is made per layer and forward
call (so per step), and ``layer.last_path`` records it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .ops.sparse import get_sparse_ops, sparse_backend
from .ops.sparse_index import TileIndex, build_tile_index

if TYPE_CHECKING:
    from .layers import SparseLayer

__all__ = [
    "COMPUTE_MODES",
    "AUTO_MAX_TILE_DENSITY",
    "AUTO_MIN_WEIGHTS",
    "DEFAULT_COMPUTE_TILE",
    "COMPUTE_TILE_SIZES",
    "check_compute",
    "check_compute_tile",
    "choose_path",
    "tile_index",
    "sparse_linear_forward",
    "sparse_conv2d_forward",
]

COMPUTE_MODES = ("auto", "dense", "sparse")
# "auto" takes the sparse kernels at or below this fraction of non-empty weight tiles ...
AUTO_MAX_TILE_DENSITY = 0.3
# ... for layers with at least this many weights (below it, launches dominate either path).
AUTO_MIN_WEIGHTS = 1 << 16
# Rows x columns of a weight tile of the sparse kernels (and of the tile index). Larger tiles make
# the kernels spill registers (checked by compiling for sm_90).
DEFAULT_COMPUTE_TILE = (32, 32)
COMPUTE_TILE_SIZES = (16, 32, 64)

_SPARSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_compute(value: Any, where: str) -> str:
    if value not in COMPUTE_MODES:
        raise ValueError(f"{where}: expected compute in {COMPUTE_MODES}, got {value!r}")
    return value


def check_compute_tile(value: Any, where: str) -> tuple[int, int]:
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and all(v in COMPUTE_TILE_SIZES for v in value)
    )
    if not ok:
        raise ValueError(
            f"{where}: expected compute_tile to be two sizes from {COMPUTE_TILE_SIZES} "
            f"(rows, columns), got {value!r}"
        )
    return int(value[0]), int(value[1])


def tile_index(layer: SparseLayer) -> TileIndex:
    """The layer's :class:`TileIndex` for its ``compute_tile``, cached until the tracked set changes.

    The cache key is the bits tensor itself (the optimizer installs a new one every step), the
    layer's own count of tracked-set changes and, outside inference mode, the bits' version counter
    (in-place writes such as ``load_state_dict``). Bits made in inference mode have no version
    counter; their index is rebuilt on every call.
    """
    bits = layer.mask_bits
    if bits.is_inference():
        version = None
    else:
        version = bits._version
    key = (layer._tracked_version, version, layer.compute_tile)
    cached = layer._tile_index_cache
    if version is not None and cached is not None and cached[0] is bits and cached[1] == key:
        return cached[2]
    rows, cols, ksize, groups = layer.matrix_geometry
    bn, bc = layer.compute_tile
    index = build_tile_index(bits, rows, cols, ksize, groups, bn, bc)
    layer._tile_index_cache = (bits, key, index)  # holds ``bits``, so its identity stays unique
    return index


def _input_dtype(layer: SparseLayer, x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def choose_path(layer: SparseLayer, x: Tensor) -> str:
    """``"sparse"`` or ``"dense"`` for this forward call (see the module docstring)."""
    mode = layer.compute
    if mode == "dense":
        return "dense"
    name = type(layer).__name__
    scale = layer.init_scale_value
    dtype = _input_dtype(layer, x)
    valid = scale == 0.0 and dtype in _SPARSE_DTYPES and layer.values.dtype in _SPARSE_DTYPES
    if mode == "sparse":
        if scale != 0.0:
            raise ValueError(
                f"{name}.forward(): compute='sparse' expects untracked weights to be exact zeros "
                f"(init_scale == 0), got init_scale {scale:.6g}; use compute='auto' or 'dense'"
            )
        if not valid:
            raise TypeError(
                f"{name}.forward(): compute='sparse' expects float32, float16 or bfloat16 "
                f"input and weights, got {dtype} / {layer.values.dtype}"
            )
        return "sparse"
    if not valid or sparse_backend(x.device) != "triton" or layer.numel < AUTO_MIN_WEIGHTS:
        return "dense"
    return "sparse" if tile_index(layer).tile_density <= AUTO_MAX_TILE_DENSITY else "dense"


# ----------------------------------------------------------------------------------- autograd


def _no_autocast(t: Tensor) -> torch.autocast:
    # The kernels define their own precision; autocast must not recast what runs inside.
    return torch.autocast(t.device.type, enabled=False)


class _WeightGrad(torch.autograd.Function):
    """The weight's own autograd node: its output stands for the effective weight (a zero-stride
    view, no memory) and its backward hands the dense weight gradient to the layer.

    Keeping this separate from the compute nodes means the gradient reaches ``layer.dense_grad``
    only when the engine actually needs the weight's gradient (not for ``autograd.grad(y, x)``),
    exactly as on the materialise path.
    """

    @staticmethod
    def forward(ctx, values, layer):  # type: ignore[override]
        ctx.layer = layer
        return values.new_zeros(()).expand(layer.weight_shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        ctx.layer._accumulate_dense_grad(grad.to(ctx.layer.values.dtype))
        return None, None


def _weight_handle(layer: SparseLayer) -> Tensor:
    return _WeightGrad.apply(layer.values, layer)


class _SparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, layer, index, ops):  # type: ignore[override]
        bits = layer.mask_bits
        vals = layer.values.detach()
        with _no_autocast(x2d):
            out = ops.sparse_linear(x2d, vals, bits, index, None if bias is None else bias.detach())
        ctx.save_for_backward(x2d, vals, bits)
        ctx.layer, ctx.index, ctx.ops = layer, index, ops
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x2d, vals, bits = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = dbias = None
        with _no_autocast(dy):
            if ctx.needs_input_grad[0]:
                dx = ctx.ops.sparse_linear_t(dy, vals, bits, ctx.index)
            if ctx.needs_input_grad[1]:
                dw = dy.t().mm(x2d)
            if ctx.needs_input_grad[2]:
                dbias = dy.sum(0).to(ctx.layer.bias.dtype)
        return dx, dw, dbias, None, None, None


class _SparseConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, index, ops, padding):  # type: ignore[override]
        bits = layer.mask_bits
        vals = layer.values.detach()
        geo = (layer.kernel_size, layer.stride, padding, layer.dilation)
        with _no_autocast(x):
            out = ops.sparse_conv2d(
                x, vals, bits, index, *geo, bias=None if bias is None else bias.detach()
            )
        ctx.save_for_backward(x, vals, bits)
        ctx.layer, ctx.index, ctx.ops, ctx.geo = layer, index, ops, geo
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, vals, bits = ctx.saved_tensors
        layer = ctx.layer
        kernel_size, stride, padding, dilation = ctx.geo
        dy = dy.contiguous()
        dx = dw = dbias = None
        with _no_autocast(dy):
            if ctx.needs_input_grad[0]:
                hw = tuple(x.shape[-2:])
                dx = ctx.ops.sparse_conv2d_t(
                    dy, vals, bits, ctx.index, hw, kernel_size, stride, padding, dilation
                )
            if ctx.needs_input_grad[1]:
                dw = torch.nn.grad.conv2d_weight(
                    x, layer.weight_shape, dy, stride, padding, dilation, layer.groups
                )
            if ctx.needs_input_grad[2]:
                dbias = dy.sum((0, 2, 3)).to(layer.bias.dtype)
        return dx, dw, dbias, None, None, None, None


def _cast_for_autocast(layer: SparseLayer, x: Tensor) -> tuple[Tensor, Tensor | None]:
    dtype = _input_dtype(layer, x)
    bias = layer.bias
    if x.dtype != dtype:
        x = x.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return x, bias


def sparse_linear_forward(layer: Any, x: Tensor) -> Tensor:
    """``SparseLinear`` forward on the sparse path (``x [..., in_features]``)."""
    x, bias = _cast_for_autocast(layer, x)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, layer.in_features).contiguous()
    ops = get_sparse_ops(x.device)
    out = _SparseLinearFn.apply(x2d, _weight_handle(layer), bias, layer, tile_index(layer), ops)
    return out.view(*lead, layer.out_features)


def sparse_conv2d_forward(layer: Any, x: Tensor) -> Tensor:
    """``SparseConv2d`` forward on the sparse path (``x [B, C, H, W]`` or ``[C, H, W]``)."""
    x, bias = _cast_for_autocast(layer, x)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    pads = layer._reversed_padding_repeated_twice  # [left, right, top, bottom]
    symmetric = pads[0] == pads[1] and pads[2] == pads[3]
    if layer.padding_mode != "zeros" or not symmetric:
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, pads, mode=mode)
        padding = (0, 0)
    else:
        padding = (pads[2], pads[0])
    ops = get_sparse_ops(x.device)
    index = tile_index(layer)
    out = _SparseConv2dFn.apply(x, _weight_handle(layer), bias, layer, index, ops, padding)
    return out.squeeze(0) if unbatched else out
