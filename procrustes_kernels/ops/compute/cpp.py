"""C++/OpenMP sparse compute ops for CPU tensors (``csrc/spmm.cpp``), float32.

Same functions and results (to the rounding of a float32 sum) as :mod:`.reference`, plus the
sampled weight gradients :func:`sddmm_linear` / :func:`sddmm_conv2d`. The linear forward and
input gradient read and write PyTorch's token-major layout (the kernel transposes tiles of 16
tokens in cache); the other kernels work on feature-major activations (one contiguous plane per
feature, ``csrc/spmm.h``), and this module moves between those and PyTorch's layouts:

* linear SDDMM: ``x [M, cols]`` and ``dy`` become ``x^T`` and ``dy^T`` (in the extension, in a
  workspace kept between calls), one plane of ``M`` tokens per feature;
* convolution: the input is zero-padded and cut into ``stride_h x stride_w`` phase planes on the
  output grid (``[C, sh, sw, B, Hg, Wg]``), so that every kernel position of every tracked weight is
  one shifted contiguous run; outputs are computed on the whole grid and cropped.

Only the tracked weights are read (the weight's untracked values must be zero: the caller checks),
and no dense copy of the weight is made. The ``index`` argument may be a full
:class:`~.index.TileIndex` or anything with its ``rows``, ``cols``, ``ksize`` and ``groups``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..contract import conv_grid_dims

try:
    from ... import _C
except ImportError as err:  # the dispatcher turns this into one warning and uses the reference
    raise ImportError(
        f"procrustes_kernels.ops.compute.cpp: the compiled extension is not built ({err})"
    ) from err

__all__ = [
    "sparse_linear",
    "sparse_linear_t",
    "sparse_conv2d",
    "sparse_conv2d_t",
    "sddmm_linear",
    "sddmm_conv2d",
    "accepts",
    "takes_geometry",
]

# The functions of this module walk the bits themselves: the custom ops hand them the weight's
# geometry (rows, cols, ksize, groups) instead of building a tile index.
takes_geometry = True


def accepts(dtypes: set[torch.dtype]) -> bool:
    """float32 activations and weights (other dtypes run the reference)."""
    return all(d == torch.float32 for d in dtypes)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _check(fn: str, name: str, t: object, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: expected {name} to be a Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{fn}: expected {name} on the CPU, got {t.device}")
    if t.dtype != torch.float32:
        raise TypeError(f"{fn}: expected {name} of dtype float32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{fn}: expected {name} with {ndim} dims, got shape {tuple(t.shape)}")
    return t


def _check_size(fn: str, name: str, t: Tensor, dim: int, size: int) -> None:
    if t.shape[dim] != size:
        raise ValueError(
            f"{fn}: expected {name}.shape[{dim}] == {size}, got shape {tuple(t.shape)}"
        )


def _linear_geometry(values: Tensor, bits: Tensor, index, L: int) -> dict:
    return dict(
        values=_np(values.contiguous()),
        bits=_np(bits.contiguous()),
        rows=index.rows,
        cols=index.cols,
        groups=index.groups,
        L=L,
    )


def _geometry(values: Tensor, bits: Tensor, index, phases: int, phase, shift, L: int) -> dict:
    return dict(
        _linear_geometry(values, bits, index, L),
        ksize=index.ksize,
        phases=phases,
        phase=phase,
        shift=shift,
    )


# Scratch planes of the convolution kernels, kept between calls (per thread, per slot, up to
# WORKSPACE_KEEP_BYTES each): a training loop then reuses warm pages instead of faulting in
# fresh ones for every call, which costs as much as the kernels themselves on some machines.
WORKSPACE_KEEP_BYTES = 32 << 20


class _Workspace(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def take(self, slot: str, n: int, zero: bool) -> Tensor:
        """``n`` float32 scratch elements of ``slot`` (zeroed when asked): valid until the next
        take of the same slot in this thread, so nothing returned to a caller may alias it."""
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=torch.float32)
            if n * 4 <= WORKSPACE_KEEP_BYTES:
                self.buffers[slot] = buf
        out = buf[:n]
        if zero:
            out.zero_()
        return out


_work = _Workspace()


def _fresh(view: Tensor) -> Tensor:
    """A new contiguous tensor with ``view``'s values (never a view of the workspace)."""
    return torch.empty(view.shape, dtype=view.dtype).copy_(view)


