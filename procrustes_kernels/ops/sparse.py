"""Dispatch of the sparse compute ops (forward / backward data from the compressed weight).

Two implementations of the same four functions (:mod:`.sparse_reference` defines them):

* ``"triton"``: the block-sparse kernels of :mod:`.triton_sparse_linear` and
  :mod:`.triton_sparse_conv`, for CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``);
* ``"reference"``: pure PyTorch, any device.

The weight-op backend choice of :mod:`procrustes_kernels.ops` applies: where it picks Triton the
kernels run, everywhere else (the C++ backend has no sparse compute, the CPU has no use for it) the
reference does.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch

from . import backend_for, sparse_reference

__all__ = ["sparse_backend", "get_sparse_ops", "SPARSE_FUNCTIONS"]

SPARSE_FUNCTIONS = ("sparse_linear", "sparse_linear_t", "sparse_conv2d", "sparse_conv2d_t")

_triton: SimpleNamespace | None = None


def _triton_ops() -> SimpleNamespace:
    global _triton
    if _triton is None:
        lin = importlib.import_module(".triton_sparse_linear", __package__)
        conv = importlib.import_module(".triton_sparse_conv", __package__)
        _triton = SimpleNamespace(
            name="triton",
            sparse_linear=lin.sparse_linear,
            sparse_linear_t=lin.sparse_linear_t,
            sparse_conv2d=conv.sparse_conv2d,
            sparse_conv2d_t=conv.sparse_conv2d_t,
        )
    return _triton


_REFERENCE = SimpleNamespace(
    name="reference", **{f: getattr(sparse_reference, f) for f in SPARSE_FUNCTIONS}
)


def sparse_backend(device: torch.device | str) -> str:
    """``"triton"`` or ``"reference"``: which implementation runs sparse compute on ``device``."""
    return "triton" if backend_for(device) == "triton" else "reference"


def get_sparse_ops(device: torch.device | str) -> SimpleNamespace:
    """The sparse compute functions for tensors of ``device`` (attribute ``name`` says which)."""
    return _triton_ops() if sparse_backend(device) == "triton" else _REFERENCE
