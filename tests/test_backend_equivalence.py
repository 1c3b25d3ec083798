"""Every backend against the reference, op by op: one parametrised suite.

For every backend but the reference (the definition: :mod:`procrustes_kernels.ops.update.reference`
and :mod:`procrustes_kernels.ops.compute.reference`) and every op it implements itself
(``ops.backend_ops(name)``; the others fall back to the reference and need no test here):

1. golden tiny cases with hand-checked answers, which every implementation, the reference
   included, must give;
2. fresh random inputs of odd sizes in every dtype the backend takes (:data:`INPUTS`), against the
   reference on CPU copies of the same inputs, to the backend's row of
   :data:`helpers.tolerances.TOLERANCES` (cpp: bit for bit; triton: ~1 ulp of the candidate);
3. whole optimizer runs on each backend against the reference backend.

Triton runs on CUDA tensors when there is a GPU, else on CPU tensors through its interpreter
(conftest sets ``TRITON_INTERPRET=1``), at its default launch configuration. What only one backend
has stays in its own file: Triton's block sizes, schedules, int64 offsets and sm_90 compiles
(``test_triton_*.py``), the C++ backend's thread counts, instruction sets, stored scores and
FMA probe (``test_cpp_ops.py``), and every backend's error messages. Outputs are poisoned at
allocation (conftest's ``poison``) so that an element a backend never wrote cannot pass.

Over 600 lines on purpose: one file holds the whole comparison, every op of every backend, so
that a new op or backend is covered by adding a row, not a file.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BOUND,
    DEVICE,
    PARAMS,
    SEED,
    TOLERANCES,
    assert_histogram,
    assert_same,
    compressed_weight,
    gap_threshold,
    index_to,
    mlp,
    random_mask,
    random_segment,
    random_weight,
    segment_from_mask,
    segment_to,
    threshold_with_ties,
)

import procrustes_kernels as pk
from procrustes_kernels import ops
from procrustes_kernels.ops import (
    BACKENDS,
    COMPUTE_OPS,
    GRAD_OPS,
    RADIX_HIGH_BINS,
    RADIX_LOW_BINS,
    UPDATE_OPS,
    StepParams,
)
from procrustes_kernels.ops.compute import reference as compute_ref
from procrustes_kernels.ops.contract import GROUP_SIZE, HIST_BINS, Regen, score_histogram
from procrustes_kernels.ops.update import reference as update_ref
from procrustes_kernels.philox import init_values, philox_uniform
from procrustes_kernels.selection import PaperQuantileSelector
from procrustes_kernels.storage import group_pointers, pack_bits

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
# On a GPU, float32 convolutions run in TF32 by default (as cuDNN would): compared without.
pytestmark = pytest.mark.usefixtures("no_tf32")
CPU = torch.device("cpu")


# -------------------------------------------------------------------------------- what is tested
@dataclass(frozen=True)
class Inputs:
    """Where a backend runs and what it is given."""

    device: torch.device
    ops: tuple[str, ...]  # the ops it implements itself (docs/dispatch.md), the rest fall back
    sizes: tuple[int, ...]  # elements of a segment
    update_dtypes: tuple[torch.dtype, ...]  # layer dtypes of the update ops
    compute_dtypes: tuple[torch.dtype, ...]  # input / value dtypes of the compute ops
    # Every flag set on every (size, dtype); else the flag sets take turns over them (the
    # interpreter's time per launch).
    every_flag_set: bool


INPUTS = {
    "cpp": Inputs(
        device=CPU,
        ops=UPDATE_OPS + COMPUTE_OPS + GRAD_OPS,
        sizes=(1, 7, 255, 256, 257, 1000, 4099, 100_003),
        update_dtypes=(F32, F64),
        compute_dtypes=(F32,),
        every_flag_set=True,
    ),
    "triton": Inputs(
        device=DEVICE,
        ops=tuple(
            op
            for op in UPDATE_OPS + COMPUTE_OPS + GRAD_OPS
            if op not in ("compact_mask", "paper_walk")
        ),
        sizes=(1, 7, 255, 257, 1000, 4099),
        update_dtypes=(F32, F16, BF16, F64),
        compute_dtypes=(F32, F16, BF16),
        every_flag_set=False,
    ),
}
TESTED = tuple(INPUTS)  # every backend but the reference


@dataclass(frozen=True)
class Flags:
    """A segment's shape of storage and one step's scalars."""

    density: float  # of the tracked set
    scale_prev: float  # d_(n-1)
    buffer: bool  # a momentum buffer
    zero_grads: float  # fraction of exactly zero gradients
    params: StepParams


FLAG_SETS = {
    # name: density, scale_prev, buffer, zero_grads, StepParams(lr, momentum, weight_decay, scale)
    "sgd": Flags(0.3, 1.0, False, 0.3, PARAMS["sgd"]),
    "momentum_wd_decay": Flags(0.3, 0.9, True, 0.0, PARAMS["momentum_wd_decay"]),
    "zero_scale": Flags(0.5, 0.37, True, 0.0, PARAMS["zero_scale"]),
    "no_init": Flags(0.0, 0.0, False, 0.0, StepParams(0.1, 0.9, 1e-3, scale=0.0)),
    "all_tracked": Flags(1.0, 1.0, True, 0.2, StepParams(0.1, 0.9, 1e-3, scale=1.0)),
    "momentum_without_buffer": Flags(0.2, 0.9, False, 0.5, StepParams(0.1, 0.9, 0.0, scale=0.81)),
    "buffer_without_momentum": Flags(0.1, 0.37, True, 0.3, StepParams(0.1, 0.0, 5e-4, scale=0.37)),
}

REFERENCE = {
    **{op: getattr(update_ref, op) for op in UPDATE_OPS},
    **{op: getattr(compute_ref, op) for op in COMPUTE_OPS + GRAD_OPS},
}


def has(backend: str, op: str) -> bool:
    return op in ops.backend_ops(backend)


def device_of(backend: str) -> torch.device:
    return CPU if backend == "reference" else INPUTS[backend].device


def implementation(backend: str, op: str, dtypes=()):
    """``backend``'s own ``op``, as the dispatcher hands it out for tensors of ``dtypes``."""
    if backend == "reference":
        return REFERENCE[op]
    with ops.use_backend(backend):
        fn = ops.kernel(op, device_of(backend), set(dtypes))
    assert fn is not REFERENCE[op], f"{backend} falls back to the reference for {op} {dtypes}"
    return fn


