"""The C++ backend (procrustes_kernels._C through ops.update.cpp): what only it has.

Its ops against the reference, op by op on golden and random inputs, are in
``test_backend_equivalence.py``; here: its extra functions (``candidates``, ``philox_uniform``),
identical results on every thread count and instruction set, the probe of this PyTorch build's
FMA behaviour, the scores one pass stores for the next (``Segment.scratch``), the fallback of the
dtypes it does not take, readable errors for bad inputs, and the wiring of the paper's walk.

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
from helpers import PARAMS, assert_same, random_segment, threshold_with_ties

from procrustes_kernels.ops import use_backend
from procrustes_kernels.ops.contract import Segment, StepParams
from procrustes_kernels.ops.update import reference as R
from procrustes_kernels.philox import philox_uniform
from procrustes_kernels.selection import PaperQuantileSelector
from procrustes_kernels.storage import GROUP_SIZE

try:
    from procrustes_kernels import _C
    from procrustes_kernels.ops.update import cpp as C

    _IMPORT_ERROR = None
except ImportError as err:  # reported by the autouse fixture below, as a failure
    _C = C = None
    _IMPORT_ERROR = err

SIZES = [1, 7, 255, 256, 257, 1000, 4099, 100_003]


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


# --------------------------------------------------------------- its extra functions vs reference
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
def test_philox_uniform_matches_reference(n, offsets_dtype):
    for seed in (0, -5, 2**63 + 12345) if n < 10_000 else (7,):
        offsets = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int64).to(offsets_dtype)
        if offsets_dtype == torch.int64:
            offsets[::3] += 2**40  # high counter words too
        assert_same(C.philox_uniform(seed, offsets), philox_uniform(seed, offsets), f"seed {seed}")


def test_materialize_offsets_cross_two_to_the_32():
    # A group whose offsets cross 2**32 takes the generators' carry path: checked through
    # philox_uniform, since a weight that large does not fit in a test.
    offsets = torch.arange(2**32 - 300, 2**32 + 300, dtype=torch.int64)
    assert_same(on_every_config(lambda: C.philox_uniform(99, offsets)), philox_uniform(99, offsets))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("params", list(PARAMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_candidates_match_reference(n, params, dtype):
    # (c, m, s, tracked) of every weight, bit for bit: the intermediate the update ops share.
    p = PARAMS[params]
    seg = random_segment(n, dtype=dtype, scale_prev=0.9, rng=1)
    c, m, s, tracked = R.candidates(seg, p)
    assert_same(C.candidates(seg, p), (c, m, s, tracked), "candidates")
    assert_same(C.scores(seg, p), s, "scores")


# ---------------------------------------------------------- thread counts and instruction sets
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_materialize_is_identical_on_every_config(n, dtype):
    seg = random_segment(n, dtype=dtype, density=0.2)
    for scale in (1.0, 0.9**7, 0.0):
        args = (seg.seed, seg.bound, scale, seg.values, seg.bits, seg.group_ptr, n, dtype)
        expected = R.materialize(*args)
        assert_same(on_every_config(lambda args=args: C.materialize(*args)), expected)


def test_update_ops_are_identical_on_every_config():
    n = 100_003
    p = PARAMS["momentum_wd_decay"]
    seg = random_segment(n, scale_prev=0.9, rng=3)
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


@pytest.mark.parametrize("n", [1, 257, 4099, 100_003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_after_the_decay_is_identical_on_every_config(n, dtype):
    # Both scales zero (Procrustes after its decay): the selecting passes skip regenerating w0, so
    # they must still give the reference's results bit for bit, with zero gradients among the
    # untracked weights (candidates of zero, never kept) and the stored-scores path included.
    p = PARAMS["zero_scale"]
    seg = random_segment(n, dtype=dtype, scale_prev=0.0, zero_grads=0.2, rng=14)
    s = R.scores(seg, p)
    thr = threshold_with_ties(s)
    assert_same(on_every_config(lambda: C.candidates(seg, p)), R.candidates(seg, p))
    assert_same(on_every_config(lambda: C.log_histogram(seg, p)), R.log_histogram(seg, p))
    assert_same(on_every_config(lambda: C.radix_histogram(seg, p)), R.radix_histogram(seg, p))
    for quota in (0, 3):
        for hist in (False, True):
            assert_same(
                on_every_config(lambda q=quota, h=hist: C.compact(seg, p, thr, q, h)),
                R.compact(seg, p, thr, quota, hist),
                f"quota={quota} with_histogram={hist}",
            )
    assert_same(on_every_config(lambda: C.compact(seg, p, 0.0)), R.compact(seg, p, 0.0))
    keep = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.1
    assert_same(on_every_config(lambda: C.compact_mask(seg, p, keep)), R.compact_mask(seg, p, keep))

    def two_pass():  # the first pass stores the scores, the compaction reads them
        t = _copy(seg, {})
        return C.log_histogram(t, p), C.compact(t, p, thr)

    assert_same(on_every_config(two_pass), (R.log_histogram(seg, p), R.compact(seg, p, thr)))


@pytest.mark.parametrize("n", [257, 4099, 100_003])
def test_compact_tie_quota_is_identical_on_every_config(n):
    # bound 0 and integer gradients: scores take a handful of values, so every threshold has many
    # ties spread over many groups, and over the threads' chunks; the quota must go to the lowest
    # flat indices across them whatever the split.
    p = StepParams(lr=1.0, momentum=0.9, weight_decay=0.0, scale=1.0)
    seg = random_segment(n, bound=0.0, grid=1.0, density=0.0, rng=4)
    s = R.scores(seg, p)
    for thr in (1.0, 2.0):
        ties = int((s == thr).sum())
        assert ties > 0, f"the case should have ties at {thr}"
        for quota in (0, 1, GROUP_SIZE + 3, ties // 2, ties, ties + 5):
            got = on_every_config(lambda thr=thr, quota=quota: C.compact(seg, p, thr, quota))
            assert_same(got, R.compact(seg, p, thr, quota), f"thr={thr} quota={quota}")
            assert got.ties_used == min(quota, ties)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_falls_back_to_reference(dtype):
    # The dispatcher sends what the kernels do not take to the reference, in one place; the
    # kernels themselves refuse it with a clear error.
    from procrustes_kernels import ops

    seg = random_segment(300, dtype=dtype)
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
import helpers as H
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
assert not C._add_alpha_is_fused(torch.float32) and not C._add_alpha_is_fused(torch.float64)
p = StepParams(lr=0.1, momentum=0.9, weight_decay=5e-4, scale=0.81)
for dtype in (torch.float32, torch.float64):
    seg = H.random_segment(4099, dtype=dtype, scale_prev=0.9, rng=5)
    H.assert_same(C.candidates(seg, p), R.candidates(seg, p))
    thr = H.threshold_with_ties(R.scores(seg, p))
    H.assert_same(C.compact(seg, p, thr, 1, True), R.compact(seg, p, thr, 1, True))
    H.assert_same(C.compact(seg, p, thr, 0, True), R.compact(seg, p, thr, 0, True))
    C.radix_histogram(seg, p)  # stores the scores for the next compaction
    H.assert_same(C.compact(seg, p, thr, 1), R.compact(seg, p, thr, 1))
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
    seg = random_segment(n, dtype=dtype, scale_prev=0.9, rng=7)

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
    seg = random_segment(n, bound=0.0, grid=1.0, density=0.1, rng=8)
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
    seg = random_segment(4099, rng=9, scale_prev=0.9)
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
    seg = random_segment(100_003, dtype=dtype, rng=10, scale_prev=0.9)
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
    seg = random_segment(4099, rng=11, scale_prev=0.9)
    seg.grad[::97] = 0.0
    C.radix_histogram(seg, p)
    assert_same(C.compact(seg, p, thr, 2, True), R.compact(seg, p, thr, 2, True))


def test_stored_scores_with_non_finite_scores():
    # Infinite and NaN gradients give infinite and NaN scores (upper bits 0x7F80 and up).
    p = PARAMS["sgd"]
    seg = random_segment(4099, rng=12, scale_prev=0.9)
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
    seg = random_segment(100_003, density=0.05, rng=13, scale_prev=0.9)
    s = R.scores(seg, p)
    for thr in (0.0, float(s.median()), threshold_with_ties(s, 0.01)):
        got = on_every_config(lambda thr=thr: C.compact(_copy(seg, None), p, thr, 0, True))
        assert_same(got, R.compact(seg, p, thr, 0, True))


def test_bad_score_buffers_raise():
    seg = random_segment(300)
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
def test_paper_branch_wiring_matches_reference():
    # The quantile_paper branch of DropBack._update with the C++ ops: scores, walk, compact_mask.
    p = PARAMS["momentum_wd_decay"]
    segments = [random_segment(n, rng=6, scale_prev=0.9) for n in (1000, 4099, 257)]
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
    seg = random_segment(1000)
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
    seg = random_segment(4099, density=0.5)
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
    seg = random_segment(300)
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
