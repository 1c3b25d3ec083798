"""Tile index of a compressed weight: what the sparse compute kernels need to find tracked values.

Every sparse layer's weight is a matrix ``W[N, Cg * KS]`` in flat row-major order: ``N`` output
rows (features / channels), ``Cg`` input columns (features / channels) per group and ``KS`` kernel
positions per (row, column) pair (``kH * kW`` for a convolution, 1 for a linear layer). With
``groups`` groups, rows ``[g * N/groups, (g+1) * N/groups)`` read input columns
``[g * Cg, (g+1) * Cg)``. The compressed storage holds the tracked values in that flat order plus one
bit per element (:mod:`procrustes_kernels.storage`).

A *tile* is ``block_n`` rows of one group times ``block_c`` columns, each with its whole kernel: the
unit of work of the compute kernels, and the unit of the GPU-shaped selection granularity. Tiles
are cut per group, so that a tile never straddles two groups.

:class:`TileIndex` is derived from the bits alone (no values) and serves both W and W^T:

* ``row_off[n, ct]``: index into the packed values of the first tracked element of row ``n`` at or
  after column tile ``ct`` (the number of tracked elements before it in flat order). A kernel finds
  the value of element ``(n, c, k)`` as ``row_off[n, ct]`` plus the tracked bits of row ``n`` from
  the tile's first column up to ``(c, k)``, counted in the tile.
* ``tile_nnz[gt, ct]``: tracked elements per tile (``gt`` = ``g * tiles_n + t``).
* ``row_ptr`` / ``row_tiles``: for every row tile ``gt``, its non-empty column tiles ``ct``
  (ascending); the forward pass ``Y = X W^T`` walks these.
* ``col_ptr`` / ``col_tiles``: for every (group, column tile) ``g * tiles_c + ct``, its non-empty row
  tiles ``t`` within the group (ascending); the backward-data pass ``dX = dY W`` walks these.

It is rebuilt whenever the tracked set changes (once per optimizer step), in a few torch ops over
the bits; the layers cache it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...storage import unpack_bits

__all__ = [
    "TileIndex",
    "build_tile_index",
    "cached_tile_index",
    "tile_mask",
    "Schedule",
    "build_schedule",
    "schedule_makespan",
]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_geometry(fn: str, rows: int, cols: int, ksize: int, groups: int) -> None:
    for name, v in (("rows", rows), ("cols", cols), ("ksize", ksize), ("groups", groups)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{fn}: expected {name} to be a positive int, got {v!r}")
    if rows % groups:
        raise ValueError(f"{fn}: expected rows divisible by groups, got {rows} and {groups}")


def _check_block(fn: str, name: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{fn}: expected {name} to be a positive int, got {v!r}")
    return v


@dataclass(frozen=True)
class TileIndex:
    """Per-tile pointers into a compressed weight (see the module docstring).

    All tensors live on the weight's device; ``row_off`` is int32 when the tracked count fits,
    the others are int32.
    """

    rows: int
    cols: int
    ksize: int
    groups: int
    block_n: int
    block_c: int
    nnz: int
    row_off: Tensor  # [rows, tiles_c]
    tile_nnz: Tensor  # [groups * tiles_n, tiles_c]
    row_ptr: Tensor  # [groups * tiles_n + 1]
    row_tiles: Tensor  # [nonempty tiles] column tile per entry
    col_ptr: Tensor  # [groups * tiles_c + 1]
    col_tiles: Tensor  # [nonempty tiles] row tile (within the group) per entry

    @property
    def rows_per_group(self) -> int:
        return self.rows // self.groups

    @property
    def tiles_n(self) -> int:
        """Row tiles per group."""
        return _cdiv(self.rows_per_group, self.block_n)

    @property
    def tiles_c(self) -> int:
        """Column tiles (per group)."""
        return _cdiv(self.cols, self.block_c)

    @property
    def num_tiles(self) -> int:
        return self.groups * self.tiles_n * self.tiles_c

    @property
    def nonempty_tiles(self) -> int:
        return int(self.row_tiles.numel())

    @property
    def tile_density(self) -> float:
        """Fraction of tiles that hold at least one tracked weight."""
        return self.nonempty_tiles / max(1, self.num_tiles)

    @property
    def density(self) -> float:
        """Fraction of weights that are tracked."""
        return self.nnz / max(1, self.rows * self.cols * self.ksize)

    def row_tile_work(self) -> Tensor:
        """Non-empty column tiles per row tile (the cost of one forward work unit), int64."""
        return (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int64)

    def col_tile_work(self) -> Tensor:
        """Non-empty row tiles per (group, column tile) (the cost of one backward-data unit)."""
        return (self.col_ptr[1:] - self.col_ptr[:-1]).to(torch.int64)


def _csr(nonempty: Tensor) -> tuple[Tensor, Tensor]:
    """Row pointers and column indices (int32) of a boolean matrix's true entries, row-major."""
    counts = nonempty.sum(dim=1)
    ptr = torch.zeros(nonempty.shape[0] + 1, dtype=torch.int64, device=nonempty.device)
    ptr[1:] = counts.cumsum(0)
    cols = nonempty.nonzero()[:, 1]
    return ptr.to(torch.int32), cols.to(torch.int32)