def _values(fn: str, values: Tensor) -> Tensor:
    return _check(fn, "values", values, 1)


# -------------------------------------------------------------------------------- linear layers
def sparse_linear(x: Tensor, values: Tensor, bits: Tensor, index, bias: Tensor | None = None):
    """``x @ W^T + bias`` from the compressed weight (``x`` and the result token-major, as
    PyTorch lays them out: the kernel transposes tiles of 16 tokens in cache)."""
    fn = "sparse_linear()"
    _check_size(fn, "x", _check(fn, "x", x, 2), 1, index.cols * index.groups)
    values = _values(fn, values)
    if bias is not None:
        bias = _check(fn, "bias", bias, 1).contiguous()
    x = x.contiguous()
    y = torch.empty(x.shape[0], index.rows, dtype=torch.float32)
    _C.spmm_linear_forward(
        **_linear_geometry(values, bits, index, x.shape[0]),
        x=_np(x).reshape(-1),
        bias=None if bias is None else _np(bias),
        out=_np(y).reshape(-1),
    )
    return y


def sparse_linear_t(dy: Tensor, values: Tensor, bits: Tensor, index) -> Tensor:
    """``dy @ W`` (the input gradient of :func:`sparse_linear`)."""
    fn = "sparse_linear_t()"
    _check_size(fn, "dy", _check(fn, "dy", dy, 2), 1, index.rows)
    values = _values(fn, values)
    dy = dy.contiguous()
    dx = torch.empty(dy.shape[0], index.cols * index.groups, dtype=torch.float32)
    _C.spmm_linear_backward(
        **_linear_geometry(values, bits, index, dy.shape[0]),
        dy=_np(dy).reshape(-1),
        out=_np(dx).reshape(-1),
    )
    return dx


def _sddmm_args(fn: str, x: Tensor, dy: Tensor, index) -> None:
    _check_size(fn, "x", _check(fn, "x", x, 2), 1, index.cols * index.groups)
    _check_size(fn, "dy", _check(fn, "dy", dy, 2), 1, index.rows)
    if x.shape[0] != dy.shape[0]:
        raise ValueError(
            f"{fn}: expected x and dy with the same rows, got {tuple(x.shape)} and {tuple(dy.shape)}"
        )


def sddmm_linear(x: Tensor, dy: Tensor, values: Tensor, bits: Tensor, index) -> Tensor:
    """``(dy^T @ x)`` at the tracked positions, in storage order (``values``' length): the
    gradient of the tracked weights of :func:`sparse_linear`."""
    fn = "sddmm_linear()"
    _sddmm_args(fn, x, dy, index)
    values = _values(fn, values)
    x, dy = x.contiguous(), dy.contiguous()
    out = torch.empty(values.numel(), dtype=torch.float32)
    _C.spmm_linear_sddmm(
        **_linear_geometry(values, bits, index, x.shape[0]),
        x=_np(x).reshape(-1),
        dy=_np(dy).reshape(-1),
        out=_np(out),
    )
    return out


def sampled_linear_backward(
    x: Tensor, dy: Tensor, values: Tensor, bits: Tensor, index, need_dx: bool
) -> tuple[Tensor | None, Tensor]:
    """``(dy @ W or None, the tracked weights' gradient)``: the backward of a linear layer on a
    step that keeps the tracked set."""
    _sddmm_args("sddmm_linear()", x, dy, index)
    dx = sparse_linear_t(dy, values, bits, index) if need_dx else None
    return dx, sddmm_linear(x, dy, values, bits, index)


# ---------------------------------------------------------------------------------- convolutions
@dataclass(frozen=True)
class ConvGrid:
    """Where the kernels compute a convolution: padded input cut into stride phases, each of
    ``Hg x Wg`` (the output grid); kernel position ``k`` reads phase ``phase[k]`` shifted by
    ``shift[k]`` floats."""

    batch: int
    channels: int
    hw: tuple[int, int]
    out_hw: tuple[int, int]
    grid: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    phase: np.ndarray
    shift: np.ndarray

    @property
    def phases(self) -> int:
        return self.stride[0] * self.stride[1]

    @property
    def L(self) -> int:
        return self.batch * self.grid[0] * self.grid[1]

    @property
    def max_shift(self) -> int:
        return int(self.shift.max())


