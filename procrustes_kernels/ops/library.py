"""The kernels as ``torch.library`` custom ops (namespace ``procrustes``): what PyTorch's
dispatcher, ``torch.compile`` and ``torch.export`` see.

Each op has one real implementation that asks :func:`procrustes_kernels.ops.get_ops` for the
backend of its tensors' device (Triton for CUDA, C++ for CPU, the reference otherwise, or the one
forced by ``PROCRUSTES_BACKEND`` / ``use_backend``): the single place where a backend is chosen.
Its fake implementation gives shapes and dtypes for tracing, without running a kernel.

* ``procrustes::materialize(values, bits, group_ptr, scale, seed, bound, numel, has_init)``: the
  flat effective weight (tracked values, every other weight ``scale * w0``). ``scale`` is a 0-d
  float32 tensor, read by the kernel, so the decay factor changing from step to step is data, not
  a constant of a traced graph; ``has_init`` (``scale != 0``) is the one thing the host decides.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backend_for, get_ops

__all__ = ["materialize", "eager"]


def eager(*tensors: Tensor) -> bool:
    """Whether a call on ``tensors`` may skip the dispatcher and run the implementation directly:
    plain tensors, no tracing, no dispatch mode. A custom op costs ~25 us of Python per call, more
    than a small layer's kernel; what it is for (tracing, fake tensors, modes) is absent then."""
    return (
        all(type(t) is Tensor and t.device.type != "meta" for t in tensors)
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._ops._len_torch_dispatch_stack_pre_dispatch() == 0
    )


def materialize_impl(
    values: Tensor,
    bits: Tensor,
    group_ptr: Tensor,
    scale: Tensor,
    seed: int,
    bound: float,
    numel: int,
    has_init: bool,
) -> Tensor:
    """The implementation of ``procrustes::materialize`` (see the module docstring)."""
    device = values.device
    ops = get_ops(device)
    if backend_for(device) == "triton":
        return ops.materialize(
            seed, bound, scale, values, bits, group_ptr, numel, values.dtype, has_init=has_init
        )
    # CPU backends take the scale as a number: reading a CPU scalar is no device synchronisation.
    s = float(scale) if has_init else 0.0
    return ops.materialize(seed, bound, s, values, bits, group_ptr, numel, values.dtype)


materialize = torch.library.custom_op("procrustes::materialize", mutates_args=())(materialize_impl)
materialize.__doc__ = "Flat effective weight of ``numel`` elements (the dtype of ``values``)."


@materialize.register_fake
def _materialize_fake(
    values: Tensor,
    bits: Tensor,
    group_ptr: Tensor,
    scale: Tensor,
    seed: int,
    bound: float,
    numel: int,
    has_init: bool,
) -> Tensor:
    return values.new_empty(numel)
