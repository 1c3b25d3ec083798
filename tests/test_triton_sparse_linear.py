"""The Triton sparse linear kernels: what only they have.

Their forward and backward data against the reference
(:mod:`procrustes_kernels.ops.compute.reference`) on golden tiny cases and random odd shapes and
dtypes, at the default launch configuration, are in ``test_backend_equivalence.py``. Here: hand-checked cases of the tile traversal and of the rounding,
the other schedules, tile shapes and empty tiles, launch overrides, int64 offsets, the two loop
forms, the schedule cache, argument errors, and a compile of the kernels for sm_90.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``); with one, the same tests run on CUDA tensors. Outputs are poisoned (NaN)
at allocation so that an element a kernel never wrote cannot pass for a right one.

The interpreter costs ~10 ms per weight tile a unit visits, so the sizes are small.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import triton
from helpers import (
    DEVICE,
    TOLERANCES,
    compile_for_sm90,
    compressed_weight,
    random_mask,
    without_gpu,
)

from procrustes_kernels.ops import triton_util
from procrustes_kernels.ops.compute import reference as ref
from procrustes_kernels.ops.compute import triton_linear as tsl
from procrustes_kernels.ops.compute.index import build_schedule, build_tile_index, schedule_makespan
from procrustes_kernels.ops.contract import Regen
from procrustes_kernels.ops.update import reference as update_ref
from procrustes_kernels.storage import group_pointers, pack_bits

TRITON = TOLERANCES["triton"]
SCHEDULES = ("grid", "balanced", "unbalanced")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def _fresh_schedules():
    tsl.clear_schedule_cache()
    yield
    tsl.clear_schedule_cache()


def storage(mask2d, values=None, block_n=16, block_c=16, vdtype=F32, seed=0):
    """``(values, bits, index)`` of a weight whose tracked set is ``mask2d [rows, cols]``."""
    return compressed_weight(
        mask2d, values, block_n=block_n, block_c=block_c, values_dtype=vdtype, seed=seed
    )


def randn(*shape, dtype=F32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def check_both(x, values, bits, index, bias=None, dy=None, **kw):
    """Forward and backward data against the reference; returns the kernels' ``(y, dx)``."""
    y = tsl.sparse_linear(x, values, bits, index, bias, **kw)
    TRITON.assert_compute(y, ref.sparse_linear(x, values, bits, index, bias))
    if dy is None:
        dy = randn(x.shape[0], index.rows, dtype=x.dtype, seed=7)
    dx = tsl.sparse_linear_t(dy, values, bits, index, **kw)
    TRITON.assert_compute(dx, ref.sparse_linear_t(dy, values, bits, index))
    return y, dx


# ------------------------------------------------------------------------------ hand-checked cases

# W = [[0, 2, 0], [0, 0, -1]]: flat elements 1 and 5 tracked.
GOLD_MASK = torch.tensor([[0, 1, 0], [0, 0, 1]], dtype=torch.bool)
GOLD_VALUES = torch.tensor([2.0, -1.0])
GOLD_X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
GOLD_BIAS = torch.tensor([0.5, 1.0])
GOLD_DY = torch.tensor([[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if s != "balanced"])
def test_golden_tiny_on_the_other_schedules(poison, schedule):
    """The golden case of test_backend_equivalence.py (default schedule, balanced) on the others."""
    values, bits, index = storage(GOLD_MASK, GOLD_VALUES)
    assert bits.tolist() == [0b00100010] and index.nnz == 2
    x, bias, dy = GOLD_X.to(DEVICE), GOLD_BIAS.to(DEVICE), GOLD_DY.to(DEVICE)
    y = tsl.sparse_linear(x, values, bits, index, schedule=schedule)
    assert y.tolist() == [[4.0, -3.0], [10.0, -6.0]]
    y = tsl.sparse_linear(x, values, bits, index, bias, schedule=schedule)
    assert y.tolist() == [[4.5, -2.0], [10.5, -5.0]]
    dx = tsl.sparse_linear_t(dy, values, bits, index, schedule=schedule)
    assert dx.tolist() == [[0.0, 2.0, -2.0], [0.0, 6.0, -4.0]]


def test_golden_second_column_tile(poison):
    """Tracked (0, 17) and (1, 3) with 16-column tiles: values are found through row_off across
    column tiles (row 0's only value sits in its second tile, row 1's in its first)."""
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, 17] = mask[1, 3] = True
    values, bits, index = storage(mask, torch.tensor([3.0, 5.0]))
    x = torch.arange(40, dtype=F32).view(2, 20).to(DEVICE)  # x[m, c] = 20 m + c
    y = tsl.sparse_linear(x, values, bits, index)
    assert y.tolist() == [[3.0 * 17, 5.0 * 3], [3.0 * 37, 5.0 * 23]]
    dx = tsl.sparse_linear_t(torch.tensor([[1.0, 10.0]], device=DEVICE), values, bits, index)
    want = torch.zeros(1, 20)
    want[0, 17], want[0, 3] = 3.0, 50.0
    assert torch.equal(dx.cpu(), want)