def implementations(op: str) -> list[str]:
    """Every implementation of ``op``, the reference's first (for the golden cases)."""
    return ["reference"] + [b for b in TESTED if has(b, op)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def update_cases(op: str, flags: bool = True, turns: bool = False) -> list:
    """``(backend, n, dtype[, flags])`` for every backend with ``op``; ``turns``: the flag sets
    take turns on every backend (for ops where they matter little)."""
    cases = []
    for backend in TESTED:
        if not has(backend, op):
            continue
        inputs = INPUTS[backend]
        for i, (n, dtype) in enumerate(itertools.product(inputs.sizes, inputs.update_dtypes)):
            base = f"{backend}-{n}-{dtype_name(dtype)}"
            if not flags:
                cases.append(pytest.param(backend, n, dtype, id=base))
                continue
            names = list(FLAG_SETS)
            if turns or not inputs.every_flag_set:
                names = [names[i % len(names)]]
            cases += [pytest.param(backend, n, dtype, f, id=f"{base}-{f}") for f in names]
    return cases


def backends_with(*op_names: str) -> list[str]:
    return [b for b in TESTED if all(has(b, op) for op in op_names)]


def segments(backend: str, n: int, dtype: torch.dtype, flags: str, rng: int = 0):
    """The case's segment on the CPU (the reference's input) and on the backend's device."""
    f = FLAG_SETS[flags]
    seg = random_segment(
        n,
        density=f.density,
        dtype=dtype,
        momentum=f.buffer,
        scale_prev=f.scale_prev,
        zero_grads=f.zero_grads,
        rng=rng,
    )
    return seg, segment_to(seg, device_of(backend)), f.params


def test_every_backend_is_available_and_covered():
    available = ops.available_backends()
    assert set(TESTED) == set(BACKENDS) - {"reference"}, "a backend without a row in INPUTS"
    assert set(TOLERANCES) == set(TESTED), "a backend without a row in TOLERANCES"
    for backend in TESTED:
        assert available[backend], f"{backend}: {ops.backend_error(backend)}"
        own = ops.backend_ops(backend)
        assert set(own) == set(INPUTS[backend].ops), f"{backend} implements {own}"
        missing = set(own) - set(OP_TESTS)
        assert not missing, f"{backend} has ops without a test here: {missing}"
    assert set(OP_TESTS) == set(UPDATE_OPS + COMPUTE_OPS + GRAD_OPS)


# ------------------------------------------------------------------------- golden: update ops

# 10 elements, elements 1, 4 and 9 tracked.
GOLD_MASK = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
GOLD_VALUES = torch.tensor([2.0, -1.0, 0.5])
GOLD_GRAD = torch.tensor([-0.5, 0.5, 0.25, -0.25, 0.0, 1.0, 0.0, -0.25, 0.0, 0.25])


def gold_segment(backend, momentum=None, scale_prev=0.0):
    return segment_from_mask(
        GOLD_MASK,
        GOLD_VALUES,
        GOLD_GRAD,
        momentum,
        scale_prev=scale_prev,
        device=device_of(backend),
    )


def test_golden_layout():
    bits = pack_bits(GOLD_MASK)
    assert bits.tolist() == [0b00010010, 0b00000010]
    assert group_pointers(bits, 10).tolist() == [0, 3]


@pytest.mark.parametrize("backend", implementations("materialize"))
@pytest.mark.parametrize("scale", [0.0, 1.0, 0.37, 0.5])
def test_golden_materialize(poison, backend, scale):
    seg = gold_segment(backend)
    fn = implementation(backend, "materialize", {F32})
    out = fn(SEED, BOUND, scale, seg.values, seg.bits, seg.group_ptr, 10, F32)
    u = philox_uniform(SEED, torch.arange(10, dtype=torch.int32))
    w0 = (2.0 * u - 1.0) * torch.tensor(BOUND)
    assert torch.equal(w0, init_values(SEED, 10, BOUND))
    want = w0 * torch.tensor(scale) if scale else torch.zeros(10)
    want[[1, 4, 9]] = GOLD_VALUES
    assert out.device.type == device_of(backend).type
    assert_same(out, want)
    if scale == 0.0:
        assert out.cpu().tolist() == [0, 2, 0, 0, -1, 0, 0, 0, 0, 0.5]
        assert not torch.signbit(out.cpu()[out.cpu() == 0]).any()  # +0, as torch.zeros


@pytest.mark.parametrize("backend", implementations("compact"))
def test_golden_compact_without_momentum(poison, backend):
    # scale 0 (no init term), lr 1: c = W - g and s = |c|, all exact in float32:
    #   s = [0.5, 1.5, 0.25, 0.25, 1, 1, 0, 0.25, 0, 0.25]
    seg = gold_segment(backend)
    p = StepParams(lr=1.0, momentum=0.0, weight_decay=0.0, scale=0.0)
    res = implementation(backend, "compact", {F32})(seg, p, 0.25, tie_quota=2, with_histogram=True)
    # above 0.25: 0, 1, 4, 5; ties at 0.25: 2, 3, 7, 9 of which the first two are kept
    assert res.values.cpu().tolist() == [0.5, 1.5, -0.25, 0.25, -1.0, -1.0]
    assert res.bits.cpu().tolist() == [0b00111111, 0]
    assert res.group_ptr.cpu().tolist() == [0, 6]
    assert res.ties_used == 2 and res.momentum is None
    scores = torch.tensor([0.5, 1.5, 0.25, 0.25, 1, 1, 0, 0.25, 0, 0.25])
    assert torch.equal(res.histogram.cpu(), score_histogram(scores))
    if has(backend, "scores"):
        assert_same(implementation(backend, "scores", {F32})(seg, p).cpu(), scores)
    hist = implementation(backend, "log_histogram", {F32})(seg, p)
    assert torch.equal(hist.cpu(), score_histogram(scores))
    radix = implementation(backend, "radix_histogram", {F32})
    high = radix(seg, p).cpu()
    assert {int(b): int(high[b]) for b in high.nonzero().flatten()} == {
        0: 2,  # 0.0
        0x3E80: 4,  # 0.25
        0x3F00: 1,  # 0.5
        0x3F80: 2,  # 1.0
        0x3FC0: 1,  # 1.5
    }
    low = radix(seg, p, 0x3E80).cpu()
    assert low[0] == 4 and low.sum() == 4


@pytest.mark.parametrize("backend", implementations("compact"))
def test_golden_compact_with_momentum(poison, backend):
    # momentum 0.5 with buffer [1, 2, 4] on elements 1, 4, 9:
    #   m[1] = 0.5 + 0.5 = 1, m[4] = 1 + 0 = 1, m[9] = 2 + 0.25 = 2.25, elsewhere m = g
    #   c = [0.5, 1, -0.25, 0.25, -2, -1, 0, 0.25, 0, -1.75], s = |c|
    seg = gold_segment(backend, torch.tensor([1.0, 2.0, 4.0]))
    p = StepParams(lr=1.0, momentum=0.5, weight_decay=0.0, scale=0.0)
    res = implementation(backend, "compact", {F32})(seg, p, 0.25, tie_quota=1)
    # above 0.25: 0, 1, 4, 5, 9; ties at 0.25: 2, 3, 7 of which the first is kept
    assert res.values.cpu().tolist() == [0.5, 1.0, -0.25, -2.0, -1.0, -1.75]
    assert res.momentum.cpu().tolist() == [-0.5, 1.0, 0.25, 1.0, 1.0, 2.25]
    assert res.bits.cpu().tolist() == [0b00110111, 0b00000010]
    assert res.group_ptr.cpu().tolist() == [0, 6]
    assert res.ties_used == 1 and res.histogram is None


@pytest.mark.parametrize("backend", implementations("compact"))
def test_golden_compact_of_new_entries(poison, backend):
    # bound 0: w0 = 0, nothing tracked, lr 1 -> c = -g and s = |g| exactly; no buffer, so the
    # momentum of a new entry is m = g.
    grad = torch.tensor([0.5, -3.0, 1.0, 2.0, 0.0, -2.0, 7.0, 0.25, 2.0, -1.0])
    seg = segment_from_mask(
        torch.zeros(10, dtype=torch.bool),
        torch.zeros(0),
        grad,
        seed=3,
        bound=0.0,
        device=device_of(backend),
    )
    p = StepParams(lr=1.0, momentum=0.9, weight_decay=0.0, scale=1.0)
    if has(backend, "scores"):
        assert_same(implementation(backend, "scores", {F32})(seg, p).cpu(), grad.abs())
    compact = implementation(backend, "compact", {F32})
    # Above 2: elements 1 and 6; one tie at 2 allowed: the lowest index, 3 (not 5 or 8).
    out = compact(seg, p, 2.0, tie_quota=1)
    assert_same(out.values.cpu(), torch.tensor([3.0, -2.0, -7.0]))
    assert_same(out.momentum.cpu(), torch.tensor([-3.0, 2.0, 7.0]))
    assert_same(out.bits.cpu(), torch.tensor([0b0100_1010, 0], dtype=torch.uint8))
    assert_same(out.group_ptr.cpu(), torch.tensor([0, 3]))
    assert out.ties_used == 1
    many = compact(seg, p, 2.0, tie_quota=10)
    assert many.ties_used == 3 and many.kept == 5
    none = compact(seg, p, 2.0)
    assert none.kept == 2 and none.ties_used == 0


@pytest.mark.parametrize("backend", implementations("radix_histogram"))
def test_golden_histograms(poison, backend):
    grad = torch.tensor([1.0, 0.0, 1.5, 1.0, 2.0**-60, 3.0e38])
    seg = segment_from_mask(
        torch.zeros(6, dtype=torch.bool),
        torch.zeros(0),
        grad,
        seed=0,
        bound=0.0,
        device=device_of(backend),
    )
    p = StepParams(lr=1.0, momentum=0.0, weight_decay=0.0, scale=1.0)
    radix = implementation(backend, "radix_histogram", {F32})
    high = radix(seg, p).cpu()
    assert high.shape == (RADIX_HIGH_BINS,) and high.dtype == torch.int64
    # 1.0 = 0x3F800000, 1.5 = 0x3FC00000: upper 15 bits 0x3F80 and 0x3FC0.
    assert high[0x3F80] == 2 and high[0x3FC0] == 1 and high[0] == 1 and int(high.sum()) == 6
    low = radix(seg, p, 0x3F80).cpu()
    assert low.shape == (RADIX_LOW_BINS,) and low[0] == 2 and int(low.sum()) == 2
    hist = implementation(backend, "log_histogram", {F32})(seg, p).cpu()
    assert hist.shape == (HIST_BINS,) and hist.dtype == torch.int64
    # 1.0: (0x3F800000 >> 18) - (87 << 5) = 4064 - 2784 = 1280; 0 and 2**-60 clamp to bin 0,
    # 3e38 to the last bin.
    assert hist[1280] == 2 and hist[0] == 2 and hist[-1] == 1 and int(hist.sum()) == 6


@pytest.mark.parametrize("backend", implementations("paper_walk"))
def test_golden_paper_walk(backend):
    scores = torch.tensor([0.5, 0.001, 0.02], device=device_of(backend))
    mask, theta = implementation(backend, "paper_walk", {F32})(scores, 0.01, 0.5, 1)
    q = 1.0 - 1 / 3
    up, down = 1.0 + 0.5 * q, 1.0 - 0.5 * (1.0 - q)
    # 0.5 > 0.01 kept; 0.001 < 0.0133 not; 0.02 > 0.0111 kept.
    assert mask.tolist() == [True, False, True]
    assert theta == 0.01 * up * down * up


# ------------------------------------------------------------------------ golden: compute ops

# W = [[0, 2, 0], [0, 0, -1]]: flat elements 1 and 5 tracked.
GOLD_W_MASK = torch.tensor([[0, 1, 0], [0, 0, 1]], dtype=torch.bool)
GOLD_W_VALUES = torch.tensor([2.0, -1.0])


@pytest.mark.parametrize("backend", implementations("sparse_linear"))
def test_golden_sparse_linear(poison, backend):
    dev = device_of(backend)
    values, bits, index = compressed_weight(GOLD_W_MASK, GOLD_W_VALUES, device=dev)
    assert bits.tolist() == [0b00100010] and index.nnz == 2
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], device=dev)
    lin = implementation(backend, "sparse_linear")
    assert lin(x, values, bits, index).tolist() == [[4.0, -3.0], [10.0, -6.0]]
    bias = torch.tensor([0.5, 1.0], device=dev)
    assert lin(x, values, bits, index, bias).tolist() == [[4.5, -2.0], [10.5, -5.0]]


