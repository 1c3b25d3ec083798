"""The C++ backend (procrustes_kernels._C through ops.update.cpp) against the PyTorch reference.

Golden cases with hand-checked answers first, then every op on fresh random storage of odd sizes,
bit for bit (the reference's own FMA behaviour is probed, so even the candidate values match
exactly), identical across thread counts and instruction sets, readable errors for bad inputs, the
paper's sequential walk, and whole optimizer runs on both backends.

The extension must be built (``python setup.py build_ext --inplace``): without it every test here
fails rather than skips, since CI builds it.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_close_verbose
from torch import nn

import procrustes_kernels as pk
from procrustes_kernels import ops
from procrustes_kernels.ops import use_backend
from procrustes_kernels.ops.contract import Compacted, Segment, StepParams
from procrustes_kernels.ops.update import reference as R
from procrustes_kernels.philox import init_values, philox_uniform
from procrustes_kernels.selection import HIST_BINS, PaperQuantileSelector
from procrustes_kernels.storage import GROUP_SIZE, group_pointers, pack_bits

try:
    from procrustes_kernels import _C
    from procrustes_kernels.ops.update import cpp as C

    _IMPORT_ERROR = None
except ImportError as err:  # reported by the autouse fixture below, as a failure
    _C = C = None
    _IMPORT_ERROR = err

SIZES = [1, 7, 255, 256, 257, 1000, 4099, 100_003]
PARAMS = {
    "sgd": StepParams(lr=0.3, momentum=0.0, weight_decay=0.0, scale=1.0),
    "momentum_wd_decay": StepParams(lr=0.1, momentum=0.9, weight_decay=5e-4, scale=0.81),
    "zero_scale": StepParams(lr=0.05, momentum=0.5, weight_decay=1e-3, scale=0.0),
}


@pytest.fixture(autouse=True)
def _cpp_backend():
    if C is None:
        pytest.fail(
            f"the C++ backend is not built ({_IMPORT_ERROR}); "
            "run `python setup.py build_ext --inplace` or `pip install -e .`"
        )
    yield
    C.set_num_threads(0)
    _C.set_simd_level(_C.max_simd_level())


# ------------------------------------------------------------------------------------- helpers
def make_segment(
    n: int,
    *,
    density: float = 0.3,
    dtype: torch.dtype = torch.float32,
    momentum: bool = True,
    seed: int = 1234,
    bound: float = 0.05,
    scale_prev: float = 0.9,
    integer_grads: bool = False,
    rng: int = 0,
) -> Segment:
    """Random consistent storage plus gradient; ``integer_grads`` with ``bound=0`` makes ties."""
    g = torch.Generator().manual_seed(rng * 100_003 + n)
    mask = torch.rand(n, generator=g) < density
    bits = pack_bits(mask)
    nv = int(mask.sum())
    values = (torch.randn(nv, generator=g) * 0.1).to(dtype)
    if integer_grads:
        grad = torch.randint(-3, 4, (n,), generator=g).to(dtype)
    else:
        grad = (torch.randn(n, generator=g) * 0.01).to(dtype)
    mom = (torch.randn(nv, generator=g) * 0.01).to(dtype) if momentum else None
    return Segment(
        seed=seed,
        bound=bound,
        numel=n,
        values=values,
        bits=bits,
        group_ptr=group_pointers(bits, n),
        grad=grad,
        momentum=mom,
        scale_prev=scale_prev,
    )


def assert_same(a, b, where=""):
    """Bit-identical results: tensors (dtype, shape, bits), Compacted, tuples, numbers."""
    if isinstance(a, Compacted):
        assert isinstance(b, Compacted)
        for f in ("values", "bits", "group_ptr", "momentum", "histogram"):
            assert_same(getattr(a, f), getattr(b, f), f"{where}.{f}")
        assert a.ties_used == b.ties_used, f"{where}: ties_used {a.ties_used} != {b.ties_used}"
    elif isinstance(a, tuple):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif a is None or b is None:
        assert a is None and b is None, f"{where}: {a!r} vs {b!r}"
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if a.is_floating_point():  # compare bit patterns: -0.0 vs 0.0 and NaNs count
            as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            same = (a.detach().view(as_int) == b.detach().view(as_int)).numpy()
        else:
            same = (a == b).numpy()
        if not same.all():
            bad = np.nonzero(~same)[0][:5].tolist()
            raise AssertionError(
                f"{where}: {int((~same).sum())} / {same.size} elements differ, first at {bad}: "
                f"{a[bad].tolist()} vs {b[bad].tolist()}"
            )
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def configs():
    """(threads, simd level) pairs to run under: both thread counts, every instruction set."""
    top = _C.max_simd_level()
    return [(1, top), (2, top)] + [(2, level) for level in range(top - 1, -1, -1)]


def on_every_config(fn):
    """fn() under every config; asserts the results are identical and returns the first."""
    results = []
    for threads, level in configs():
        C.set_num_threads(threads)
        _C.set_simd_level(level)
        results.append(fn())
    for (threads, level), r in zip(configs()[1:], results[1:]):
        assert_same(r, results[0], f"threads={threads} simd={level}")
    return results[0]


def threshold_with_ties(s: torch.Tensor, keep_frac: float = 0.1) -> float:
    """A score value near the top ``keep_frac`` quantile (so ties at it exist)."""
    ordered = s.sort().values
    return float(ordered[max(0, int(len(ordered) * (1 - keep_frac)) - 1)])


# ---------------------------------------------------------------------------------- golden cases
def test_philox_known_answer():
    # Random123's Philox4x32-10 known answer: counter 0, key 0 -> first word 0x6627e8d5.
    word = 0x6627E8D5  # positive as int32, so u = float32(word) * scale
    scale = np.float32(4.6566127342e-10)
    expected = np.float32(np.float32(word) * scale)
    u = C.philox_uniform(0, torch.tensor([0], dtype=torch.int64))
    assert u.dtype == torch.float32 and u.shape == (1,)
    assert u.item() == float(expected)
    w0 = C.materialize(
        0,
        1.0,
        1.0,
        torch.zeros(0),
        torch.zeros(1, dtype=torch.uint8),
        torch.zeros(2, dtype=torch.int64),
        1,
        torch.float32,
    )
    assert w0.item() == float(np.float32(np.float32(2.0) * expected - np.float32(1.0)))


def test_materialize_golden():
    # Elements 2 and 9 tracked with values 5 and -7; scale 0 leaves exact zeros elsewhere.
    bits = torch.tensor([0b0000_0100, 0b0000_0010], dtype=torch.uint8)
    ptr = torch.tensor([0, 2], dtype=torch.int64)
    vals = torch.tensor([5.0, -7.0])
    out = C.materialize(11, 0.3, 0.0, vals, bits, ptr, 10, torch.float32)
    expected = torch.zeros(10)
    expected[2], expected[9] = 5.0, -7.0
    assert_same(out, expected)
    assert not torch.signbit(out[out == 0]).any()  # +0, as the reference's torch.zeros
    half = C.materialize(11, 0.3, 0.5, vals, bits, ptr, 10, torch.float32)
    w0 = init_values(11, 10, 0.3)
    expected = w0 * torch.tensor(0.5)
    expected[2], expected[9] = 5.0, -7.0
    assert_same(half, expected)


def test_compact_golden():
    # bound 0: w0 = 0, nothing tracked, lr 1 -> c = -g and s = |g| exactly.
    grad = torch.tensor([0.5, -3.0, 1.0, 2.0, 0.0, -2.0, 7.0, 0.25, 2.0, -1.0])
    seg = Segment(
        seed=3,
        bound=0.0,
        numel=10,
        values=torch.zeros(0),
        bits=torch.zeros(2, dtype=torch.uint8),
        group_ptr=torch.zeros(2, dtype=torch.int64),
        grad=grad,
    )
    p = StepParams(lr=1.0, momentum=0.9, weight_decay=0.0, scale=1.0)
    assert_same(C.scores(seg, p), grad.abs())
    # Above 2: elements 1 and 6; one tie at 2 allowed: the lowest index, 3 (not 5 or 8).
    out = C.compact(seg, p, 2.0, tie_quota=1)
    assert_same(out.values, torch.tensor([3.0, -2.0, -7.0]))
    assert_same(out.momentum, torch.tensor([-3.0, 2.0, 7.0]))  # m = g for a new entry
    assert_same(out.bits, torch.tensor([0b0100_1010, 0], dtype=torch.uint8))
    assert_same(out.group_ptr, torch.tensor([0, 3]))
    assert out.ties_used == 1
    many = C.compact(seg, p, 2.0, tie_quota=10)
    assert many.ties_used == 3 and many.kept == 5
    none = C.compact(seg, p, 2.0)
    assert none.kept == 2 and none.ties_used == 0


def test_histograms_golden():
    grad = torch.tensor([1.0, 0.0, 1.5, 1.0, 2.0**-60, 3.0e38])
    seg = Segment(
        seed=0,
        bound=0.0,
        numel=6,
        values=torch.zeros(0),
        bits=torch.zeros(1, dtype=torch.uint8),
        group_ptr=torch.zeros(2, dtype=torch.int64),
        grad=grad,
    )
    p = StepParams(lr=1.0, momentum=0.0, weight_decay=0.0, scale=1.0)
    high = C.radix_histogram(seg, p)
    assert high.shape == (1 << 15,) and high.dtype == torch.int64
    # 1.0 = 0x3F800000, 1.5 = 0x3FC00000: upper 15 bits 0x3F80 and 0x3FC0.
    assert high[0x3F80] == 2 and high[0x3FC0] == 1 and high[0] == 1 and int(high.sum()) == 6
    low = C.radix_histogram(seg, p, 0x3F80)
    assert low.shape == (1 << 16,) and low[0] == 2 and int(low.sum()) == 2
    hist = C.log_histogram(seg, p)
    assert hist.shape == (HIST_BINS,)
    # 1.0: (0x3F800000 >> 18) - (87 << 5) = 4064 - 2784 = 1280; 0 and 2**-60 clamp to bin 0,
    # 3e38 to the last bin.
    assert hist[1280] == 2 and hist[0] == 2 and hist[-1] == 1 and int(hist.sum()) == 6


def test_paper_walk_golden():
    scores = torch.tensor([0.5, 0.001, 0.02])
    mask, theta = C.paper_walk(scores, 0.01, 0.5, 1)
    q = 1.0 - 1 / 3
    up, down = 1.0 + 0.5 * q, 1.0 - 0.5 * (1.0 - q)
    # 0.5 > 0.01 kept; 0.001 < 0.0133 not; 0.02 > 0.0111 kept.
    assert mask.tolist() == [True, False, True]
    assert theta == 0.01 * up * down * up


# ------------------------------------------------------------------------ random inputs vs reference
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
def test_philox_uniform_matches_reference(n, offsets_dtype):
    for seed in (0, -5, 2**63 + 12345) if n < 10_000 else (7,):
        offsets = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int64).to(offsets_dtype)
        if offsets_dtype == torch.int64:
            offsets[::3] += 2**40  # high counter words too
        assert_same(C.philox_uniform(seed, offsets), philox_uniform(seed, offsets), f"seed {seed}")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_materialize_matches_reference(n, dtype):
    seg = make_segment(n, dtype=dtype, density=0.2)
    for scale in (1.0, 0.9**7, 0.0):
        args = (seg.seed, seg.bound, scale, seg.values, seg.bits, seg.group_ptr, n, dtype)
        expected = R.materialize(*args)
        assert_same(on_every_config(lambda args=args: C.materialize(*args)), expected)


def test_materialize_offsets_cross_two_to_the_32():
    # A group whose offsets cross 2**32 takes the generators' carry path: checked through
    # philox_uniform, since a weight that large does not fit in a test.
    offsets = torch.arange(2**32 - 300, 2**32 + 300, dtype=torch.int64)
    assert_same(on_every_config(lambda: C.philox_uniform(99, offsets)), philox_uniform(99, offsets))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("params", list(PARAMS))
def test_update_ops_match_reference(n, params):
    p = PARAMS[params]
    seg = make_segment(n, rng=1)
    c, m, s, tracked = R.candidates(seg, p)
    assert_same(C.candidates(seg, p), (c, m, s, tracked), "candidates")
    assert_same(C.scores(seg, p), s, "scores")
    assert_same(C.log_histogram(seg, p), R.log_histogram(seg, p), "log_histogram")
    high = R.radix_histogram(seg, p)
    assert_same(C.radix_histogram(seg, p), high, "radix high")
    b = int(torch.nonzero(high)[-1])  # the bin of the largest score, and a middle one
    for bin_ in {b, int(torch.nonzero(high)[len(torch.nonzero(high)) // 2])}:
        assert_same(C.radix_histogram(seg, p, bin_), R.radix_histogram(seg, p, bin_), "radix low")
    thr = threshold_with_ties(s)
    for quota in (0, 1, 3):
        for hist in (False, True):
            assert_same(
                C.compact(seg, p, thr, quota, hist),
                R.compact(seg, p, thr, quota, hist),
                f"compact quota={quota} hist={hist}",
            )
    keep = torch.rand(n) < 0.25
    assert_same(C.compact_mask(seg, p, keep), R.compact_mask(seg, p, keep), "compact_mask")


@pytest.mark.parametrize("n", [1, 257, 4099])
def test_update_ops_float64_match_reference(n):
    p = PARAMS["momentum_wd_decay"]
    seg = make_segment(n, dtype=torch.float64, rng=2)
    c, m, s, tracked = R.candidates(seg, p)
    assert_same(C.candidates(seg, p), (c, m, s, tracked))
    assert_same(C.log_histogram(seg, p), R.log_histogram(seg, p))
    assert_same(C.radix_histogram(seg, p), R.radix_histogram(seg, p))
    thr = threshold_with_ties(s)
    assert_same(C.compact(seg, p, thr, 2, True), R.compact(seg, p, thr, 2, True))
    keep = torch.rand(n) < 0.5
    assert_same(C.compact_mask(seg, p, keep), R.compact_mask(seg, p, keep))


def test_update_ops_are_identical_on_every_config():
    n = 100_003
    p = PARAMS["momentum_wd_decay"]
    seg = make_segment(n, rng=3)
    s = R.scores(seg, p)
    thr = threshold_with_ties(s)
    assert_same(on_every_config(lambda: C.candidates(seg, p)), R.candidates(seg, p))
    assert_same(on_every_config(lambda: C.log_histogram(seg, p)), R.log_histogram(seg, p))
    assert_same(on_every_config(lambda: C.radix_histogram(seg, p)), R.radix_histogram(seg, p))
    assert_same(
        on_every_config(lambda: C.compact(seg, p, thr, 2, True)), R.compact(seg, p, thr, 2, True)
    )
    keep = torch.rand(n) < 0.1
    assert_same(on_every_config(lambda: C.compact_mask(seg, p, keep)), R.compact_mask(seg, p, keep))


@pytest.mark.parametrize("n", [257, 4099, 100_003])
def test_compact_tie_quota_in_flat_order(n):
    # bound 0 and integer gradients: scores take a handful of values, so every threshold has many
    # ties spread over many groups; the quota must go to the lowest flat indices across them.
    p = StepParams(lr=1.0, momentum=0.9, weight_decay=0.0, scale=1.0)
    seg = make_segment(n, bound=0.0, integer_grads=True, density=0.0, rng=4)
    s = R.scores(seg, p)
    for thr in (1.0, 2.0):
        ties = int((s == thr).sum())
        for quota in (0, 1, GROUP_SIZE + 3, ties // 2, ties, ties + 5):
            got = on_every_config(lambda thr=thr, quota=quota: C.compact(seg, p, thr, quota))
            assert_same(got, R.compact(seg, p, thr, quota), f"thr={thr} quota={quota}")
            assert got.ties_used == min(quota, ties)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_falls_back_to_reference(dtype):
    # The dispatcher sends what the kernels do not take to the reference, in one place; the
    # kernels themselves refuse it with a clear error.
    from procrustes_kernels import ops

    seg = make_segment(300, dtype=dtype)
    p = PARAMS["momentum_wd_decay"]
    with ops.use_backend("cpp"):
        for op in ("scores", "log_histogram", "compact", "compact_mask", "materialize"):
            assert ops.kernel(op, "cpu", {dtype}) is getattr(R, op)
        thr = threshold_with_ties(R.scores(seg, p))
        assert_same(ops.compact(seg, p, thr, 1, True), R.compact(seg, p, thr, 1, True))
        assert_same(ops.scores(seg, p), R.scores(seg, p))
    with pytest.raises(TypeError, match="one dtype, float32 or float64"):
        C.candidates(seg, p)
    with pytest.raises(TypeError, match="one dtype, float32 or float64"):
        C.compact(seg, p, 0.1, 1, True)
    args = (seg.seed, seg.bound, 0.5, seg.values, seg.bits, seg.group_ptr, 300, dtype)
    with pytest.raises(TypeError, match="both float32 or both float64"):
        C.materialize(*args)


def test_unfused_pytorch_build_is_matched_too():
    # PyTorch's generic (non-AVX) kernels round a.add(b, alpha=s) twice; the probe must see it and
    # the kernels must follow, bit for bit.
    root = pathlib.Path(__file__).resolve().parents[1]
    code = """
