"""``SparseLinear`` / ``SparseConv2d``: drop-in nn layers whose weight lives on a budget.

Only the tracked set is stored (a :class:`~procrustes_kernels.storage.BlockStorage`: packed values,
one bit per element, group pointers). Every other weight is ``init_scale * w0`` where ``w0`` is
regenerated from the layer seed (:mod:`procrustes_kernels.philox`) and ``init_scale`` is the decay
factor the optimizer advances (1 for DropBack; it reaches exactly 0 under Procrustes).

The forward pass materialises the effective weight and calls ``F.linear`` / ``F.conv2d``, or, once
untracked weights are zeros, runs the sparse kernels on the compressed weight (``compute``, see
:mod:`procrustes_kernels.compute`). Either way the backward produces the dense gradient of the
effective weight, which the layer keeps in ``dense_grad`` until the optimizer's next ``step()``
consumes it (the scores of *untracked* weights need it). The ``values`` parameter itself gets no ``.grad``: clip or all-reduce ``dense_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .compute import (
    DEFAULT_COMPUTE_TILE,
    check_compute,
    check_compute_tile,
    choose_path,
    sparse_conv2d_forward,
    sparse_linear_forward,
)
from .ops import get_ops
from .philox import derive_seed, init_bound, init_values
from .storage import BlockStorage

__all__ = ["SparseLayer", "SparseLinear", "SparseConv2d", "sparsify", "densify", "set_compute"]

LINEAR_BLOCK = 16


def _random_seed() -> int:
    # Drawn from torch's default generator so torch.manual_seed makes layer seeds reproducible.
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _check_seed(seed: Any, fn: str) -> int:
    if isinstance(seed, torch.Tensor):
        seed = int(seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"{fn}: expected seed to be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"{fn}: expected seed in [0, 2**63), got {seed}")
    return seed


class _MaterializeWeight(torch.autograd.Function):
    """Dense effective weight from the tracked values; backward hands the dense gradient to the layer.

    ``values`` is an input only so that autograd runs the backward whenever the layer's weight
    requires grad; no gradient flows into it (its size changes with every step, and the optimizer
    needs the gradient of *all* weights anyway, which it finds in ``layer.dense_grad``).
    """

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, layer: SparseLayer) -> torch.Tensor:
        ctx.layer = layer
        return layer._materialize(values.detach())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        ctx.layer._accumulate_dense_grad(grad)
        return None, None


class SparseLayer(nn.Module):
    """Common machinery of the budgeted layers: seed, decay factor, compressed tracked set.

    State (all in ``state_dict``): ``values`` (parameter, tracked values in flat order), buffers
    ``mask_bits`` / ``group_ptr`` (the rest of the compressed storage), ``seed`` and ``init_scale``
    (the current decay factor ``d`` of untracked weights).
    """

    weight_shape: tuple[int, ...]
    block_size: int
    fan_in: int

    def _init_sparse(
        self,
        weight_shape: tuple[int, ...],
        fan_in: int,
        block_size: int,
        seed: int | None,
        bias: bool,
        device: Any,
        dtype: torch.dtype | None,
        compute: str = "auto",
        compute_tile: tuple[int, int] = DEFAULT_COMPUTE_TILE,
    ) -> None:
        name = type(self).__name__
        self.compute = check_compute(compute, f"{name}()")
        self.compute_tile = check_compute_tile(compute_tile, f"{name}()")
        self._tile_index_cache = None
        self._tracked_version = 0  # bumped whenever the tracked set is replaced
        self.last_path: str | None = None
        if dtype is None:
            dtype = torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"{name}(): expected a floating dtype, got {dtype}")
        seed = _random_seed() if seed is None else _check_seed(seed, f"{name}()")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.block_size = int(block_size)
        self.fan_in = int(fan_in)
        self.bound = init_bound(fan_in)
        empty = BlockStorage.empty(self.weight_shape, self.block_size, dtype=dtype, device=device)
        self.values = nn.Parameter(empty.values)
        self.register_buffer("mask_bits", empty.bits)
        self.register_buffer("group_ptr", empty.group_ptr)
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64, device=device))
        self.register_buffer("init_scale", torch.ones((), dtype=torch.float32, device=device))
        out = self.weight_shape[0]
        if bias:
            # The bias continues the layer's random stream after the weights.
            b = init_values(seed, out, self.bound, start=self.numel, device=device)
            self.bias = nn.Parameter(b.to(dtype))
        else:
            self.register_parameter("bias", None)
        self.dense_grad: torch.Tensor | None = None

    # -- compute path ----------------------------------------------------------------------------
    @property
    def compute(self) -> str:
        """``"auto"``, ``"dense"`` or ``"sparse"``: how forward/backward compute (see
        :mod:`procrustes_kernels.compute`)."""
        return self._compute

    @compute.setter
    def compute(self, value: str) -> None:
        self._compute = check_compute(value, f"{type(self).__name__}.compute")

    @property
    def compute_tile(self) -> tuple[int, int]:
        """``(rows, columns)`` of the sparse kernels' weight tile (each 16, 32 or 64)."""
        return self._compute_tile

    @compute_tile.setter
    def compute_tile(self, value: tuple[int, int]) -> None:
        self._compute_tile = check_compute_tile(value, f"{type(self).__name__}.compute_tile")

    # -- tracked set ---------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def matrix_geometry(self) -> tuple[int, int, int, int]:
        """``(rows, cols, ksize, groups)``: the weight as the compute kernels and tiles see it.

        ``rows`` output features / channels, ``cols`` input features / channels per group,
        ``ksize`` kernel positions per (row, column) pair (1 for a linear layer); see
        :mod:`procrustes_kernels.ops.sparse_index`.
        """
        rows = self.weight_shape[0]
        cols = self.weight_shape[1] if len(self.weight_shape) > 1 else 1
        ksize = math.prod(self.weight_shape[2:])
        return rows, cols, ksize, getattr(self, "groups", 1)

    @property
    def nnz(self) -> int:
        """Number of tracked (stored) weights."""
        return self.values.numel()

    @property
    def storage(self) -> BlockStorage:
        """The compressed tracked set (a view on this layer's tensors)."""
        return BlockStorage(
            self.weight_shape,
            self.block_size,
            self.values.detach(),
            self.mask_bits,
            self.group_ptr,
            validate=False,
        )

    def set_tracked(self, storage: BlockStorage) -> None:
        """Replace the tracked set (keeps the ``values`` parameter object, so optimizers hold on)."""
        if tuple(storage.shape) != self.weight_shape or storage.block_size != self.block_size:
            raise ValueError(
                f"{type(self).__name__}.set_tracked(): expected storage of shape {self.weight_shape} "
                f"and block_size {self.block_size}, got {tuple(storage.shape)} / {storage.block_size}"
            )
        self.values.data = storage.values.to(self.values.dtype)
        self.mask_bits = storage.bits
        self.group_ptr = storage.group_ptr
        self._tracked_version += 1

    def _host_value(self, name: str) -> float | int:
        """The Python value of a scalar buffer, read from the device only when the buffer changed
        (new tensor or in-place write), so a forward pass on a GPU does not synchronise for it."""
        t = getattr(self, name)
        if t.is_inference():  # no version counter to trust
            return t.item()
        cache = self.__dict__.setdefault("_host_values", {})
        hit = cache.get(name)
        if hit is not None and hit[0] is t and hit[1] == t._version:
            return hit[2]
        value = t.item()
        cache[name] = (t, t._version, value)
        return value

    @property
    def seed_value(self) -> int:
        return int(self._host_value("seed"))

    @property
    def init_scale_value(self) -> float:
        """``init_scale`` as a Python float (the current decay factor of untracked weights)."""
        return float(self._host_value("init_scale"))

    def initial_weight(self) -> torch.Tensor:
        """``w0`` regenerated from the seed: float32, shaped like the nn weight."""
        w0 = init_values(self.seed_value, self.numel, self.bound, device=self.mask_bits.device)
        return w0.view(self.weight_shape)

    def _materialize(self, values: torch.Tensor) -> torch.Tensor:
        ops = get_ops(values.device)
        flat = ops.materialize(
            self.seed_value,
            self.bound,
            self.init_scale_value,
            values,
            self.mask_bits,
            self.group_ptr,
            self.numel,
            values.dtype,
        )
        return flat.view(self.weight_shape)

    def effective_weight(self) -> torch.Tensor:
        """The dense weight the forward pass uses (a plain tensor shaped like the nn weight)."""
        with torch.no_grad():
            return self._materialize(self.values.detach())

    def _weight(self) -> torch.Tensor:
        return _MaterializeWeight.apply(self.values, self)

    def _accumulate_dense_grad(self, grad: torch.Tensor) -> None:
        grad = grad.detach()
        if self.dense_grad is None:
            self.dense_grad = grad.clone(memory_format=torch.contiguous_format)
        else:
            self.dense_grad.add_(grad)

    # -- checks and state ------------------------------------------------------------------------
    def _check_input(
        self, input: torch.Tensor, feature_dim: int, expected: int, ndims: tuple
    ) -> None:
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
        if input.dtype != self.values.dtype and not torch.is_autocast_enabled(input.device.type):
            raise TypeError(
                f"{name}.forward(): expected input of dtype {self.values.dtype}, got {input.dtype}"
            )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # The tracked count varies: size the values parameter to the checkpoint's before copying.
        # Checked before anything is copied, so a bad checkpoint leaves the layer as it was.
        keys = [prefix + k for k in ("values", "mask_bits", "group_ptr")]
        if all(k in state_dict for k in keys):
            saved = [state_dict[k] for k in keys]
            try:
                BlockStorage(self.weight_shape, self.block_size, *(t.detach() for t in saved))
            except (ValueError, TypeError) as err:
                error_msgs.append(
                    f"{prefix or 'layer '}tracked set in checkpoint is inconsistent: {err}"
                )
                return
            self.values.data = torch.empty(
                saved[0].numel(), dtype=self.values.dtype, device=self.values.device
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.dense_grad = None
        self._tracked_version += 1

    def _sparse_repr(self) -> str:
        return (
            f"block_size={self.block_size}, seed={self.seed_value}, nnz={self.nnz}/{self.numel}, "
            f"init_scale={self.init_scale_value:.3g}"
        )


class SparseLinear(SparseLayer):
    """Budgeted drop-in for :class:`torch.nn.Linear` (same arguments, plus ``seed``).

    Args:
        in_features, out_features, bias, device, dtype: as :class:`torch.nn.Linear`.
        seed: the layer's random stream (initial weights and bias); drawn from torch's default
            generator when omitted.
        block_size: storage block length, a run of input weights of one output row.
        compute: ``"auto"`` (default), ``"dense"`` or ``"sparse"``: materialise the weight and call
            ``F.linear``, or run the sparse kernels on the compressed weight (valid once untracked
            weights are zeros); see :mod:`procrustes_kernels.compute`.
        compute_tile: ``(rows, columns)`` weight tile of the sparse kernels.

    The initial weight is U(-1/sqrt(in_features), 1/sqrt(in_features)) like ``nn.Linear``'s, but
    generated from ``seed`` so it can be regenerated instead of stored.
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
        super().__init__()
        for arg, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"SparseLinear(): expected {arg} to be a positive int, got {v!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(
                f"SparseLinear(): expected block_size to be a positive int, got {block_size!r}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self._init_sparse(
            (out_features, in_features),
            in_features,
            block_size,
            seed,
            bias,
            device,
            dtype,
            compute,
            compute_tile,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input, -1, self.in_features, tuple(range(1, 9)))
        path = choose_path(self, input)
        if path == "sparse":
            out = sparse_linear_forward(self, input)
        else:
            out = F.linear(input, self._weight(), self.bias)
        self.last_path = path
        return out

    def to_dense(self) -> nn.Linear:
        """The equivalent :class:`torch.nn.Linear` holding the current effective weight."""
        layer = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.values.device,
            dtype=self.values.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(self.effective_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
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


class SparseConv2d(SparseLayer):
    """Budgeted drop-in for :class:`torch.nn.Conv2d` (same arguments, plus ``seed``).

    One storage block is the ``kH x kW`` kernel of one (output channel, input channel) pair, as in
    the Procrustes accelerator, so the same blocks serve W (forward) and W^T (backward data).

    ``compute`` / ``compute_tile`` as for :class:`SparseLinear` (the tile is output channels x
    input channels, each with its whole kernel).
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
        super().__init__()
        name = "SparseConv2d()"
        for arg, v in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("groups", groups),
        ):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected {arg} to be a positive int, got {v!r}")
        if in_channels % groups:
            raise ValueError(
                f"{name}: expected in_channels divisible by groups, got {in_channels} and {groups}"
            )
        if out_channels % groups:
            raise ValueError(
                f"{name}: expected out_channels divisible by groups, got {out_channels} and {groups}"
            )
        kernel_size, stride, dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        for arg, v in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
            if any(not isinstance(x, int) or x <= 0 for x in v):
                raise ValueError(f"{name}: expected {arg} of positive ints, got {v!r}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(
                    f"{name}: expected padding 'same', 'valid' or ints, got {padding!r}"
                )
            if padding == "same" and any(s != 1 for s in stride):
                raise ValueError(f"{name}: padding='same' expects stride 1, got stride {stride}")
        else:
            padding = _pair(padding)
            if any(not isinstance(x, int) or x < 0 for x in padding):
                raise ValueError(f"{name}: expected padding of non-negative ints, got {padding!r}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"{name}: expected padding_mode in {_PADDING_MODES}, got {padding_mode!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        # F.pad amounts (last dim first) when padding is done outside the convolution.
        if padding == "valid":
            pads = [0, 0, 0, 0]
        elif padding == "same":
            pads = []
            for d, k in zip(reversed(dilation), reversed(kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
        else:
            pads = [p for p in reversed(padding) for _ in range(2)]
        self._reversed_padding_repeated_twice = pads
        cin = in_channels // groups
        kh, kw = kernel_size
        self._init_sparse(
            (out_channels, cin, kh, kw),
            cin * kh * kw,
            kh * kw,
            seed,
            bias,
            device,
            dtype,
            compute,
            compute_tile,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input, -3, self.in_channels, (3, 4))
        path = choose_path(self, input)
        if path == "sparse":
            out = sparse_conv2d_forward(self, input)
        elif self.padding_mode != "zeros":
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            out = F.conv2d(
                padded, self._weight(), self.bias, self.stride, 0, self.dilation, self.groups
            )
        else:
            out = F.conv2d(
                input,
                self._weight(),
                self.bias,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
            )
        self.last_path = path
        return out

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
            device=self.values.device,
            dtype=self.values.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(self.effective_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
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
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return f"{s}, {self._sparse_repr()}"


_SPARSE_OF = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}


def _replace(model: nn.Module, convert: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace submodules (in ``named_modules`` order) by ``convert(name, module)`` when not None.

    A module registered at several places (weight tying) is converted once and the one new module
    is put at every place, so the tie survives.
    """
    targets = []
    converted: dict[int, nn.Module | None] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in converted:
            converted[id(module)] = convert(name, module)
        new = converted[id(module)]
        if new is not None:
            targets.append((name, new))
    if targets and targets[0][0] == "":
        return targets[0][1]  # the model itself was converted
    for name, new in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def sparsify(
    model: nn.Module,
    seed: int = 0,
    *,
    filter: Callable[[str, nn.Module], bool] | None = None,
    linear_block_size: int = LINEAR_BLOCK,
) -> nn.Module:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` for its sparse version, in place.

    DropBack regenerates untracked weights from their initial value, so that value must be a pure
    function of a seed: **the swapped layers' weights and biases are re-initialised** from
    ``derive_seed(seed, position)`` (position = order among the swapped layers in
    ``model.named_modules()``), with the same distribution as PyTorch's default init. Trained
    weights of the original layers are not kept.

    Args:
        model: the model to convert (modified in place; returned for convenience, or the new layer
            when ``model`` itself is an ``nn.Linear`` / ``nn.Conv2d``).
        seed: model seed; the same seed gives the same network on every backend and machine.
        filter: optional ``filter(qualified_name, module) -> bool``; layers for which it returns
            False stay dense.
        linear_block_size: storage block length of the SparseLinear layers.
    """
    seed = _check_seed(seed, "sparsify()")
    position = 0

    def convert(name: str, module: nn.Module) -> nn.Module | None:
        nonlocal position
        cls = _SPARSE_OF.get(type(module))
        if cls is None or (filter is not None and not filter(name, module)):
            return None
        kw = {"block_size": linear_block_size} if cls is SparseLinear else {}
        new = cls.from_dense(module, seed=derive_seed(seed, position), **kw)
        new.train(module.training)
        position += 1
        return new

    return _replace(model, convert)


def densify(model: nn.Module) -> nn.Module:
    """Replace every sparse layer by the equivalent nn layer holding its effective weight, in place."""

    def convert(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, SparseLayer):
            return None
        new = module.to_dense()
        new.train(module.training)
        return new

    return _replace(model, convert)


def set_compute(
    model: nn.Module, compute: str = "auto", compute_tile: tuple[int, int] | None = None
) -> nn.Module:
    """Set ``compute`` (and optionally ``compute_tile``) on every sparse layer of ``model``.

    ``"auto"`` lets each layer choose per step between its sparse kernels and the materialise path,
    ``"dense"`` / ``"sparse"`` force one (see :mod:`procrustes_kernels.compute`). Checked before
    any layer changes.
    """
    check_compute(compute, "set_compute()")
    if compute_tile is not None:
        compute_tile = check_compute_tile(compute_tile, "set_compute()")
    for module in model.modules():
        if isinstance(module, SparseLayer):
            module.compute = compute
            if compute_tile is not None:
                module.compute_tile = compute_tile
    return model