def conv_grid(
    batch: int,
    channels: int,
    hw: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> ConvGrid:
    (h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = hw, kernel_size, stride, padding, dilation
    (oh, ow), (hg, wg) = conv_grid_dims(hw, kernel_size, stride, padding, dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError(
            f"sparse_conv2d(): the padded input {h + 2 * ph}x{w + 2 * pw} is smaller than the "
            "dilated kernel"
        )
    r = np.repeat(np.arange(kh) * dh, kw)
    s = np.tile(np.arange(kw) * dw, kh)
    phase = ((r % sh) * sw + (s % sw)).astype(np.int32)
    shift = ((r // sh) * wg + (s // sw)).astype(np.int64)
    return ConvGrid(batch, channels, (h, w), (oh, ow), (hg, wg), (sh, sw), (ph, pw), phase, shift)


def conv_planes(x: Tensor, grid: ConvGrid) -> Tensor:
    """``x [B, C, H, W]`` as the kernels' input planes ``[C, sh, sw, B, Hg, Wg]``, flat, followed
    by ``max_shift`` zeros (in this thread's workspace: valid until the next call)."""
    (hg, wg), (sh, sw), (ph, pw) = grid.grid, grid.stride, grid.padding
    b, c = grid.batch, grid.channels
    flat = _work.take("in", c * grid.phases * grid.L + grid.max_shift, zero=True)
    planes = flat[: c * grid.phases * grid.L].view(c, sh, sw, b, hg, wg)
    # Padded row y = i + ph is row y // sh of phase y % sh (the same for columns): each phase
    # takes every sh-th row of x from the first i with (i + ph) % sh == that phase.
    xc = x.transpose(0, 1)
    for py in range(sh):
        i0 = (py - ph) % sh
        for px in range(sw):
            j0 = (px - pw) % sw
            src = xc[:, :, i0::sh, j0::sw]
            if src.numel() == 0:
                continue
            r0, q0 = (i0 + ph) // sh, (j0 + pw) // sw
            planes[:, py, px, :, r0 : r0 + src.shape[2], q0 : q0 + src.shape[3]].copy_(src)
    return flat


def _out_planes(dy: Tensor, grid: ConvGrid) -> tuple[Tensor, int]:
    """``dy [B, N, OH, OW]`` on the grid ``[N, B, Hg, Wg]`` (zeros off it), after ``max_shift``
    zeros; returns the buffer and that head."""
    n = dy.shape[1]
    head = grid.max_shift
    flat = _work.take("grid", head + n * grid.L, zero=True)
    view = flat[head:].view(n, grid.batch, *grid.grid)
    view[:, :, : grid.out_hw[0], : grid.out_hw[1]] = dy.transpose(0, 1)
    return flat, head


def _conv_args(fn: str, x_or_dy: Tensor, index, kernel_size) -> None:
    if tuple(kernel_size)[0] * tuple(kernel_size)[1] != index.ksize:
        raise ValueError(
            f"{fn}: expected kernel_size with {index.ksize} positions, got {tuple(kernel_size)}"
        )


def sparse_conv2d(
    x: Tensor,
    values: Tensor,
    bits: Tensor,
    index,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    bias: Tensor | None = None,
) -> Tensor:
    """``conv2d(x, W, bias, stride, padding, dilation, index.groups)`` from the compressed weight."""
    fn = "sparse_conv2d()"
    _check_size(fn, "x", _check(fn, "x", x, 4), 1, index.cols * index.groups)
    _conv_args(fn, x, index, kernel_size)
    grid = conv_grid(
        x.shape[0], x.shape[1], tuple(x.shape[2:]), kernel_size, stride, padding, dilation
    )
    return sparse_conv2d_planes(conv_planes(x, grid), grid, values, bits, index, bias)


def sparse_conv2d_planes(
    xp: Tensor, grid: ConvGrid, values: Tensor, bits: Tensor, index, bias: Tensor | None
) -> Tensor:
    """:func:`sparse_conv2d` on :func:`conv_planes`."""
    fn = "sparse_conv2d()"
    values = _values(fn, values)
    if bias is not None:
        bias = _check(fn, "bias", bias, 1).contiguous()
    y = _work.take("out", index.rows * grid.L, zero=False).view(index.rows, grid.batch, *grid.grid)
    _C.spmm_forward(
        **_geometry(values, bits, index, grid.phases, grid.phase, grid.shift, grid.L),
        x=_np(xp),
        bias=None if bias is None else _np(bias),
        out=_np(y).reshape(-1),
    )
    oh, ow = grid.out_hw
    return _fresh(y[:, :, :oh, :ow].transpose(0, 1))


def sparse_conv2d_t(
    dy: Tensor,
    values: Tensor,
    bits: Tensor,
    index,
    input_hw: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> Tensor:
    """Gradient of :func:`sparse_conv2d` with respect to its input ``[B, C, H, W]``."""
    fn = "sparse_conv2d_t()"
    _check_size(fn, "dy", _check(fn, "dy", dy, 4), 1, index.rows)
    _conv_args(fn, dy, index, kernel_size)
    values = _values(fn, values)
    c = index.cols * index.groups
    grid = conv_grid(dy.shape[0], c, tuple(input_hw), kernel_size, stride, padding, dilation)
    if tuple(dy.shape[2:]) != grid.out_hw:
        raise ValueError(
            f"{fn}: expected dy of spatial size {grid.out_hw} for input {tuple(input_hw)}, "
            f"got {tuple(dy.shape[2:])}"
        )
    buf, head = _out_planes(dy, grid)
    dxp = _work.take("out", c * grid.phases * grid.L, zero=False)
    _C.spmm_backward(
        **_geometry(values, bits, index, grid.phases, grid.phase, grid.shift, grid.L),
        dy=_np(buf),
        head=head,
        out=_np(dxp),
    )
    (h, w), (hg, wg), (sh, sw), (ph, pw) = grid.hw, grid.grid, grid.stride, grid.padding
    padded = dxp.view(c, sh, sw, grid.batch, hg, wg).permute(3, 0, 4, 1, 5, 2)
    padded = padded.reshape(grid.batch, c, hg * sh, wg * sw)
    return _fresh(padded[:, :, ph : ph + h, pw : pw + w])


def sddmm_conv2d(
    x: Tensor,
    dy: Tensor,
    values: Tensor,
    bits: Tensor,
    index,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> Tensor:
    """The weight gradient of :func:`sparse_conv2d` at the tracked positions (storage order)."""
    fn = "sddmm_conv2d()"
    _check_size(fn, "x", _check(fn, "x", x, 4), 1, index.cols * index.groups)
    _check_size(fn, "dy", _check(fn, "dy", dy, 4), 1, index.rows)
    _conv_args(fn, x, index, kernel_size)
    grid = conv_grid(
        x.shape[0], x.shape[1], tuple(x.shape[2:]), kernel_size, stride, padding, dilation
    )
    if tuple(dy.shape[2:]) != grid.out_hw or dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"{fn}: expected dy of shape {(x.shape[0], index.rows, *grid.out_hw)}, "
            f"got {tuple(dy.shape)}"
        )
    return sddmm_conv2d_planes(conv_planes(x, grid), grid, dy, values, bits, index)


def sddmm_conv2d_planes(
    xp: Tensor, grid: ConvGrid, dy: Tensor, values: Tensor, bits: Tensor, index
) -> Tensor:
    """:func:`sddmm_conv2d` on :func:`conv_planes`."""
    fn = "sddmm_conv2d()"
    values = _values(fn, values)
    buf, head = _out_planes(dy, grid)
    out = torch.empty(values.numel(), dtype=torch.float32)
    _C.spmm_sddmm(
        **_geometry(values, bits, index, grid.phases, grid.phase, grid.shift, grid.L),
        dy=_np(buf),
        head=head,
        x=_np(xp),
        out=_np(out),
    )
    return out
