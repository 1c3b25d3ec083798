"""``SparseLinear`` / ``SparseConv2d`` and the making of budgeted weights for modules.

A budgeted weight is a :class:`~procrustes_kernels.weight.BudgetedWeight` parameter in place of a
module's dense weight; the module keeps its class, its forward and everything else.
:class:`SparseLinear` / :class:`SparseConv2d` are ``nn.Linear`` / ``nn.Conv2d`` built with a
budgeted weight (the same arguments, plus ``seed``); :mod:`procrustes_kernels.convert` converts the
weights of a whole model (``sparsify`` / ``densify``).

DropBack regenerates untracked weights from their initial value, so that value must be a pure
function of a seed: a budgeted weight (and the bias of its module) is re-initialised from
``derive_seed(model seed, position)``, with the distribution PyTorch's own init uses for it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .compute import DEFAULT_COMPUTE_TILE, autocast_on, check_compute, check_compute_tile
from .philox import init_values
from .storage import BlockStorage
from .weight import BudgetedWeight, check_seed, is_budgeted

__all__ = ["SparseLinear", "SparseConv2d"]

LINEAR_BLOCK = 16


def _random_seed() -> int:
    # Drawn from torch's default generator so torch.manual_seed makes layer seeds reproducible.
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _float32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    """The U(-b, b) bound of ``nn.init.xavier_uniform_`` (what ``nn.MultiheadAttention`` uses)."""
    return _float32(math.sqrt(6.0 / (fan_in + fan_out)))


def _new_weight(
    like: torch.Tensor,
    *,
    seed: int,
    block_size: int,
    groups: int = 1,
    bound: float | None = None,
    device: Any = None,
    compute: str = "auto",
    compute_tile: tuple[int, int] = DEFAULT_COMPUTE_TILE,
) -> nn.Parameter:
    """A budgeted parameter at its initial state, shaped like the dense ``like``."""
    w = BudgetedWeight.initial(
        tuple(like.shape),
        seed=seed,
        bound=bound,
        block_size=block_size,
        groups=groups,
        dtype=like.dtype,
        device=like.device if device is None else device,
        compute=compute,
        compute_tile=compute_tile,
    )
    return nn.Parameter(w, requires_grad=like.requires_grad)


def _seeded_bias(weight: BudgetedWeight, old: nn.Parameter, device: Any) -> nn.Parameter:
    """The bias of a budgeted weight's module: continues the weight's random stream after it."""
    b = init_values(
        weight.seed, old.numel(), weight.bound, start=weight.weight_numel, device=device
    )
    return nn.Parameter(b.to(old.dtype), requires_grad=old.requires_grad)


def _zero_param(old: nn.Parameter, device: Any) -> nn.Parameter:
    return nn.Parameter(
        torch.zeros(old.shape, dtype=old.dtype, device=device), requires_grad=old.requires_grad
    )


def _load_old_layout(module: nn.Module, state_dict: dict, prefix: str, *rest: Any) -> None:
    """Read checkpoints of the layer-based layout (``values`` / ``mask_bits`` / ``group_ptr`` /
    ``seed`` / ``init_scale`` of a sparse layer) into the budgeted ``weight``."""
    old = [prefix + k for k in ("values", "mask_bits", "group_ptr", "seed", "init_scale")]
    w = module._parameters.get("weight")
    if old[0] not in state_dict or prefix + "weight" in state_dict or not is_budgeted(w):
        return
    if not all(k in state_dict for k in old):
        return  # incomplete: load_state_dict reports the missing and unexpected keys
    values, bits, group_ptr, seed, scale = (state_dict.pop(k) for k in old)
    if bits.numel() != (w.weight_numel + 7) // 8:
        rest[-1].append(
            f"{prefix}values / mask_bits (layer-based layout): the checkpoint's bits hold "
            f"{bits.numel()} bytes, the weight of shape {w._shape} needs {(w.weight_numel + 7) // 8}"
        )
        return
    state_dict[prefix + "weight"] = BudgetedWeight(
        values.detach(),
        bits,
        group_ptr,
        scale.detach().to(torch.float32),
        shape=w._shape,
        seed=int(seed),
        bound=w.bound,
        block_size=w.block_size,
        groups=w.groups,
        scale_value=float(scale),
    )


def _watch_old_layout(module: nn.Module) -> None:
    if not module.__dict__.get("_pk_old_layout_hook"):
        module.register_load_state_dict_pre_hook(_load_old_layout)
        module._pk_old_layout_hook = True


class _BudgetedLayer:
    """What SparseLinear and SparseConv2d add to their nn class: views of the budgeted weight."""

    weight: BudgetedWeight

    @property
    def compute(self) -> str:
        """``"auto"``, ``"dense"`` or ``"sparse"`` of the weight (:mod:`procrustes_kernels.compute`)."""
        return self.weight.compute

    @compute.setter
    def compute(self, value: str) -> None:
        self.weight.compute = value

    @property
    def compute_tile(self) -> tuple[int, int]:
        """``(rows, columns)`` of the sparse kernels' weight tile (each 16, 32 or 64)."""
        return self.weight.compute_tile

    @compute_tile.setter
    def compute_tile(self, value: tuple[int, int]) -> None:
        self.weight.compute_tile = value

    @property
    def last_path(self) -> str | None:
        """``"dense"`` or ``"sparse"``: the path the last forward took."""
        return self.weight.last_path

    @property
    def block_size(self) -> int:
        return self.weight.block_size

    @property
    def nnz(self) -> int:
        """Number of tracked (stored) weights."""
        return self.weight.nnz

    @property
    def storage(self) -> BlockStorage:
        """The compressed tracked set (a view on the weight's tensors)."""
        return self.weight.storage

    def effective_weight(self) -> torch.Tensor:
        """The dense weight the forward pass uses (a plain tensor shaped like the nn weight)."""
        return self.weight.effective()

    def initial_weight(self) -> torch.Tensor:
        """``w0`` regenerated from the seed: float32, shaped like the nn weight."""
        return self.weight.initial_values()

    def _budget_weight(
        self,
        seed: int,
        block_size: int,
        groups: int,
        device: Any,
        compute: str,
        compute_tile: tuple[int, int],
    ) -> None:
        """Replace the (meta) weight the nn constructor made by a budgeted one on ``device`` and
        seed the bias from it."""
        device = torch.empty(0, device=device).device if device is not None else torch.device("cpu")
        self.weight = _new_weight(
            self.weight,
            seed=seed,
            block_size=block_size,
            groups=groups,
            device=device,
            compute=compute,
            compute_tile=compute_tile,
        )
        if self.bias is not None:
            self.bias = _seeded_bias(self.weight, self.bias, self.weight.values.device)
        _watch_old_layout(self)

    def reset_parameters(self) -> None:
        """Back to the initial state: nothing tracked, weight ``w0`` and bias from the seed.
        (Called by the nn constructor too, while the weight is still its dense meta one.)"""
        if not self._reset_budgeted():
            super().reset_parameters()

    def _reset_budgeted(self) -> bool:
        """Back to the initial state (nothing tracked, bias from the seed); False when the weight
        is not budgeted yet (during the nn constructor)."""
        w = self._parameters.get("weight")
        if not is_budgeted(w):
            return False
        w.reset_tracked()
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(_seeded_bias(w, self.bias, self.bias.device))
        return True

    def _check_input(self, input: Any, feature_dim: int, expected: int, ndims: tuple) -> None:
        name = type(self).__name__
        if not isinstance(input, torch.Tensor):
            raise TypeError(
                f"{name}.forward(): expected input to be a Tensor, got {type(input).__name__}"
            )
        if input.dim() not in ndims:
            raise ValueError(
                f"{name}.forward(): expected input with {' or '.join(map(str, ndims))} dims, "
                f"got shape {tuple(input.shape)}"
            )
        if input.shape[feature_dim] != expected:
            raise ValueError(
                f"{name}.forward(): expected input.shape[{feature_dim}] == {expected}, "
                f"got shape {tuple(input.shape)}"
            )
        if not input.is_floating_point():
            raise TypeError(f"{name}.forward(): expected a floating-point input, got {input.dtype}")
        dtype = self.weight.values.dtype
        if input.dtype != dtype and not autocast_on(input.device.type):
            raise TypeError(f"{name}.forward(): expected input of dtype {dtype}, got {input.dtype}")

    def _sparse_repr(self) -> str:
        w = self.weight
        if not is_budgeted(w):
            return "dense weight"
        return (
            f"block_size={w.block_size}, seed={w.seed}, nnz={w.nnz}/{w.weight_numel}, "
            f"scale={w.scale_value:.3g}"
        )


