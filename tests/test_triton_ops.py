"""The Triton backend against the reference, kernel by kernel and through the optimizer.

Without a GPU every kernel runs on CPU tensors through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``); with one, the same tests run on CUDA tensors. Order: tiny cases checked by
hand, then random odd sizes and flags against :mod:`procrustes_kernels.ops.update.reference`, then whole
training runs with each backend from identical states. Kernel outputs are poisoned (NaN, 0xFF) at
allocation so that an element a kernel never wrote cannot pass for a right one.

The interpreter costs ~50-100 ms per launch whatever the size, so sizes are small and the
per-device default block (one big block on CPU) is overridden only where several programs matter.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_verbose
from torch import nn

import procrustes_kernels as pk
from procrustes_kernels import ops
from procrustes_kernels.ops import triton_util
from procrustes_kernels.ops.contract import RADIX_HIGH_BINS, RADIX_LOW_BINS, Segment, StepParams
from procrustes_kernels.ops.update import reference as ref
from procrustes_kernels.ops.update import triton_kernels as tri
from procrustes_kernels.philox import init_bound, philox_uniform
from procrustes_kernels.selection import HIST_BINS, score_histogram
from procrustes_kernels.storage import group_pointers, pack_bits

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SEED = 0x5EED_1234_ABCD  # above 2**32: both key words of the Philox key matter
BOUND = init_bound(37)


@pytest.fixture
def poison(monkeypatch):
    """Outputs the launchers allocate start as NaN / 0xFF / -1 instead of whatever was there."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(0xFF)
        elif t.dtype != torch.bool:
            t.fill_(-1)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


def segment_from_mask(mask, values, grad, momentum=None, *, seed=SEED, bound=BOUND, scale_prev=1.0):
    bits = pack_bits(mask)
    return Segment(
        seed=seed,
        bound=bound,
        numel=mask.numel(),
        values=values.to(DEVICE),
        bits=bits.to(DEVICE),
        group_ptr=group_pointers(bits, mask.numel()).to(DEVICE),
        grad=grad.to(DEVICE),
        momentum=None if momentum is None else momentum.to(DEVICE),
        scale_prev=scale_prev,
    )


def random_segment(n, density=0.3, dtype=torch.float32, momentum=True, scale_prev=1.0, seed=SEED):
    g = torch.Generator().manual_seed(n * 7919 + int(density * 1000))
    if density in (0.0, 1.0):
        mask = torch.full((n,), bool(density))
    else:
        mask = torch.rand(n, generator=g) < density
    nnz = int(mask.sum())
    values = (torch.randn(nnz, generator=g) * 0.1).to(dtype)
    grad = (torch.randn(n, generator=g) * 0.02).to(dtype)
    mom = (torch.randn(nnz, generator=g) * 0.01).to(dtype) if momentum else None
    return segment_from_mask(mask, values, grad, mom, seed=seed, scale_prev=scale_prev)


def gap_threshold(s, q):
    """A float32 threshold near the ``q`` quantile of ``s`` in a gap between scores, so that ulp
    differences between backends cannot move any score across it."""
    v = torch.unique(s.cpu().double())
    i = min(int(q * len(v)), len(v) - 2)
    for j in list(range(i, len(v) - 1)) + list(range(i - 1, -1, -1)):
        if v[j + 1] - v[j] > 1e-5 * v[j + 1]:
            return float(np.float32((v[j] + v[j + 1]) / 2))
    return float("inf")


def assert_compacted_equal(got, want, dtype):
    assert torch.equal(got.bits.cpu(), want.bits.cpu()), "tracked sets differ"
    assert torch.equal(got.group_ptr.cpu(), want.group_ptr.cpu())
    assert got.group_ptr.dtype == torch.int64 and got.bits.dtype == torch.uint8
    assert got.ties_used == want.ties_used
    rtol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    for a, b in ((got.values, want.values), (got.momentum, want.momentum)):
        if b is None:
            assert a is None
            continue
        scale = float(b.abs().max()) if b.numel() else 0.0
        assert_close_verbose(a.cpu(), b.cpu(), rtol=rtol, atol=rtol * scale)
    if want.histogram is None:
        assert got.histogram is None
    else:
        assert torch.equal(got.histogram.cpu(), want.histogram.cpu())


# ------------------------------------------------------------------------------ hand-checked cases

