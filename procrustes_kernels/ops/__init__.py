"""The one place that decides which backend runs the weight ops.

Backends implement the same functions (see :mod:`.reference`, the definition):

* ``"reference"``: pure PyTorch, any device; the tests' oracle.
* ``"triton"``: Triton kernels, for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).
* ``"cpp"``: the compiled C++/OpenMP extension, for CPU tensors.

By default CUDA tensors go to Triton and CPU tensors to C++, each when available, else to the
reference. ``PROCRUSTES_BACKEND=<name>`` in the environment, :func:`set_backend` or the
:func:`use_backend` context manager force one (tests and benchmarks do). Nothing here initialises
CUDA or imports Triton until an op actually runs on a device that wants it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

from . import reference
from .types import RADIX_HIGH_BINS, RADIX_LOW_BINS, Compacted, Segment, StepParams

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_for",
    "get_ops",
    "set_backend",
    "use_backend",
    "Segment",
    "StepParams",
    "Compacted",
    "RADIX_HIGH_BINS",
    "RADIX_LOW_BINS",
]

BACKENDS = ("reference", "triton", "cpp")
_MODULES = {"reference": None, "triton": ".triton_ops", "cpp": ".cpp_ops"}
_loaded: dict[str, ModuleType | None] = {"reference": reference}
_errors: dict[str, str] = {}
_forced: str | None = None


def _check_name(name: str, fn: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{fn}: expected a backend in {BACKENDS}, got {name!r}")
    return name


def _load(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name], __name__)
        except Exception as err:  # a missing build or package only disables that backend
            _loaded[name] = None
            _errors[name] = f"{type(err).__name__}: {err}"
            # A backend whose wrapper ships but whose build is missing deserves one warning.
            if name == "cpp" and importlib.util.find_spec(_MODULES[name], __name__) is not None:
                warnings.warn(
                    f"procrustes_kernels: the C++ backend is not available ({_errors[name]}); "
                    "CPU tensors use the PyTorch reference. Reinstall with a C++ compiler to build it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _loaded[name]


def available_backends() -> dict[str, bool]:
    """Which backends can run here (importing them if needed)."""
    return {name: _load(name) is not None for name in BACKENDS}


def backend_error(name: str) -> str | None:
    """Why a backend failed to load, or None."""
    _load(_check_name(name, "backend_error()"))
    return _errors.get(name)


def _env_backend() -> str | None:
    name = os.environ.get("PROCRUSTES_BACKEND") or None
    return _check_name(name, "PROCRUSTES_BACKEND") if name else None


def set_backend(name: str | None) -> None:
    """Force one backend for every op (``None``: choose per device again)."""
    global _forced
    _forced = None if name is None else _check_name(name, "set_backend()")


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


def backend_for(device: torch.device | str) -> str:
    """Name of the backend that runs ops on tensors of ``device``."""
    forced = _forced or _env_backend()
    if forced is not None:
        if _load(forced) is None:
            raise RuntimeError(
                f"backend {forced!r} was forced but is not available: {_errors.get(forced)}"
            )
        return forced
    device_type = torch.device(device).type
    if device_type == "cuda" and _load("triton") is not None:
        return "triton"
    if device_type == "cpu" and _load("cpp") is not None:
        return "cpp"
    return "reference"


def get_ops(device: torch.device | str) -> ModuleType:
    """The module implementing the ops for tensors of ``device``."""
    return _loaded[backend_for(device)]
