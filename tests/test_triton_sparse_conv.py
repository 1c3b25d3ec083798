"""The Triton sparse convolution (forward and backward data): what only it has.

Its results against :mod:`procrustes_kernels.ops.compute.reference` on golden tiny cases and random
masks over odd shapes, kernels, strides, paddings, dilations, groups and dtypes, at the default
launch configuration, are in ``test_backend_equivalence.py``. Here: the rounding of half inputs by
hand, memory layouts (channels_last, arbitrary strides), several m-tiles and tile shapes, empty
tiles, no tracked weight, int64 offsets, argument errors and an sm_90 compile check.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``); with one, the same tests run on CUDA tensors. Outputs are poisoned (NaN)
at allocation so that an element a kernel never wrote cannot pass for a right one.

The interpreter costs ~0.1 s per (program, weight tile) of a 3x3 kernel, so images are tiny
(5 x 7), channels few, and ``block_m`` is forced small only where several m-tiles matter.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DEVICE,
    TOLERANCES,
    compile_for_sm90,
    compressed_weight,
    index_to,
    random_weight,
    without_gpu,
)

from procrustes_kernels.ops import triton_util
from procrustes_kernels.ops.compute import reference as ref
from procrustes_kernels.ops.compute import triton_conv as tsc
from procrustes_kernels.ops.compute.index import build_tile_index

TRITON = TOLERANCES["triton"]
# On a GPU, float32 convolutions run in TF32 by default (as cuDNN would): compared without.
pytestmark = pytest.mark.usefixtures("no_tf32")


def check_both(x, weight, kernel_size, stride, padding, dilation, bias=None, block_m=None):
    """Forward and backward data of the kernels against the reference, on poisoned outputs."""
    values, bits, index = weight
    geo = (kernel_size, stride, padding, dilation)
    y = tsc.sparse_conv2d(x, values, bits, index, *geo, bias, block_m=block_m)
    want = ref.sparse_conv2d(
        x.cpu(), values.cpu(), bits.cpu(), index_to(index, "cpu"), *geo, bias_cpu(bias)
    )
    assert y.device == x.device
    TRITON.assert_compute(y, want)

    dy = torch.randn(want.shape).to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        dy = dy.to(memory_format=torch.channels_last)
    dy = dy.to(DEVICE)
    hw = tuple(x.shape[2:])
    dx = tsc.sparse_conv2d_t(dy, values, bits, index, hw, *geo, block_m=block_m)
    want_dx = ref.sparse_conv2d_t(
        dy.cpu(), values.cpu(), bits.cpu(), index_to(index, "cpu"), hw, *geo
    )
    TRITON.assert_compute(dx, want_dx)
    return y, dx


def bias_cpu(bias):
    return None if bias is None else bias.cpu()


# ------------------------------------------------------------------------------ hand-checked cases


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_golden_rounding(poison, dtype):
    # x = 1 on both channels. eps = the dtype's epsilon.
    #   row 0: w = 1 + eps/2 + eps/8  -> weight rounds to 1 + eps (truncation would give 1)
    #   row 1: w = (1, eps/2 + eps/8) -> float32 sum 1 + 5 eps/8, output rounds to 1 + eps
    #   row 2: w = 1 + eps/2          -> a tie: rounds to even, 1
    eps = torch.finfo(dtype).eps
    mask = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    values = torch.tensor([1 + eps / 2 + eps / 8, 1.0, eps / 2 + eps / 8, 1 + eps / 2])
    weight = compressed_weight(mask, values, rows=3, cols=2)
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
    return values.cpu(), bits.cpu(), index_to(index, "cpu")


# ------------------------------------------------------------------------------ layouts and tiles


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
    TRITON.assert_compute(dx, want)


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
    weight = compressed_weight(mask, values, rows=20, cols=20)
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


@without_gpu
def test_kernels_compile_for_sm90(tmp_path):
    """Lower both kernels to cubins for sm_90 without a GPU (fp32 with tf32 and ieee, fp16, bf16,
    int64 offsets)."""
    snippet = """
        from procrustes_kernels.ops.compute import triton_conv as T

        GEO = ["M", "H", "W", "OH", "OW"]
        STRIDES = ["b", "c", "h", "w"]
        CONV = ["SH", "SW", "PH", "PW", "DH", "DW"]
        REGEN = {"seed": "u64", "bound": "fp32"}

        def ints(names, ty="i32"):
            return {k: ty for k in names}

        def fwd(xt, vt, bt, consts):
            sig = {"out_ptr": xt, "x_ptr": xt, "values_ptr": vt, "bits_ptr": "*u8",
                   "row_off_ptr": "*i32", "row_ptr_ptr": "*i32", "row_tiles_ptr": "*i32",
                   "bias_ptr": bt, "scale_ptr": "*fp32", **ints(GEO),
                   **ints(["sx" + s for s in STRIDES]), **ints(["so" + s for s in STRIDES]),
                   **ints(["rpg", "cols", "KROW", "TILES_N", "TILES_C", "NGT"]),
                   **ints(CONV), **REGEN}
            return T._sparse_conv2d_kernel, sig, consts

        def bwd(xt, vt, consts):
            sig = {"dx_ptr": xt, "dy_ptr": xt, "values_ptr": vt, "bits_ptr": "*u8",
                   "row_off_ptr": "*i32", "col_ptr_ptr": "*i32", "col_tiles_ptr": "*i32",
                   "scale_ptr": "*fp32", **ints(GEO), **ints(["sd" + s for s in STRIDES]),
                   **ints(["sx" + s for s in STRIDES]),
                   **ints(["rpg", "cols", "KROW", "TILES_C", "TILES_N", "NGC"]), **ints(CONV),
                   **REGEN}
            return T._sparse_conv2d_t_kernel, sig, consts

        def flags(prec, offs64, kh=3, kw=3, bm=128, bn=64, bc=32, init=False, **extra):
            return {"KS": kh * kw, "KW": kw, **extra, "HAS_INIT": init, "WHILE_LOOP": False,
                    "DOT_F32": False,
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
            # Regenerating the untracked weights in the tile loads (every tile visited).
            (*fwd("*bf16", "*fp32", "*bf16", flags("ieee", False, bn=32, bc=32, init=True,
                                                   HAS_BIAS=True)), 8, 2),
            (*bwd("*fp32", "*fp32", flags("tf32", False, bm=64, bn=32, bc=32, init=True)), 8, 2),
        ]
        for fn, sig, consts, warps, stages in jobs:
            k = compile_sm90(fn, sig, consts, num_warps=warps, num_stages=stages)
            if consts["HAS_INIT"]:
                assert "ld.local" not in k.asm["ptx"], "register spills"
        """
    compile_for_sm90(snippet, tmp_path, expected=8)