# 10 elements, elements 1, 4 and 9 tracked.
GOLD_MASK = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
GOLD_VALUES = torch.tensor([2.0, -1.0, 0.5])
GOLD_GRAD = torch.tensor([-0.5, 0.5, 0.25, -0.25, 0.0, 1.0, 0.0, -0.25, 0.0, 0.25])


def test_golden_layout():
    bits = pack_bits(GOLD_MASK)
    assert bits.tolist() == [0b00010010, 0b00000010]
    assert group_pointers(bits, 10).tolist() == [0, 3]


@pytest.mark.parametrize("scale", [0.0, 1.0, 0.37])
def test_golden_materialize(poison, scale):
    seg = segment_from_mask(GOLD_MASK, GOLD_VALUES, GOLD_GRAD)
    out = tri.materialize(
        SEED, BOUND, scale, seg.values, seg.bits, seg.group_ptr, 10, torch.float32
    )
    u = philox_uniform(SEED, torch.arange(10, dtype=torch.int32))
    w0 = (2.0 * u - 1.0) * torch.tensor(BOUND)
    want = w0 * torch.tensor(scale) if scale else torch.zeros(10)
    want[[1, 4, 9]] = GOLD_VALUES
    assert torch.equal(out.cpu(), want)
    if scale == 0.0:
        assert out.cpu().tolist() == [0, 2, 0, 0, -1, 0, 0, 0, 0, 0.5]


def test_golden_compact_without_momentum(poison):
    # scale 0 (no init term), lr 1: c = W - g and s = |c|, all exact in float32:
    #   s = [0.5, 1.5, 0.25, 0.25, 1, 1, 0, 0.25, 0, 0.25]
    seg = segment_from_mask(GOLD_MASK, GOLD_VALUES, GOLD_GRAD, scale_prev=0.0)
    p = StepParams(lr=1.0, momentum=0.0, weight_decay=0.0, scale=0.0)
    res = tri.compact(seg, p, 0.25, tie_quota=2, with_histogram=True)
    # above 0.25: 0, 1, 4, 5; ties at 0.25: 2, 3, 7, 9 of which the first two are kept
    assert res.values.cpu().tolist() == [0.5, 1.5, -0.25, 0.25, -1.0, -1.0]
    assert res.bits.cpu().tolist() == [0b00111111, 0]
    assert res.group_ptr.cpu().tolist() == [0, 6]
    assert res.ties_used == 2 and res.momentum is None
    scores = torch.tensor([0.5, 1.5, 0.25, 0.25, 1, 1, 0, 0.25, 0, 0.25])
    assert torch.equal(res.histogram.cpu(), score_histogram(scores))
    assert torch.equal(tri.log_histogram(seg, p).cpu(), score_histogram(scores))
    high = tri.radix_histogram(seg, p).cpu()
    assert {int(b): int(high[b]) for b in high.nonzero().flatten()} == {
        0: 2,  # 0.0
        0x3E80: 4,  # 0.25
        0x3F00: 1,  # 0.5
        0x3F80: 2,  # 1.0
        0x3FC0: 1,  # 1.5
    }
    low = tri.radix_histogram(seg, p, 0x3E80).cpu()
    assert low[0] == 4 and low.sum() == 4
    assert_compacted_equal(res, ref.compact(seg, p, 0.25, 2, True), torch.float32)


def test_golden_compact_with_momentum(poison):
    # momentum 0.5 with buffer [1, 2, 4] on elements 1, 4, 9:
    #   m[1] = 0.5 + 0.5 = 1, m[4] = 1 + 0 = 1, m[9] = 2 + 0.25 = 2.25, elsewhere m = g
    #   c = [0.5, 1, -0.25, 0.25, -2, -1, 0, 0.25, 0, -1.75], s = |c|
    seg = segment_from_mask(
        GOLD_MASK, GOLD_VALUES, GOLD_GRAD, torch.tensor([1.0, 2.0, 4.0]), scale_prev=0.0
    )
    p = StepParams(lr=1.0, momentum=0.5, weight_decay=0.0, scale=0.0)
    res = tri.compact(seg, p, 0.25, tie_quota=1)
    # above 0.25: 0, 1, 4, 5, 9; ties at 0.25: 2, 3, 7 of which the first is kept
    assert res.values.cpu().tolist() == [0.5, 1.0, -0.25, -2.0, -1.0, -1.75]
    assert res.momentum.cpu().tolist() == [-0.5, 1.0, 0.25, 1.0, 1.0, 2.25]
    assert res.bits.cpu().tolist() == [0b00110111, 0b00000010]
    assert res.group_ptr.cpu().tolist() == [0, 6]
    assert res.ties_used == 1 and res.histogram is None
    assert_compacted_equal(res, ref.compact(seg, p, 0.25, 1), torch.float32)


