"""Compressed block storage for the tracked set of a weight.

Layout
------
A dense weight of shape ``shape`` is viewed as a ``rows x row_len`` matrix, where dim 0 is the
output dimension (``out_features`` of a linear layer, ``K`` of a ``(K, C, R, S)`` convolution) and
``row_len = prod(shape[1:])``. Each row is cut into blocks of ``block_size`` consecutive elements;
the last block of a row is shorter when ``row_len % block_size != 0``. Convolutions use
``block_size = R * S`` so that one block is the ``R x S`` kernel of one ``(k, c)`` pair; linear
layers use a fixed run (16 by default) of the input weights of one output row.

Three tensors hold the tracked set:

``values``
    The tracked values, packed in flat row-major order (ascending flat index).
``bits``
    ``ceil(numel / 8)`` bytes; flat element ``e`` is tracked iff bit ``e % 8`` of byte ``e // 8``
    is set (little-endian bit order). Padding bits past ``numel`` are 0.
``group_ptr``
    ``ceil(numel / GROUP_SIZE) + 1`` int64 entries: ``group_ptr[g]`` is the number of tracked
    elements with flat index ``< g * GROUP_SIZE``, and ``group_ptr[-1] == nnz``.

The offset into ``values`` of the block that starts at flat index ``e`` is::

    group_ptr[e // GROUP_SIZE] + popcount(bits[(e // GROUP_SIZE) * GROUP_SIZE : e])

Why this shape
--------------
The Procrustes accelerator stores each ``(k, c)`` kernel block as a bitmask plus a pointer into a
packed value array. Because any block is reachable in O(1) from its own pointer, the same storage
can be walked row by row (computing with ``W``) or column by column (computing with ``W^T`` in the
backward pass) without a second, transposed copy.

A pointer per block is expensive for small blocks, though: a 3x3 kernel has 9 elements, so a
32-bit pointer per block costs ~3.6 bits per weight, more than the bitmask itself. Here one int64
pointer covers ``GROUP_SIZE = 256`` elements (0.25 bits per weight) and the remaining distance to
a block start is a popcount of at most 256 bits, which is what the hardware's popcount tree does
anyway. At 10% density in fp32 the storage is about 0.139x the dense bytes: 0.1 * 32 bits of
values + 1 bit of mask + 0.25 bits of pointer, over 32 bits.

Over 600 lines on purpose: the format, its validation and its
conversions (masks, indices, devices, checkpoints) are the one definition every backend follows.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "GROUP_SIZE",
    "BlockStorage",
    "pack_bits",
    "unpack_bits",
    "group_pointers",
]

GROUP_SIZE = 256
"""Elements covered by one entry of ``group_ptr``. Must stay a multiple of 8 so that a group
always starts on a byte boundary of ``bits``."""

_BYTES_PER_GROUP = GROUP_SIZE // 8

# Upper bound on the elements touched per step of to_dense_transposed(), so that its index
# tensors stay a few tens of MB however large the weight is.
_TRANSPOSE_CHUNK = 1 << 22

_POPCOUNT_LUT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _popcount(bytes_: Tensor) -> Tensor:
    """Per-byte popcount of a uint8 tensor, as int64 on the same device."""
    return _POPCOUNT_LUT.to(bytes_.device)[bytes_.long()]


def _check_tensor(where: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_int(where: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{where}: expected {name} to be an int, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{where}: expected {name} to be an int, got {type(value).__name__}"
        ) from None
    if v < minimum:
        raise ValueError(f"{where}: expected {name} >= {minimum}, got {v}")
    return v


def _check_shape(where: str, shape: object) -> tuple[int, ...]:
    if not isinstance(shape, tuple | list):
        raise TypeError(
            f"{where}: expected shape to be a tuple of ints, got {type(shape).__name__}"
        )
    if len(shape) == 0:
        raise ValueError(f"{where}: expected shape with at least 1 dim, got ()")
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, bool):
            raise TypeError(f"{where}: expected shape[{i}] to be an int, got bool")
        try:
            d = operator.index(d)
        except TypeError:
            raise TypeError(
                f"{where}: expected shape[{i}] to be an int, got {type(d).__name__}"
            ) from None
        if d < 1:
            raise ValueError(f"{where}: expected every dim of shape >= 1, got {tuple(shape)}")
        dims.append(d)
    return tuple(dims)


def _check_bits(where: str, bits: object, numel: int) -> Tensor:
    bits = _check_tensor(where, "bits", bits)
    if bits.dtype != torch.uint8:
        raise ValueError(f"{where}: expected bits of dtype torch.uint8, got {bits.dtype}")
    if bits.dim() != 1:
        raise ValueError(f"{where}: expected bits to be 1-D, got shape {tuple(bits.shape)}")
    want = (numel + 7) // 8
    if bits.numel() != want:
        raise ValueError(
            f"{where}: expected bits of length ceil(numel / 8) = {want} for numel={numel}, "
            f"got {bits.numel()}"
        )
    return bits


def _tail_mask(numel: int) -> int:
    """Bits of the last byte that lie inside [0, numel)."""
    r = numel % 8
    return 0xFF if r == 0 else (1 << r) - 1


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean mask into little-endian bytes.

    Args:
        mask: bool tensor; it is read in flat row-major order (a 1-D mask is the usual input).

    Returns:
        uint8 tensor of ``ceil(mask.numel() / 8)`` bytes on ``mask.device``: element ``e`` sets
        bit ``e % 8`` of byte ``e // 8``. Padding bits are 0.
    """
    mask = _check_tensor("pack_bits()", "mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits(): expected mask of dtype torch.bool, got {mask.dtype}")
    n = mask.numel()
    nbytes = (n + 7) // 8
    padded = torch.zeros(nbytes * 8, dtype=torch.int64, device=mask.device)
    padded[:n] = mask.reshape(-1)
    shifts = torch.arange(8, dtype=torch.int64, device=mask.device)
    return (padded.view(nbytes, 8) << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(bits: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        bits: uint8 tensor of ``ceil(numel / 8)`` bytes.
        numel: number of elements the bits describe; padding bits past it are ignored.

    Returns:
        bool tensor of shape ``(numel,)`` on ``bits.device``.
    """
    numel = _check_int("unpack_bits()", "numel", numel, 0)
    bits = _check_bits("unpack_bits()", bits, numel)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).bool().reshape(-1)[:numel]


def group_pointers(bits: Tensor, numel: int) -> Tensor:
    """Group pointers for a bitmask.

    Args:
        bits: uint8 tensor of ``ceil(numel / 8)`` bytes (see :func:`pack_bits`).
        numel: number of elements the bits describe; padding bits past it are not counted.

    Returns:
        int64 tensor of length ``ceil(numel / GROUP_SIZE) + 1`` on ``bits.device``: entry ``g`` is
        the number of set bits with index ``< g * GROUP_SIZE`` and the last entry is the total.
    """
    numel = _check_int("group_pointers()", "numel", numel, 0)
    bits = _check_bits("group_pointers()", bits, numel)
    ngroups = (numel + GROUP_SIZE - 1) // GROUP_SIZE
    counts = torch.zeros(ngroups * _BYTES_PER_GROUP, dtype=torch.int64, device=bits.device)
    counts[: bits.numel()] = _popcount(bits)
    if numel % 8:
        counts[bits.numel() - 1] = _popcount(bits[-1:] & _tail_mask(numel))[0]
    ptr = torch.zeros(ngroups + 1, dtype=torch.int64, device=bits.device)
    ptr[1:] = counts.view(ngroups, _BYTES_PER_GROUP).sum(dim=1).cumsum(dim=0)
    return ptr


class BlockStorage:
    """Tracked set of one weight, stored as bitmask + group pointers + packed values.

    See the module docstring for the layout. Instances are plain containers (not ``nn.Module``)
    and never copy the tensors given to the constructor.

    Attributes:
        shape: the dense weight shape; dim 0 is the output dimension.
        block_size: elements per block along a row (``R * S`` for conv, e.g. 16 for linear).
        values: 1-D float tensor of the tracked values in ascending flat-index order.
        bits: uint8 tensor of ``ceil(numel / 8)`` bytes, one bit per element.
        group_ptr: int64 tensor of ``ceil(numel / GROUP_SIZE) + 1`` prefix counts.
    """

    shape: tuple[int, ...]
    block_size: int
    values: Tensor
    bits: Tensor
    group_ptr: Tensor

    def __init__(
        self,
        shape: Sequence[int],
        block_size: int,
        values: Tensor,
        bits: Tensor,
        group_ptr: Tensor,
        *,
        validate: bool = True,
    ) -> None:
        """Wrap existing tensors.

        Args:
            shape: dense weight shape (at least 1 dim, every dim >= 1).
            block_size: block length along a row, >= 1 (may exceed ``row_len``; each row is then a
                single short block).
            values, bits, group_ptr: the three storage tensors, on one device.
            validate: check dtypes, lengths, padding bits and that ``group_ptr`` and ``values``
                agree with ``bits``. This reads the whole bitmask (and syncs on an accelerator);
                pass False only for tensors known to be consistent.

        Raises:
            TypeError, ValueError: naming the offending argument.
        """
        where = "BlockStorage()"
        self.shape = _check_shape(where, shape)
        self.block_size = _check_int(where, "block_size", block_size, 1)
        self.values = _check_tensor(where, "values", values)
        self.bits = _check_tensor(where, "bits", bits)
        self.group_ptr = _check_tensor(where, "group_ptr", group_ptr)
        if validate:
            self._validate(where)

    def _validate(self, where: str) -> None:
        numel = self.numel
        values, bits, group_ptr = self.values, self.bits, self.group_ptr
        if not values.is_floating_point():
            raise ValueError(f"{where}: expected values of a floating dtype, got {values.dtype}")
        if values.dim() != 1:
            raise ValueError(f"{where}: expected values to be 1-D, got shape {tuple(values.shape)}")
        _check_bits(where, bits, numel)
        if group_ptr.dtype != torch.int64:
            raise ValueError(
                f"{where}: expected group_ptr of dtype torch.int64, got {group_ptr.dtype}"
            )
        ngroups = (numel + GROUP_SIZE - 1) // GROUP_SIZE
        if group_ptr.dim() != 1 or group_ptr.numel() != ngroups + 1:
            raise ValueError(
                f"{where}: expected group_ptr of shape (ceil(numel / {GROUP_SIZE}) + 1,) = "
                f"({ngroups + 1},) for numel={numel}, got {tuple(group_ptr.shape)}"
            )
        for name, t in (("bits", bits), ("group_ptr", group_ptr)):
            if t.device != values.device:
                raise ValueError(
                    f"{where}: expected {name} on the device of values ({values.device}), "
                    f"got {t.device}"
                )
        tail = _tail_mask(numel)
        if tail != 0xFF and int(bits[-1]) & ~tail & 0xFF:
            raise ValueError(
                f"{where}: expected padding bits of bits (past numel={numel}) to be 0, "
                f"got last byte {int(bits[-1]):#010b}"
            )
        expected = group_pointers(bits, numel)
        popcount = int(expected[-1])
        if values.numel() != popcount:
            raise ValueError(
                f"{where}: expected values.numel() == popcount(bits) = {popcount}, "
                f"got {values.numel()}"
            )
        if not torch.equal(group_ptr, expected):
            bad = int((group_ptr != expected).nonzero()[0, 0])
            if bad == ngroups:
                raise ValueError(
                    f"{where}: expected group_ptr[-1] == values.numel() == {popcount}, "
                    f"got group_ptr[-1]={int(group_ptr[-1])}"
                )
            raise ValueError(
                f"{where}: expected group_ptr[{bad}] == popcount of bits[:{bad * GROUP_SIZE}] "
                f"= {int(expected[bad])}, got {int(group_ptr[bad])}"
            )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def empty(
        cls,
        shape: Sequence[int],
        block_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> BlockStorage:
        """Storage with nothing tracked.

        Args:
            shape: dense weight shape.
            block_size: block length along a row.
            dtype: floating dtype of ``values``.
            device: device of all three tensors.
        """
        where = "BlockStorage.empty()"
        shape = _check_shape(where, shape)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"{where}: expected dtype to be a floating torch.dtype, got {dtype}")
        numel = math.prod(shape)
        ngroups = (numel + GROUP_SIZE - 1) // GROUP_SIZE
        return cls(
            shape,
            block_size,
            torch.zeros(0, dtype=dtype, device=device),
            torch.zeros((numel + 7) // 8, dtype=torch.uint8, device=device),
            torch.zeros(ngroups + 1, dtype=torch.int64, device=device),
            validate=False,
        )

    @classmethod
    def from_mask(cls, dense: Tensor, mask: Tensor, block_size: int) -> BlockStorage:
        """Track the elements of ``dense`` where ``mask`` is True.

        Args:
            dense: floating tensor with the weight shape; its shape becomes ``self.shape``.
            mask: bool tensor with the same number of elements (any shape; read flat).
            block_size: block length along a row.

        Returns:
            Storage with ``values = dense.flatten()[mask.flatten()]``. The values are a new
            tensor but keep ``dense``'s autograd history.
        """
        where = "BlockStorage.from_mask()"
        dense = _check_tensor(where, "dense", dense)
        mask = _check_tensor(where, "mask", mask)
        if not dense.is_floating_point():
            raise TypeError(f"{where}: expected dense of a floating dtype, got {dense.dtype}")
        if dense.dim() == 0:
            raise ValueError(f"{where}: expected dense with at least 1 dim, got a 0-d tensor")
        if mask.dtype != torch.bool:
            raise TypeError(f"{where}: expected mask of dtype torch.bool, got {mask.dtype}")
        if mask.numel() != dense.numel():
            raise ValueError(
                f"{where}: expected mask with dense.numel() = {dense.numel()} elements, "
                f"got shape {tuple(mask.shape)}"
            )
        if mask.device != dense.device:
            raise ValueError(
                f"{where}: expected mask on the device of dense ({dense.device}), got {mask.device}"
            )
        shape = _check_shape(where, tuple(dense.shape))
        flat_mask = mask.reshape(-1)
        bits = pack_bits(flat_mask)
        return cls(
            shape,
            block_size,
            dense.reshape(-1)[flat_mask],
            bits,
            group_pointers(bits, flat_mask.numel()),
            validate=False,
        )

    @classmethod
    def from_indices(
        cls, shape: Sequence[int], block_size: int, indices: Tensor, values: Tensor
    ) -> BlockStorage:
        """Track the given flat indices with the given values.

        Args:
            shape: dense weight shape.
            block_size: block length along a row.
            indices: 1-D int64 tensor of strictly increasing flat indices in ``[0, numel)``.
            values: 1-D floating tensor aligned with ``indices``; stored as is (not copied).
        """
        where = "BlockStorage.from_indices()"
        shape = _check_shape(where, shape)
        numel = math.prod(shape)
        indices = _check_tensor(where, "indices", indices)
        values = _check_tensor(where, "values", values)
        if indices.dtype != torch.int64:
            raise TypeError(f"{where}: expected indices of dtype torch.int64, got {indices.dtype}")
        if indices.dim() != 1:
            raise ValueError(
                f"{where}: expected indices to be 1-D, got shape {tuple(indices.shape)}"
            )
        if not values.is_floating_point():
            raise TypeError(f"{where}: expected values of a floating dtype, got {values.dtype}")
        if values.dim() != 1 or values.numel() != indices.numel():
            raise ValueError(
                f"{where}: expected values of shape ({indices.numel()},) to match indices, "
                f"got {tuple(values.shape)}"
            )
        if values.device != indices.device:
            raise ValueError(
                f"{where}: expected values on the device of indices ({indices.device}), "
                f"got {values.device}"
            )
        if indices.numel():
            problem = None
            if int(indices[0]) < 0:
                problem = f"indices[0]={int(indices[0])}"
            elif int(indices[-1]) >= numel:
                problem = f"indices[-1]={int(indices[-1])}"
            else:
                not_increasing = (indices[1:] <= indices[:-1]).nonzero()
                if not_increasing.numel():
                    i = int(not_increasing[0, 0]) + 1
                    problem = f"indices[{i}]={int(indices[i])} after {int(indices[i - 1])}"
            if problem is not None:
                raise ValueError(
                    f"{where}: expected indices strictly increasing in [0, {numel}), got {problem}"
                )
        mask = torch.zeros(numel, dtype=torch.bool, device=indices.device)
        mask[indices] = True
        bits = pack_bits(mask)
        return cls(shape, block_size, values, bits, group_pointers(bits, numel), validate=False)

    # ------------------------------------------------------------------ properties

    @property
    def numel(self) -> int:
        """Elements of the dense weight."""
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        """Tracked elements."""
        return self.values.numel()

    @property
    def rows(self) -> int:
        """``shape[0]``: output rows."""
        return self.shape[0]

    @property
    def row_len(self) -> int:
        """``prod(shape[1:])``: elements per output row."""
        return math.prod(self.shape[1:])

    @property
    def blocks_per_row(self) -> int:
        """``ceil(row_len / block_size)``."""
        return (self.row_len + self.block_size - 1) // self.block_size

    @property
    def density(self) -> float:
        """``nnz / numel``."""
        return self.nnz / self.numel

    @property
    def nbytes(self) -> int:
        """Bytes of ``values`` + ``bits`` + ``group_ptr``."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.bits, self.group_ptr))

    @property
    def dtype(self) -> torch.dtype:
        """dtype of ``values``."""
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        """Device of the storage tensors."""
        return self.values.device

    # ------------------------------------------------------------------ dense views

    def mask(self) -> Tensor:
        """bool tensor of shape ``(numel,)``: True at tracked flat indices."""
        return unpack_bits(self.bits, self.numel)

    def indices(self) -> Tensor:
        """Sorted int64 flat indices of the tracked elements (``mask().nonzero().flatten()``)."""
        return self.mask().nonzero().reshape(-1)

    def _check_dense_like(self, where: str, name: str, t: object) -> Tensor:
        t = _check_tensor(where, name, t)
        if tuple(t.shape) not in (self.shape, (self.numel,)):
            raise ValueError(
                f"{where}: expected {name} of shape {self.shape} or ({self.numel},), "
                f"got {tuple(t.shape)}"
            )
        if t.device != self.device:
            raise ValueError(
                f"{where}: expected {name} on the storage device ({self.device}), got {t.device}"
            )
        return t

    def to_dense(self, fill: Tensor | None = None) -> Tensor:
        """Dense weight of shape ``self.shape`` and dtype ``self.dtype``.

        Args:
            fill: values for the untracked positions, weight-shaped or flat; zeros if None. It is
                not modified (it is cast to ``self.dtype`` if needed).

        Returns:
            A new tensor; differentiable with respect to ``values`` (and ``fill``).
        """
        if fill is None:
            base = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        else:
            fill = self._check_dense_like("BlockStorage.to_dense()", "fill", fill)
            base = fill.reshape(-1).to(self.dtype)
        # masked_scatter consumes its source in ascending flat order, which is exactly the
        # packing order of values.
        return base.masked_scatter(self.mask(), self.values).view(self.shape)

    def scatter_(self, out: Tensor) -> Tensor:
        """Write the tracked values into ``out`` in place; untracked positions are untouched.

        Args:
            out: contiguous tensor, weight-shaped or flat, on the storage device. Values are cast
                to ``out.dtype``.

        Returns:
            ``out``.
        """
        where = "BlockStorage.scatter_()"
        out = self._check_dense_like(where, "out", out)
        if not out.is_contiguous():
            raise ValueError(f"{where}: expected out to be contiguous, got strides {out.stride()}")
        out.view(-1).masked_scatter_(self.mask(), self.values.to(out.dtype))
        return out

    def gather(self, dense: Tensor) -> Tensor:
        """Values of ``dense`` at the tracked positions, in the order of ``values``.

        Args:
            dense: weight-shaped or flat tensor on the storage device (e.g. a gradient).

        Returns:
            1-D tensor of length ``nnz`` and dtype ``dense.dtype``.
        """
        dense = self._check_dense_like("BlockStorage.gather()", "dense", dense)
        return dense.reshape(-1).masked_select(self.mask())

    # ------------------------------------------------------------------ block access

    def _block_starts(self) -> Tensor:
        """Flat start index of every block, shape (rows, blocks_per_row)."""
        dev = self.device
        k = torch.arange(self.rows, dtype=torch.int64, device=dev)
        j = torch.arange(self.blocks_per_row, dtype=torch.int64, device=dev)
        return k[:, None] * self.row_len + j[None, :] * self.block_size

    def _offsets_at(self, starts: Tensor) -> Tensor:
        """Offsets into values of arbitrary flat positions in [0, numel), via group pointers.

        The popcount between a group start and a position is split into whole bytes (an
        exclusive prefix over the <= 32 bytes of the group, i.e. the popcount tree of the
        hardware) plus the low bits of the position's own byte.
        """
        bits = self.bits
        nb = bits.numel()
        ngroups = self.group_ptr.numel() - 1
        per_byte = torch.zeros(ngroups * _BYTES_PER_GROUP, dtype=torch.int64, device=bits.device)
        per_byte[:nb] = _popcount(bits)
        per_byte = per_byte.view(ngroups, _BYTES_PER_GROUP)
        before_byte = (per_byte.cumsum(dim=1) - per_byte).reshape(-1)
        byte = starts >> 3
        low_bits = (1 << (starts & 7)) - 1
        partial = _popcount((bits[byte].long() & low_bits).to(torch.uint8))
        return self.group_ptr[starts // GROUP_SIZE] + before_byte[byte] + partial

    def block_offsets(self) -> Tensor:
        """int64 ``(rows, blocks_per_row)``: offset into ``values`` of each block's first
        tracked element (equivalently, tracked elements before the block start).

        Computed from ``group_ptr`` plus the popcount of the bits between each block's group
        start and the block start, as the accelerator addresses a block."""
        return self._offsets_at(self._block_starts())

    def block_counts(self) -> Tensor:
        """int64 ``(rows, blocks_per_row)``: tracked elements in each block."""
        offsets = self.block_offsets().reshape(-1)
        # Blocks tile the flat range in row-major order, so each block ends where the next
        # begins and the last one ends at nnz.
        ends = torch.cat([offsets[1:], offsets.new_full((1,), self.nnz)])
        return (ends - offsets).view(self.rows, self.blocks_per_row)

    def _block_range(self, row: int, block: int) -> tuple[int, int]:
        where = "BlockStorage.read_block()"
        row = _check_int(where, "row", row, 0)
        block = _check_int(where, "block", block, 0)
        if row >= self.rows:
            raise ValueError(f"{where}: expected row in [0, {self.rows}), got {row}")
        if block >= self.blocks_per_row:
            raise ValueError(f"{where}: expected block in [0, {self.blocks_per_row}), got {block}")
        start = row * self.row_len + block * self.block_size
        end = min(start + self.block_size, (row + 1) * self.row_len)
        return start, end

    def read_block(self, row: int, block: int) -> Tensor:
        """Dense contents of block ``(row, block)``, read through its pointer and bits only.

        Returns:
            Tensor of length ``block_size`` (shorter for the short last block of a row) and
            dtype ``self.dtype``; untracked elements are 0.
        """
        start, end = self._block_range(row, block)
        g = start // GROUP_SIZE
        byte = start // 8
        # Only the <= 32 bytes between the group start and the block start are read, so the
        # cost does not grow with the weight.
        before = _popcount(self.bits[g * _BYTES_PER_GROUP : byte]).sum()
        before = before + _popcount(self.bits[byte : byte + 1] & ((1 << (start % 8)) - 1)).sum()
        offset = int(self.group_ptr[g] + before)
        last_byte = (end - 1) // 8
        shifts = torch.arange(8, dtype=torch.uint8, device=self.device)
        window = ((self.bits[byte : last_byte + 1].unsqueeze(1) >> shifts) & 1).bool()
        m = window.reshape(-1)[start % 8 : start % 8 + (end - start)]
        n = int(m.sum())
        out = torch.zeros(end - start, dtype=self.dtype, device=self.device)
        return out.masked_scatter(m, self.values[offset : offset + n])

    def to_dense_transposed(self) -> Tensor:
        """``W^T`` assembled block by block in column order from the same storage.

        Blocks are visited with the block column ``j`` outer and the row ``k`` inner, the order
        in which the backward pass streams ``W^T``; each block is read at ``block_offsets()[k, j]``
        through its bits. The result is ``to_dense().transpose(0, 1)`` made contiguous: shape
        ``(in, out)`` for ``(out, in)`` and ``(C, K, R, S)`` for ``(K, C, R, S)``.

        Raises:
            ValueError: for a 1-D shape, which has no dim 1 to swap.
        """
        if len(self.shape) < 2:
            raise ValueError(
                f"BlockStorage.to_dense_transposed(): expected shape with at least 2 dims, "
                f"got {self.shape}"
            )
        rows, row_len, bs, bpr = self.rows, self.row_len, self.block_size, self.blocks_per_row
        dev = self.device
        offsets_t = self.block_offsets().t()  # (bpr, rows): column-order walk
        # t_dense[i, k] = W[k, i] over the rows x row_len view.
        t_dense = torch.zeros(row_len, rows, dtype=self.dtype, device=dev)
        k = torch.arange(rows, dtype=torch.int64, device=dev)
        t = torch.arange(bs, dtype=torch.int64, device=dev)
        cols_per_step = max(1, _TRANSPOSE_CHUNK // (rows * bs))
        for j0 in range(0, bpr, cols_per_step):
            j = torch.arange(j0, min(j0 + cols_per_step, bpr), dtype=torch.int64, device=dev)
            col = j[:, None, None] * bs + t[None, None, :]  # (J, 1, bs) position in the row
            in_row = col < row_len  # false past the end of a short last block
            e = torch.where(in_row, k[None, :, None] * row_len + col, 0)  # (J, rows, bs)
            tracked = ((self.bits[e >> 3] >> (e & 7)) & 1).bool() & in_row
            rank = tracked.cumsum(dim=2) - tracked.long()  # tracked before, within the block
            addr = offsets_t[j][:, :, None] + rank
            col_b = col.expand_as(tracked)
            k_b = k[None, :, None].expand_as(tracked)
            t_dense[col_b[tracked], k_b[tracked]] = self.values[addr[tracked]]
        if len(self.shape) == 2:
            return t_dense
        # (row_len, K) = (C, R*S, K) -> (C, K, R*S); reshape alone may return a strided view
        # when C == 1, hence the explicit copy.
        d0, d1, rest = self.shape[0], self.shape[1], self.shape[2:]
        t_dense = t_dense.view(d1, math.prod(rest), d0).permute(0, 2, 1).contiguous()
        return t_dense.view(d1, d0, *rest)

    # ------------------------------------------------------------------ copies

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> BlockStorage:
        """Storage on ``device`` with ``values`` cast to ``dtype``.

        ``bits`` and ``group_ptr`` keep their dtypes. Like ``Tensor.to``, tensors that need no
        change are shared with ``self``.
        """
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            raise TypeError(
                f"BlockStorage.to(): expected dtype to be a floating torch.dtype, got {dtype}"
            )
        return BlockStorage(
            self.shape,
            self.block_size,
            self.values.to(device=device, dtype=dtype),
            self.bits.to(device=device),
            self.group_ptr.to(device=device),
            validate=False,
        )

    def clone(self) -> BlockStorage:
        """Deep copy of the three tensors."""
        return BlockStorage(
            self.shape,
            self.block_size,
            self.values.clone(),
            self.bits.clone(),
            self.group_ptr.clone(),
            validate=False,
        )

    def __repr__(self) -> str:
        return (
            f"BlockStorage(shape={self.shape}, block_size={self.block_size}, nnz={self.nnz}, "
            f"density={self.density:.4f}, nbytes={self.nbytes}, dtype={self.dtype}, "
            f"device={self.device})"
        )