@pytest.mark.parametrize("backend", implementations("sparse_linear_t"))
def test_golden_sparse_linear_t(poison, backend):
    dev = device_of(backend)
    values, bits, index = compressed_weight(GOLD_W_MASK, GOLD_W_VALUES, device=dev)
    dy = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=dev)
    dx = implementation(backend, "sparse_linear_t")(dy, values, bits, index)
    assert dx.tolist() == [[0.0, 2.0, -2.0], [0.0, 6.0, -4.0]]


def conv_gold_1x1(dev):
    # W[n, c] = [[2, .], [0.5, -1]] (W[0, 1] untracked); storage order (n, c): values [2, 0.5, -1]
    mask = torch.tensor([1, 0, 1, 1], dtype=torch.bool)
    return compressed_weight(mask, torch.tensor([2.0, 0.5, -1.0]), rows=2, cols=2, device=dev)


def conv_gold_tap(dev):
    # One tracked tap, (r, s) = (0, 2), value 3, of a 3x3 kernel.
    mask = torch.zeros(9, dtype=torch.bool)
    mask[0 * 3 + 2] = True
    return compressed_weight(mask, torch.tensor([3.0]), rows=1, cols=1, ksize=9, device=dev)


@pytest.mark.parametrize("backend", implementations("sparse_conv2d"))
def test_golden_sparse_conv2d(poison, backend):
    dev = device_of(backend)
    conv = implementation(backend, "sparse_conv2d")
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]], device=dev)  # [1, 2, 1, 2]
    bias = torch.tensor([1.0, -1.0], device=dev)
    y = conv(x, *conv_gold_1x1(dev), (1, 1), bias=bias)
    # y0 = 2 * x0 + 1, y1 = 0.5 * x0 - x1 - 1
    assert y.cpu().tolist() == [[[[3.0, 5.0]], [[-3.5, -4.0]]]]
    # padding 1: y[i, j] = 3 * x[i - 1, j + 1].
    x = torch.arange(1.0, 13.0, device=dev).view(1, 1, 3, 4)
    y = conv(x, *conv_gold_tap(dev), (3, 3), padding=(1, 1)).cpu()
    want = torch.zeros(1, 1, 3, 4)
    want[..., 1:, :-1] = 3 * x.cpu()[..., :-1, 1:]
    assert torch.equal(y, want)