def build_tile_index(
    bits: Tensor,
    rows: int,
    cols: int,
    ksize: int = 1,
    groups: int = 1,
    block_n: int = 32,
    block_c: int = 32,
) -> TileIndex:
    """The :class:`TileIndex` of a weight ``[rows, cols * ksize]`` whose tracked bits are ``bits``.

    Args:
        bits: uint8 tracked-bit mask of the ``rows * cols * ksize`` weights (storage order).
        rows, cols, ksize, groups: the weight's matrix geometry (module docstring).
        block_n, block_c: tile shape in rows and columns.
    """
    fn = "build_tile_index()"
    _check_geometry(fn, rows, cols, ksize, groups)
    block_n = _check_block(fn, "block_n", block_n)
    block_c = _check_block(fn, "block_c", block_c)
    numel = rows * cols * ksize
    if not isinstance(bits, Tensor) or bits.dtype != torch.uint8:
        raise TypeError(f"{fn}: expected bits to be a uint8 tensor, got {bits!r:.80}")
    device = bits.device
    rpg = rows // groups
    tiles_n, tiles_c = _cdiv(rpg, block_n), _cdiv(cols, block_c)

    mask = unpack_bits(bits, numel).view(rows, cols, ksize)
    per_col = mask.sum(dim=2, dtype=torch.int32)  # [rows, cols]
    padded = torch.zeros(rows, tiles_c * block_c, dtype=torch.int32, device=device)
    padded[:, :cols] = per_col
    runs = padded.view(rows, tiles_c, block_c).sum(dim=2, dtype=torch.int64)  # [rows, tiles_c]
    flat = runs.reshape(-1)
    nnz = int(flat.sum())
    row_off = (flat.cumsum(0) - flat).view(rows, tiles_c)
    row_off = row_off.to(torch.int32) if nnz < 2**31 else row_off

    by_group = torch.zeros(groups, tiles_n * block_n, tiles_c, dtype=torch.int64, device=device)
    by_group[:, :rpg] = runs.view(groups, rpg, tiles_c)
    tile_nnz = by_group.view(groups, tiles_n, block_n, tiles_c).sum(dim=2)
    tile_nnz = tile_nnz.reshape(groups * tiles_n, tiles_c)
    nonempty = tile_nnz > 0
    row_ptr, row_tiles = _csr(nonempty)
    # Column view: per group, its column tiles as rows of a [tiles_c, tiles_n] matrix.
    by_col = (
        nonempty.view(groups, tiles_n, tiles_c).transpose(1, 2).reshape(groups * tiles_c, tiles_n)
    )
    col_ptr, col_tiles = _csr(by_col)
    return TileIndex(
        rows=rows,
        cols=cols,
        ksize=ksize,
        groups=groups,
        block_n=block_n,
        block_c=block_c,
        nnz=nnz,
        row_off=row_off.contiguous(),
        tile_nnz=tile_nnz.to(torch.int32),
        row_ptr=row_ptr,
        row_tiles=row_tiles,
        col_ptr=col_ptr,
        col_tiles=col_tiles,
    )


_CACHE_ATTR = "_procrustes_tile_index"


def cached_tile_index(
    bits: Tensor,
    rows: int,
    cols: int,
    ksize: int = 1,
    groups: int = 1,
    block_n: int = 32,
    block_c: int = 32,
) -> TileIndex:
    """:func:`build_tile_index`, cached on the ``bits`` tensor itself until it changes.

    A weight's tracked set gets a new bits tensor at every update, so the cache lives and dies
    with it; an in-place write bumps the tensor's version, which is part of the key. Bits made in
    inference mode have no version counter: their index is rebuilt on every call.
    """
    version = None if bits.is_inference() else bits._version
    key = (rows, cols, ksize, groups, block_n, block_c, version)
    hit = getattr(bits, _CACHE_ATTR, None)
    if version is not None and hit is not None and hit[0] == key:
        return hit[1]
    index = build_tile_index(bits, rows, cols, ksize, groups, block_n, block_c)
    if version is not None:
        setattr(bits, _CACHE_ATTR, (key, index))
    return index