# ------------------------------------------------------------------------------------- materialize

MATERIALIZE_CASES = [
    # n, density, scale, dtype, block
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


@pytest.mark.parametrize("n,density,scale,dtype,block", MATERIALIZE_CASES)
def test_materialize_matches_reference(poison, n, density, scale, dtype, block):
    seg = random_segment(n, density, torch.float32 if dtype == torch.bfloat16 else dtype)
    args = (SEED, BOUND, scale, seg.values, seg.bits, seg.group_ptr, n, dtype)
    out = tri.materialize(*args, block=block)
    assert out.dtype == dtype and out.shape == (n,)
    assert torch.equal(out.cpu(), ref.materialize(*args).cpu())


@pytest.mark.parametrize("n,density,scale,dtype,block", MATERIALIZE_CASES)
def test_materialize_with_a_device_scale_matches_the_float_scale(
    poison, n, density, scale, dtype, block
):
    # The decay factor read by the kernel from a 0-d float32 tensor (no host read of it).
    seg = random_segment(n, density, torch.float32 if dtype == torch.bfloat16 else dtype)
    args = (SEED, BOUND, scale, seg.values, seg.bits, seg.group_ptr, n, dtype)
    s = torch.tensor(scale, dtype=torch.float32, device=seg.values.device)
    out = tri.materialize(SEED, BOUND, s, *args[3:], has_init=scale != 0.0, block=block)
    assert torch.equal(out.cpu(), ref.materialize(*args).cpu())
    with pytest.raises(ValueError, match="has_init"):
        tri.materialize(SEED, BOUND, s, *args[3:])


def test_materialize_int64_offsets(poison, monkeypatch):
    monkeypatch.setattr(triton_util, "OFFS64_FROM", 0)
    seg = random_segment(1000, 0.3)
    args = (SEED, BOUND, 0.37, seg.values, seg.bits, seg.group_ptr, 1000, torch.float32)
    assert torch.equal(tri.materialize(*args, block=256).cpu(), ref.materialize(*args).cpu())


def test_materialize_negative_and_small_seeds(poison):
    seg = random_segment(300, 0.2)
    for seed in (-3, 1, 2**63 - 1):
        args = (seed, BOUND, 1.0, seg.values, seg.bits, seg.group_ptr, 300, torch.float32)
        assert torch.equal(tri.materialize(*args).cpu(), ref.materialize(*args).cpu())


# ------------------------------------------------------------------------------- update passes

UPDATE_CASES = [
    # n, density, scale_prev, scale, momentum (mu, buffer), weight_decay, dtype, block
    (1, 0.0, 1.0, 1.0, (0.0, False), 0.0, torch.float32, None),
    (7, 1.0, 1.0, 1.0, (0.9, True), 1e-3, torch.float32, None),
    (255, 0.3, 0.9, 0.81, (0.9, False), 0.0, torch.float32, 256),
    (256, 0.3, 1.0, 0.37, (0.0, True), 5e-4, torch.float32, 256),
    (257, 0.5, 0.37, 0.0, (0.5, True), 0.0, torch.float32, 256),
    (1000, 0.0, 0.0, 0.0, (0.9, False), 1e-3, torch.float32, 512),
    (1000, 0.3, 1.0, 1.0, (0.9, True), 1e-3, torch.float64, None),
    (1000, 1.0, 0.9, 0.81, (0.0, False), 0.0, torch.float16, None),
    (4099, 0.1, 1.0, 1.0, (0.9, True), 1e-3, torch.float32, 1024),
    (4099, 0.2, 0.9, 0.81, (0.0, False), 1e-3, torch.bfloat16, None),
]


@pytest.mark.parametrize("n,density,scale_prev,scale,mom,wd,dtype,block", UPDATE_CASES)
def test_update_ops_match_reference(poison, n, density, scale_prev, scale, mom, wd, dtype, block):
    mu, buffer = mom
    seg = random_segment(n, density, dtype, momentum=buffer, scale_prev=scale_prev)
    p = StepParams(lr=0.1, momentum=mu, weight_decay=wd, scale=scale)
    kw = {"block": block}

    assert torch.equal(tri.log_histogram(seg, p, **kw).cpu(), ref.log_histogram(seg, p).cpu())
    high = tri.radix_histogram(seg, p, **kw)
    assert high.shape == (RADIX_HIGH_BINS,) and high.dtype == torch.int64
    assert torch.equal(high.cpu(), ref.radix_histogram(seg, p).cpu())
    top = int(high.nonzero().max())
    low = tri.radix_histogram(seg, p, top, **kw)
    assert low.shape == (RADIX_LOW_BINS,)
    assert torch.equal(low.cpu(), ref.radix_histogram(seg, p, top).cpu())

    thr = gap_threshold(ref.scores(seg, p), 0.7)
    got = tri.compact(seg, p, thr, with_histogram=True, **kw)
    assert got.values.dtype == dtype
    assert_compacted_equal(got, ref.compact(seg, p, thr, with_histogram=True), dtype)


def exact_segment(n, step=0.25):
    """Values and gradients on a coarse grid: with scale 0 and lr 1 every score is exact, so
    ties at a threshold are real ties on every backend."""
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.3
    values = torch.randint(-4, 5, (int(mask.sum()),), generator=g).float() * step
    grad = torch.randint(-4, 5, (n,), generator=g).float() * step
    return segment_from_mask(mask, values, grad, scale_prev=0.0)


@pytest.mark.parametrize("quota", [1, 37, 300, 10**6])
def test_tie_quota_follows_flat_order_across_groups(poison, quota):
    seg = exact_segment(1000)
    p = StepParams(lr=1.0, momentum=0.0, weight_decay=0.0, scale=0.0)
    want = ref.compact(seg, p, 0.5, quota)
    assert 0 < want.ties_used <= quota  # ~150 ties at 0.5, spread over all four groups
    assert_compacted_equal(tri.compact(seg, p, 0.5, quota, block=256), want, torch.float32)


def test_compact_keeps_nothing_or_everything(poison):
    seg = random_segment(257, 0.3)
    p = StepParams(lr=0.1, momentum=0.9, weight_decay=0.0, scale=1.0)
    for thr, quota in ((float("inf"), 0), (float("inf"), 5), (-1.0, 0)):
        got = tri.compact(seg, p, thr, quota, block=256)
        assert got.kept == (0 if thr > 0 else 257)
        assert_compacted_equal(got, ref.compact(seg, p, thr, quota), torch.float32)


def test_compact_int64_offsets(poison, monkeypatch):
    monkeypatch.setattr(triton_util, "OFFS64_FROM", 0)
    seg = exact_segment(700)
    p = StepParams(lr=1.0, momentum=0.0, weight_decay=0.0, scale=0.0)
    got = tri.compact(seg, p, 0.5, 20, with_histogram=True, block=256)
    assert_compacted_equal(got, ref.compact(seg, p, 0.5, 20, True), torch.float32)


def test_local_histogram_variant(poison):
    seg = random_segment(1000, 0.3)
    p = StepParams(lr=0.1, momentum=0.9, weight_decay=1e-3, scale=0.9)
    want = ref.log_histogram(seg, p).cpu()
    assert torch.equal(tri.log_histogram(seg, p, local_hist=True, block=512).cpu(), want)
    got = tri.compact(seg, p, 0.01, with_histogram=True, local_hist=True, block=512)
    assert torch.equal(got.histogram.cpu(), want) and got.histogram.shape == (HIST_BINS,)


def test_radix_low_of_an_empty_bin_is_zero():
    seg = random_segment(300, 0.3)
    p = StepParams(lr=0.1, momentum=0.0, weight_decay=0.0, scale=1.0)
    assert int(tri.radix_histogram(seg, p, RADIX_HIGH_BINS - 1).sum()) == 0
    with pytest.raises(ValueError, match="radix_histogram"):
        tri.radix_histogram(seg, p, RADIX_HIGH_BINS)


def test_bad_launch_arguments_are_rejected():
    seg = random_segment(300, 0.3)
    p = StepParams(lr=0.1, momentum=0.0, weight_decay=0.0, scale=1.0)
    with pytest.raises(ValueError, match="block"):
        tri.log_histogram(seg, p, block=300)
    with pytest.raises(ValueError, match="grad"):
        tri.compact(Segment(**{**seg.__dict__, "grad": seg.grad[:-1]}), p, 0.1)


# ------------------------------------------------------------------------------------ optimizer

STEPS = 8


def small_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(13, 29), nn.ReLU(), nn.Linear(29, 5))
    return pk.sparsify(net, seed=11).to(DEVICE)