def test_golden_bf16_rounds_weights_and_output_to_nearest_even(poison):
    """bfloat16 x: float32 weights are rounded to nearest even (not truncated) before the dot, and
    the float32 sum is rounded once, to nearest even, at the end."""
    w = torch.tensor([1.0 + 2**-8 + 2**-10, -(1.0 + 2**-8 + 2**-10), 3.0 + 2**-20])
    values, bits, index = storage(torch.ones(3, 1, dtype=torch.bool), w)
    y = tsl.sparse_linear(torch.ones(1, 1, dtype=BF16, device=DEVICE), values, bits, index)
    assert y.dtype == BF16
    assert torch.equal(y.cpu(), w.to(BF16).view(1, 3))
    assert y.float().tolist() == [[1.0 + 2**-7, -(1.0 + 2**-7), 3.0]]
    # Output rounding: 1 + 2^-8 + 2^-10 is exact in float32, 1 + 2^-7 in bfloat16 (truncation: 1).
    row = torch.tensor([1.0, 2**-8, 2**-10])
    values, bits, index = storage(torch.ones(1, 3, dtype=torch.bool), row, vdtype=BF16)
    y = tsl.sparse_linear(torch.ones(1, 3, dtype=BF16, device=DEVICE), values, bits, index)
    assert y.float().tolist() == [[1.0 + 2**-7]]
    dx = tsl.sparse_linear_t(torch.ones(1, 1, dtype=BF16, device=DEVICE), values, bits, index)
    assert torch.equal(dx.cpu(), row.to(BF16).view(1, 3))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_no_tracked_weights_gives_zeros_or_bias(poison, schedule):
    values, bits, index = storage(torch.zeros(33, 45, dtype=torch.bool))
    assert index.nnz == 0 and values.numel() == 0 and index.nonempty_tiles == 0
    x, bias = randn(5, 45), randn(33, seed=2)
    y = tsl.sparse_linear(x, values, bits, index, schedule=schedule)
    assert torch.equal(y, torch.zeros(5, 33, device=DEVICE))
    y = tsl.sparse_linear(x, values, bits, index, bias, schedule=schedule)
    assert torch.equal(y, bias.expand(5, 33))
    dx = tsl.sparse_linear_t(randn(5, 33), values, bits, index, schedule=schedule)
    assert torch.equal(dx, torch.zeros(5, 45, device=DEVICE))


def test_empty_batch():
    values, bits, index = storage(random_mask(5, 7, 0.5))
    y = tsl.sparse_linear(torch.empty(0, 7, device=DEVICE), values, bits, index)
    assert y.shape == (0, 5) and y.dtype == F32
    dx = tsl.sparse_linear_t(torch.empty(0, 5, dtype=BF16, device=DEVICE), values, bits, index)
    assert dx.shape == (0, 7) and dx.dtype == BF16


