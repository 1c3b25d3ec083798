"""``BudgetedWeight``: a weight on a budget, as a PyTorch tensor.

A budgeted weight is an ``nn.Parameter`` with the shape, dtype and device of the dense weight it
stands for, whose data is the compressed tracked set (:class:`~procrustes_kernels.storage.
BlockStorage`: packed ``values``, one bit per element in ``bits``, ``group_ptr``), the ``seed``
that regenerates every untracked weight and the decay factor ``scale`` (``d`` of docs/training_rule.md:
an untracked weight is ``scale * w0``). Nothing dense is stored.

It is a traceable wrapper tensor subclass, so the standard tools see a tensor:

* ``F.linear`` / ``F.conv2d`` (what ``nn.Linear`` / ``nn.Conv2d`` / ``nn.MultiheadAttention``
  call) run on the compressed form (:mod:`procrustes_kernels.functional`): they materialise the
  effective weight for cuBLAS / cuDNN or run the sparse kernels, and autograd puts the dense
  gradient of the effective weight in ``weight.grad``, a plain tensor.
* ``detach``, ``clone``, ``to`` / ``.cuda()`` / ``.half()``, ``copy_`` (loading a checkpoint) and
  pickling (``torch.save``, ``state_dict``) keep the compressed form.
* Any other read (``w * 2``, ``w.sum()``, ``w.t()``, ``torch.matmul(x, w.T)``, ``F.embedding``
  of a tied weight, ``dense.copy_(w)``) sees the dense effective weight, materialised for that op;
  autograd differentiates it as usual.
* Writes it cannot honour (an in-place update from a ``torch.optim`` optimizer, ``nn.init``,
  ``w.zero_()``) raise an error naming :class:`~procrustes_kernels.DropBack` /
  :class:`~procrustes_kernels.Procrustes`, the only things that change it.

Over 600 lines on purpose: the tensor subclass, its shared state and
the rule of every aten op on it (the dispatch table at the bottom) are one unit, and the rules
read the class's private state.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from . import ops as _ops
from .compute import DEFAULT_COMPUTE_TILE, check_compute, check_compute_tile
from .ops.contract import Regen
from .philox import init_bound, init_values
from .storage import GROUP_SIZE, BlockStorage

__all__ = ["BudgetedWeight", "is_budgeted", "budgeted_weights"]

aten = torch.ops.aten

_INNER = ("values", "bits", "group_ptr", "scale")
# The names the tracer sees (__tensor_flatten__): ``values`` would shadow ``Tensor.values()``.
_FLAT = {"values": "tracked_values", "bits": "bits", "group_ptr": "group_ptr", "scale": "scale"}


class _Tracked:
    """The state a budgeted weight shares with its aliases (``detach()``, ``.data``, the tensors of
    ``state_dict()``), as a dense tensor shares its storage: a write through any of them (the
    optimizer's step, ``copy_`` of a checkpoint) is seen by all. ``clone()`` / ``to()`` copy it."""

    __slots__ = (*_INNER, "seed", "bound", "scale_value", "version", "sampled_grad")

    def __init__(self) -> None:
        self.version = 0  # bumped whenever the tracked set is replaced
        # Set by the optimizer (reselect_every > 1) when its next step keeps the tracked set.
        self.sampled_grad = False


def _shared(name: str, doc: str) -> property:
    def get(self: BudgetedWeight) -> Any:
        return getattr(self.__dict__["_store"], name)

    def set_(self: BudgetedWeight, value: Any) -> None:
        store = self.__dict__.get("_store")
        if store is None:  # being rebuilt by unpickling
            store = self.__dict__["_store"] = _Tracked()
        if name == "values" and type(value) is Tensor and not torch.compiler.is_compiling():
            # The tracked count changes from step to step: a compiled graph should take it as a
            # dynamic size (see procrustes_kernels.tracing).
            torch._dynamo.maybe_mark_dynamic(value, 0)
        setattr(store, name, value)

    return property(get, set_, doc=doc)


def is_budgeted(t: Any) -> bool:
    """Whether ``t`` is a budgeted weight (a :class:`BudgetedWeight`, e.g. a parameter that
    :func:`~procrustes_kernels.sparsify` converted)."""
    return isinstance(t, BudgetedWeight)


def budgeted_weights(model: torch.nn.Module) -> list[tuple[str, BudgetedWeight]]:
    """``(qualified name, weight)`` of every budgeted parameter of ``model``, in
    ``model.named_parameters()`` order (a weight tied between modules appears once)."""
    return [(n, p) for n, p in model.named_parameters() if is_budgeted(p)]


def check_seed(seed: Any, fn: str) -> int:
    if isinstance(seed, Tensor):
        seed = int(seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"{fn}: expected seed to be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"{fn}: expected seed in [0, 2**63), got {seed}")
    return seed


def _check_scale(scale: Any, fn: str) -> float:
    if isinstance(scale, Tensor):
        scale = float(scale)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: expected scale to be a float, got {type(scale).__name__}")
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"{fn}: expected scale (the decay factor) in [0, 1], got {scale!r}")
    return float(scale)


def _write_error(func: Any, w: Any, view: bool = False, what: str | None = None) -> RuntimeError:
    name = what or getattr(func, "__name__", str(func))
    target = (
        "a view of a budgeted weight" if view else f"a budgeted weight of shape {tuple(w._shape)}"
    )
    return RuntimeError(
        f"{name}: cannot write into {target}: a budgeted weight is stored "
        "as its tracked set plus a seed, and only pk.DropBack / pk.Procrustes change it (train it "
        "with pk.DropBack(model.parameters(), ...) or pk.Procrustes(...), not a torch.optim "
        "optimizer; weight.reset_tracked() returns it to its initial value; pk.densify(model) "
        "turns it into a dense weight)"
    )


class BudgetedWeight(Tensor):
    """A weight of which only the tracked set is stored (see the module docstring).

    Build one with :meth:`initial` (nothing tracked yet) or let :func:`~procrustes_kernels.sparsify`
    / :class:`~procrustes_kernels.SparseLinear` do it. Attributes:

    * ``values``, ``bits``, ``group_ptr``: the compressed tracked set (``storage`` wraps them as a
      :class:`~procrustes_kernels.storage.BlockStorage`); ``nnz`` tracked weights.
    * ``scale``: 0-d float32 tensor, the decay factor of untracked weights (``scale_value`` as a
      Python float). ``seed``, ``bound``: ``w0 = bound * (2 * u(seed, i) - 1)``.
    * ``block_size``: storage block length; ``groups``: convolution groups (1 for linear weights).
    * ``compute`` / ``compute_tile`` / ``last_path``: how ``F.linear`` / ``F.conv2d`` compute with
      it (see :mod:`procrustes_kernels.compute`).
    """

    values = _shared("values", "Tracked values in ascending flat-index order.")
    tracked_values = values
    bits = _shared("bits", "uint8 tracked-bit mask, one bit per weight.")
    group_ptr = _shared("group_ptr", "int64 pointers into ``values``, one per 256 weights (+1).")
    scale = _shared("scale", "0-d float32 tensor: the decay factor of untracked weights.")
    seed = _shared("seed", "The weight's random stream: ``w0`` is regenerated from it.")
    bound = _shared("bound", "``w0 = bound * (2 * u(seed, i) - 1)``.")
    _scale_value = _shared("scale_value", "``scale`` as a Python float.")
    _tracked_version = _shared("version", "Count of tracked-set replacements.")
    block_size: int
    groups: int
    # Not pickled (see __getstate__): a rebuilt weight starts from this class default.
    last_path: str | None = None

    @staticmethod
    def __new__(
        cls,
        values: Tensor,
        bits: Tensor,
        group_ptr: Tensor,
        scale: Tensor,
        *,
        shape: tuple[int, ...],
        seed: int,
        bound: float,
        block_size: int,
        groups: int = 1,
        scale_value: float | None = None,
        compute: str = "auto",
        compute_tile: tuple[int, int] = DEFAULT_COMPUTE_TILE,
        requires_grad: bool = False,
    ) -> BudgetedWeight:
        r = Tensor._make_wrapper_subclass(
            cls,
            tuple(shape),
            dtype=values.dtype,
            device=values.device,
            requires_grad=requires_grad,
        )
        r._shape = tuple(int(s) for s in shape)
        r._store = _Tracked()
        r.values, r.bits, r.group_ptr, r.scale = values, bits, group_ptr, scale
        r.seed, r.bound = int(seed), float(bound)
        r._scale_value = float(scale) if scale_value is None else float(scale_value)
        r.block_size, r.groups = int(block_size), groups
        r._compute, r._compute_tile = compute, compute_tile
        r.last_path = None
        return r

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # everything happens in __new__
        super().__init__()

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def initial(
        cls,
        shape: tuple[int, ...],
        *,
        seed: int,
        bound: float | None = None,
        block_size: int,
        groups: int = 1,
        dtype: torch.dtype | None = None,
        device: Any = None,
        compute: str = "auto",
        compute_tile: tuple[int, int] = DEFAULT_COMPUTE_TILE,
        requires_grad: bool = False,
    ) -> BudgetedWeight:
        """A weight at its initial state: nothing tracked, ``scale`` 1, so it equals ``w0``.

        ``bound`` defaults to ``1 / sqrt(fan_in)`` (``fan_in = prod(shape[1:])``), the U(-b, b)
        of ``nn.Linear`` / ``nn.Conv2d``.
        """
        fn = "BudgetedWeight.initial()"
        shape = tuple(int(s) for s in shape)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"{fn}: expected a floating dtype, got {dtype}")
        seed = check_seed(seed, fn)
        if bound is None:
            bound = init_bound(math.prod(shape[1:]) if len(shape) > 1 else 1)
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            raise ValueError(f"{fn}: expected a positive finite bound, got {bound!r}")
        empty = BlockStorage.empty(shape, block_size, dtype=dtype, device=device)
        return cls(
            empty.values,
            empty.bits,
            empty.group_ptr,
            torch.ones((), dtype=torch.float32, device=device),
            shape=shape,
            seed=seed,
            bound=bound,
            block_size=block_size,
            groups=groups,
            scale_value=1.0,
            compute=check_compute(compute, fn),
            compute_tile=check_compute_tile(compute_tile, fn),
            requires_grad=requires_grad,
        )

    def _alias(self) -> BudgetedWeight:
        """A new tensor object on this weight's state (what ``detach()`` gives): writes through
        either reach both."""
        out = Tensor._make_wrapper_subclass(
            BudgetedWeight, self._shape, dtype=self.values.dtype, device=self.values.device
        )
        out.__dict__.update(
            _shape=self._shape,
            _store=self._store,
            block_size=self.block_size,
            groups=self.groups,
            _compute=self._compute,
            _compute_tile=self._compute_tile,
        )
        return out

    def _with(self, **inner: Tensor) -> BudgetedWeight:
        """A new weight with this one's metadata and the given inner tensors: its own state."""
        t = {k: inner[k] for k in _INNER}
        return BudgetedWeight(
            t["values"],
            t["bits"],
            t["group_ptr"],
            t["scale"],
            shape=self._shape,
            seed=self.seed,
            bound=self.bound,
            block_size=self.block_size,
            groups=self.groups,
            scale_value=self._scale_value,
            compute=self._compute,
            compute_tile=self._compute_tile,
        )

    # -- the tracked set -------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        """Number of tracked (stored) weights."""
        return self.values.numel()

    @property
    def weight_numel(self) -> int:
        """Number of weights it stands for (``numel()`` of the dense weight)."""
        return math.prod(self._shape)

    @property
    def scale_value(self) -> float:
        """The decay factor of untracked weights as a Python float (no device read)."""
        return self._scale_value

    @property
    def sampled_grad(self) -> bool:
        """Whether backward computes this weight's gradient at its tracked positions only (a
        :class:`~procrustes_kernels.gradient.TrackedGradient`): set by the optimizer with
        ``reselect_every > 1`` before each step that keeps the tracked set."""
        return self._store.sampled_grad

    def set_sampled_grad(self, on: bool) -> None:
        self._store.sampled_grad = bool(on)

    @property
    def geometry(self) -> tuple[int, int, int, int]:
        """``(rows, cols, ksize, groups)``: the weight as the compute kernels and tiles see it.

        ``rows`` output features / channels, ``cols`` input features / channels per group,
        ``ksize`` kernel positions per (row, column) pair (1 for a linear weight); see
        :mod:`procrustes_kernels.ops.compute.index`.
        """
        shape = self._shape
        cols = shape[1] if len(shape) > 1 else 1
        return shape[0], cols, math.prod(shape[2:]), self.groups

    @property
    def storage(self) -> BlockStorage:
        """The compressed tracked set (a view on this weight's tensors)."""
        return BlockStorage(
            self._shape, self.block_size, self.values, self.bits, self.group_ptr, validate=False
        )

    def set_tracked(self, storage: BlockStorage, scale: float | None = None) -> None:
        """Replace the tracked set (and, when given, the decay factor), keeping this object.

        The low-level writer used by the optimizer's ``step()`` (and by tests and benchmarks that
        set a tracked set by hand). ``storage`` must describe this weight's shape; its tensors are
        taken as they are (converted to this weight's dtype and device).
        """
        fn = "BudgetedWeight.set_tracked()"
        if tuple(storage.shape) != self._shape:
            raise ValueError(
                f"{fn}: expected storage of shape {self._shape}, got {tuple(storage.shape)}"
            )
        if scale is not None:
            scale = _check_scale(scale, fn)
        device = self.values.device
        self.values = storage.values.to(device=device, dtype=self.values.dtype)
        self.bits = storage.bits.to(device)
        self.group_ptr = storage.group_ptr.to(device)
        if scale is not None:
            self.set_scale(scale)
        self._tracked_version += 1

    def reset_tracked(self) -> None:
        """Forget every tracked weight and the decay: the weight is ``w0`` again (its initial
        value, regenerated from the seed)."""
        empty = BlockStorage.empty(self._shape, self.block_size, dtype=self.values.dtype)
        self.set_tracked(empty, scale=1.0)

    def set_scale(self, scale: float) -> None:
        """Set the decay factor of untracked weights (a new 0-d tensor)."""
        scale = _check_scale(scale, "BudgetedWeight.set_scale()")
        self.scale = torch.full((), scale, dtype=torch.float32, device=self.values.device)
        self._scale_value = float(np.float32(scale))  # what the float32 tensor holds

    def effective(self) -> Tensor:
        """The dense weight that ``F.linear`` / ``F.conv2d`` compute with: tracked values, every
        other weight ``scale * w0``. A plain tensor, outside autograd (the custom op
        ``procrustes::materialize``, so ``torch.compile`` traces it)."""
        return _ops.materialize(*self._materialize_args()).view(self._shape)

    def _materialize_args(self) -> tuple:
        """The leading arguments of :func:`procrustes_kernels.ops.materialize` for this weight
        (its storage, decay factor and regeneration constants), after which a range may follow."""
        return (
            self.values,
            self.bits,
            self.group_ptr,
            self.scale,
            self.seed,
            self.bound,
            self.weight_numel,
            self._scale_value != 0.0,
        )

    def regen(self) -> Regen | None:
        """How kernels regenerate the untracked weights inside their tile loads (a
        :class:`~procrustes_kernels.ops.contract.Regen`), or None where they are exact zeros
        (decay factor 0)."""
        if self._scale_value == 0.0:
            return None
        return Regen(self.scale, self.seed, self.bound)

    def initial_values(self) -> Tensor:
        """``w0`` regenerated from the seed: float32, shaped like the dense weight."""
        w0 = init_values(self.seed, self.weight_numel, self.bound, device=self.values.device)
        return w0.view(self._shape)

    # -- compute path ----------------------------------------------------------------------------
    @property
    def compute(self) -> str:
        """``"auto"``, ``"dense"`` or ``"sparse"``: how ``F.linear`` / ``F.conv2d`` compute
        with this weight (see :mod:`procrustes_kernels.compute`)."""
        return self._compute

    @compute.setter
    def compute(self, value: str) -> None:
        self._compute = check_compute(value, "BudgetedWeight.compute")

    @property
    def compute_tile(self) -> tuple[int, int]:
        """``(rows, columns)`` of the sparse kernels' weight tile (each 16, 32 or 64)."""
        return self._compute_tile

    @compute_tile.setter
    def compute_tile(self, value: tuple[int, int]) -> None:
        self._compute_tile = check_compute_tile(value, "BudgetedWeight.compute_tile")

    # -- tensor protocol -------------------------------------------------------------------------
    def __repr__(self) -> str:  # type: ignore[override]
        grad = ", requires_grad=True" if self.requires_grad else ""
        return (
            f"BudgetedWeight(shape={self._shape}, nnz={self.nnz}/{self.weight_numel}, "
            f"scale={self._scale_value:.6g}, seed={self.seed}, block_size={self.block_size}, "
            f"dtype={self.values.dtype}, device={self.values.device}{grad})"
        )

    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        # The decay factor is data (the ``scale`` tensor): only whether it is zero is part of the
        # context, so a traced graph does not depend on its value (no recompile per decay step).
        ctx = (
            self._shape,
            self.seed,
            self.bound,
            self.block_size,
            self.groups,
            self._scale_value != 0.0,
            self._compute,
            self._compute_tile,
        )
        return [_FLAT[k] for k in _INNER], ctx

    def _stable_hash_for_caching(self) -> str:
        """What torch.compile's AOT cache keys a budgeted weight by: the flatten context and the
        inner tensors' dtypes and devices (not their contents nor the tracked count, which
        change every step)."""
        _, ctx = self.__tensor_flatten__()
        inner = tuple(
            (str(t.dtype), str(t.device), t.dim()) for t in map(self.__getattribute__, _INNER)
        )
        payload = (type(self).__qualname__, tuple(self.shape), str(self.dtype), self.requires_grad)
        return hashlib.blake2b(repr((*payload, ctx, inner)).encode(), digest_size=16).hexdigest()

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, Tensor], ctx: tuple, outer_size: Any, outer_stride: Any
    ) -> BudgetedWeight:
        shape, seed, bound, block_size, groups, has_init, compute, tile = ctx
        scale = inner["scale"]
        if not has_init:
            scale_value = 0.0
        elif type(scale) is Tensor and not torch.compiler.is_compiling():
            scale_value = float(scale)  # a real weight coming out of a compiled region
        else:
            scale_value = float("nan")  # traced: only zero / non-zero is known (NaN: non-zero)
        return BudgetedWeight(
            inner["tracked_values"],
            inner["bits"],
            inner["group_ptr"],
            inner["scale"],
            shape=shape,
            seed=seed,
            bound=bound,
            block_size=block_size,
            groups=groups,
            scale_value=scale_value,
            compute=compute,
            compute_tile=tile,
        )

    _STATE = (
        "_shape",
        *_INNER,
        "seed",
        "bound",
        "block_size",
        "groups",
        "_scale_value",
        "_compute",
        "_compute_tile",
    )

    def __getstate__(self) -> dict[str, Any]:
        # What pickling (torch.save) keeps: the compressed form, never a cache.
        state = {k: getattr(self, k) for k in self._STATE}
        if self.__dict__.get("_is_param"):
            state["_is_param"] = True
        return state

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        impl = _function_table().get(func)
        if impl is not None:
            out = impl(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return _plain_function(func, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        handler = _DISPATCH.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        _refuse_writes(func, args, kwargs)
        if func in _LIKE_OPS:  # only the metadata of the weight is read
            return func(*tree_map(_empty_like_weight, args), **tree_map(_empty_like_weight, kwargs))
        return _on_effective(func, args, kwargs)


class _DenseView(Tensor):
    """A view of a budgeted weight's effective weight (``w.t()``, ``w[0]``, ``w.view(-1)``,
    ``w.split(...)``): it reads as the dense values, and writes into it raise, since they could
    not reach the budgeted weight (a view of a dense weight would write into it)."""

    @staticmethod
    def __new__(cls, dense: Tensor) -> _DenseView:
        r = Tensor._make_wrapper_subclass(
            cls,
            dense.shape,
            strides=dense.stride(),
            storage_offset=dense.storage_offset(),
            dtype=dense.dtype,
            device=dense.device,
        )
        r._dense = dense
        return r

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __repr__(self) -> str:  # type: ignore[override]
        return f"view of a budgeted weight: {self._dense!r}"

    def __format__(self, spec: str) -> str:
        return self._dense.__format__(spec)

    def __deepcopy__(self, memo: dict) -> Tensor:
        # A copy is no view of the weight any more: a plain tensor, free to write.
        return self._dense.clone()

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["_dense"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, ctx: Any, size: Any, stride: Any) -> _DenseView:
        return _DenseView(inner["_dense"])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        return _plain_function(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            return _DenseView(args[0]._dense.detach())
        _refuse_writes(func, args, kwargs)
        return _on_effective(func, args, kwargs)


_READ_ONLY = (BudgetedWeight, _DenseView)


def _plain_function(func: Any, args: tuple, kwargs: dict) -> Any:
    """A torch function on a budgeted weight or a view of one, below the library's own ones:
    host-side writes refused, host reads on the effective weight, the rest to the dispatcher."""
    _refuse_host_writes(func, args)
    if func in _HOST_READS:  # need real memory: read the effective weight
        return func(*tree_map(_effective_of, args), **kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _on_effective(func: Any, args: tuple, kwargs: dict) -> Any:
    """An aten op run on the effective weight; views of it come back read-only."""
    out = func(*tree_map(_effective_of, args), **tree_map(_effective_of, kwargs))
    return _protect_views(func, out)


def _refuse_writes(func: Any, args: tuple, kwargs: dict) -> None:
    """Raise if ``func`` writes into a budgeted weight or a view of one (also inside the tensor
    lists of ``_foreach_*_`` ops)."""
    schema = func._schema
    if not schema.is_mutable:
        return
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, BudgetedWeight):
                raise _write_error(func, v)
            if isinstance(v, _DenseView):
                raise _write_error(func, v, view=True)


def _refuse_host_writes(func: Any, args: tuple) -> None:
    """Writes that bypass the dispatcher: ``t.data = ...`` and shared memory."""
    target = args[0] if args else None
    if not isinstance(target, _READ_ONLY):
        return
    if getattr(func, "__name__", None) == "__set__" and getattr(func, "__self__", None) is _DATA:
        raise _write_error(func, target, view=isinstance(target, _DenseView), what=".data = ...")
    if func is Tensor.share_memory_:
        raise RuntimeError(
            "share_memory_(): a budgeted weight cannot live in shared memory: pk.DropBack / "
            "pk.Procrustes replace its tracked set at every step, so processes would not see "
            "each other's updates (train across processes with torch.distributed instead)"
        )


_DATA = torch._C.TensorBase.__dict__["data"]
_HOST_READS = {Tensor.tolist, Tensor.numpy, Tensor.__array__, Tensor.__dlpack__}


def _protect_views(func: Any, out: Any) -> Any:
    """Outputs of ``func`` that alias its input (views) become read-only :class:`_DenseView`."""
    if not any(r.alias_info is not None for r in func._schema.returns):
        return out
    # In inference mode too: the wrapper itself needs a version counter.
    with torch.inference_mode(False):
        if isinstance(out, Tensor):
            return _DenseView(out)
        if isinstance(out, (list, tuple)):
            return type(out)(_DenseView(t) if isinstance(t, Tensor) else t for t in out)
    return out


def _effective_of(t: Any) -> Any:
    if isinstance(t, BudgetedWeight):
        return t.effective()
    return t._dense if isinstance(t, _DenseView) else t


def _empty_like_weight(t: Any) -> Any:
    if isinstance(t, BudgetedWeight):
        return torch.empty(t._shape, dtype=t.values.dtype, device=t.values.device)
    return t


_LIKE_OPS = {
    aten.empty_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.rand_like.default,
    aten.randn_like.default,
    aten.new_empty.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.new_empty_strided.default,
}


def _detach(func: Any, args: tuple, kwargs: dict) -> BudgetedWeight:
    return args[0]._alias()


def _clone(func: Any, args: tuple, kwargs: dict) -> BudgetedWeight:
    w = args[0]
    return w._with(**{k: getattr(w, k).clone() for k in _INNER})


def _to_copy(func: Any, args: tuple, kwargs: dict) -> Tensor:
    w = args[0]
    dtype = kwargs.get("dtype") or w.values.dtype
    device = kwargs.get("device") or w.values.device
    if not dtype.is_floating_point:  # e.g. w.int(): a dense conversion of the effective weight
        return func(w.effective(), **kwargs)
    non_blocking = bool(kwargs.get("non_blocking", False))
    moved = {
        k: getattr(w, k).to(device=device, non_blocking=non_blocking, copy=True) for k in _INNER
    }
    moved["values"] = moved["values"].to(dtype)
    return w._with(**moved)


def _to(func: Any, args: tuple, kwargs: dict) -> Tensor:
    """``aten.to.*`` (reached in inference mode): itself when nothing changes, else a copy."""
    bound = {a.name: v for a, v in zip(func._schema.arguments, args)} | kwargs
    w = bound["self"]
    other = bound.get("other")
    dtype = other.dtype if other is not None else bound.get("dtype")
    device = other.device if other is not None else bound.get("device")
    dtype = dtype or w.values.dtype
    device = torch.device(device) if device is not None else w.values.device
    same_device = device.type == w.values.device.type and device.index in (
        None,
        w.values.device.index,
    )
    if dtype == w.values.dtype and same_device and not bound.get("copy", False):
        return w
    return _to_copy(
        aten._to_copy.default,
        (w,),
        {"dtype": dtype, "device": device, "non_blocking": bound.get("non_blocking", False)},
    )


def _same_values(dst: BudgetedWeight, src: Tensor) -> bool:
    """Whether dense ``src`` holds exactly ``dst``'s effective weight."""
    if not isinstance(src, Tensor) or tuple(src.shape) != tuple(dst._shape):
        return False
    if src.device.type == "meta" or dst.values.device.type == "meta":
        return False
    eff = dst.effective()
    return bool(torch.equal(src.to(device=eff.device, dtype=eff.dtype), eff))


def _copy(func: Any, args: tuple, kwargs: dict) -> Tensor:
    dst, src = args[0], args[1]
    if not isinstance(dst, BudgetedWeight):  # a dense tensor loads the effective weight
        dst.copy_(src.effective(), **kwargs)
        return dst
    storage = check_loadable(dst, src)
    if storage is None:
        # Writing the value the weight already has (DistributedDataParallel's start-up broadcast
        # of rank 0's weights into ranks built from the same seed) changes nothing.
        return dst
    fn = "BudgetedWeight.copy_()"
    seed, scale = check_seed(src.seed, fn), _check_scale(src._scale_value, fn)
    device, dtype = dst.values.device, dst.values.dtype
    dst.values = storage.values.to(device=device, dtype=dtype, copy=True)
    dst.bits = storage.bits.to(device=device, copy=True)
    dst.group_ptr = storage.group_ptr.to(device=device, copy=True)
    dst.seed, dst.bound = seed, float(src.bound)
    dst.set_scale(scale)
    dst._tracked_version += 1
    return dst


def check_loadable(dst: BudgetedWeight, src: Any, fn: str = "BudgetedWeight.copy_()"):
    """Everything ``dst.copy_(src)`` checks, changing nothing: the checked storage of ``src``, or
    None when ``src`` is a dense tensor equal to ``dst``'s effective weight (a no-op copy).
    Raises TypeError / ValueError naming what does not fit."""
    if not isinstance(src, BudgetedWeight) and isinstance(src, Tensor) and _same_values(dst, src):
        return None
    if not isinstance(src, BudgetedWeight):
        raise TypeError(
            f"{fn}: expected a budgeted weight to load from, got a dense {type(src).__name__} of "
            f"shape {tuple(getattr(src, 'shape', ()))}: a dense weight has no tracked set and seed "
            "to store. "
            "Load dense weights into the nn model before pk.sparsify, or load a checkpoint of "
            "the sparsified model (under DistributedDataParallel, build the model on every "
            "rank with the same pk.sparsify seed: the start-up broadcast then changes nothing)"
        )
    if src._shape != dst._shape:
        raise ValueError(f"{fn}: expected a weight of shape {dst._shape}, got {src._shape}")
    # Check everything before anything changes: a bad checkpoint leaves the weight as it was.
    storage = BlockStorage(src._shape, dst.block_size, src.values, src.bits, src.group_ptr)
    check_seed(src.seed, fn)
    _check_scale(src._scale_value, fn)
    if src.scale.numel() != 1 or float(src.scale) != float(np.float32(src._scale_value)):
        raise ValueError(
            f"{fn}: the decay factor's tensor ({src.scale.flatten()[:1].tolist()}) and its value "
            f"({src._scale_value!r}) disagree: an inconsistent checkpoint"
        )
    if not (math.isfinite(src.bound) and src.bound > 0):
        raise ValueError(f"{fn}: expected a positive finite bound, got {src.bound!r}")
    if float(src.bound) != float(dst.bound):
        # The initial values' bound follows from the layer's shape (PyTorch's default init):
        # a different one is a checkpoint of another architecture.
        raise ValueError(
            f"{fn}: expected the bound of the initial values {dst.bound!r} (this layer's), "
            f"got {src.bound!r}"
        )
    if src.bits.numel() != (dst.weight_numel + 7) // 8 or src.group_ptr.numel() != (
        (dst.weight_numel + GROUP_SIZE - 1) // GROUP_SIZE + 1
    ):
        raise ValueError(f"{fn}: storage does not describe {dst.weight_numel} weights")
    if src.values.numel() and not bool(torch.isfinite(src.values).all()):
        raise ValueError(f"{fn}: expected finite tracked values, the checkpoint holds NaN / inf")
    return storage


_DISPATCH = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.to.dtype_layout: _to,
    aten.to.device: _to,
    aten.to.dtype: _to,
    aten.to.other: _to,
    aten.copy_.default: _copy,
}

_FUNCTIONS: dict | None = None


def _function_table() -> dict:
    """torch functions computed on the compressed form (imported late: functional imports us)."""
    global _FUNCTIONS
    if _FUNCTIONS is None:
        from . import functional

        _FUNCTIONS = {
            torch.nn.functional.linear: functional.linear,
            torch.nn.functional.conv2d: functional.conv2d,
        }
    return _FUNCTIONS


# torch.load(weights_only=True), the default, may rebuild budgeted weights.
torch.serialization.add_safe_globals([BudgetedWeight, _DenseView])