import torch
from procrustes_kernels.ops.update import cpp as C, reference as R
from procrustes_kernels.ops.contract import StepParams
import test_cpp_ops as T
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
assert not C._add_alpha_is_fused(torch.float32) and not C._add_alpha_is_fused(torch.float64)
p = StepParams(lr=0.1, momentum=0.9, weight_decay=5e-4, scale=0.81)
for dtype in (torch.float32, torch.float64):
    seg = T.make_segment(4099, dtype=dtype, rng=5)
    T.assert_same(C.candidates(seg, p), R.candidates(seg, p))
    thr = T.threshold_with_ties(R.scores(seg, p))
    T.assert_same(C.compact(seg, p, thr, 1, True), R.compact(seg, p, thr, 1, True))
    T.assert_same(C.compact(seg, p, thr, 0, True), R.compact(seg, p, thr, 0, True))
    C.radix_histogram(seg, p)  # stores the scores for the next compaction
    T.assert_same(C.compact(seg, p, thr, 1), R.compact(seg, p, thr, 1))
print("ok")
"""
    env = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": "default",
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]),
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# ---------------------------------------------------------------------- stored scores (scratch)
def _copy(seg: Segment, scratch) -> Segment:
    """The same segment (same tensors) with its own scratch (None: the backend may not store)."""
    return Segment(**{**seg.__dict__, "scratch": scratch})


def _topk_passes(seg: Segment, p: StepParams, keep_frac: float = 0.1, quota: int = 3):
    """The optimizer's top-k sequence on one segment: high histogram, low histogram, compact."""
    high = C.radix_histogram(seg, p)
    b = int(torch.nonzero(high.flip(0).cumsum(0) >= max(1, int(seg.numel * keep_frac)))[0])
    b = len(high) - 1 - b
    low = C.radix_histogram(seg, p, b)
    nz = torch.nonzero(low).flatten()
    lo = int(nz[len(nz) // 2]) if len(nz) else 0
    thr = float(np.array([(b << 16) | lo], dtype=np.int32).view(np.float32)[0])
    return high, low, C.compact(seg, p, thr, quota)


@pytest.mark.parametrize("n", [1, 255, 257, 4099, 100_003])
@pytest.mark.parametrize("params", list(PARAMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stored_scores_give_the_same_results(n, params, dtype):
    # The top-k sequence with the scores stored by the first pass (scratch) against the same
    # sequence recomputing every pass (no scratch), on every thread count and instruction set.
    p = PARAMS[params]
    seg = make_segment(n, dtype=dtype, rng=7)

    def run(scratch):
        s = _copy(seg, scratch)
        out = _topk_passes(s, p)
        if scratch is not None:
            assert s.scratch == {}, "compact() drops the stored scores"
        return out

    got = on_every_config(lambda: run({}))
    assert_same(got, run(None))
    # ... and the reference, for the same threshold.
    high, low, out = got
    assert_same(high, R.radix_histogram(seg, p))
    b = len(high) - 1 - int(torch.nonzero(high.flip(0).cumsum(0) >= max(1, int(n * 0.1)))[0])
    assert_same(low, R.radix_histogram(seg, p, b))


@pytest.mark.parametrize("n", [257, 4099, 100_003])
def test_stored_scores_with_many_ties(n):
    # bound 0 and integer gradients: a handful of score values, so the threshold's upper bits
    # match many elements and their exact scores are recomputed in bulk.
    p = StepParams(lr=1.0, momentum=0.9, weight_decay=0.0, scale=1.0)
    seg = make_segment(n, bound=0.0, integer_grads=True, density=0.1, rng=8)
    s = R.scores(seg, p)
    for thr in (1.0, 2.0, 0.0):
        ties = int((s == thr).sum())
        for quota in (0, 1, ties // 2, ties + 5):
            for hist in (False, True):
                expected = R.compact(seg, p, thr, quota, hist)

                def stored(thr=thr, quota=quota, hist=hist):
                    fresh = _copy(seg, {})
                    C.radix_histogram(fresh, p)
                    return C.compact(fresh, p, thr, quota, hist)

                assert_same(on_every_config(stored), expected, f"thr={thr} quota={quota}")


def test_stored_scores_of_other_params_are_not_used():
    # One Segment reused with other StepParams (or changed tensors) must not see stale scores.
    seg = make_segment(4099, rng=9)
    p1, p2 = PARAMS["momentum_wd_decay"], PARAMS["zero_scale"]
    C.radix_histogram(seg, p1)  # stores p1's scores
    assert seg.scratch
    thr = threshold_with_ties(R.scores(seg, p2))
    high2 = R.radix_histogram(seg, p2)
    b = int(torch.nonzero(high2)[-1])
    assert_same(C.radix_histogram(seg, p2, b), R.radix_histogram(seg, p2, b))
    assert_same(C.compact(seg, p2, thr, 2, True), R.compact(seg, p2, thr, 2, True))

    # In-place change of the gradient after the scores were stored.
    C.radix_histogram(seg, p1)
    seg.grad.mul_(3.0)
    thr = threshold_with_ties(R.scores(seg, p1))
    assert_same(C.compact(seg, p1, thr, 1), R.compact(seg, p1, thr, 1))

    # A new tensor in the segment (a momentum buffer of the same size, say).
    C.radix_histogram(seg, p1)
    seg.momentum = seg.momentum * 2.0
    assert_same(C.log_histogram(seg, p1), R.log_histogram(seg, p1))
    assert_same(C.compact(seg, p1, thr, 0, True), R.compact(seg, p1, thr, 0, True))

    # Another seed (a scalar of the segment).
    C.radix_histogram(seg, p1)
    seg.seed += 1
    assert_same(C.compact(seg, p1, thr, 0), R.compact(seg, p1, thr, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_pass_quantile_with_stored_scores(dtype):
    # log_histogram then compact (the quantile selector's warm-up steps).
    p = PARAMS["momentum_wd_decay"]
    seg = make_segment(100_003, dtype=dtype, rng=10)
    hist = C.log_histogram(seg, p)
    assert_same(hist, R.log_histogram(seg, p))
    assert seg.scratch
    assert_same(C.log_histogram(seg, p), hist)  # read back from the stored upper halves
    thr = threshold_with_ties(R.scores(seg, p), 0.2)
    assert_same(C.compact(seg, p, thr, 0, True), R.compact(seg, p, thr, 0, True))
    assert not seg.scratch


@pytest.mark.parametrize("thr", [-1.0, -0.0, 0.0, float("inf"), float("nan")])
def test_stored_scores_with_unusual_thresholds(thr):
    # Thresholds the stored upper halves cannot order (sign bit set) or that sit at the edges.
    p = PARAMS["momentum_wd_decay"]
    seg = make_segment(4099, rng=11)
    seg.grad[::97] = 0.0
    C.radix_histogram(seg, p)
    assert_same(C.compact(seg, p, thr, 2, True), R.compact(seg, p, thr, 2, True))


def test_stored_scores_with_non_finite_scores():
    # Infinite and NaN gradients give infinite and NaN scores (upper bits 0x7F80 and up).
    p = PARAMS["sgd"]
    seg = make_segment(4099, rng=12)
    seg.grad[5] = float("inf")
    seg.grad[300] = float("nan")
    seg.grad[301] = -float("inf")
    s = R.scores(seg, p)
    bits = s.view(torch.int32).long() >> 16
    for b in sorted(set(bits[[5, 300, 301]].tolist())):
        fresh = _copy(seg, {})
        assert_same(C.radix_histogram(fresh, p), R.radix_histogram(seg, p))
        assert_same(C.radix_histogram(fresh, p, b), R.radix_histogram(seg, p, b))
    for thr in (float(s[7]), float("inf"), 1e30):
        fresh = _copy(seg, {})
        C.radix_histogram(fresh, p)
        assert_same(C.compact(fresh, p, thr, 1, True), R.compact(seg, p, thr, 1, True))


def test_compaction_without_quota_collects_in_the_pass():
    # No tie quota: the kept candidates are collected during the scoring pass (many kept, so
    # the per-thread buffers grow); the result must equal the recomputing path (a quota that
    # adds no tie) and the reference.
    p = PARAMS["momentum_wd_decay"]
    seg = make_segment(100_003, density=0.05, rng=13)
    s = R.scores(seg, p)
    for thr in (0.0, float(s.median()), threshold_with_ties(s, 0.01)):
        got = on_every_config(lambda thr=thr: C.compact(_copy(seg, None), p, thr, 0, True))
        assert_same(got, R.compact(seg, p, thr, 0, True))


def test_bad_score_buffers_raise():
    seg = make_segment(300)
    kw = C._seg_kwargs(seg, PARAMS["sgd"])
    with pytest.raises(TypeError, match="scores of dtype uint16"):
        _C.radix_histogram(**kw, high=-1, scores=np.zeros(300, np.float32))
    with pytest.raises(ValueError, match="scores of length"):
        _C.radix_histogram(**kw, high=-1, scores=np.zeros(299, np.uint16))
    with pytest.raises(ValueError, match="scores_valid needs a scores buffer"):
        _C.radix_histogram(**kw, high=-1, scores_valid=True)
    with pytest.raises(ValueError, match="tracked_c of length"):
        _C.radix_histogram(**kw, high=-1, tracked_c=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="high < 2"):
        _C.radix_histogram(**kw, high=1 << 15)


# ------------------------------------------------------------------------------------- paper walk
@pytest.mark.parametrize("n", [1, 7, 1000, 100_003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paper_walk_matches_selector(n, dtype):
    scores = (torch.randn(n).abs() * 0.02).to(dtype)
    selector = PaperQuantileSelector()
    for step, k in enumerate((max(1, n // 10), max(1, n // 3))):
        with use_backend("reference"):  # the selector's own walk: the Python reference
            expected, state = selector.step(scores * (1 + step), k)
        mask, theta = C.paper_walk(scores * (1 + step), selector.theta, selector.lam, k)
        assert_same(mask, expected)
        assert theta == state["theta"]
        selector.load_state_dict(state)  # the next step carries theta


def test_paper_branch_wiring_matches_reference():
    # The quantile_paper branch of DropBack._update with the C++ ops: scores, walk, compact_mask.
    p = PARAMS["momentum_wd_decay"]
    segments = [make_segment(n, rng=6) for n in (1000, 4099, 257)]
    k = 600
    selector = PaperQuantileSelector(theta0=0.005)
    scores = torch.cat([R.scores(s, p) for s in segments])
    with use_backend("reference"):
        mask_ref, plan = selector.step(scores, k)
    expected = [
        R.compact_mask(s, p, m)
        for s, m in zip(segments, torch.split(mask_ref, [s.numel for s in segments]))
    ]
    scores = torch.cat([C.scores(s, p) for s in segments])
    mask, theta = C.paper_walk(scores, selector.theta, selector.lam, k)
    got = [
        C.compact_mask(s, p, m)
        for s, m in zip(segments, torch.split(mask, [s.numel for s in segments]))
    ]
    assert theta == plan["theta"]
    for g, e in zip(got, expected):
        assert_same(g, e)


# ------------------------------------------------------------------------------------- bad inputs
def _bad(seg: Segment, **changes) -> Segment:
    return Segment(**{**seg.__dict__, **changes})


def test_bad_segments_raise_readable_errors():
    p = PARAMS["momentum_wd_decay"]
    seg = make_segment(1000)
    n = seg.numel
    cases = [
        (TypeError, "grad of a floating dtype", dict(grad=torch.zeros(n, dtype=torch.int32))),
        (TypeError, "bits of dtype torch.uint8", dict(bits=seg.bits.to(torch.int64))),
        (TypeError, "group_ptr of dtype torch.int64", dict(group_ptr=seg.group_ptr.int())),
        (TypeError, "values of a floating dtype", dict(values=seg.values.int())),
        (ValueError, "grad to be contiguous", dict(grad=torch.zeros(n, 2)[:, 0])),
        (ValueError, "bits of length", dict(bits=seg.bits[:-1].contiguous())),
        (ValueError, "group_ptr of length", dict(group_ptr=seg.group_ptr[:-1].contiguous())),
        (ValueError, "grad of length", dict(grad=torch.zeros(n + 1))),
        (ValueError, "momentum of length", dict(momentum=seg.momentum[:-1].contiguous())),
        (
            ValueError,
            r"group_ptr\[-1\] == values.numel\(\)",
            dict(values=seg.values[:-1].clone(), momentum=None),
        ),
        (ValueError, "on the CPU", dict(grad=torch.zeros(n, device="meta"))),
        (TypeError, "Segment", None),
    ]
    ops_to_try = [
        lambda s: C.scores(s, p),
        lambda s: C.log_histogram(s, p),
        lambda s: C.radix_histogram(s, p),
        lambda s: C.compact(s, p, 0.01, 1, True),
        lambda s: C.compact_mask(s, p, torch.zeros(n, dtype=torch.bool)),
    ]
    for err, match, change in cases:
        bad = "not a segment" if change is None else _bad(seg, **change)
        for op in ops_to_try:
            with pytest.raises(err, match=match):
                op(bad)


def test_inconsistent_group_ptr_raises_instead_of_crashing():
    p = PARAMS["sgd"]
    seg = make_segment(4099, density=0.5)
    ptr = seg.group_ptr.clone()
    ptr[5] += 3  # still ends at values.numel(), but group 4 and 5 now point past their bits
    bad = _bad(seg, group_ptr=ptr)
    for op in (
        lambda s: C.scores(s, p),
        lambda s: C.compact(s, p, 0.0),
        lambda s: C.compact_mask(s, p, torch.ones(4099, dtype=torch.bool)),
    ):
        with pytest.raises(ValueError, match=r"group_ptr consistent with bits.*group_ptr\[4\]"):
            op(bad)
    with pytest.raises(ValueError, match="group_ptr consistent"):
        C.materialize(seg.seed, seg.bound, 1.0, seg.values, seg.bits, ptr, 4099, torch.float32)
    ptr = seg.group_ptr.clone()
    ptr[0] = -1
    with pytest.raises(ValueError, match=r"group_ptr\[0\] == 0"):
        C.scores(_bad(seg, group_ptr=ptr), p)


def test_bad_arguments_of_the_other_entry_points():
    seg = make_segment(300)
    with pytest.raises(TypeError, match="keep of dtype torch.bool"):
        C.compact_mask(seg, PARAMS["sgd"], torch.zeros(300, dtype=torch.uint8))
    with pytest.raises(ValueError, match="keep of length"):
        C.compact_mask(seg, PARAMS["sgd"], torch.zeros(299, dtype=torch.bool))
    with pytest.raises(TypeError, match="offsets of dtype int32 or int64"):
        C.philox_uniform(0, torch.zeros(3))
    with pytest.raises(TypeError, match="seed"):
        C.philox_uniform(1.5, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="numel >= 0"):
        C.materialize(0, 0.1, 1.0, seg.values, seg.bits, seg.group_ptr, -1, torch.float32)
    with pytest.raises(ValueError, match="bits of length"):
        C.materialize(0, 0.1, 1.0, seg.values, seg.bits, seg.group_ptr, 400, torch.float32)
    with pytest.raises(ValueError, match="set_num_threads"):
        C.set_num_threads(-1)
    with pytest.raises(TypeError, match="paper_walk"):
        C.paper_walk(torch.zeros(3, dtype=torch.int64), 0.01, 1e-6, 1)
    # The extension itself checks what reaches it: numpy arrays of the right kind only.
    f32 = np.zeros(256, dtype=np.float32)
    u8 = np.zeros(32, dtype=np.uint8)
    i64 = np.zeros(2, dtype=np.int64)
    kw = dict(
        seed=0,
        bound=0.1,
        scale=1.0,
        values=np.zeros(0, np.float32),
        bits=u8,
        group_ptr=i64,
        numel=256,
    )
    with pytest.raises(TypeError, match="out to be a numpy array"):
        _C.materialize(**kw, out=[0.0] * 256)
    with pytest.raises(TypeError, match="out of dtype float32"):
        _C.materialize(**kw, out=np.zeros(256))
    with pytest.raises(ValueError, match="out to be 1-D"):
        _C.materialize(**kw, out=f32.reshape(16, 16))
    with pytest.raises(ValueError, match="out to be contiguous"):
        _C.materialize(**kw, out=np.zeros(512, np.float32)[::2])
    readonly = f32.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="out to be writable"):
        _C.materialize(**kw, out=readonly)


# ---------------------------------------------------------------------------- the whole optimizer
def _model(seed: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(37, 61), nn.ReLU(), nn.Linear(61, 29), nn.ReLU(), nn.Linear(29, 5)
    )
    return pk.sparsify(net, seed=seed)


def _train(backend: str, steps: int, **opt_kw):
    model = _model(seed=17)
    opt = pk.DropBack(model.parameters(), quantile_warmup=4, **opt_kw)
    g = torch.Generator().manual_seed(1)
    history = []
    with ops.use_backend(backend):
        for _ in range(steps):
            x, y = torch.randn(32, 37, generator=g), torch.randint(0, 5, (32,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            weights = [w for _, w in pk.budgeted_weights(model)]
            assert len(weights) == 3
            history.append(
                [
                    (
                        w.bits.clone(),
                        w.group_ptr.clone(),
                        w.values.clone(),
                        opt.state[w].get("momentum_buffer"),
                        w.effective(),
                    )
                    for w in weights
                ]
            )
    return history, opt


@pytest.mark.parametrize("selection", ["topk", "quantile"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 5e-4)])
def test_optimizer_steps_match_reference_backend(selection, scope, momentum, wd):
    kw = dict(
        lr=0.2,
        budget=0.15,
        momentum=momentum,
        weight_decay=wd,
        init_decay=0.9,
        selection=selection,
        scope=scope,
    )
    ref, ref_opt = _train("reference", 10, **kw)
    got, got_opt = _train("cpp", 10, **kw)
    for step, (r_layers, g_layers) in enumerate(zip(ref, got)):
        for i, (r, g) in enumerate(zip(r_layers, g_layers)):
            where = f"step {step + 1} layer {i}"
            assert torch.equal(g[0], r[0]), f"{where}: tracked sets differ"
            assert torch.equal(g[1], r[1]), f"{where}: group pointers differ"
            for a, b in zip(g[2:], r[2:]):
                assert (a is None) == (b is None), where
                if a is not None:
                    assert_close_verbose(a, b, rtol=1e-6, atol=0.0)
    assert got_opt.tracked_count == ref_opt.tracked_count
    assert got_opt.state_dict()["dropback"] == ref_opt.state_dict()["dropback"]