def train(model, backend, selection, scope, mu, wd):
    g = torch.Generator().manual_seed(5)
    opt = pk.DropBack(
        model.parameters(),
        lr=0.2,
        budget=0.1,
        momentum=mu,
        weight_decay=wd,
        init_decay=0.8 if selection == "quantile" else 1.0,
        selection=selection,
        scope=scope,
        quantile_warmup=3,  # the later steps compact with the carried threshold and its histogram
    )
    history = []
    with ops.use_backend(backend):
        for _ in range(STEPS):
            x = torch.randn(24, 13, generator=g).to(DEVICE)
            y = torch.randint(0, 5, (24,), generator=g).to(DEVICE)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            history.append(
                (
                    [w.bits.cpu().clone() for w in opt.weights],
                    [w.values.cpu().clone() for w in opt.weights],
                    opt.tracked_count,
                )
            )
    return history


@pytest.mark.parametrize("selection", ["topk", "quantile"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("mu,wd", [(0.0, 0.0), (0.9, 1e-3)], ids=["sgd", "momentum_wd"])
def test_training_matches_reference(selection, scope, mu, wd):
    model = small_model()
    got = train(copy.deepcopy(model), "triton", selection, scope, mu, wd)
    want = train(model, "reference", selection, scope, mu, wd)
    for step, ((bits_t, vals_t, count_t), (bits_r, vals_r, count_r)) in enumerate(zip(got, want)):
        assert count_t == count_r, f"step {step + 1}: tracked count {count_t} != {count_r}"
        for i, (bt, br, vt, vr) in enumerate(zip(bits_t, bits_r, vals_t, vals_r)):
            assert torch.equal(bt, br), f"step {step + 1}, layer {i}: tracked sets differ"
            scale = float(vr.abs().max()) if vr.numel() else 0.0
            assert_close_verbose(vt, vr, rtol=1e-6, atol=1e-6 * scale)


# ----------------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the other tests compile every kernel for real"
)
def test_kernels_compile_for_sm90(tmp_path):
    """Lower every kernel to a cubin for sm_90, as the GPU machine would, without a GPU: the
    interpreter accepts things the compiler rejects (and the other way round)."""
    script = textwrap.dedent(
        """
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
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
             "numel": "i64", "ngroups": "i64"},
             {"HAS_INIT": True, "SCALE_IS_PTR": False, "OFFS64": True, "BLOCK": 1024}),
            (T._materialize_kernel, {"out_ptr": "*fp32", "values_ptr": "*fp32", "bits_ptr": "*u8",
             "group_ptr_ptr": "*i64", "seed": "i64", "bound": "fp32", "scale": "*fp32",
             "numel": "i32", "ngroups": "i32"},
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
        ]
        for fn, sig, consts in jobs:
            src = ASTSource(fn, {**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
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
    assert out.stdout.count("compiled") == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU)")
def test_cuda_kernels_match_cpu_reference_at_1m():
    n = 1 << 20
    seg = random_segment(n + 3, 0.1)  # on CUDA
    cpu = Segment(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in seg.__dict__.items()})
    args = (SEED, BOUND, 0.9, seg.values, seg.bits, seg.group_ptr, seg.numel, torch.float32)
    out = tri.materialize(*args)
    want = ref.materialize(*(a.cpu() if torch.is_tensor(a) else a for a in args))
    assert out.is_cuda and torch.equal(out.cpu(), want)
    p = StepParams(lr=0.1, momentum=0.9, weight_decay=1e-3, scale=0.81)
    assert torch.equal(tri.radix_histogram(seg, p).cpu(), ref.radix_histogram(cpu, p))
    thr = gap_threshold(ref.scores(cpu, p), 0.9)
    got = tri.compact(seg, p, thr, with_histogram=True)
    assert got.values.is_cuda
    assert_compacted_equal(got, ref.compact(cpu, p, thr, with_histogram=True), torch.float32)