def _check_common(name: str, dtype: Any, seed: Any, compute: Any, tile: Any) -> int:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"{name}: expected a floating dtype, got {dtype}")
    check_compute(compute, name)
    check_compute_tile(tile, name)
    return _random_seed() if seed is None else check_seed(seed, name)


class SparseLinear(_BudgetedLayer, nn.Linear):
    """``nn.Linear`` whose weight is budgeted (same arguments, plus ``seed``).

    Args:
        in_features, out_features, bias, device, dtype: as :class:`torch.nn.Linear`.
        seed: the layer's random stream (initial weights and bias); drawn from torch's default
            generator when omitted.
        block_size: storage block length, a run of input weights of one output row.
        compute: ``"auto"`` (default), ``"dense"`` or ``"sparse"``: materialise the weight and call
            ``F.linear``, or run the sparse kernels on the compressed weight (valid once untracked
            weights are zeros); see :mod:`procrustes_kernels.compute`.
        compute_tile: ``(rows, columns)`` weight tile of the sparse kernels.

    ``isinstance(layer, nn.Linear)`` holds and ``layer.weight`` is a
    :class:`~procrustes_kernels.weight.BudgetedWeight` parameter. The initial weight is
    U(-1/sqrt(in_features), 1/sqrt(in_features)) like ``nn.Linear``'s, but generated from ``seed``
    so it can be regenerated instead of stored; ``reset_parameters()`` returns to it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        seed: int | None = None,
        block_size: int = LINEAR_BLOCK,
        compute: str = "auto",
        compute_tile: tuple[int, int] = DEFAULT_COMPUTE_TILE,
    ) -> None:
        name = "SparseLinear()"
        for arg, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: expected {arg} to be a positive int, got {v!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ValueError(
                f"{name}: expected block_size to be a positive int, got {block_size!r}"
            )
        seed = _check_common(name, dtype, seed, compute, compute_tile)
        # The nn constructor's dense weight lives on the meta device: nothing is allocated.
        super().__init__(in_features, out_features, bias, device="meta", dtype=dtype)
        self._budget_weight(seed, block_size, 1, device, compute, compute_tile)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input, -1, self.in_features, tuple(range(1, 9)))
        return super().forward(input)

    def to_dense(self) -> nn.Linear:
        """The equivalent :class:`torch.nn.Linear` holding the current effective weight."""
        layer = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device="meta",
            dtype=self.weight.dtype,
        )
        layer.weight = nn.Parameter(self.effective_weight(), self.weight.requires_grad)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone(), self.bias.requires_grad)
        return layer

    @classmethod
    def from_dense(cls, layer: nn.Linear, *, seed: int | None = None, **kw: Any) -> SparseLinear:
        """A fresh sparse layer with ``layer``'s configuration (weights re-initialised from ``seed``)."""
        return cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
            seed=seed,
            **kw,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._sparse_repr()}"
        )


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class SparseConv2d(_BudgetedLayer, nn.Conv2d):
    """``nn.Conv2d`` whose weight is budgeted (same arguments, plus ``seed``).

    One storage block is the ``kH x kW`` kernel of one (output channel, input channel) pair, as in
    the Procrustes accelerator, so the same blocks serve W (forward) and W^T (backward data).

    ``seed``, ``compute`` and ``compute_tile`` as for :class:`SparseLinear` (the tile is output
    channels x input channels, each with its whole kernel).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        seed: int | None = None,
        compute: str = "auto",
        compute_tile: tuple[int, int] = DEFAULT_COMPUTE_TILE,
    ) -> None:
        from torch.nn.modules.utils import _pair

        name = "SparseConv2d()"
        for arg, v in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("groups", groups),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: expected {arg} to be a positive int, got {v!r}")
        if in_channels % groups:
            raise ValueError(
                f"{name}: expected in_channels divisible by groups, got {in_channels} and {groups}"
            )
        if out_channels % groups:
            raise ValueError(
                f"{name}: expected out_channels divisible by groups, got {out_channels} and {groups}"
            )
        for arg, v in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
            if any(not isinstance(x, int) or x <= 0 for x in _pair(v)):
                raise ValueError(f"{name}: expected {arg} of positive ints, got {_pair(v)!r}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(
                    f"{name}: expected padding 'same', 'valid' or ints, got {padding!r}"
                )
            if padding == "same" and any(s != 1 for s in _pair(stride)):
                raise ValueError(
                    f"{name}: padding='same' expects stride 1, got stride {_pair(stride)}"
                )
        elif any(not isinstance(x, int) or x < 0 for x in _pair(padding)):
            raise ValueError(
                f"{name}: expected padding of non-negative ints, got {_pair(padding)!r}"
            )
        if padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"{name}: expected padding_mode in {_PADDING_MODES}, got {padding_mode!r}"
            )
        seed = _check_common(name, dtype, seed, compute, compute_tile)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device="meta",
            dtype=dtype,
        )
        block = self.kernel_size[0] * self.kernel_size[1]
        self._budget_weight(seed, block, groups, device, compute, compute_tile)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input, -3, self.in_channels, (3, 4))
        return super().forward(input)

    def to_dense(self) -> nn.Conv2d:
        """The equivalent :class:`torch.nn.Conv2d` holding the current effective weight."""
        layer = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device="meta",
            dtype=self.weight.dtype,
        )
        layer.weight = nn.Parameter(self.effective_weight(), self.weight.requires_grad)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone(), self.bias.requires_grad)
        return layer

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, *, seed: int | None = None, **kw: Any) -> SparseConv2d:
        """A fresh sparse layer with ``layer``'s configuration (weights re-initialised from ``seed``)."""
        return cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
            seed=seed,
            **kw,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sparse_repr()}"