def tile_mask(
    tiles: Tensor,
    rows: int,
    cols: int,
    ksize: int = 1,
    groups: int = 1,
    block_n: int = 32,
    block_c: int = 32,
) -> Tensor:
    """Expand a boolean tile mask ``[groups * tiles_n, tiles_c]`` to the flat element mask."""
    fn = "tile_mask()"
    _check_geometry(fn, rows, cols, ksize, groups)
    rpg = rows // groups
    tiles_n, tiles_c = _cdiv(rpg, block_n), _cdiv(cols, block_c)
    if tuple(tiles.shape) != (groups * tiles_n, tiles_c):
        raise ValueError(
            f"{fn}: expected tiles of shape {(groups * tiles_n, tiles_c)}, got {tuple(tiles.shape)}"
        )
    t = tiles.view(groups, tiles_n, tiles_c).bool()
    t = t.repeat_interleave(block_n, dim=1)[:, :rpg].repeat_interleave(block_c, dim=2)[:, :, :cols]
    return t.reshape(rows, cols, 1).expand(rows, cols, ksize).reshape(-1)


# ------------------------------------------------------------------------------- load balancing


@dataclass(frozen=True)
class Schedule:
    """Work units of a persistent kernel, split among ``programs`` programs.

    Program ``p`` runs units ``units[ptr[p]:ptr[p+1]]`` in order. A unit id encodes
    ``(m_tile, row)`` as ``row * m_tiles + m_tile``, where ``row`` indexes the work list being
    scheduled (row tiles for the forward pass, (group, column tile) for backward data).
    """

    programs: int
    m_tiles: int
    ptr: Tensor  # int32 [programs + 1]
    units: Tensor  # int32 [m_tiles * rows]
    balanced: bool


def build_schedule(work: Tensor, m_tiles: int, programs: int, balanced: bool = True) -> Schedule:
    """Assign the units ``(m_tile, row)`` (cost ``work[row]`` each) to ``programs`` programs.

    ``balanced=True`` does what the Procrustes accelerator does with its half-tiles: units are
    sorted by cost, heaviest first, and dealt to the programs in a snake order (0..P-1, P-1..0, ...),
    so every program gets a mix of dense and sparse units and no program is the long pole.
    ``balanced=False`` deals the units in their natural order in contiguous chunks (a plain static
    split), the baseline the balanced schedule is measured against. Units of cost 0 still run (they
    write zeros / the bias).
    """
    fn = "build_schedule()"
    m_tiles = _check_block(fn, "m_tiles", m_tiles)
    programs = _check_block(fn, "programs", programs)
    device = work.device
    rows = work.numel()
    total = rows * m_tiles
    programs = min(programs, max(1, total))
    unit = torch.arange(total, dtype=torch.int64, device=device)
    cost = work.to(torch.int64).repeat_interleave(m_tiles)  # unit id = row * m_tiles + m_tile
    if balanced:
        order = torch.sort(cost, descending=True, stable=True).indices
        unit = unit[order]
        rank = torch.arange(total, dtype=torch.int64, device=device)
        lap, pos = rank // programs, rank % programs
        prog = torch.where(lap % 2 == 0, pos, programs - 1 - pos)
    else:
        per = _cdiv(total, programs)
        prog = torch.arange(total, dtype=torch.int64, device=device) // per
    by_prog = torch.sort(prog, stable=True).indices
    units = unit[by_prog]
    counts = torch.bincount(prog, minlength=programs)
    ptr = torch.zeros(programs + 1, dtype=torch.int64, device=device)
    ptr[1:] = counts.cumsum(0)
    return Schedule(programs, m_tiles, ptr.to(torch.int32), units.to(torch.int32), balanced)


def schedule_makespan(
    schedule: Schedule, work: Tensor, unit_overhead: float = 1.0
) -> tuple[float, float]:
    """``(longest program, mean program)`` in tile-units of a schedule, with ``unit_overhead``
    tiles' worth of fixed cost per unit (loading the output tile, writing it).

    The ratio of the two is the long-pole factor: 1.0 is a perfect balance.
    """
    cost = work.to(torch.float64).repeat_interleave(schedule.m_tiles) + unit_overhead
    per_unit = cost[schedule.units.to(torch.int64)]
    ptr = schedule.ptr.to(torch.int64)
    csum = torch.zeros(per_unit.numel() + 1, dtype=torch.float64, device=per_unit.device)
    csum[1:] = per_unit.cumsum(0)
    per_prog = csum[ptr[1:]] - csum[ptr[:-1]]
    return float(per_prog.max()), float(per_prog.mean())
