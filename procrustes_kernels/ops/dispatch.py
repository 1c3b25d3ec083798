"""Which backend runs an op: the one place that decides, and the one place that falls back.

Backends (each a set of modules that implement ops of :data:`.contract.UPDATE_OPS` /
:data:`.contract.COMPUTE_OPS` under those names, listed in their ``__all__``):

* ``"reference"``: pure PyTorch, any device; every op; the tests' oracle.
* ``"triton"``: Triton kernels, for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).
* ``"cpp"``: the compiled C++/OpenMP extension, for CPU tensors (the update ops).

By default CUDA tensors go to Triton and CPU tensors to C++, each when available, else to the
reference. ``PROCRUSTES_BACKEND=<name>`` in the environment, :func:`set_backend` or the
:func:`use_backend` context manager force one (tests and benchmarks do). :func:`kernel` returns the
chosen backend's implementation of an op, or the reference's where that backend has no such op or
does not take the dtypes at hand (a backend module may define ``accepts(dtypes) -> bool``), or,
for a compute op asked to regenerate the untracked weights (``regen``), where the module does not
say ``regenerates = True``: callers never ask which backend lacks what. Nothing here initialises CUDA or imports Triton until an op
actually runs on a device that wants it. The custom ops of :mod:`.library` call :func:`kernel`, so
PyTorch's dispatcher and the library agree on which kernel runs.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator, Set

import torch

from .contract import COMPUTE_OPS, GRAD_OPS, UPDATE_OPS

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_error",
    "backend_for",
    "backend_ops",
    "kernel",
    "regenerates",
    "set_backend",
    "use_backend",
]

BACKENDS = ("reference", "triton", "cpp")
OPS = UPDATE_OPS + COMPUTE_OPS + GRAD_OPS
_MODULES = {
    "reference": (".update.reference", ".compute.reference"),
    "triton": (
        ".update.triton_kernels",
        ".compute.triton_linear",
        ".compute.triton_conv",
        ".compute.triton_sddmm",
    ),
    "cpp": (".update.cpp", ".compute.cpp"),
}
# name -> {op: (implementation, accepts, regenerates)} once loaded; None when it cannot load here
_tables: dict[str, dict[str, tuple[Callable, Callable | None, bool]] | None] = {}
_errors: dict[str, str] = {}
_forced: str | None = None


def _check_name(name: str, fn: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{fn}: expected a backend in {BACKENDS}, got {name!r}")
    return name


def _load(name: str) -> dict[str, tuple[Callable, Callable | None, bool]] | None:
    if name in _tables:
        return _tables[name]
    table: dict[str, tuple[Callable, Callable | None, bool]] = {}
    try:
        for mod_name in _MODULES[name]:
            mod = importlib.import_module(mod_name, __package__)
            accepts = getattr(mod, "accepts", None)
            regenerates = bool(getattr(mod, "regenerates", False))
            for op in mod.__all__:
                if op in OPS:
                    table[op] = (getattr(mod, op), accepts, regenerates)
    except Exception as err:  # a missing build or package only disables that backend
        _tables[name] = None
        _errors[name] = f"{type(err).__name__}: {err}"
        # A backend whose wrapper ships but whose build is missing deserves one warning.
        if name == "cpp" and importlib.util.find_spec(_MODULES[name][0], __package__):
            warnings.warn(
                f"procrustes_kernels: the C++ backend is not available ({_errors[name]}); "
                "CPU tensors use the PyTorch reference. Reinstall with a C++ compiler to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    _tables[name] = table
    return table


def available_backends() -> dict[str, bool]:
    """Which backends can run here (importing them if needed)."""
    return {name: _load(name) is not None for name in BACKENDS}


def backend_error(name: str) -> str | None:
    """Why a backend failed to load, or None."""
    _load(_check_name(name, "backend_error()"))
    return _errors.get(name)


def backend_ops(name: str) -> tuple[str, ...]:
    """The ops backend ``name`` implements itself (the others fall back to the reference)."""
    table = _load(_check_name(name, "backend_ops()"))
    return tuple(op for op in OPS if table is not None and op in table)


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
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if device_type == "cuda" and _load("triton") is not None:
        return "triton"
    if device_type == "cpu" and _load("cpp") is not None:
        return "cpp"
    return "reference"


def kernel(
    op: str,
    device: torch.device | str,
    dtypes: Set[torch.dtype] = frozenset(),
    regen: bool = False,
) -> Callable:
    """The implementation of ``op`` for tensors of ``device`` and ``dtypes`` (with ``regen``:
    that regenerates the untracked weights, a compute op's ``regen=`` argument): the chosen
    backend's where it has one that takes them, else the reference's."""
    if op not in OPS:
        raise ValueError(f"kernel(): expected an op in {OPS}, got {op!r}")
    table = _tables.get(backend_for(device))  # backend_for loaded it
    entry = table.get(op) if table is not None else None
    if entry is not None and (entry[1] is None or entry[1](dtypes)) and (entry[2] or not regen):
        return entry[0]
    return _load("reference")[op][0]


def regenerates(name: str) -> bool:
    """Whether backend ``name``'s own compute kernels take ``regen=`` (untracked weights
    ``scale * w0``, regenerated inside the kernels): the Triton and reference ones."""
    table = _load(_check_name(name, "regenerates()"))
    entry = table.get("sparse_linear") if table is not None else None
    return entry is not None and entry[2]