@pytest.mark.parametrize("backend", implementations("sparse_conv2d_t"))
def test_golden_sparse_conv2d_t(poison, backend):
    dev = device_of(backend)
    conv_t = implementation(backend, "sparse_conv2d_t")
    dy = torch.tensor([[[[1.0, 1.0]], [[1.0, -1.0]]]], device=dev)
    dx = conv_t(dy, *conv_gold_1x1(dev), (1, 2), (1, 1))
    # dx0 = 2 * dy0 + 0.5 * dy1, dx1 = -dy1
    assert dx.cpu().tolist() == [[[[2.5, 1.5]], [[-1.0, 1.0]]]]
    # dx[i, j] = 3 * dy[i + 1, j - 1]
    dy = torch.arange(1.0, 13.0, device=dev).view(1, 1, 3, 4) * 0.5
    dx = conv_t(dy, *conv_gold_tap(dev), (3, 4), (3, 3), padding=(1, 1)).cpu()
    want = torch.zeros(1, 1, 3, 4)
    want[..., :-1, 1:] = 3 * dy.cpu()[..., 1:, :-1]
    assert torch.equal(dx, want)


# ---------------------------------------------------------------------- random: update ops


@pytest.mark.parametrize("backend,n,dtype,flags", update_cases("materialize", turns=True))
def test_materialize(poison, backend, n, dtype, flags):
    ref_seg, seg, _ = segments(backend, n, dtype, flags)
    fn = implementation(backend, "materialize", {dtype})
    for scale in (1.0, 0.9**7, 0.0):
        args = (seg.seed, seg.bound, scale, seg.values, seg.bits, seg.group_ptr, n, dtype)
        want = update_ref.materialize(SEED, BOUND, scale, *_storage(ref_seg), n, dtype)
        out = fn(*args)
        assert out.device.type == seg.values.device.type
        assert_same(out, want, f"scale {scale}")
    if dtype in (F16, BF16):  # half output from float32 values
        ref_seg, seg, _ = segments(backend, n, F32, flags)
        fn = implementation(backend, "materialize", {F32, dtype})
        out = fn(seg.seed, seg.bound, 0.37, *_storage(seg), n, dtype)
        assert_same(out, update_ref.materialize(SEED, BOUND, 0.37, *_storage(ref_seg), n, dtype))


def _storage(seg):
    return seg.values, seg.bits, seg.group_ptr


@pytest.mark.parametrize("backend", backends_with("materialize"))
def test_materialize_negative_and_small_seeds(poison, backend):
    ref_seg = random_segment(300, density=0.2)
    seg = segment_to(ref_seg, device_of(backend))
    fn = implementation(backend, "materialize", {F32})
    for seed in (-3, 1, 2**63 - 1):
        want = update_ref.materialize(seed, BOUND, 1.0, *_storage(ref_seg), 300, F32)
        assert_same(fn(seed, BOUND, 1.0, *_storage(seg), 300, F32), want, f"seed {seed}")


@pytest.mark.parametrize("backend,n,dtype,flags", update_cases("scores"))
def test_scores(poison, backend, n, dtype, flags):
    ref_seg, seg, p = segments(backend, n, dtype, flags)
    got = implementation(backend, "scores", seg.dtypes)(seg, p)
    c, m, want, _ = update_ref.candidates(ref_seg, p)
    assert got.device.type == device_of(backend).type
    TOLERANCES[backend].assert_scores(got, want, c, m, p.lr)
    f = FLAG_SETS[flags]
    if f.zero_grads and p.weight_decay == 0 and f.scale_prev == p.scale and n >= 255:
        assert int((want == 0).sum()) > 0, "the case should have zero scores"


def own_scores(backend, seg, ref_seg, p) -> tuple[torch.Tensor, int]:
    """The backend's own scores (on the CPU) and how many differ from the reference's."""
    want = update_ref.scores(ref_seg, p)
    if TOLERANCES[backend].scores is None:
        return want, 0  # the same bits (test_scores)
    assert has(backend, "scores"), f"{backend}: inexact scores that no op returns"
    got = implementation(backend, "scores", seg.dtypes)(seg, p).cpu()
    return got, int((got.view(torch.int32) != want.view(torch.int32)).sum())


@pytest.mark.parametrize("backend,n,dtype,flags", update_cases("log_histogram"))
def test_log_histogram(poison, backend, n, dtype, flags):
    ref_seg, seg, p = segments(backend, n, dtype, flags)
    got = implementation(backend, "log_histogram", seg.dtypes)(seg, p)
    assert got.shape == (HIST_BINS,) and got.dtype == torch.int64
    s, moved = own_scores(backend, seg, ref_seg, p)
    assert_histogram(got, update_ref.log_histogram(ref_seg, p), score_histogram(s), moved)


