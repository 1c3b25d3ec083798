"""Inputs of the kernels: segments for the update ops, compressed weights for the compute ops.

Update ops: :func:`random_segment` (one factory for every test: random storage, gradient and
momentum, or values and gradients on a grid so that scores and ties are exact on every backend),
:func:`segment_from_mask` for hand-made cases, and the two ways the tests pick a threshold
(:func:`threshold_with_ties`, :func:`gap_threshold`).

Compute ops: :func:`compressed_weight` (values, bits and tile index of a given tracked set),
:func:`random_mask` (seeded) and :func:`random_weight` (from the global RNG).
"""

from __future__ import annotations

import numpy as np
import torch

from procrustes_kernels.ops.compute.index import TileIndex, build_tile_index
from procrustes_kernels.ops.contract import Segment, StepParams
from procrustes_kernels.philox import init_bound
from procrustes_kernels.storage import group_pointers, pack_bits

__all__ = [
    "DEVICE",
    "SEED",
    "BOUND",
    "PARAMS",
    "segment_from_mask",
    "random_segment",
    "segment_to",
    "threshold_with_ties",
    "gap_threshold",
    "compressed_weight",
    "random_mask",
    "random_weight",
    "index_to",
]

# Where the Triton kernels run: the GPU when there is one, else the interpreter on CPU tensors.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SEED = 0x5EED_1234_ABCD  # above 2**32: both key words of the Philox key matter
BOUND = init_bound(37)


# Step scalars the tests share: plain SGD, momentum with weight decay and a decaying scale, and a
# scale of 0 (untracked weights become exact zeros).
PARAMS = {
    "sgd": StepParams(lr=0.3, momentum=0.0, weight_decay=0.0, scale=1.0),
    "momentum_wd_decay": StepParams(lr=0.1, momentum=0.9, weight_decay=5e-4, scale=0.81),
    "zero_scale": StepParams(lr=0.05, momentum=0.5, weight_decay=1e-3, scale=0.0),
}


# ------------------------------------------------------------------------------------ segments
def segment_from_mask(
    mask: torch.Tensor,
    values: torch.Tensor,
    grad: torch.Tensor,
    momentum: torch.Tensor | None = None,
    *,
    seed: int = SEED,
    bound: float = BOUND,
    scale_prev: float = 1.0,
    device: torch.device | str = "cpu",
) -> Segment:
    """The segment whose tracked set is the flat bool ``mask`` (values in flat order)."""
    mask = mask.reshape(-1)
    bits = pack_bits(mask)
    return Segment(
        seed=seed,
        bound=bound,
        numel=mask.numel(),
        values=values.to(device),
        bits=bits.to(device),
        group_ptr=group_pointers(bits, mask.numel()).to(device),
        grad=grad.to(device),
        momentum=None if momentum is None else momentum.to(device),
        scale_prev=scale_prev,
    )


def random_segment(
    n: int,
    *,
    density: float = 0.3,
    dtype: torch.dtype = torch.float32,
    momentum: bool = True,
    seed: int = SEED,
    bound: float = BOUND,
    scale_prev: float = 1.0,
    grad_std: float = 0.02,
    grid: float | None = None,
    zero_grads: float = 0.0,
    rng: int = 0,
    device: torch.device | str = "cpu",
) -> Segment:
    """Random consistent storage plus gradient (and momentum) of ``n`` elements.

    Drawn from a generator seeded with ``rng * 100_003 + n`` (not the global RNG), in this order:
    the tracked mask (``density``; 0 and 1 draw nothing), the tracked values (``N(0, 0.1^2)``), the
    gradient (``N(0, grad_std^2)``), the gradients set to zero (a ``zero_grads`` fraction; none
    drawn for 0) and the momentum buffer (``N(0, 0.01^2)``, ``momentum=True``).

    ``grid``: values and gradients are integers in [-4, 4] times ``grid`` instead. With
    ``bound=0`` (or ``scale_prev`` and the step's scale 0) and ``lr=1`` every score is then exact,
    so ties at a threshold are real ties on every backend.
    """
    g = torch.Generator().manual_seed(rng * 100_003 + n)
    if density in (0.0, 1.0):
        mask = torch.full((n,), bool(density))
    else:
        mask = torch.rand(n, generator=g) < density
    nnz = int(mask.sum())
    if grid is None:
        values = torch.randn(nnz, generator=g) * 0.1
        grad = torch.randn(n, generator=g) * grad_std
    else:
        values = torch.randint(-4, 5, (nnz,), generator=g).float() * grid
        grad = torch.randint(-4, 5, (n,), generator=g).float() * grid
    if zero_grads > 0:
        grad[torch.rand(n, generator=g) < zero_grads] = 0.0
    mom = (torch.randn(nnz, generator=g) * 0.01).to(dtype) if momentum else None
    return segment_from_mask(
        mask,
        values.to(dtype),
        grad.to(dtype),
        mom,
        seed=seed,
        bound=bound,
        scale_prev=scale_prev,
        device=device,
    )