@pytest.mark.parametrize("block_n, block_c", [(16, 16), (32, 16), (16, 32)])
def test_tile_shapes_and_empty_tiles(poison, block_n, block_c):
    """Empty rows, an empty row tile and an empty column tile, on every tile shape."""
    mask = random_mask(70, 100, 0.3)
    mask[block_n : 2 * block_n] = False  # row tile 1
    mask[:, block_c : 2 * block_c] = False  # column tile 1
    mask[[0, 5, 69]] = False  # single empty rows
    values, bits, index = storage(mask, block_n=block_n, block_c=block_c)
    assert 0 < index.nonempty_tiles < index.num_tiles
    assert int(index.row_tile_work()[1]) == 0 and int(index.col_tile_work()[1]) == 0
    bias = randn(70, seed=3)
    y, dx = check_both(randn(37, 100), values, bits, index, bias, block_m=16)
    assert torch.equal(y[:, block_n : 2 * block_n], bias[block_n : 2 * block_n].expand(37, -1))
    assert torch.equal(dx[:, block_c : 2 * block_c], torch.zeros(37, block_c, device=DEVICE))


def test_schedules_and_launch_overrides_agree_bitwise(poison):
    """Every unit does the same arithmetic whatever program runs it: identical bits."""
    values, bits, index = storage(random_mask(40, 45, 0.2), block_n=16, block_c=16)
    x, dy, bias = randn(37, 45), randn(37, 40, seed=4), randn(40, seed=3)
    configs = [
        {"schedule": "grid"},
        {"schedule": "balanced", "programs": 3},
        {"schedule": "unbalanced", "programs": 3},
        {"schedule": "balanced", "programs": 1000},  # more programs than units
    ]
    runs = [
        (
            tsl.sparse_linear(x, values, bits, index, bias, block_m=16, **kw),
            tsl.sparse_linear_t(dy, values, bits, index, block_m=16, **kw),
        )
        for kw in configs
    ]
    for y, dx in runs[1:]:
        assert torch.equal(y, runs[0][0]) and torch.equal(dx, runs[0][1])
    TRITON.assert_compute(runs[0][0], ref.sparse_linear(x, values, bits, index, bias))
    TRITON.assert_compute(runs[0][1], ref.sparse_linear_t(dy, values, bits, index))


def test_int64_offsets_and_strided_input(poison, monkeypatch):
    values, bits, index = storage(random_mask(33, 45, 0.3))
    x = randn(45, 37).t()  # not contiguous
    y_want, dx_want = check_both(x, values, bits, index)
    monkeypatch.setattr(triton_util, "OFFS64_FROM", 1)
    dy = randn(37, 33, seed=7)
    assert torch.equal(tsl.sparse_linear(x, values, bits, index), y_want)
    assert torch.equal(tsl.sparse_linear_t(dy, values, bits, index), dx_want)


@pytest.mark.skipif(
    tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7),
    reason="triton < 3.7's interpreter cannot take a loaded loop bound (hence _WHILE_LOOPS)",
)
def test_for_loop_form_matches_while_loop_form(poison, monkeypatch):
    """The GPU's ``for`` loops, run through the interpreter (which uses ``while`` loops)."""
    values, bits, index = storage(random_mask(40, 45, 0.3))
    x, dy, bias = randn(37, 45), randn(37, 40, seed=4), randn(40, seed=3)
    for schedule in ("grid", "balanced"):
        kw = {"schedule": schedule, "block_m": 16}
        monkeypatch.setattr(tsl, "_WHILE_LOOPS", True)
        y, dx = check_both(x, values, bits, index, bias, dy, **kw)
        monkeypatch.setattr(tsl, "_WHILE_LOOPS", False)
        assert torch.equal(tsl.sparse_linear(x, values, bits, index, bias, **kw), y)
        assert torch.equal(tsl.sparse_linear_t(dy, values, bits, index, **kw), dx)


