"""The Triton update kernels: what only they have.

Their results against the reference, op by op on golden and random inputs at the default launch
configuration, and whole training runs, are in ``test_backend_equivalence.py``; here: launch
configurations (block sizes with several programs, the local histogram, a device-side scale),
int64 offsets, argument errors, the compile for sm_90, and a GPU-sized run on a GPU.

Without a GPU every kernel runs on CPU tensors through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``); with one, the same tests run on CUDA tensors. Kernel outputs are poisoned
(NaN, 0xFF) at allocation so that an element a kernel never wrote cannot pass for a right one.

The interpreter costs ~20-50 ms per launch whatever the size, so sizes are small and the
per-device default block (one big block on CPU) is overridden only where several programs matter.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    BOUND,
    DEVICE,
    SEED,
    TOLERANCES,
    assert_same,
    compile_for_sm90,
    gap_threshold,
    random_segment,
    segment_to,
    without_gpu,
)

from procrustes_kernels.ops import triton_util
from procrustes_kernels.ops.contract import RADIX_HIGH_BINS, Segment, StepParams
from procrustes_kernels.ops.update import reference as ref
from procrustes_kernels.ops.update import triton_kernels as tri

TRITON = TOLERANCES["triton"]


def exact_segment(n, step=0.25):
    """Values and gradients on a coarse grid: with scale 0 and lr 1 every score is exact, so
    ties at a threshold are real ties on every backend."""
    return random_segment(n, grid=step, momentum=False, scale_prev=0.0, device=DEVICE)


# ------------------------------------------------------------------------- launch configurations

MATERIALIZE_CASES = [
    # n, density, scale, dtype, block (None: the device's default)
    (1, 0.0, 1.0, torch.float32, None),
    (1, 1.0, 0.37, torch.float32, None),
    (7, 0.3, 0.37, torch.float16, None),
    (255, 0.3, 1.0, torch.bfloat16, 256),
    (256, 1.0, 0.0, torch.float32, 256),
    (257, 0.3, 0.37, torch.float32, 256),
    (1000, 0.0, 0.37, torch.float64, 512),
    (1000, 0.5, 0.37, torch.float16, None),
    (4099, 0.1, 1.0, torch.float32, 1024),
    (4099, 0.3, 0.0, torch.bfloat16, None),
]


def materialize_args(n, density, scale, dtype):
    seg = random_segment(
        n,
        density=density,
        dtype=torch.float32 if dtype == torch.bfloat16 else dtype,
        device=DEVICE,
    )
    return (SEED, BOUND, scale, seg.values, seg.bits, seg.group_ptr, n, dtype)


@pytest.mark.parametrize(
    "n,density,scale,dtype,block", [c for c in MATERIALIZE_CASES if c[-1] is not None]
)
def test_materialize_in_small_blocks(poison, n, density, scale, dtype, block):
    args = materialize_args(n, density, scale, dtype)
    out = tri.materialize(*args, block=block)
    assert out.dtype == dtype and out.shape == (n,)
    assert_same(out, ref.materialize(*args))


@pytest.mark.parametrize("n,density,scale,dtype,block", MATERIALIZE_CASES)
def test_materialize_with_a_device_scale_matches_the_float_scale(
    poison, n, density, scale, dtype, block
):
    # The decay factor read by the kernel from a 0-d float32 tensor (no host read of it).
    args = materialize_args(n, density, scale, dtype)
    s = torch.tensor(scale, dtype=torch.float32, device=DEVICE)
    out = tri.materialize(SEED, BOUND, s, *args[3:], has_init=scale != 0.0, block=block)
    assert_same(out, ref.materialize(*args))
    with pytest.raises(ValueError, match="has_init"):
        tri.materialize(SEED, BOUND, s, *args[3:])


def test_materialize_int64_offsets(poison, monkeypatch):
    monkeypatch.setattr(triton_util, "OFFS64_FROM", 0)
    seg = random_segment(1000, device=DEVICE)
    args = (SEED, BOUND, 0.37, seg.values, seg.bits, seg.group_ptr, 1000, torch.float32)
    assert_same(tri.materialize(*args, block=256), ref.materialize(*args))


UPDATE_CASES = [
    # n, density, scale_prev, scale, momentum (mu, buffer), weight_decay, dtype, block
    (255, 0.3, 0.9, 0.81, (0.9, False), 0.0, torch.float32, 256),
    (256, 0.3, 1.0, 0.37, (0.0, True), 5e-4, torch.float32, 256),
    (257, 0.5, 0.37, 0.0, (0.5, True), 0.0, torch.float32, 256),
    (1000, 0.0, 0.0, 0.0, (0.9, False), 1e-3, torch.float32, 512),
    (1000, 0.3, 1.0, 1.0, (0.9, True), 1e-3, torch.float64, 256),
    (4099, 0.1, 1.0, 1.0, (0.9, True), 1e-3, torch.float32, 1024),
    (4099, 0.2, 0.9, 0.81, (0.0, False), 1e-3, torch.bfloat16, 1024),
]


@pytest.mark.parametrize("n,density,scale_prev,scale,mom,wd,dtype,block", UPDATE_CASES)
def test_update_ops_in_small_blocks(poison, n, density, scale_prev, scale, mom, wd, dtype, block):
    """Several programs: every kernel gives the bits of its one-program run, whatever the block
    (and that run is the reference's to the tolerance of test_backend_equivalence.py)."""
    mu, buffer = mom
    cpu = random_segment(n, density=density, dtype=dtype, momentum=buffer, scale_prev=scale_prev)
    seg = segment_to(cpu, DEVICE)
    p = StepParams(lr=0.1, momentum=mu, weight_decay=wd, scale=scale)
    kw = {"block": block}

    assert_same(tri.scores(seg, p, **kw), tri.scores(seg, p), "scores")
    assert_same(tri.log_histogram(seg, p, **kw), tri.log_histogram(seg, p), "log_histogram")
    high = tri.radix_histogram(seg, p, **kw)
    assert_same(high, tri.radix_histogram(seg, p), "radix high")
    top = int(high.nonzero().max())
    assert_same(tri.radix_histogram(seg, p, top, **kw), tri.radix_histogram(seg, p, top))

    thr = gap_threshold(ref.scores(cpu, p), 0.7)
    got = tri.compact(seg, p, thr, with_histogram=True, **kw)
    assert_same(got, tri.compact(seg, p, thr, with_histogram=True), "compact")
    want = ref.compact(cpu, p, thr)
    got.histogram = None  # the binning of its own scores: test_backend_equivalence.py
    TRITON.assert_compacted(got, want, dtype)


@pytest.mark.parametrize("quota", [1, 37, 300, 10**6])
def test_tie_quota_follows_flat_order_across_programs(poison, quota):
    seg = exact_segment(1000)
    p = StepParams(lr=1.0, momentum=0.0, weight_decay=0.0, scale=0.0)
    want = ref.compact(seg, p, 0.5, quota)
    assert 0 < want.ties_used <= quota  # ~150 ties at 0.5, spread over all four groups
    TRITON.assert_compacted(tri.compact(seg, p, 0.5, quota, block=256), want, torch.float32)


def test_compact_keeps_nothing_or_everything_in_small_blocks(poison):
    seg = random_segment(257, device=DEVICE)
    p = StepParams(lr=0.1, momentum=0.9, weight_decay=0.0, scale=1.0)
    for thr, quota in ((float("inf"), 0), (float("inf"), 5), (-1.0, 0)):
        got = tri.compact(seg, p, thr, quota, block=256)
        assert got.kept == (0 if thr > 0 else 257)
        TRITON.assert_compacted(got, ref.compact(seg, p, thr, quota), torch.float32)


def test_compact_int64_offsets(poison, monkeypatch):
    monkeypatch.setattr(triton_util, "OFFS64_FROM", 0)
    seg = exact_segment(700)
    p = StepParams(lr=1.0, momentum=0.0, weight_decay=0.0, scale=0.0)
    got = tri.compact(seg, p, 0.5, 20, with_histogram=True, block=256)
    TRITON.assert_compacted(got, ref.compact(seg, p, 0.5, 20, True), torch.float32)


def test_local_histogram_variant(poison):
    # tl.histogram per block instead of one atomic per element: the same counts.
    seg = random_segment(1000, device=DEVICE)
    p = StepParams(lr=0.1, momentum=0.9, weight_decay=1e-3, scale=0.9)
    want = tri.log_histogram(seg, p)
    assert_same(tri.log_histogram(seg, p, local_hist=True, block=512), want)
    got = tri.compact(seg, p, 0.01, with_histogram=True, local_hist=True, block=512)
    assert_same(got.histogram, want)


# ---------------------------------------------------------------------------------- arguments


def test_radix_low_of_an_empty_bin_is_zero_and_past_the_bins_an_error():
    seg = random_segment(300, device=DEVICE)
    p = StepParams(lr=0.1, momentum=0.0, weight_decay=0.0, scale=1.0)
    assert int(tri.radix_histogram(seg, p, RADIX_HIGH_BINS - 1).sum()) == 0
    with pytest.raises(ValueError, match="radix_histogram"):
        tri.radix_histogram(seg, p, RADIX_HIGH_BINS)


def test_bad_launch_arguments_are_rejected():
    seg = random_segment(300, device=DEVICE)
    p = StepParams(lr=0.1, momentum=0.0, weight_decay=0.0, scale=1.0)
    with pytest.raises(ValueError, match="block"):
        tri.log_histogram(seg, p, block=300)
    with pytest.raises(ValueError, match="grad"):
        tri.compact(Segment(**{**seg.__dict__, "grad": seg.grad[:-1]}), p, 0.1)


# ----------------------------------------------------------------------------------- GPU only


@without_gpu
def test_kernels_compile_for_sm90(tmp_path):
    """Lower every kernel to a cubin for sm_90, as the GPU machine would, without a GPU."""
    snippet = """
        from procrustes_kernels.ops.update import triton_kernels as T

        STEP = {"values_ptr": "*fp32", "mom_ptr": "*fp32", "bits_ptr": "*u8",
                "group_ptr_ptr": "*i64", "grad_ptr": "*fp32", "seed": "i64", "bound": "fp32",
                "scale_prev": "fp32", "scale": "fp32", "lr_bits": "i64", "mu_bits": "i64",
                "wd_bits": "i64"}
        FLAGS = {"CDT": tl.float32, "HAS_INIT": True, "HAS_WD": True, "HAS_MOM": True,
                 "OFFS64": False, "BLOCK": 1024}
        jobs = [
            (T._materialize_kernel, {"out_ptr": "*bf16", "values_ptr": "*fp32", "bits_ptr": "*u8",
             "group_ptr_ptr": "*i64", "seed": "i64", "bound": "fp32", "scale": "fp32",
             "first_group": "i64", "stop": "i64", "ngroups": "i64"},
             {"HAS_INIT": True, "SCALE_IS_PTR": False, "OFFS64": True, "BLOCK": 1024}),
            (T._materialize_kernel, {"out_ptr": "*fp32", "values_ptr": "*fp32", "bits_ptr": "*u8",
             "group_ptr_ptr": "*i64", "seed": "i64", "bound": "fp32", "scale": "*fp32",
             "first_group": "i32", "stop": "i32", "ngroups": "i32"},
             {"HAS_INIT": True, "SCALE_IS_PTR": True, "OFFS64": False, "BLOCK": 1024}),
            (T._score_stats_kernel, {"hist_ptr": "*i64", **STEP, "numel": "i32", "ngroups": "i32",
             "high": "i32"}, {"MODE": 2, "LOCAL_HIST": False, **FLAGS}),
            (T._compact_count_kernel, {"kept_ptr": "*i32", "ties_ptr": "*i32", "hist_ptr": "*i64",
             **STEP, "threshold": "fp32", "numel": "i32", "ngroups": "i32"},
             {"COUNT_TIES": True, "WITH_HIST": True, "LOCAL_HIST": False, **FLAGS}),
            (T._compact_write_kernel, {"out_values_ptr": "*fp32", "out_mom_ptr": "*fp32",
             "out_bits_ptr": "*u8", "out_group_ptr_ptr": "*i64", "allow_ptr": "*i32", **STEP,
             "threshold": "fp32", "numel": "i32", "ngroups": "i32", "nbytes": "i32"},
             {"TIES": True, "WRITE_MOM": True, **FLAGS}),
            # The scores kernel of the tile granularity, bfloat16 with int64 offsets.
            (T._scores_kernel, {"out_ptr": "*fp32", "values_ptr": "*bf16", "mom_ptr": "*bf16",
             "bits_ptr": "*u8", "group_ptr_ptr": "*i64", "grad_ptr": "*bf16", "seed": "i64",
             "bound": "fp32", "scale_prev": "fp32", "scale": "fp32", "lr_bits": "i64",
             "mu_bits": "i64", "wd_bits": "i64", "numel": "i64", "ngroups": "i64"},
             {**FLAGS, "OFFS64": True}),
        ]
        for fn, sig, consts in jobs:
            compile_sm90(fn, sig, consts)
        """
    compile_for_sm90(snippet, tmp_path, expected=6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU)")
def test_cuda_kernels_match_cpu_reference_at_1m():
    n = 1 << 20
    cpu = random_segment(n + 3, density=0.1)
    seg = segment_to(cpu, DEVICE)
    args = (SEED, BOUND, 0.9, cpu.values, cpu.bits, cpu.group_ptr, cpu.numel, torch.float32)
    out = tri.materialize(*args[:3], seg.values, seg.bits, seg.group_ptr, *args[6:])
    assert out.is_cuda
    assert_same(out, ref.materialize(*args))
    p = StepParams(lr=0.1, momentum=0.9, weight_decay=1e-3, scale=0.81)
    assert torch.equal(tri.radix_histogram(seg, p).cpu(), ref.radix_histogram(cpu, p))
    thr = gap_threshold(ref.scores(cpu, p), 0.9)
    got = tri.compact(seg, p, thr, with_histogram=True)
    assert got.values.is_cuda
    TRITON.assert_compacted(got, ref.compact(cpu, p, thr, with_histogram=True), torch.float32)