@pytest.mark.parametrize("backend,n,dtype,flags", update_cases("radix_histogram"))
def test_radix_histogram(poison, backend, n, dtype, flags):
    ref_seg, seg, p = segments(backend, n, dtype, flags)
    radix = implementation(backend, "radix_histogram", seg.dtypes)
    s, moved = own_scores(backend, seg, ref_seg, p)
    bits = s.view(torch.int32).long()
    want = update_ref.radix_histogram(ref_seg, p)
    high = radix(seg, p)
    assert high.shape == (RADIX_HIGH_BINS,) and high.dtype == torch.int64
    own = torch.bincount(bits >> 16, minlength=RADIX_HIGH_BINS)
    assert_histogram(high, want, own, moved, "upper bits")
    nonzero = torch.nonzero(want).flatten()
    # The bin of the largest score, a middle one, and one no score falls into (a NaN pattern).
    for b in {int(nonzero[-1]), int(nonzero[len(nonzero) // 2]), RADIX_HIGH_BINS - 1}:
        low = radix(seg, p, b)
        assert low.shape == (RADIX_LOW_BINS,) and low.dtype == torch.int64
        own = torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=RADIX_LOW_BINS)
        want_low = update_ref.radix_histogram(ref_seg, p, b)
        assert_histogram(low, want_low, own, moved, f"lower bits of {b:#x}")
        assert int(low.sum()) == int(high[b].cpu()), f"lower bits of {b:#x}"


@pytest.mark.parametrize("backend,n,dtype,flags", update_cases("compact"))
def test_compact(poison, backend, n, dtype, flags):
    ref_seg, seg, p = segments(backend, n, dtype, flags)
    tol = TOLERANCES[backend]
    compact = implementation(backend, "compact", seg.dtypes)
    s = update_ref.scores(ref_seg, p)
    # A threshold in a gap between scores: no ulp of a score decides what is kept (with and
    # without counting ties and the histogram; a quota without ties at the threshold adds none) ...
    gap = gap_threshold(s, 0.7)
    runs = [(gap, 0, False), (gap, 3, True)]
    if tol.ties_at_scores:  # ... and, for a bit-for-bit backend, a score itself (with its ties).
        thr = threshold_with_ties(s)
        runs = [(gap, 0, True)] + [
            (thr, quota, hist) for quota in (0, 1, 3) for hist in (False, True)
        ]
    own, moved = own_scores(backend, seg, ref_seg, p)
    for thr, quota, hist in runs:
        where = f"threshold {thr} quota {quota} histogram {hist}"
        got = compact(seg, p, thr, quota, hist)
        want = update_ref.compact(ref_seg, p, thr, quota, hist)
        if hist:  # as in test_log_histogram, then out of the comparison below
            assert_histogram(got.histogram, want.histogram, score_histogram(own), moved, where)
            got, want = replace(got, histogram=None), replace(want, histogram=None)
        tol.assert_compacted(got, want, dtype, where)


@pytest.mark.parametrize(
    "backend,n", [(b, n) for b in backends_with("compact") for n in (257, 4099)]
)
def test_compact_tie_quota_follows_flat_order(poison, backend, n):
    # Values and gradients on a grid, bound 0, lr 1, no buffer: every score is exact on every
    # backend and takes a handful of values, so every threshold has many ties spread over many
    # groups; the quota must go to the lowest flat indices across them.
    p = StepParams(lr=1.0, momentum=0.9, weight_decay=0.0, scale=1.0)
    ref_seg = random_segment(n, grid=0.25, momentum=False, bound=0.0, rng=4)
    seg = segment_to(ref_seg, device_of(backend))
    compact = implementation(backend, "compact", {F32})
    s = update_ref.scores(ref_seg, p)
    for thr in (0.5, 1.0):
        ties = int((s == thr).sum())
        assert ties > GROUP_SIZE // 8, f"the case should have ties at {thr}"
        for quota in (0, 1, GROUP_SIZE + 3, ties // 2, ties, ties + 5, 10**6):
            got = compact(seg, p, thr, quota)
            want = update_ref.compact(ref_seg, p, thr, quota)
            TOLERANCES[backend].assert_compacted(got, want, F32, f"thr={thr} quota={quota}")
            assert got.ties_used == min(quota, ties)


@pytest.mark.parametrize("backend", backends_with("compact"))
def test_compact_keeps_nothing_or_everything(poison, backend):
    ref_seg = random_segment(257)
    seg = segment_to(ref_seg, device_of(backend))
    p = StepParams(lr=0.1, momentum=0.9, weight_decay=0.0, scale=1.0)
    compact = implementation(backend, "compact", {F32})
    for thr, quota in ((float("inf"), 0), (float("inf"), 5), (-1.0, 0)):
        got = compact(seg, p, thr, quota)
        assert got.kept == (0 if thr > 0 else 257)
        TOLERANCES[backend].assert_compacted(got, update_ref.compact(ref_seg, p, thr, quota), F32)


@pytest.mark.parametrize("backend,n,dtype,flags", update_cases("compact_mask"))
def test_compact_mask(poison, backend, n, dtype, flags):
    ref_seg, seg, p = segments(backend, n, dtype, flags)
    keep = torch.rand(n) < 0.25
    got = implementation(backend, "compact_mask", seg.dtypes)(seg, p, keep.to(seg.grad.device))
    want = update_ref.compact_mask(ref_seg, p, keep)
    TOLERANCES[backend].assert_compacted(got, want, dtype)


@pytest.mark.parametrize("backend,n,dtype", update_cases("paper_walk", flags=False))
def test_paper_walk_matches_the_selector(backend, n, dtype):
    # The quantile_paper selector's own walk (the reference), two steps carrying theta.
    scores = (torch.randn(n).abs() * 0.02).to(dtype)
    walk = implementation(backend, "paper_walk", {dtype})
    selector = PaperQuantileSelector()
    for step, k in enumerate((max(1, n // 10), max(1, n // 3))):
        with ops.use_backend("reference"):
            expected, state = selector.step(scores * (1 + step), k)
        given = (scores * (1 + step)).to(device_of(backend))
        mask, theta = walk(given, selector.theta, selector.lam, k)
        assert mask.device == given.device
        assert_same(mask.cpu(), expected.cpu())
        assert theta == state["theta"]
        selector.load_state_dict(state)  # the next step carries theta


@pytest.mark.parametrize("backend", TESTED)
def test_empty_segment(poison, backend):
    ref_seg = random_segment(0)
    seg = segment_to(ref_seg, device_of(backend))
    p = FLAG_SETS["momentum_wd_decay"].params
    calls = {
        "materialize": lambda s: (s.seed, s.bound, 0.5, *_storage(s), 0, F32),
        "scores": lambda s: (s, p),
        "log_histogram": lambda s: (s, p),
        "radix_histogram": lambda s: (s, p),
        "compact": lambda s: (s, p, 0.01, 2, True),
        "compact_mask": lambda s: (s, p, torch.zeros(0, dtype=torch.bool, device=s.grad.device)),
    }
    for op in ops.backend_ops(backend):
        if op in calls:
            got = implementation(backend, op, {F32})(*calls[op](seg))
            assert_same(got, REFERENCE[op](*calls[op](ref_seg)), op)


# --------------------------------------------------------------------- random: compute ops

# m (batch), rows, cols, density; float32 inputs and values.
LINEAR_SHAPES = [
    (1, 1, 1, 1.0),
    (3, 5, 7, 0.5),
    (37, 33, 45, 0.3),
    (3, 70, 100, 0.1),
    (37, 70, 1, 0.6),
    (1, 1, 100, 0.4),
    (37, 5, 45, 0.05),
    (3, 33, 7, 1.0),
]
# B, C, H, W, N, kernel, stride, padding, dilation, groups, density, bias
CONV_SHAPES = {
    "1x1": (2, 3, 5, 7, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1, 0.5, True),
    "3x3_pad": (2, 6, 5, 7, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 0.3, True),
    "5x3_pad": (1, 4, 5, 7, 3, (5, 3), (1, 1), (2, 1), (1, 1), 1, 0.5, True),
    "3x3_stride2": (2, 5, 5, 7, 6, (3, 3), (2, 2), (1, 1), (1, 1), 1, 0.4, True),
    "3x3_stride2_nopad": (1, 3, 6, 7, 4, (3, 3), (2, 2), (0, 0), (1, 1), 1, 0.6, True),
    "3x3_dil2": (1, 3, 5, 7, 4, (3, 3), (2, 1), (2, 2), (2, 2), 1, 0.5, True),
    "1x3_asym": (1, 3, 5, 7, 4, (1, 3), (1, 2), (0, 3), (1, 2), 1, 0.5, True),
    "groups2_multitile": (1, 36, 3, 5, 34, (3, 3), (1, 1), (1, 1), (1, 1), 2, 0.2, True),
    "depthwise": (2, 4, 5, 7, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, 0.6, True),
    "depthwise_x2": (1, 3, 5, 7, 6, (3, 3), (2, 2), (1, 1), (1, 1), 3, 0.6, True),
    "full_density": (1, 5, 5, 7, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1.0, True),
    "sparse_0.05": (1, 20, 5, 7, 18, (3, 3), (1, 1), (0, 1), (1, 1), 1, 0.05, True),
    "1x1-nobias": (2, 3, 5, 7, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1, 0.5, False),
    "3x3_stride2-nobias": (2, 5, 5, 7, 6, (3, 3), (2, 2), (1, 1), (1, 1), 1, 0.4, False),
    "groups2_multitile-nobias": (1, 36, 3, 5, 34, (3, 3), (1, 1), (1, 1), (1, 1), 2, 0.2, False),
}
LINEAR_DTYPE_SHAPE = (37, 33, 45, 0.4)  # every (input, values) dtype pair on this one
CONV_DTYPE_SHAPE = (2, 6, 5, 7, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 0.4, True)


def compute_cases(op: str, shapes: dict, dtype_shape) -> list:
    """``(backend, shape, input dtype, values dtype)``: every shape in float32, and every pair of
    the backend's dtypes on ``dtype_shape``."""
    cases = []
    for backend in backends_with(op):
        for name, shape in shapes.items():
            cases.append(pytest.param(backend, shape, F32, F32, id=f"{backend}-{name}"))
        for xd, vd in itertools.product(INPUTS[backend].compute_dtypes, repeat=2):
            if (xd, vd) != (F32, F32):
                ids = f"{backend}-x_{dtype_name(xd)}-values_{dtype_name(vd)}"
                cases.append(pytest.param(backend, dtype_shape, xd, vd, id=ids))
    return cases


LINEAR = {f"{m}x{r}x{c}-{d}": (m, r, c, d) for m, r, c, d in LINEAR_SHAPES}


def linear_inputs(backend, shape, vd):
    m, rows, cols, density = shape
    weight = compressed_weight(
        random_mask(rows, cols, density),
        seed=rows + cols,
        values_dtype=vd,
        device=device_of(backend),
    )
    return m, weight


def on_cpu(values, bits, index):
    return values.cpu(), bits.cpu(), index_to(index, "cpu")


@pytest.mark.parametrize(
    "backend,shape,xd,vd", compute_cases("sparse_linear", LINEAR, LINEAR_DTYPE_SHAPE)
)
def test_sparse_linear(poison, backend, shape, xd, vd):
    m, weight = linear_inputs(backend, shape, vd)
    index = weight[2]
    dev = device_of(backend)
    x = torch.randn(m, index.cols).to(xd).to(dev)
    bias = torch.randn(index.rows).to(F32 if xd == vd == F32 else F16).to(dev)  # added in float32
    y = implementation(backend, "sparse_linear")(x, *weight, bias)
    want = compute_ref.sparse_linear(x.cpu(), *on_cpu(*weight), bias.cpu())
    assert y.dtype == xd and y.device == x.device
    TOLERANCES[backend].assert_compute(y, want)


@pytest.mark.parametrize(
    "backend,shape,xd,vd", compute_cases("sparse_linear_t", LINEAR, LINEAR_DTYPE_SHAPE)
)
def test_sparse_linear_t(poison, backend, shape, xd, vd):
    m, weight = linear_inputs(backend, shape, vd)
    dy = torch.randn(m, weight[2].rows).to(xd).to(device_of(backend))
    dx = implementation(backend, "sparse_linear_t")(dy, *weight)
    want = compute_ref.sparse_linear_t(dy.cpu(), *on_cpu(*weight))
    assert dx.dtype == xd and dx.device == dy.device
    TOLERANCES[backend].assert_compute(dx, want)


def conv_inputs(backend, shape, xd, vd):
    b, c, h, w, n, ks, st, pd, dl, groups, density, bias = shape
    dev = device_of(backend)
    weight = random_weight(
        n, c // groups, ks[0] * ks[1], groups, density, values_dtype=vd, device=dev
    )
    x = torch.randn(b, c, h, w).to(xd).to(dev)
    bias_t = torch.randn(n).to(vd).to(dev) if bias else None
    return x, weight, (ks, st, pd, dl), bias_t


@pytest.mark.parametrize(
    "backend,shape,xd,vd", compute_cases("sparse_conv2d", CONV_SHAPES, CONV_DTYPE_SHAPE)
)
def test_sparse_conv2d(poison, backend, shape, xd, vd):
    x, weight, geo, bias = conv_inputs(backend, shape, xd, vd)
    y = implementation(backend, "sparse_conv2d")(x, *weight, *geo, bias)
    cpu_bias = None if bias is None else bias.cpu()
    want = compute_ref.sparse_conv2d(x.cpu(), *on_cpu(*weight), *geo, cpu_bias)
    assert y.dtype == xd and y.device == x.device and y.is_contiguous()
    TOLERANCES[backend].assert_compute(y, want)


@pytest.mark.parametrize(
    "backend,shape,xd,vd", compute_cases("sparse_conv2d_t", CONV_SHAPES, CONV_DTYPE_SHAPE)
)
def test_sparse_conv2d_t(poison, backend, shape, xd, vd):
    x, weight, geo, _ = conv_inputs(backend, shape, xd, vd)
    out_shape = compute_ref.sparse_conv2d(x.cpu(), *on_cpu(*weight), *geo).shape
    dy = torch.randn(out_shape).to(xd).to(x.device)
    hw = tuple(x.shape[2:])
    dx = implementation(backend, "sparse_conv2d_t")(dy, *weight, hw, *geo)
    want = compute_ref.sparse_conv2d_t(dy.cpu(), *on_cpu(*weight), hw, *geo)
    assert dx.dtype == xd and dx.device == dy.device and dx.is_contiguous()
    TOLERANCES[backend].assert_compute(dx, want)


@pytest.mark.parametrize("backend", implementations("sddmm_linear"))
def test_golden_sddmm_linear(poison, backend):
    dev = device_of(backend)
    values, bits, index = compressed_weight(GOLD_W_MASK, GOLD_W_VALUES, device=dev)
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], device=dev)
    dy = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=dev)
    got = implementation(backend, "sddmm_linear")(x, dy, values, bits, index)
    want = (dy.t() @ x).reshape(-1)[GOLD_W_MASK.reshape(-1).to(dev)]
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("backend", implementations("sddmm_conv2d"))
def test_golden_sddmm_conv2d(poison, backend):
    # One 2x2 kernel with (0, 0) and (1, 1) tracked on the image 1..9: dW sums 2x2 windows.
    dev = device_of(backend)
    mask = torch.tensor([1, 0, 0, 1], dtype=torch.bool)
    values, bits, index = compressed_weight(
        mask, torch.tensor([1.0, 2.0]), rows=1, cols=1, ksize=4, device=dev
    )
    x = torch.arange(1.0, 10.0, device=dev).view(1, 1, 3, 3)
    dy = torch.ones(1, 1, 2, 2, device=dev)
    got = implementation(backend, "sddmm_conv2d")(x, dy, values, bits, index, (2, 2))
    assert got.tolist() == [12.0, 28.0]


@pytest.mark.parametrize(
    "backend,shape,xd,vd", compute_cases("sddmm_linear", LINEAR, LINEAR_DTYPE_SHAPE)
)
def test_sddmm_linear(poison, backend, shape, xd, vd):
    m, weight = linear_inputs(backend, shape, vd)
    index, dev = weight[2], device_of(backend)
    x = torch.randn(m, index.cols).to(xd).to(dev)
    dy = torch.randn(m, index.rows).to(xd).to(dev)
    got = implementation(backend, "sddmm_linear")(x, dy, *weight)
    want = compute_ref.sddmm_linear(x.cpu(), dy.cpu(), *on_cpu(*weight))
    assert got.shape == weight[0].shape and got.device == x.device
    TOLERANCES[backend].assert_compute(got, want)


@pytest.mark.parametrize(
    "backend,shape,xd,vd", compute_cases("sddmm_conv2d", CONV_SHAPES, CONV_DTYPE_SHAPE)
)
def test_sddmm_conv2d(poison, backend, shape, xd, vd):
    x, weight, geo, _ = conv_inputs(backend, shape, xd, vd)
    out_shape = compute_ref.sparse_conv2d(x.cpu(), *on_cpu(*weight), *geo).shape
    dy = torch.randn(out_shape).to(xd).to(x.device)
    got = implementation(backend, "sddmm_conv2d")(x, dy, *weight, *geo)
    want = compute_ref.sddmm_conv2d(x.cpu(), dy.cpu(), *on_cpu(*weight), *geo)
    assert got.shape == weight[0].shape and got.device == x.device
    TOLERANCES[backend].assert_compute(got, want)


# ------------------------------------------------------------ compute ops that regenerate w0
# With ``regen`` the untracked weights are ``scale * w0`` (DropBack, Procrustes before its decay),
# regenerated by the kernels from the seed: the backends whose modules say so (``regenerates``).


def regenerating(op: str) -> list[str]:
    return [b for b in implementations(op) if b == "reference" or ops.dispatch.regenerates(b)]


def test_regenerating_backends_are_declared():
    assert ops.dispatch.regenerates("triton") and ops.dispatch.regenerates("reference")
    assert not ops.dispatch.regenerates("cpp")  # its kernels read tracked weights only
    with ops.use_backend("cpp"):  # so a regenerating call runs the reference there
        fn = ops.kernel("sparse_linear", CPU, {F32}, regen=True)
    assert fn is compute_ref.sparse_linear


def regen_for(dev, scale=0.37, seed=2**63 + 12345, bound=0.6):
    return Regen(torch.tensor(scale, device=dev), seed, bound)


def effective_of(values, bits, index, regen):
    """The dense effective weight as ``materialize`` (the reference) writes it."""
    numel = index.rows * index.cols * index.ksize
    flat = update_ref.materialize(
        regen.seed,
        regen.bound,
        float(regen.scale),
        values.cpu(),
        bits.cpu(),
        group_pointers(bits.cpu(), numel),
        numel,
        values.dtype,
    )
    return flat.view(index.rows, -1)


@pytest.mark.parametrize("backend", regenerating("sparse_linear"))
def test_golden_regenerated_linear(poison, backend):
    """Multiplying by the identity gives back every weight: tracked values where tracked, the
    regenerated ``scale * w0`` elsewhere, bit for bit what ``materialize`` writes."""
    dev = device_of(backend)
    values, bits, index = compressed_weight(GOLD_W_MASK, GOLD_W_VALUES, device=dev)
    regen = regen_for(dev)
    w = effective_of(values, bits, index, regen)
    w0 = init_values(regen.seed, 6, regen.bound).view(2, 3)
    assert w[0, 1] == 2.0 and w[1, 2] == -1.0
    assert torch.equal(w[0, 0], w0[0, 0] * torch.tensor(0.37)) and w[0, 0] != 0.0
    eye = torch.eye(3, device=dev)
    y = implementation(backend, "sparse_linear")(eye, values, bits, index, regen=regen)
    assert_same(y.cpu(), w.t(), "x @ W^T with x = I")
    dx = implementation(backend, "sparse_linear_t")(
        torch.eye(2, device=dev), values, bits, index, regen=regen
    )
    assert_same(dx.cpu(), w, "dy @ W with dy = I")
    # scale 0 regenerates zeros: the plain kernels' result.
    zero = implementation(backend, "sparse_linear")(
        eye, values, bits, index, regen=regen_for(dev, 0.0)
    )
    assert_same(
        zero.cpu(),
        implementation("reference", "sparse_linear")(eye.cpu(), *on_cpu(values, bits, index)),
        "scale 0",
    )


@pytest.mark.parametrize("backend", regenerating("sparse_conv2d"))
def test_golden_regenerated_conv2d(poison, backend):
    """A one-hot input picks one kernel position of every weight: the regenerated weight."""
    dev = device_of(backend)
    values, bits, index = conv_gold_tap(dev)  # 1 x 1 x 3 x 3, one tracked tap (0, 2) = 3
    regen = regen_for(dev, 0.5, 99, 1.0)
    w = effective_of(values, bits, index, regen).view(3, 3)
    x = torch.zeros(1, 1, 3, 3, device=dev)
    x[0, 0, 1, 1] = 1.0  # with padding 1, output (i, j) reads x[i - 1 + r, j - 1 + s]
    y = implementation(backend, "sparse_conv2d")(
        x, values, bits, index, (3, 3), padding=(1, 1), regen=regen
    )
    assert_same(y.cpu()[0, 0], w.flip(0, 1), "conv of a one-hot input")
    dx = implementation(backend, "sparse_conv2d_t")(
        x, values, bits, index, (3, 3), (3, 3), padding=(1, 1), regen=regen
    )
    assert_same(dx.cpu()[0, 0], w, "input gradient of a one-hot output gradient")


def regen_cases(op: str, shapes: dict, dtype_shape) -> list:
    return [
        c for c in compute_cases(op, shapes, dtype_shape) if ops.dispatch.regenerates(c.values[0])
    ]


@pytest.mark.parametrize(
    "backend,shape,xd,vd", regen_cases("sparse_linear", LINEAR, LINEAR_DTYPE_SHAPE)
)
def test_regenerated_linear(poison, backend, shape, xd, vd):
    m, weight = linear_inputs(backend, shape, vd)
    dev = device_of(backend)
    regen = regen_for(dev, scale=0.81, seed=m * 1000 + weight[2].cols)
    x = torch.randn(m, weight[2].cols).to(xd).to(dev)
    bias = torch.randn(weight[2].rows).to(dev)
    y = implementation(backend, "sparse_linear")(x, *weight, bias, regen=regen)
    cpu_regen = regen._replace(scale=regen.scale.cpu())
    want = compute_ref.sparse_linear(x.cpu(), *on_cpu(*weight), bias.cpu(), regen=cpu_regen)
    assert y.dtype == xd
    TOLERANCES[backend].assert_compute(y, want)
    dy = torch.randn(m, weight[2].rows).to(xd).to(dev)
    dx = implementation(backend, "sparse_linear_t")(dy, *weight, regen=regen)
    want = compute_ref.sparse_linear_t(dy.cpu(), *on_cpu(*weight), regen=cpu_regen)
    TOLERANCES[backend].assert_compute(dx, want)


REGEN_CONV = {
    k: CONV_SHAPES[k]
    for k in (
        "1x1",
        "3x3_stride2",
        "3x3_dil2",
        "1x3_asym",
        "groups2_multitile",
        "depthwise_x2",
        "full_density",
    )
}


@pytest.mark.parametrize(
    "backend,shape,xd,vd", regen_cases("sparse_conv2d", REGEN_CONV, CONV_DTYPE_SHAPE)
)
def test_regenerated_conv2d(poison, backend, shape, xd, vd):
    x, weight, geo, bias = conv_inputs(backend, shape, xd, vd)
    regen = regen_for(x.device, scale=0.66, seed=x.numel())
    cpu_regen = regen._replace(scale=regen.scale.cpu())
    cpu_bias = None if bias is None else bias.cpu()
    y = implementation(backend, "sparse_conv2d")(x, *weight, *geo, bias, regen=regen)
    want = compute_ref.sparse_conv2d(x.cpu(), *on_cpu(*weight), *geo, cpu_bias, regen=cpu_regen)
    assert y.dtype == xd
    TOLERANCES[backend].assert_compute(y, want)
    dy = torch.randn(want.shape).to(xd).to(x.device)
    hw = tuple(x.shape[2:])
    dx = implementation(backend, "sparse_conv2d_t")(dy, *weight, hw, *geo, regen=regen)
    want = compute_ref.sparse_conv2d_t(dy.cpu(), *on_cpu(*weight), hw, *geo, regen=cpu_regen)
    TOLERANCES[backend].assert_compute(dx, want)


# ------------------------------------------------------------------------------- the optimizer
STEPS = 8


def train_on(backend, model, device, selection, scope, mu, wd, update="sgd"):
    """Eight steps of DropBack / Procrustes with every op on ``backend``; what is stored after
    each, and the optimizer's final extra state."""
    g = torch.Generator().manual_seed(5)
    opt = pk.DropBack(
        model.parameters(),
        lr=0.2 if update == "sgd" else 0.02,
        budget=0.1,
        momentum=mu,
        weight_decay=wd,
        update=update,
        init_decay=0.8,
        selection=selection,
        scope=scope,
        quantile_warmup=3,  # the later steps compact with the carried threshold and its histogram
    )
    history = []
    with ops.use_backend(backend):
        for _ in range(STEPS):
            x = torch.randn(24, 13, generator=g).to(device)
            y = torch.randint(0, 5, (24,), generator=g).to(device)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            assert len(opt.weights) == 2
            layers = [
                {
                    "bits": w.bits.cpu().clone(),
                    "group_ptr": w.group_ptr.cpu().clone(),
                    "values": w.values.cpu().clone(),
                    "momentum": opt.state[w].get(
                        "momentum_buffer" if update == "sgd" else "exp_avg_sq"
                    ),
                    "effective": w.effective().cpu(),
                }
                for w in opt.weights
            ]
            for layer in layers:
                if layer["momentum"] is not None:
                    layer["momentum"] = layer["momentum"].cpu().clone()
            history.append((layers, opt.tracked_count))
    return history, opt.state_dict()["dropback"]


@pytest.mark.parametrize("backend", TESTED)
@pytest.mark.parametrize("selection", ["topk", "quantile"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize(
    "mu,wd,update",
    [(0.0, 0.0, "sgd"), (0.9, 1e-3, "sgd"), (0.0, 1e-2, "adamw")],
    ids=["sgd", "momentum_wd", "adamw"],
)
def test_optimizer_matches_reference_backend(backend, selection, scope, mu, wd, update):
    torch.manual_seed(0)
    device = device_of(backend)
    model = pk.sparsify(mlp(13, 29, 5), seed=11).to(device)
    run = (device, selection, scope, mu, wd, update)
    got, got_state = train_on(backend, copy.deepcopy(model), *run)
    want, want_state = train_on("reference", model, *run)
    tol = TOLERANCES[backend]
    for step, ((g_layers, g_count), (w_layers, w_count)) in enumerate(zip(got, want)):
        assert g_count == w_count, f"step {step + 1}: tracked count {g_count} != {w_count}"
        for i, (g, w) in enumerate(zip(g_layers, w_layers)):
            where = f"step {step + 1}, layer {i}"
            assert_same(g["bits"], w["bits"], f"{where}: tracked sets")
            assert_same(g["group_ptr"], w["group_ptr"], f"{where}: group pointers")
            for key in ("values", "momentum", "effective"):
                assert (g[key] is None) == (w[key] is None), f"{where}: {key}"
                if w[key] is not None:
                    tol.assert_trained(g[key], w[key], f"{where}: {key}")
    assert got_state == want_state


# Every op and the tests that compare it (test_every_backend_is_available_and_covered).
OP_TESTS = {
    "materialize": (test_golden_materialize, test_materialize),
    "scores": (test_golden_compact_of_new_entries, test_scores),
    "log_histogram": (test_golden_histograms, test_log_histogram),
    "radix_histogram": (test_golden_histograms, test_radix_histogram),
    "compact": (test_golden_compact_without_momentum, test_compact),
    "compact_mask": (test_compact_mask,),
    "paper_walk": (test_golden_paper_walk, test_paper_walk_matches_the_selector),
    "sparse_linear": (test_golden_sparse_linear, test_sparse_linear),
    "sparse_linear_t": (test_golden_sparse_linear_t, test_sparse_linear_t),
    "sparse_conv2d": (test_golden_sparse_conv2d, test_sparse_conv2d),
    "sparse_conv2d_t": (test_golden_sparse_conv2d_t, test_sparse_conv2d_t),
    "sddmm_linear": (test_golden_sddmm_linear, test_sddmm_linear),
    "sddmm_conv2d": (test_golden_sddmm_conv2d, test_sddmm_conv2d),
}