def test_regenerating_kernels_on_every_schedule_and_loop_form(poison, monkeypatch):
    """With ``regen`` every tile is visited (the schedules are built from equal work): the
    schedules and both loop forms give identical bits, and the reference's numbers, also for a
    weight with no tracked element (all regenerated) and one whose every element is tracked."""
    for density in (0.0, 0.25, 1.0):
        values, bits, index = storage(random_mask(40, 45, density))
        regen = Regen(torch.tensor(0.7, device=DEVICE), 2**64 - 5, 0.25)
        x, dy, bias = randn(37, 45), randn(37, 40, seed=4), randn(40, seed=3)
        y_want = ref.sparse_linear(x, values, bits, index, bias, regen=regen)
        dx_want = ref.sparse_linear_t(dy, values, bits, index, regen=regen)
        runs = []
        for kw in ({"schedule": "grid"}, {"schedule": "balanced", "programs": 3}):
            runs.append(
                (
                    tsl.sparse_linear(x, values, bits, index, bias, regen=regen, block_m=16, **kw),
                    tsl.sparse_linear_t(dy, values, bits, index, regen=regen, block_m=16, **kw),
                )
            )
        for y, dx in runs[1:]:
            assert torch.equal(y, runs[0][0]) and torch.equal(dx, runs[0][1])
        TRITON.assert_compute(runs[0][0], y_want)
        TRITON.assert_compute(runs[0][1], dx_want)
    # The balanced schedule of a regenerating call is cached apart from the sparse one's.
    assert {key[-1] for key in tsl._SCHEDULES} == {True}
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7):
        monkeypatch.setattr(tsl, "_WHILE_LOOPS", False)
        assert torch.equal(
            tsl.sparse_linear(x, values, bits, index, bias, regen=regen, block_m=16), runs[0][0]
        )


def test_regenerated_weights_are_the_materialized_ones(poison):
    """``x = I`` reads the weight back: bit for bit what ``materialize`` writes, in each dtype."""
    mask = random_mask(20, 37, 0.3)
    for vdtype, xdtype in ((F32, F32), (F32, BF16), (F16, F16)):
        values, bits, index = storage(mask, vdtype=vdtype)
        regen = Regen(torch.tensor(0.43, device=DEVICE), 7, 0.3)
        w = update_ref.materialize(
            7,
            0.3,
            0.43,
            values.cpu(),
            bits.cpu(),
            group_pointers(bits.cpu(), 20 * 37),
            20 * 37,
            vdtype,
        ).view(20, 37)
        y = tsl.sparse_linear(
            torch.eye(37, dtype=xdtype, device=DEVICE), values, bits, index, regen=regen
        )
        assert torch.equal(y.cpu(), w.t().to(xdtype)), (vdtype, xdtype)


def test_bad_regen_arguments():
    values, bits, index = storage(random_mask(5, 7, 0.5))
    x = randn(3, 7)
    scale = torch.tensor(0.5, device=DEVICE)
    with pytest.raises(TypeError, match="regen to be a Regen or None"):
        tsl.sparse_linear(x, values, bits, index, regen=(scale, 1, 0.5))
    with pytest.raises(ValueError, match="regen.scale to be a 1-element float tensor"):
        tsl.sparse_linear(x, values, bits, index, regen=Regen(torch.ones(2, device=DEVICE), 1, 0.5))
    with pytest.raises(ValueError, match="regen.scale on the input's device"):
        tsl.sparse_linear_t(randn(3, 5), values, bits, index, regen=Regen(scale.to("meta"), 1, 0.5))
    with pytest.raises(ValueError, match=r"regen.seed an int in \[-2\*\*63, 2\*\*64\)"):
        tsl.sparse_linear(x, values, bits, index, regen=Regen(scale, 2**64, 0.5))


# ------------------------------------------------------------------------------------ schedules