def segment_to(seg: Segment, device: torch.device | str) -> Segment:
    """The same segment with its tensors on ``device`` (and a scratch of its own)."""
    moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in seg.__dict__.items()}
    return Segment(**{**moved, "scratch": {}})


# ---------------------------------------------------------------------------------- thresholds
def threshold_with_ties(s: torch.Tensor, keep_frac: float = 0.1) -> float:
    """A score value near the top ``keep_frac`` quantile (so ties at it exist): for backends that
    reproduce the reference's scores bit for bit."""
    ordered = s.sort().values
    return float(ordered[max(0, int(len(ordered) * (1 - keep_frac)) - 1)])


def gap_threshold(s: torch.Tensor, q: float) -> float:
    """A float32 threshold near the ``q`` quantile of ``s`` in a gap between scores, so that ulp
    differences between backends cannot move any score across it."""
    v = torch.unique(s.cpu().double())
    if len(v) < 2:
        return float(np.float32(v[0] / 2)) if len(v) and v[0] > 0 else float("inf")
    i = min(int(q * len(v)), len(v) - 2)
    for j in list(range(i, len(v) - 1)) + list(range(i - 1, -1, -1)):
        if v[j + 1] - v[j] > 1e-5 * v[j + 1]:
            return float(np.float32((v[j] + v[j + 1]) / 2))
    return float("inf")


# ---------------------------------------------------------------------------- compressed weights
def compressed_weight(
    mask: torch.Tensor,
    values: torch.Tensor | None = None,
    *,
    rows: int | None = None,
    cols: int | None = None,
    ksize: int = 1,
    groups: int = 1,
    block_n: int = 16,
    block_c: int = 16,
    values_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device | str = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor, TileIndex]:
    """``(values, bits, index)`` of a weight whose tracked set is ``mask``: ``[rows, cols]`` for a
    linear weight, or flat ``[rows * cols * ksize]`` with ``rows`` and ``cols`` given. Without
    ``values``, they are drawn ``N(0, 1)`` from a generator seeded with ``seed``."""
    if rows is None:
        rows, cols = mask.shape
    bits = pack_bits(mask.reshape(-1)).to(device)
    index = build_tile_index(bits, rows, cols, ksize, groups, block_n, block_c)
    if values is None:
        values = torch.randn(index.nnz, generator=torch.Generator().manual_seed(seed))
    return values.to(values_dtype).to(device), bits, index


def random_mask(rows: int, cols: int, density: float, seed: int = 0) -> torch.Tensor:
    """A ``[rows, cols]`` tracked set of the given density, from a seeded generator."""
    if density in (0.0, 1.0):
        return torch.full((rows, cols), bool(density))
    g = torch.Generator().manual_seed(seed * 7919 + rows * 131 + cols)
    return torch.rand(rows, cols, generator=g) < density


def random_weight(
    rows: int,
    cols: int,
    ksize: int = 1,
    groups: int = 1,
    density: float = 0.3,
    *,
    values_dtype: torch.dtype = torch.float32,
    block_n: int = 16,
    block_c: int = 16,
    device: torch.device | str = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor, TileIndex]:
    """A random compressed ``[rows, cols, ksize]`` weight (mask and ``N(0, 0.5^2)`` values from the
    global RNG, which the conftest seeds for every test)."""
    numel = rows * cols * ksize
    if density in (0.0, 1.0):
        mask = torch.full((numel,), bool(density))
    else:
        mask = torch.rand(numel) < density
    values = torch.randn(int(mask.sum())) * 0.5
    return compressed_weight(
        mask,
        values,
        rows=rows,
        cols=cols,
        ksize=ksize,
        groups=groups,
        block_n=block_n,
        block_c=block_c,
        values_dtype=values_dtype,
        device=device,
    )


def index_to(index: TileIndex, device: torch.device | str) -> TileIndex:
    """The tile index with its tensors on ``device``."""
    if index.row_off.device == torch.device(device):
        return index
    return type(index)(
        **{k: v.to(device) if torch.is_tensor(v) else v for k, v in index.__dict__.items()}
    )
