"""Tile granularity of the tracked set: weights tracked or regenerated in whole tiles.

With ``DropBack(..., granularity="tile", tile=(bn, bc))`` the optimizer does not pick single
weights but whole tiles of the weight matrix, the unit of work of the sparse compute kernels
(:mod:`procrustes_kernels.ops.compute.index`): ``bn`` rows (output features / channels of one
group) times ``bc`` columns (input features / channels of the group), each with its whole kernel
(all ``kh * kw`` positions of a convolution). Tiles are cut per group; the last tile of a group's
rows or of the columns is partial when the size does not divide. A GPU then skips whole tiles
instead of testing single bits, and a tracked tile is dense.

The rule of one step, given the element scores ``s = |c - d_n w0|`` of every sparse layer (the
float32 scores of the backend, exactly as in element granularity):

1. :func:`tile_scores`: the score of a tile is the mean of its elements' scores (summed in
   float64, divided by the tile's element count, so an edge tile is not penalised for its size).
2. :func:`select_tiles`: all tiles that share one budget ``k`` (every layer's with the global
   scope, one layer's with the per-layer scope) are ranked by score, descending; ties go to the
   earlier layer, then to the lower tile index (row-major over ``[groups * tiles_n, tiles_c]``).
   Tiles of score 0 are never kept. Tiles are taken in that order while the running count of their
   weights stays ``<= k``; the first tile that does not fit ends the selection (no smaller tile
   further down is taken in its place, so the kept tiles are always a prefix of the ranking).
3. :func:`tile_element_mask` expands the kept tiles to the flat element mask, which the backend
   compacts into the new tracked set.

Tile scores are few (``1 / (bn * bc * ksize)`` of the weights), so they are ranked exactly, on the
host; the optimizer's ``selection`` argument (top-k / quantile estimators for single weights) does
not apply. The float64 sums add in an order this module does not promise (it is torch's reduction
order on the scores' device); two orders differ by float64 rounding (~1e-16 relative), far below
the float32 resolution of the scores themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .ops.compute.index import tile_mask

__all__ = [
    "check_tile",
    "tile_grid",
    "tile_sizes",
    "tile_scores",
    "select_tiles",
    "tile_element_mask",
]

Geometry = tuple[int, int, int, int]  # (rows, cols, ksize, groups): BudgetedWeight.geometry


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_pos_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_tile(tile: object, fn: str) -> tuple[int, int]:
    """``tile`` as a ``(rows, cols)`` pair of positive ints, or a ValueError naming ``tile``."""
    if not isinstance(tile, (tuple, list)) or len(tile) != 2 or not all(map(_is_pos_int, tile)):
        raise ValueError(
            f"{fn}: expected tile to be a pair of positive ints (rows, cols), got {tile!r}"
        )
    return int(tile[0]), int(tile[1])


def _check_geometry(geometry: object, fn: str) -> Geometry:
    ok = isinstance(geometry, (tuple, list)) and len(geometry) == 4
    if not ok or not all(map(_is_pos_int, geometry)):
        raise ValueError(
            f"{fn}: expected geometry to be (rows, cols, ksize, groups) of positive ints, "
            f"got {geometry!r}"
        )
    rows, cols, ksize, groups = (int(v) for v in geometry)
    if rows % groups:
        raise ValueError(f"{fn}: expected rows divisible by groups, got {rows} and {groups}")
    return rows, cols, ksize, groups


def tile_grid(geometry: Geometry, tile: tuple[int, int]) -> tuple[int, int]:
    """``(groups * tiles_n, tiles_c)``: the shape of a layer's tile scores and tile masks."""
    fn = "tile_grid()"
    rows, cols, _, groups = _check_geometry(geometry, fn)
    bn, bc = check_tile(tile, fn)
    return groups * _cdiv(rows // groups, bn), _cdiv(cols, bc)


def _rows_cols(rows_per_group: int, cols: int, bn: int, bc: int) -> tuple[Tensor, Tensor]:
    """Rows of each row tile and columns of each column tile (the last ones may be partial)."""
    tiles_n, tiles_c = _cdiv(rows_per_group, bn), _cdiv(cols, bc)
    r = torch.full((tiles_n,), bn, dtype=torch.int64)
    r[-1] = rows_per_group - bn * (tiles_n - 1)
    c = torch.full((tiles_c,), bc, dtype=torch.int64)
    c[-1] = cols - bc * (tiles_c - 1)
    return r, c


def tile_sizes(
    geometry: Geometry, tile: tuple[int, int], device: torch.device | str | None = None
) -> Tensor:
    """Weights per tile, int64 ``[groups * tiles_n, tiles_c]``: ``rows * cols * ksize`` of the tile.

    Args:
        geometry: ``(rows, cols, ksize, groups)`` of the layer (``BudgetedWeight.geometry``).
        tile: ``(rows, cols)`` of a full tile.
    """
    fn = "tile_sizes()"
    rows, cols, ksize, groups = _check_geometry(geometry, fn)
    bn, bc = check_tile(tile, fn)
    r, c = _rows_cols(rows // groups, cols, bn, bc)
    sizes = (r[:, None] * c[None, :] * ksize).repeat(groups, 1)
    return sizes.to(device) if device is not None else sizes


def tile_scores(scores_flat: Tensor, geometry: Geometry, tile: tuple[int, int]) -> Tensor:
    """Mean element score of every tile, float64 ``[groups * tiles_n, tiles_c]``.

    Args:
        scores_flat: the layer's ``rows * cols * ksize`` element scores in storage order (what a
            backend's ``scores(seg, p)`` returns; any floating dtype, any device).
        geometry: ``(rows, cols, ksize, groups)`` of the layer (``BudgetedWeight.geometry``).
        tile: ``(rows, cols)`` of a full tile.

    Row tile ``t`` of group ``g`` is row ``g * tiles_n + t`` of the result and covers rows
    ``g * rows/groups + [t * bn, min((t+1) * bn, rows/groups))``; column tile ``ct`` covers
    columns ``[ct * bc, min((ct+1) * bc, cols))`` with all ``ksize`` positions. The sum runs in
    float64 and is divided by the tile's own element count (:func:`tile_sizes`).
    """
    fn = "tile_scores()"
    rows, cols, ksize, groups = _check_geometry(geometry, fn)
    bn, bc = check_tile(tile, fn)
    if not isinstance(scores_flat, Tensor) or not scores_flat.is_floating_point():
        raise TypeError(
            f"{fn}: expected scores_flat to be a floating tensor, got {scores_flat!r:.80}"
        )
    if scores_flat.numel() != rows * cols * ksize:
        raise ValueError(
            f"{fn}: expected scores_flat with rows * cols * ksize = {rows * cols * ksize} "
            f"elements, got {scores_flat.numel()}"
        )
    rpg = rows // groups
    tiles_n, tiles_c = _cdiv(rpg, bn), _cdiv(cols, bc)
    # Kernel positions first: for a convolution this is the largest reduction, and it leaves a
    # float64 [rows, cols] that is ksize times smaller than the scores.
    per_col = scores_flat.reshape(rows, cols, ksize).sum(dim=2, dtype=torch.float64)
    per_col = per_col.view(groups, rpg, cols)
    if rpg % bn or cols % bc:  # edge tiles: pad with zeros, which add nothing to the sums
        padded = per_col.new_zeros(groups, tiles_n * bn, tiles_c * bc)
        padded[:, :rpg, :cols] = per_col
        per_col = padded
    sums = per_col.reshape(groups, tiles_n, bn, tiles_c, bc).sum(dim=(2, 4))
    sizes = tile_sizes((rows, cols, ksize, groups), (bn, bc), device=sums.device)
    return (sums.reshape(groups * tiles_n, tiles_c) / sizes).contiguous()


def select_tiles(scores: Sequence[Tensor], k: int, sizes: Sequence[Tensor]) -> list[Tensor]:
    """Kept tiles of layers sharing one budget: one bool tensor per layer, shaped like its scores.

    Args:
        scores: tile scores of each layer (:func:`tile_scores`), in layer order.
        k: budget in weights (an int >= 0).
        sizes: weights per tile of each layer (:func:`tile_sizes`), shaped like ``scores``.

    Tiles are ranked by score, descending, with ties to the earlier layer and then to the lower
    tile index (row-major); tiles whose score is not > 0 are never kept. Tiles are taken in that
    order while the running weight count stays ``<= k``; the first tile that does not fit ends the
    selection.
    """
    fn = "select_tiles()"
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{fn}: expected k to be an int >= 0, got {k!r}")
    scores, sizes = list(scores), list(sizes)
    if len(scores) != len(sizes):
        raise ValueError(
            f"{fn}: expected one sizes tensor per scores tensor, got {len(sizes)} for {len(scores)}"
        )
    if not scores:
        return []
    for i, (s, z) in enumerate(zip(scores, sizes)):
        if tuple(s.shape) != tuple(z.shape):
            raise ValueError(
                f"{fn}: expected sizes[{i}] of shape {tuple(s.shape)} (as scores[{i}]), "
                f"got {tuple(z.shape)}"
            )
    device = scores[0].device
    flat = torch.cat([s.reshape(-1).to(device, torch.float64) for s in scores])
    count = torch.cat([z.reshape(-1).to(device, torch.int64) for z in sizes])
    if count.numel() and int(count.min()) <= 0:
        raise ValueError(f"{fn}: expected sizes > 0, got a tile of {int(count.min())} weights")
    # A stable descending sort keeps equal scores in flat order: earlier layer, lower tile index.
    order = torch.sort(flat, descending=True, stable=True).indices
    order = order[flat[order] > 0]
    taken = order[torch.cumsum(count[order], 0) <= k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    keep[taken] = True
    parts = torch.split(keep, [s.numel() for s in scores])
    return [p.view(s.shape).to(s.device) for p, s in zip(parts, scores)]


def tile_element_mask(tiles: Tensor, geometry: Geometry, tile: tuple[int, int]) -> Tensor:
    """Flat bool element mask (storage order) of the kept tiles ``[groups * tiles_n, tiles_c]``."""
    fn = "tile_element_mask()"
    rows, cols, ksize, groups = _check_geometry(geometry, fn)
    bn, bc = check_tile(tile, fn)
    return tile_mask(tiles, rows, cols, ksize, groups, block_n=bn, block_c=bc)