def skewed_mask(rows, cols, sparse_density=0.002):
    """The first quarter of the rows dense, the rest so sparse that most of their 16 x 16 tiles are
    empty (at 2% density nearly every such tile would hold a tracked weight: no skew in tiles)."""
    mask = random_mask(rows, cols, sparse_density, seed=5)
    mask[: rows // 4] = True
    return mask


def test_balanced_schedule_beats_unbalanced_on_skewed_mask(poison):
    values, bits, index = storage(skewed_mask(128, 64), block_n=16, block_c=16)
    work = index.row_tile_work()  # forward: 8 row tiles, the first 2 dense
    assert work[:2].tolist() == [4, 4] and int(work[2:].max()) < 4
    m, block_m, programs = 20, 32, 4
    bal = schedule_makespan(build_schedule(work, 1, programs, balanced=True), work)
    unbal = schedule_makespan(build_schedule(work, 1, programs, balanced=False), work)
    assert bal[1] == pytest.approx(unbal[1])  # same total work, spread differently
    assert bal[0] < unbal[0], (bal, unbal)
    x, dy = randn(m, 64), randn(m, 128, seed=4)
    kw = {"block_m": block_m, "programs": programs}
    y_b = tsl.sparse_linear(x, values, bits, index, schedule="balanced", **kw)
    y_u = tsl.sparse_linear(x, values, bits, index, schedule="unbalanced", **kw)
    assert torch.equal(y_b, y_u)
    dx_b = tsl.sparse_linear_t(dy, values, bits, index, schedule="balanced", **kw)
    dx_u = tsl.sparse_linear_t(dy, values, bits, index, schedule="unbalanced", **kw)
    assert torch.equal(dx_b, dx_u)
    TRITON.assert_compute(y_b, ref.sparse_linear(x, values, bits, index))
    TRITON.assert_compute(dx_b, ref.sparse_linear_t(dy, values, bits, index))


def test_schedule_cache_reuses_and_never_goes_stale(poison):
    values, bits, index = storage(random_mask(33, 45, 0.3))
    x = randn(3, 45)
    tsl.sparse_linear(x, values, bits, index, programs=2)
    assert len(tsl._SCHEDULES) == 1
    (sched,) = [s for _, s in tsl._SCHEDULES.values()]
    tsl.sparse_linear(x, values, bits, index, programs=2)
    assert len(tsl._SCHEDULES) == 1 and next(iter(tsl._SCHEDULES.values()))[1] is sched
    tsl.sparse_linear_t(randn(3, 33), values, bits, index, programs=2)
    assert len(tsl._SCHEDULES) == 2  # backward work is cached separately
    # An entry whose index is gone (its id now belonging to another index) is not used: plant
    # one under this index's id, made for a weight with more row tiles.
    other = build_tile_index(pack_bits(torch.ones(70 * 45, dtype=torch.bool)), 70, 45, 1, 1, 16, 16)
    key = (id(index), False, 1, 2, True, False)
    tsl._SCHEDULES[key] = (weakref.ref(other), build_schedule(other.row_tile_work(), 1, 2))
    sched = tsl._schedule(index, False, 1, 2, True)
    assert sched.units.numel() == index.tiles_n == 3 and tsl._SCHEDULES[key][0]() is index
    check_both(x, values, bits, index, programs=2)
    for _ in range(tsl._SCHEDULE_CACHE_SIZE + 5):
        tsl._schedule(index, False, 1, 2, True)
        index = build_tile_index(bits, 33, 45, 1, 1, 16, 16)
    assert len(tsl._SCHEDULES) <= tsl._SCHEDULE_CACHE_SIZE


def test_schedule_cache_evicts_least_recently_used(monkeypatch):
    """Many layers cycling through the cache: the entries in use survive, the stale ones go."""
    monkeypatch.setattr(tsl, "_SCHEDULE_CACHE_SIZE", 4)
    tsl.clear_schedule_cache()
    bits = pack_bits(torch.rand(33 * 45) < 0.3)
    hot = build_tile_index(bits, 33, 45, 1, 1, 16, 16)
    first = tsl._schedule(hot, False, 1, 2, True)
    cold = []
    for _ in range(10):
        cold.append(build_tile_index(bits, 33, 45, 1, 1, 16, 16))
        tsl._schedule(cold[-1], False, 1, 2, True)
        assert tsl._schedule(hot, False, 1, 2, True) is first  # touched every time: kept
        assert len(tsl._SCHEDULES) <= 4
    assert (
        tsl._schedule(cold[-1], False, 1, 2, True)
        is tsl._SCHEDULES[(id(cold[-1]), False, 1, 2, True, False)][1]
    )
    assert (id(cold[0]), False, 1, 2, True, False) not in tsl._SCHEDULES
    tsl.clear_schedule_cache()


# ------------------------------------------------------------------------------------ arguments


def test_bad_arguments():
    values, bits, index = storage(random_mask(5, 7, 0.5))
    x, dy = randn(3, 7), randn(3, 5)
    lin, lin_t = tsl.sparse_linear, tsl.sparse_linear_t
    with pytest.raises(ValueError, match=r"x of shape \[M, 7\]"):
        lin(randn(3, 5), values, bits, index)
    with pytest.raises(ValueError, match=r"dy of shape \[M, 5\]"):
        lin_t(x, values, bits, index)
    with pytest.raises(ValueError, match=r"x of shape"):
        lin(randn(7), values, bits, index)
    with pytest.raises(TypeError, match="x of dtype"):
        lin(x.double(), values, bits, index)
    with pytest.raises(TypeError, match="values of dtype"):
        lin(x, values.double(), bits, index)
    with pytest.raises(ValueError, match="values with index.nnz"):
        lin(x, values[:-1], bits, index)
    with pytest.raises(ValueError, match="bits with 5 bytes"):
        lin(x, values, bits[:-1], index)
    with pytest.raises(TypeError, match="bits to be a uint8"):
        lin(x, values, bits.to(torch.int32), index)
    with pytest.raises(ValueError, match=r"bias of shape \[5\]"):
        lin(x, values, bits, index, randn(7))
    with pytest.raises(ValueError, match="values on x's device"):
        lin(x, values.to("meta"), bits, index)
    with pytest.raises(ValueError, match="bias on x's device"):
        lin(x, values, bits, index, torch.zeros(5, device="meta"))
    with pytest.raises(ValueError, match="schedule one of 'grid', 'balanced', 'unbalanced'"):
        lin(x, values, bits, index, schedule="fast")
    with pytest.raises(ValueError, match="block_m a power of two >= 16"):
        lin_t(dy, values, bits, index, block_m=24)
    with pytest.raises(ValueError, match="programs a positive int"):
        lin(x, values, bits, index, programs=0)
    with pytest.raises(ValueError, match="num_warps"):
        lin(x, values, bits, index, num_warps=3)
    with pytest.raises(TypeError, match="index to be a TileIndex"):
        lin(x, values, bits, None)
    conv = build_tile_index(pack_bits(torch.ones(5 * 7 * 9, dtype=torch.bool)), 5, 7, 9)
    with pytest.raises(ValueError, match="index with ksize == 1 and groups == 1"):
        lin(x, torch.zeros(conv.nnz), pack_bits(torch.ones(5 * 7 * 9, dtype=torch.bool)), conv)
    small = build_tile_index(bits, 5, 7, 1, 1, 8, 16)
    with pytest.raises(ValueError, match="index.block_n to be a power of two >= 16"):
        lin(x, values, bits, small)
    odd = build_tile_index(bits, 5, 7, 1, 1, 16, 48)
    with pytest.raises(ValueError, match="index.block_c to be a power of two >= 16"):
        lin_t(dy, values, bits, odd)


def test_tf32_only_on_gpu_and_when_allowed():
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        want = "ieee" if triton_util.INTERPRETED else "tf32"
        assert tsl._dot_config(F32) == (triton_util.INTERPRETED, want)
        assert tsl._dot_config(BF16)[1] == "ieee"
        matmul.allow_tf32 = False
        assert tsl._dot_config(F32)[1] == "ieee"
    finally:
        matmul.allow_tf32 = before


# ----------------------------------------------------------------------------------- GPU shapes


@without_gpu
def test_kernels_compile_for_sm90(tmp_path):
    """Lower both kernels to cubins for sm_90 without a GPU, with the GPU defaults (native
    float16 / bfloat16 and tf32 dots, persistent and grid, ``for`` loops), and check that nothing
    spills."""
    snippet = """
        from procrustes_kernels.ops.compute import triton_linear as T

        def common(x, v, ro):
            return {"values_ptr": v, "bits_ptr": "*u8", "row_off_ptr": ro}
        SIZES = {"M": "i32", "N": "i32", "K": "i32", "m_tiles": "i32", "TILES_C": "i32"}
        SCHED = {"sched_ptr_ptr": "*i32", "sched_units_ptr": "*i32", "scale_ptr": "*fp32"}
        REGEN = {"seed": "u64", "bound": "fp32"}
        def fwd(x, v, ro="*i32"):
            return {"y_ptr": x, "x_ptr": x, **common(x, v, ro), "row_ptr_ptr": "*i32",
                    "row_tiles_ptr": "*i32", "bias_ptr": "*fp32", **SCHED, **SIZES, **REGEN}
        def bwd(x, v, ro="*i32"):
            return {"dx_ptr": x, "dy_ptr": x, **common(x, v, ro), "col_ptr_ptr": "*i32",
                    "col_tiles_ptr": "*i32", **SCHED, **SIZES, "TILES_N": "i32", **REGEN}
        def flags(persistent, precision, offs64, bm, bn, bc, while_loops=False, init=False):
            return {"PERSISTENT": persistent, "WHILE_LOOPS": while_loops, "HAS_INIT": init,
                    "DOT_F32": False,
                    "PRECISION": precision, "OFFS64": offs64, "BLOCK_M": bm, "BLOCK_N": bn,
                    "BLOCK_C": bc}
        jobs = [
            (T._linear_kernel, fwd("*bf16", "*fp32"),
             {"HAS_BIAS": True, **flags(True, "ieee", False, 128, 64, 32)}, 8),
            (T._linear_kernel, fwd("*fp32", "*bf16", "*i64"),
             {"HAS_BIAS": False, **flags(False, "tf32", True, 64, 16, 16)}, 4),
            (T._linear_t_kernel, bwd("*fp16", "*fp32"), flags(True, "ieee", False, 128, 64, 32), 4),
            (T._linear_t_kernel, bwd("*fp32", "*fp16"), flags(False, "ieee", True, 16, 32, 16), 4),
            # The interpreter's loop form compiles too (T._WHILE_LOOPS is a module constant).
            (T._linear_kernel, fwd("*fp16", "*fp16"),
             {"HAS_BIAS": True, **flags(True, "ieee", False, 64, 32, 32, True)}, 4),
            # The layers' default compute tile (32 x 32) at the GPU's BLOCK_M, bfloat16.
            (T._linear_kernel, fwd("*bf16", "*bf16"),
             {"HAS_BIAS": True, **flags(True, "ieee", False, 128, 32, 32)}, 4),
            (T._linear_t_kernel, bwd("*bf16", "*bf16"), flags(True, "ieee", False, 128, 32, 32), 4),
            # Regenerating the untracked weights in the tile loads (every tile visited).
            (T._linear_kernel, fwd("*bf16", "*fp32"),
             {"HAS_BIAS": True, **flags(True, "ieee", False, 128, 32, 32, init=True)}, 4),
            (T._linear_t_kernel, bwd("*fp32", "*fp32"),
             flags(False, "tf32", False, 128, 32, 32, init=True), 4),
        ]
        for fn, sig, consts, warps in jobs:
            k = compile_sm90(fn, sig, consts, num_warps=warps, num_stages=3)
            assert "ld.local" not in k.asm["ptx"], "register spills"
        """
    compile_for_sm90(snippet, tmp_path, expected=9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU)")
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cuda_default_config_at_size(dtype):
    """GPU defaults (block_m 128, SM-count programs, native half dots) on a layer-sized weight."""
    values, bits, index = storage(skewed_mask(1024, 768, 0.02), block_n=64, block_c=32)
    for schedule in SCHEDULES:
        check_both(
            randn(300, 768, dtype=dtype),
            values,
            bits,
            index,
            randn(1024, seed=3),
            schedule=schedule,
        )
