"""How ``F.linear`` / ``F.conv2d`` compute with a budgeted weight: materialise + nn op, or sparse kernels.

Two paths give the same function:

* ``"dense"`` (materialise): write the effective weight, call ``F.linear`` / ``F.conv2d`` (cuBLAS /
  cuDNN). Always valid.
* ``"sparse"``: compute the forward pass and the input gradient directly from the compressed
  storage (:mod:`procrustes_kernels.ops.compute`), skipping weight tiles with no tracked weight,
  for float32 / float16 / bfloat16. Where every untracked weight is exactly zero
  (``weight.scale_value == 0``: Procrustes after its decay) every backend has these kernels.
  Otherwise (DropBack, Procrustes before its decay) the untracked weights are ``scale * w0`` and
  only the Triton kernels (and the reference that defines them) compute with them: they
  regenerate each one from the seed inside the weight-tile load, visit every tile, and so never
  write any part of the dense weight to memory; the C++ kernels read tracked weights only, and
  ``"sparse"`` raises there. The weight gradient stays a dense GEMM (``dY^T X`` / cuDNN's
  weight gradient) on steps that reselect the tracked set.

A budgeted weight's ``compute`` attribute (also reachable as ``SparseLinear.compute``) picks one:
``"dense"``, ``"sparse"`` (raises when the sparse path is not valid) or ``"auto"`` (default), which
takes the sparse kernels when they are valid, the Triton kernels run (CUDA), the layer is large
enough and few enough tiles hold tracked weights (:data:`AUTO_MAX_TILE_DENSITY`,
:data:`AUTO_MIN_WEIGHTS`), or, on the CPU with the C++ kernels (float32), the layer has at least
:data:`AUTO_MIN_WEIGHTS_CPU` weights and few enough of them are tracked
(:data:`AUTO_MAX_DENSITY_CPU`; for a convolution also :data:`AUTO_MAX_CONV_DENSITY_CPU` over
its :func:`conv_grid_overhead`); the choice is made per weight and call (so per step), and
``weight.last_path`` records it. ``"auto"`` never takes the regenerating kernels: a unit of
``BLOCK_M`` input rows regenerates every weight it reads (a Philox draw per weight per unit), where
the materialise path draws each weight once per panel and hands the product to cuBLAS; they are for when memory, not time, is the limit (not timed on a GPU yet).
The autograd functions of both paths live in :mod:`procrustes_kernels.functional`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .ops import backend_for
from .ops.compute.index import TileIndex, cached_tile_index
from .ops.contract import COMPUTE_DTYPES, conv_grid_dims
from .ops.dispatch import regenerates

if TYPE_CHECKING:
    from .weight import BudgetedWeight

__all__ = [
    "COMPUTE_MODES",
    "AUTO_MAX_TILE_DENSITY",
    "AUTO_MIN_WEIGHTS",
    "AUTO_MAX_DENSITY_CPU",
    "AUTO_MIN_WEIGHTS_CPU",
    "AUTO_MAX_CONV_DENSITY_CPU",
    "conv_grid_overhead",
    "DEFAULT_COMPUTE_TILE",
    "COMPUTE_TILE_SIZES",
    "check_compute",
    "check_compute_tile",
    "choose_path",
    "dense_tracked_grad",
    "tile_index",
    "SPARSE_DTYPES",
]

COMPUTE_MODES = ("auto", "dense", "sparse")
# "auto" takes the sparse kernels at or below this fraction of non-empty weight tiles ...
AUTO_MAX_TILE_DENSITY = 0.3
# ... for layers with at least this many weights (below it, launches dominate either path).
AUTO_MIN_WEIGHTS = 1 << 16
# On the CPU (C++ kernels) "auto" takes the sparse kernels at or below this density of tracked
# weights, for layers of at least AUTO_MIN_WEIGHTS_CPU weights (benchmarks/bench_cpu.py,
# cpu_passes_intel_v4.md: at 10% a SparseLinear pass is 0.70-0.73x nn.Linear's, at 50% 2.0x;
# ResNet-18's 64-channel 3x3 convolutions at 10% take 0.30x of oneDNN's forward + input gradient).
AUTO_MAX_DENSITY_CPU = 0.2
AUTO_MIN_WEIGHTS_CPU = 1 << 12
# A convolution takes them only while its density times its grid overhead (the positions of the
# padded, stride-phased grid the kernels walk per output position) is at most the first value
# (unit stride) or the second (strided): the C++ kernels stream a shifted run of that grid per
# tracked weight, oneDNN computes the output positions only. 2-core Intel Xeon, ResNet-18's
# convolutions, batch 32, forward + input gradient against the materialise path (panels
# included), density x overhead where the sparse kernels stop winning: 0.33, 0.32, 0.28, 0.29
# (64, 128, 256, 512 channels, 3x3, unit stride, overhead 1.13-2.25) and 0.19, 0.17, 0.34 (strided).
AUTO_MAX_CONV_DENSITY_CPU = (0.27, 0.16)
# Rows x columns of a weight tile of the sparse kernels (and of the tile index). Larger tiles make
# the kernels spill registers (checked by compiling for sm_90).
DEFAULT_COMPUTE_TILE = (32, 32)
COMPUTE_TILE_SIZES = (16, 32, 64)

SPARSE_DTYPES = COMPUTE_DTYPES


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


def tile_index(weight: BudgetedWeight) -> TileIndex:
    """The weight's :class:`TileIndex` for its ``compute_tile``, cached on its bits tensor until
    the tracked set changes (:func:`~procrustes_kernels.ops.compute.index.cached_tile_index`)."""
    return cached_tile_index(weight.bits, *weight.geometry, *weight.compute_tile)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for types autocast does not know, such
    as ``meta``)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def input_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``x`` computes in (the autocast dtype where autocast is on)."""
    if autocast_on(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def conv_grid_overhead(
    hw: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> float:
    """Positions of the grid the C++ convolution kernels walk (the padded input cut into stride
    phases, each ``ceil((H + 2 p) / s)`` by ``ceil((W + 2 p) / s)``) per output position: what
    they compute in excess of the output (1.0 where the input leaves no output position)."""
    (oh, ow), (hg, wg) = conv_grid_dims(hw, kernel_size, stride, padding, dilation)
    if oh <= 0 or ow <= 0:
        return 1.0
    return (hg * wg) / (oh * ow)


def choose_path(
    weight: BudgetedWeight,
    x: torch.Tensor,
    where: str,
    conv: Callable[[], tuple[float, bool]] | None = None,
) -> str:
    """``"sparse"`` or ``"dense"`` for one ``F.linear`` / ``F.conv2d`` call (see the module
    docstring); ``where`` names the caller in errors; ``conv``, for a convolution: gives its
    :func:`conv_grid_overhead` and whether it is strided (called only where the choice needs it)."""
    mode = weight.compute
    if mode == "dense":
        return "dense"
    scale = weight.scale_value
    dtype = input_dtype(x)
    dtypes_ok = dtype in SPARSE_DTYPES and weight.values.dtype in SPARSE_DTYPES
    valid = scale == 0.0 and dtypes_ok
    backend = backend_for(x.device)
    if mode == "sparse":
        if scale != 0.0 and not regenerates(backend):
            raise ValueError(
                f"{where}: compute='sparse' on the {backend} backend expects untracked weights "
                f"to be exact zeros (weight scale 0), got scale {scale:.6g}: its kernels read "
                "the tracked weights only (the Triton kernels regenerate the others); use "
                "compute='auto' or 'dense', which regenerate the weight a panel at a time"
            )
        if not dtypes_ok:
            raise TypeError(
                f"{where}: compute='sparse' expects float32, float16 or bfloat16 "
                f"input and weights, got {dtype} / {weight.values.dtype}"
            )
        return "sparse"
    min_weights = AUTO_MIN_WEIGHTS_CPU if backend == "cpp" else AUTO_MIN_WEIGHTS
    if not valid or backend not in ("triton", "cpp") or weight.weight_numel < min_weights:
        return "dense"
    if torch.compiler.is_compiling():
        # The tile density is data: a traced graph cannot branch on it. Compiled, "auto" takes
        # the materialise path; compute="sparse" traces the sparse kernels as custom ops.
        return "dense"
    if backend == "cpp":
        # The C++ kernels walk the tracked weights one by one (no tiles to skip): their cost
        # follows the density (float32 only; other dtypes would run the reference).
        if dtype != torch.float32 or weight.values.dtype != torch.float32:
            return "dense"
        limit = AUTO_MAX_DENSITY_CPU
        if conv is not None:
            overhead, strided = conv()
            limit = min(limit, AUTO_MAX_CONV_DENSITY_CPU[int(strided)] / overhead)
        return "sparse" if weight.nnz <= limit * weight.weight_numel else "dense"
    return "sparse" if tile_index(weight).tile_density <= AUTO_MAX_TILE_DENSITY else "dense"


def dense_tracked_grad(weight: BudgetedWeight, x: torch.Tensor) -> bool:
    """Whether a step that keeps the tracked set takes a materialised layer's tracked gradient
    from its dense weight gradient (ATen's GEMM / convolution, picked at the tracked positions,
    a transient of one layer) instead of the sampled kernel (SDDMM).

    On the C++ backend, float32 layers denser than :data:`AUTO_MAX_DENSITY_CPU`: there ATen's
    dense gradient is the faster of the two (2-core Intel Xeon, ResNet-18's 3x3 convolutions,
    batch 32: at 30% density 18.7-30.8 ms dense + pick against 20.8-35.0 ms SDDMM; at 10% the
    SDDMM wins, 11.5-16.3 against 18.3-33.8 ms; a SparseLinear's SDDMM loses from ~10-20%).
    Elsewhere the SDDMM (untimed on a GPU)."""
    if backend_for(x.device) != "cpp" or torch.compiler.is_compiling():
        return False
    if x.dtype != torch.float32 or weight.values.dtype != torch.float32:
        return False
    return weight.nnz > AUTO_MAX_DENSITY_CPU * weight.weight_numel
