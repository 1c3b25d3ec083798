"""The Triton sparse convolution (forward and backward data) against the sparse reference.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``); with one, the same tests run on CUDA tensors. Order: tiny cases checked by
hand, then random masks over odd shapes, kernels, strides, paddings, dilations, groups, dtypes and
layouts against :mod:`procrustes_kernels.ops.compute.reference`, then edge cases (empty tiles, no
tracked weight, int64 offsets), argument errors and an sm_90 compile check. Outputs are poisoned
(NaN) at allocation so that an element a kernel never wrote cannot pass for a right one.

The interpreter costs ~0.1 s per (program, weight tile) of a 3x3 kernel, so images are tiny
(5 x 7), channels few, and ``block_m`` is forced small only where several m-tiles matter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_close_verbose

from procrustes_kernels.ops import triton_util
from procrustes_kernels.ops.compute import reference as ref
from procrustes_kernels.ops.compute import triton_conv as tsc
from procrustes_kernels.ops.compute.index import build_tile_index
from procrustes_kernels.storage import pack_bits

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@pytest.fixture
def poison(monkeypatch):
    """Outputs the launchers allocate start as NaN instead of whatever was there."""
    real_empty = torch.empty

    def empty(*a, **k):
        t = real_empty(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def make_weight(mask, values, rows, cols, ksize, groups=1, block_n=16, block_c=16):
    """Compressed weight (values, bits, index) of a flat [rows, cols, ksize] mask, on DEVICE."""
    bits = pack_bits(mask.reshape(-1)).to(DEVICE)
    index = build_tile_index(bits, rows, cols, ksize, groups, block_n, block_c)
    return values.to(DEVICE), bits, index


def random_weight(rows, cols, ksize, groups, density, *, values_dtype=torch.float32, **blocks):
    if density in (0.0, 1.0):
        mask = torch.full((rows * cols * ksize,), bool(density))
    else:
        mask = torch.rand(rows * cols * ksize) < density
    values = (torch.randn(int(mask.sum())) * 0.5).to(values_dtype)
    return make_weight(mask, values, rows, cols, ksize, groups, **blocks)


def check_both(x, weight, kernel_size, stride, padding, dilation, bias=None, block_m=None):
    """Forward and backward data of the kernels against the reference, on poisoned outputs."""
    values, bits, index = weight
    geo = (kernel_size, stride, padding, dilation)
    y = tsc.sparse_conv2d(x, values, bits, index, *geo, bias, block_m=block_m)
    want = ref.sparse_conv2d(
        x.cpu(), values.cpu(), bits.cpu(), index_cpu(index), *geo, bias_cpu(bias)
    )
    rtol, atol = TOL[x.dtype]
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    assert y.device == x.device
    assert_close_verbose(y.cpu(), want, rtol=rtol, atol=atol * scale)

    dy = torch.randn(want.shape).to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        dy = dy.to(memory_format=torch.channels_last)
    dy = dy.to(DEVICE)
    hw = tuple(x.shape[2:])
    dx = tsc.sparse_conv2d_t(dy, values, bits, index, hw, *geo, block_m=block_m)
    want_dx = ref.sparse_conv2d_t(dy.cpu(), values.cpu(), bits.cpu(), index_cpu(index), hw, *geo)
    scale = max(1.0, float(want_dx.abs().max()))
    assert_close_verbose(dx.cpu(), want_dx, rtol=rtol, atol=atol * scale)
    return y, dx


def index_cpu(index):
    if index.row_off.device.type == "cpu":
        return index
    return type(index)(
        **{k: v.cpu() if torch.is_tensor(v) else v for k, v in index.__dict__.items()}
    )


def bias_cpu(bias):
    return None if bias is None else bias.cpu()


# ------------------------------------------------------------------------------ hand-checked cases


def test_golden_1x1(poison):
    # W[n, c] = [[2, .], [0.5, -1]] (W[0, 1] untracked); storage order (n, c): values [2, 0.5, -1]
    mask = torch.tensor([1, 0, 1, 1], dtype=torch.bool)
    weight = make_weight(mask, torch.tensor([2.0, 0.5, -1.0]), 2, 2, 1)
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]], device=DEVICE)  # [1, 2, 1, 2]
    bias = torch.tensor([1.0, -1.0], device=DEVICE)
    y = tsc.sparse_conv2d(x, *weight, (1, 1), bias=bias)
    # y0 = 2 * x0 + 1, y1 = 0.5 * x0 - x1 - 1
    assert y.cpu().tolist() == [[[[3.0, 5.0]], [[-3.5, -4.0]]]]
    dy = torch.tensor([[[[1.0, 1.0]], [[1.0, -1.0]]]], device=DEVICE)
    dx = tsc.sparse_conv2d_t(dy, *weight, (1, 2), (1, 1))
    # dx0 = 2 * dy0 + 0.5 * dy1, dx1 = -dy1
    assert dx.cpu().tolist() == [[[[2.5, 1.5]], [[-1.0, 1.0]]]]


def test_golden_single_3x3_tap(poison):
    # One tracked tap, (r, s) = (0, 2), value 3, padding 1: y[i, j] = 3 * x[i - 1, j + 1].
    mask = torch.zeros(9, dtype=torch.bool)
    mask[0 * 3 + 2] = True
    weight = make_weight(mask, torch.tensor([3.0]), 1, 1, 9)
    x = torch.arange(1.0, 13.0, device=DEVICE).view(1, 1, 3, 4)
    y = tsc.sparse_conv2d(x, *weight, (3, 3), padding=(1, 1)).cpu()
    want = torch.zeros(1, 1, 3, 4)
    want[..., 1:, :-1] = 3 * x.cpu()[..., :-1, 1:]
    assert torch.equal(y, want)
    # dx[i, j] = 3 * dy[i + 1, j - 1]
    dy = torch.arange(1.0, 13.0, device=DEVICE).view(1, 1, 3, 4) * 0.5
    dx = tsc.sparse_conv2d_t(dy, *weight, (3, 4), (3, 3), padding=(1, 1)).cpu()
    want = torch.zeros(1, 1, 3, 4)
    want[..., :-1, 1:] = 3 * dy.cpu()[..., 1:, :-1]
    assert torch.equal(dx, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_golden_rounding(poison, dtype):
    # x = 1 on both channels. eps = the dtype's epsilon.
    #   row 0: w = 1 + eps/2 + eps/8  -> weight rounds to 1 + eps (truncation would give 1)
    #   row 1: w = (1, eps/2 + eps/8) -> float32 sum 1 + 5 eps/8, output rounds to 1 + eps
    #   row 2: w = 1 + eps/2          -> a tie: rounds to even, 1
    eps = torch.finfo(dtype).eps
    mask = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    values = torch.tensor([1 + eps / 2 + eps / 8, 1.0, eps / 2 + eps / 8, 1 + eps / 2])
    weight = make_weight(mask, values, 3, 2, 1)
    x = torch.ones(1, 2, 1, 1, dtype=dtype, device=DEVICE)
    y = tsc.sparse_conv2d(x, *weight, (1, 1))
    assert y.dtype == dtype
    assert y.float().cpu().flatten().tolist() == [1 + eps, 1 + eps, 1.0]
    assert torch.equal(y.cpu(), ref.sparse_conv2d(x.cpu(), *cpu(weight), (1, 1)))
    dx = tsc.sparse_conv2d_t(torch.ones_like(y), *weight, (1, 1), (1, 1))
    # dx0 = w00 + w10 + w20 = (1 + eps) + 1 + 1 ; dx1 = w11 = eps/2 + eps/8 (exact in dtype)
    assert torch.equal(
        dx.cpu(), ref.sparse_conv2d_t(torch.ones_like(y).cpu(), *cpu(weight), (1, 1), (1, 1))
    )


def cpu(weight):
    values, bits, index = weight
    return values.cpu(), bits.cpu(), index_cpu(index)


# ------------------------------------------------------------------------------ against reference

CASES = {
    # B, C, H, W, N, kernel, stride, padding, dilation, groups, density
    "1x1": (2, 3, 5, 7, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1, 0.5),
    "3x3_pad": (2, 6, 5, 7, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 0.3),
    "5x3_pad": (1, 4, 5, 7, 3, (5, 3), (1, 1), (2, 1), (1, 1), 1, 0.5),
    "3x3_stride2": (2, 5, 5, 7, 6, (3, 3), (2, 2), (1, 1), (1, 1), 1, 0.4),
    "3x3_stride2_nopad": (1, 3, 6, 7, 4, (3, 3), (2, 2), (0, 0), (1, 1), 1, 0.6),
    "3x3_dil2": (1, 3, 5, 7, 4, (3, 3), (2, 1), (2, 2), (2, 2), 1, 0.5),
    "1x3_asym": (1, 3, 5, 7, 4, (1, 3), (1, 2), (0, 3), (1, 2), 1, 0.5),
    "groups2_multitile": (1, 36, 3, 5, 34, (3, 3), (1, 1), (1, 1), (1, 1), 2, 0.2),
    "depthwise": (2, 4, 5, 7, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, 0.6),
    "depthwise_x2": (1, 3, 5, 7, 6, (3, 3), (2, 2), (1, 1), (1, 1), 3, 0.6),
    "full_density": (1, 5, 5, 7, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1.0),
    "sparse_0.05": (1, 20, 5, 7, 18, (3, 3), (1, 1), (0, 1), (1, 1), 1, 0.05),
}


# Every case runs with a bias; these also without.
NO_BIAS = ["1x1", "3x3_stride2", "groups2_multitile"]


@pytest.mark.parametrize(
    "case,bias",
    [(c, True) for c in CASES] + [(c, False) for c in NO_BIAS],
    ids=list(CASES) + [f"{c}-nobias" for c in NO_BIAS],
)
def test_matches_reference(poison, case, bias):
    b, c, h, w, n, ks, st, pd, dl, groups, density = CASES[case]
    weight = random_weight(n, c // groups, ks[0] * ks[1], groups, density)
    x = torch.randn(b, c, h, w, device=DEVICE)
    bias_t = torch.randn(n, device=DEVICE) if bias else None
    y, dx = check_both(x, weight, ks, st, pd, dl, bias_t)
    assert y.is_contiguous() and dx.is_contiguous()


@pytest.mark.parametrize(
    "dtype,values_dtype",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.bfloat16, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_low_precision(poison, dtype, values_dtype):
    weight = random_weight(5, 6, 9, 1, 0.4, values_dtype=values_dtype)
    x = torch.randn(2, 6, 5, 7).to(dtype).to(DEVICE)
    bias = torch.randn(5, device=DEVICE).to(values_dtype)
    y, dx = check_both(x, weight, (3, 3), (1, 1), (1, 1), (1, 1), bias)
    assert y.dtype == dtype and dx.dtype == dtype


def test_channels_last(poison):
    weight = random_weight(6, 5, 9, 1, 0.5)
    x = torch.randn(2, 5, 5, 7, device=DEVICE).to(memory_format=torch.channels_last)
    y, dx = check_both(x, weight, (3, 3), (2, 1), (1, 1), (1, 1), torch.randn(6, device=DEVICE))
    # The outputs mirror the input's memory format, as conv2d does.
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert dx.is_contiguous(memory_format=torch.channels_last) and not dx.is_contiguous()


def test_arbitrary_strides(poison):
    weight = random_weight(4, 3, 9, 1, 0.5)
    base = torch.randn(3, 8, 6, 15, device=DEVICE)
    x = base[::2, 1:7:2, 1:, ::2]  # [2, 3, 5, 8], no dim contiguous but the last has stride 2
    assert not x.is_contiguous()
    y, _ = check_both(x, weight, (3, 3), (1, 1), (1, 1), (1, 1))
    dy = torch.randn(y.shape[0], y.shape[1] * 2, *y.shape[2:], device=DEVICE)[:, ::2]
    dx = tsc.sparse_conv2d_t(dy, *weight, (5, 8), (3, 3), padding=(1, 1))
    want = ref.sparse_conv2d_t(dy.cpu(), *cpu(weight), (5, 8), (3, 3), padding=(1, 1))
    assert_close_verbose(dx.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_n,block_c", [(16, 32), (32, 16)])
def test_several_m_tiles_and_tile_shapes(poison, block_n, block_c):
    # M = 2 * 5 * 7 = 70 positions in 5 m-tiles of 16; 40 channels make 2-3 tiles per dim.
    weight = random_weight(40, 40, 1, 1, 0.3, block_n=block_n, block_c=block_c)
    x = torch.randn(2, 40, 5, 7, device=DEVICE)
    check_both(
        x, weight, (1, 1), (1, 1), (0, 0), (1, 1), torch.randn(40, device=DEVICE), block_m=16
    )


def test_empty_rows_and_column_tiles(poison):
    # 20 x 20 weight (1x1) in 16 x 16 tiles: only tile (0, 0) holds weights, and rows 3, 7 of it
    # are empty too. Row tile 1 has no non-empty column tile (its outputs are the bias alone), and
    # column tile 1 no non-empty row tile (its input gradients are zero).
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[:16, :16] = torch.rand(16, 16) < 0.5
    mask[[3, 7]] = False
    values = torch.randn(int(mask.sum()))
    weight = make_weight(mask, values, 20, 20, 1)
    index = weight[2]
    assert index.nonempty_tiles == 1 and index.row_ptr.cpu().tolist() == [0, 1, 1]
    assert index.col_ptr.cpu().tolist() == [0, 1, 1]
    x = torch.randn(2, 20, 3, 5, device=DEVICE)
    bias = torch.randn(20, device=DEVICE)
    y, dx = check_both(x, weight, (1, 1), (1, 1), (0, 0), (1, 1), bias)
    assert torch.equal(y[:, 16:].cpu(), bias[16:].cpu().view(1, 4, 1, 1).expand(2, 4, 3, 5))
    assert torch.equal(y[:, [3, 7]].cpu(), bias[[3, 7]].cpu().view(1, 2, 1, 1).expand(2, 2, 3, 5))
    assert not dx[:, 16:].cpu().any()


def test_no_tracked_weight(poison):
    weight = random_weight(5, 3, 9, 1, 0.0)
    assert weight[2].nnz == 0 and weight[0].numel() == 0
    x = torch.randn(2, 3, 5, 7, device=DEVICE)
    bias = torch.randn(5, device=DEVICE)
    y = tsc.sparse_conv2d(x, *weight, (3, 3), padding=(1, 1), bias=bias)
    assert torch.equal(y.cpu(), bias.cpu().view(1, 5, 1, 1).expand(2, 5, 5, 7))
    assert not tsc.sparse_conv2d(x, *weight, (3, 3)).cpu().any()
    dx = tsc.sparse_conv2d_t(torch.randn(2, 5, 3, 5, device=DEVICE), *weight, (5, 7), (3, 3))
    assert dx.shape == (2, 3, 5, 7) and not dx.cpu().any()


def test_empty_batch():
    weight = random_weight(5, 3, 9, 1, 0.5)
    y = tsc.sparse_conv2d(torch.randn(0, 3, 5, 7, device=DEVICE), *weight, (3, 3))
    assert y.shape == (0, 5, 3, 5)
    dx = tsc.sparse_conv2d_t(torch.randn(0, 5, 3, 5, device=DEVICE), *weight, (5, 7), (3, 3))
    assert dx.shape == (0, 3, 5, 7)


def test_int64_offsets(poison, monkeypatch):
    monkeypatch.setattr(triton_util, "OFFS64_FROM", 0)
    weight = random_weight(6, 4, 6, 2, 0.5)
    x = torch.randn(2, 8, 5, 7, device=DEVICE)
    check_both(x, weight, (2, 3), (2, 1), (1, 1), (1, 2), torch.randn(6, device=DEVICE))


# ---------------------------------------------------------------------------------- bad arguments


def test_bad_arguments_are_rejected():
    values, bits, index = random_weight(5, 3, 9, 1, 0.5)
    x = torch.randn(1, 3, 5, 7, device=DEVICE)
    fwd = tsc.sparse_conv2d
    bad_fwd = [
        (ValueError, "x with 4 dims", dict(x=x[0])),
        (ValueError, r"x.shape\[1\] == 3", dict(x=torch.randn(1, 4, 5, 7, device=DEVICE))),
        (TypeError, "x of dtype", dict(x=x.double())),
        (TypeError, "x to be a Tensor", dict(x=x.tolist())),
        (ValueError, "index.nnz", dict(values=values[:-1])),
        (TypeError, "values of dtype", dict(values=values.double())),
        (ValueError, "bits", dict(bits=bits[:-1])),
        (TypeError, "bits to be a uint8", dict(bits=bits.to(torch.int32))),
        (ValueError, "kernel_size with 9 positions", dict(kernel_size=(3, 2))),
        (TypeError, "kernel_size", dict(kernel_size=(3, 3, 1))),
        (ValueError, "stride entries >= 1", dict(stride=(0, 1))),
        (ValueError, "padding entries >= 0", dict(padding=(-1, 0))),
        (ValueError, "dilation entries >= 1", dict(dilation=0)),
        (ValueError, "positive output size", dict(x=torch.randn(1, 3, 2, 7, device=DEVICE))),
        (ValueError, r"bias of shape \(5,\)", dict(bias=torch.zeros(4, device=DEVICE))),
        (TypeError, "bias of a floating dtype", dict(bias=torch.zeros(5, dtype=torch.int32))),
        (ValueError, "block_m a power of two", dict(block_m=24)),
        (ValueError, "block_m a power of two", dict(block_m=8)),
        (ValueError, "num_warps", dict(num_warps=3)),
        (ValueError, "num_stages", dict(num_stages=0)),
        (TypeError, "index to be a TileIndex", dict(index=None)),
        (ValueError, "values on", dict(values=values.to("meta"))),
    ]
    base = dict(x=x, values=values, bits=bits, index=index, kernel_size=(3, 3))
    for exc, match, change in bad_fwd:
        kwargs = {**base, **change}
        with pytest.raises(exc, match=match):
            fwd(**kwargs)

    small = build_tile_index(bits, 5, 3, 9, 1, 8, 16)
    with pytest.raises(ValueError, match=r"index.block_n to be a power of two >= 16"):
        fwd(x, values, bits, small, (3, 3))
    odd = build_tile_index(bits, 5, 3, 9, 1, 16, 24)
    with pytest.raises(ValueError, match=r"index.block_c to be a power of two >= 16"):
        tsc.sparse_conv2d_t(
            torch.randn(1, 5, 3, 5, device=DEVICE), values, bits, odd, (5, 7), (3, 3)
        )

    dy = torch.randn(1, 5, 3, 5, device=DEVICE)
    bwd = tsc.sparse_conv2d_t
    bad_bwd = [
        (ValueError, r"dy.shape\[1\] == 5", dict(dy=torch.randn(1, 3, 3, 5, device=DEVICE))),
        (
            ValueError,
            r"dy of spatial size \(3, 5\)",
            dict(dy=torch.randn(1, 5, 3, 4, device=DEVICE)),
        ),
        (ValueError, "input_hw entries >= 1", dict(input_hw=(0, 7))),
        (ValueError, "positive output size", dict(input_hw=(2, 7))),
        (ValueError, "index.nnz", dict(values=values[1:])),
        (ValueError, "kernel_size with 9 positions", dict(kernel_size=(1, 1))),
    ]
    base = dict(dy=dy, values=values, bits=bits, index=index, input_hw=(5, 7), kernel_size=(3, 3))
    for exc, match, change in bad_bwd:
        with pytest.raises(exc, match=match):
            bwd(**{**base, **change})


# ----------------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the other tests compile every kernel for real"
)
def test_kernels_compile_for_sm90(tmp_path):
    """Lower both kernels to cubins for sm_90 without a GPU (fp32 with tf32 and ieee, fp16, bf16,
    int64 offsets): the interpreter accepts things the compiler rejects (and the other way round)."""
    script = textwrap.dedent(
        """
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from procrustes_kernels.ops.compute import triton_conv as T

        GEO = ["M", "H", "W", "OH", "OW"]
        STRIDES = ["b", "c", "h", "w"]
        CONV = ["SH", "SW", "PH", "PW", "DH", "DW"]

        def ints(names, ty="i32"):
            return {k: ty for k in names}

        def fwd(xt, vt, bt, consts):
            sig = {"out_ptr": xt, "x_ptr": xt, "values_ptr": vt, "bits_ptr": "*u8",
                   "row_off_ptr": "*i32", "row_ptr_ptr": "*i32", "row_tiles_ptr": "*i32",
                   "bias_ptr": bt, **ints(GEO), **ints(["sx" + s for s in STRIDES]),
                   **ints(["so" + s for s in STRIDES]),
                   **ints(["rpg", "cols", "KROW", "TILES_N", "TILES_C", "NGT"]),
                   **ints(CONV)}
            return T._sparse_conv2d_kernel, sig, consts

        def bwd(xt, vt, consts):
            sig = {"dx_ptr": xt, "dy_ptr": xt, "values_ptr": vt, "bits_ptr": "*u8",
                   "row_off_ptr": "*i32", "col_ptr_ptr": "*i32", "col_tiles_ptr": "*i32",
                   **ints(GEO), **ints(["sd" + s for s in STRIDES]),
                   **ints(["sx" + s for s in STRIDES]),
                   **ints(["rpg", "cols", "KROW", "TILES_C", "NGC"]), **ints(CONV)}
            return T._sparse_conv2d_t_kernel, sig, consts

        def flags(prec, offs64, kh=3, kw=3, bm=128, bn=64, bc=32, **extra):
            return {"KS": kh * kw, "KW": kw, **extra, "WHILE_LOOP": False, "DOT_F32": False,
                    "PRECISION": prec, "OFFS64": offs64, "BLOCK_M": bm, "BLOCK_N": bn,
                    "BLOCK_C": bc}

        # The GPU defaults (8 warps, 2 stages, BLOCK_M 128 forward / 64 backward), and others.
        jobs = [
            (*fwd("*fp32", "*fp32", "*fp16", flags("tf32", False, HAS_BIAS=True)), 8, 2),
            (*fwd("*bf16", "*fp16", "*fp32", flags("ieee", True, 1, 1, 64, 128, 64,
                                                   HAS_BIAS=False)), 4, 3),
            (*bwd("*fp32", "*fp32", flags("ieee", False, 5, 3, bm=64)), 8, 2),
            (*bwd("*fp16", "*bf16", flags("ieee", True, 3, 3, 128, 32, 64)), 4, 3),
            # The layers' default compute tile (32 x 32) and the benchmark's conv tile (16 x 16).
            (*fwd("*bf16", "*bf16", "*bf16", flags("ieee", False, bn=32, bc=32, HAS_BIAS=True)), 8, 2),
            (*bwd("*bf16", "*bf16", flags("ieee", False, bm=64, bn=16, bc=16)), 8, 2),
        ]
        for fn, sig, consts, warps, stages in jobs:
            src = ASTSource(fn, {**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
            opts = {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False}
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
            print("compiled", fn.__name__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env.update(PYTHONPATH=str(root), TRITON_CACHE_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("compiled") == 6
