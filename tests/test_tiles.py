"""Tile granularity of the optimizer (``DropBack(..., granularity="tile")``).

Order: hand-computed cases of the pure functions of :mod:`procrustes_kernels.tiles` (tile means,
edge tiles, groups and kernels, the selection rule), then the optimizer against a dense emulation
of the tile rule written here, the three backends against each other, checkpoints, arguments and
the element granularity left as it was. The Triton ``scores`` kernel the tile rule uses on GPUs is
compared with the reference in ``test_backend_equivalence.py`` and compiled for sm_90 in
``test_triton_ops.py``.
"""

from __future__ import annotations

import copy
import functools
import io

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_same_state,
    assert_same_tensor,
    batches,
    budgeted_modules,
    save_bytes,
    snapshot,
    sparse_weights,
    train,
)
from torch import nn

import procrustes_kernels as pk
from procrustes_kernels import ops
from procrustes_kernels.ops.compute.index import build_tile_index
from procrustes_kernels.optim import decay_factor
from procrustes_kernels.philox import init_values
from procrustes_kernels.tiles import (
    select_tiles,
    tile_element_mask,
    tile_grid,
    tile_scores,
    tile_sizes,
)

# ------------------------------------------------------------------------ tile_scores, by hand


def test_golden_4x4_with_2x2_tiles():
    s = torch.arange(16, dtype=torch.float32)  # W[r, c] = 4 r + c
    means = tile_scores(s, (4, 4, 1, 1), (2, 2))
    # [0, 1, 4, 5] [2, 3, 6, 7] / [8, 9, 12, 13] [10, 11, 14, 15]
    assert means.dtype == torch.float64
    assert means.tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert tile_sizes((4, 4, 1, 1), (2, 2)).tolist() == [[4, 4], [4, 4]]


def test_golden_edge_tiles_are_means_of_their_own_elements():
    s = torch.arange(15, dtype=torch.float32)  # 3 x 5, W[r, c] = 5 r + c
    assert tile_grid((3, 5, 1, 1), (2, 2)) == (2, 3)
    assert tile_sizes((3, 5, 1, 1), (2, 2)).tolist() == [[4, 4, 2], [2, 2, 1]]
    means = tile_scores(s, (3, 5, 1, 1), (2, 2))
    # rows 0-1: [0 1 5 6] [2 3 7 8] [4 9]; row 2: [10 11] [12 13] [14]
    assert means.tolist() == [[3.0, 5.0, 6.5], [10.5, 12.5, 14.0]]


def test_golden_groups_and_kernel_positions():
    # rows 4 in 2 groups, 2 columns per group, 3 kernel positions: W[r, c, k] = 6 r + 3 c + k.
    s = torch.arange(24, dtype=torch.float32)
    geo = (4, 2, 3, 2)
    # tile (2, 1): one row tile per group; a tile is 2 rows x 1 column x 3 positions.
    assert tile_scores(s, geo, (2, 1)).tolist() == [[4.0, 7.0], [16.0, 19.0]]
    # tile (3, 2): the row tile is cut at the group border (2 rows, partial), never across it.
    assert tile_sizes(geo, (3, 2)).tolist() == [[12], [12]]
    assert tile_scores(s, geo, (3, 2)).tolist() == [[5.5], [17.5]]
    # tile (1, 1): every (row, column) pair with its kernel.
    assert tile_scores(s, geo, (1, 1)).flatten().tolist() == [1.0 + 3 * i for i in range(8)]
    # The expanded mask of group 1's first tile is rows 2-3, column 0, all positions.
    mask = tile_element_mask(torch.tensor([[False, False], [True, False]]), geo, (2, 1))
    assert mask.nonzero().flatten().tolist() == [12, 13, 14, 18, 19, 20]


def brute_tile_means(s, geo, tile):
    rows, cols, ksize, groups = geo
    bn, bc = tile
    rpg = rows // groups
    w = s.reshape(rows, cols, ksize)
    out = []
    for g in range(groups):
        for r0 in range(0, rpg, bn):
            row = []
            for c0 in range(0, cols, bc):
                part = w[g * rpg + r0 : g * rpg + min(r0 + bn, rpg), c0 : min(c0 + bc, cols)]
                row.append(float(part.double().sum()) / part.numel())
            out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    "geo,tile",
    [
        ((33, 20, 1, 1), (4, 8)),
        ((7, 13, 1, 1), (32, 32)),  # one partial tile
        ((12, 5, 9, 3), (3, 2)),
        ((10, 3, 4, 2), (4, 3)),
        ((6, 1, 25, 6), (1, 1)),  # depthwise
    ],
)
def test_tile_scores_match_brute_force(geo, tile):
    rows, cols, ksize, _ = geo
    s = torch.rand(rows * cols * ksize, generator=torch.Generator().manual_seed(1))
    got = tile_scores(s, geo, tile)
    assert got.shape == tile_grid(geo, tile)
    torch.testing.assert_close(got, brute_tile_means(s, geo, tile), rtol=1e-15, atol=0)
    sizes = tile_sizes(geo, tile)
    assert int(sizes.sum()) == s.numel()
    # Every tile's mask covers exactly its size; the tiles partition the weight.
    cover = torch.zeros(s.numel(), dtype=torch.int64)
    for i in range(sizes.numel()):
        one = torch.zeros(sizes.numel(), dtype=torch.bool)
        one[i] = True
        m = tile_element_mask(one.view(sizes.shape), geo, tile)
        assert int(m.sum()) == int(sizes.flatten()[i])
        cover += m
    assert torch.all(cover == 1)


# ------------------------------------------------------------------------ select_tiles, by hand


def test_golden_selection_takes_a_prefix_of_the_ranking():
    scores = [torch.tensor([[3.0, 1.0], [2.0, 0.5]], dtype=torch.float64)]
    sizes = [torch.full((2, 2), 4)]
    # 3 (4 weights), 2 (8), then 1 would make 12 > 9: stop there, 0.5 is not reached.
    assert select_tiles(scores, 9, sizes)[0].tolist() == [[True, False], [True, False]]
    assert select_tiles(scores, 12, sizes)[0].tolist() == [[True, True], [True, False]]
    assert select_tiles(scores, 3, sizes)[0].tolist() == [[False, False], [False, False]]
    assert select_tiles(scores, 0, sizes)[0].sum() == 0


def test_golden_selection_stops_at_the_first_tile_that_does_not_fit():
    scores = [torch.tensor([[5.0, 4.0, 3.0]], dtype=torch.float64)]
    sizes = [torch.tensor([[4, 8, 2]])]
    # 5 fits (4 <= 7); 4 does not (12 > 7): the selection ends, although 3 (2 weights) would fit.
    assert select_tiles(scores, 7, sizes)[0].tolist() == [[True, False, False]]
    assert select_tiles(scores, 14, sizes)[0].tolist() == [[True, True, True]]


def test_golden_selection_ties_and_zero_scores():
    a = torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    sizes = [torch.ones(2, 2, dtype=torch.int64), torch.ones(1, 2, dtype=torch.int64)]
    # Ranking: a[1,0]=2, b[0,1]=2 (later layer), a[0,0]=1, a[1,1]=1, b[0,0]=1, a[0,1]=0 (never).
    want = [
        (1, [[False, False], [True, False]], [[False, False]]),
        (2, [[False, False], [True, False]], [[False, True]]),
        (3, [[True, False], [True, False]], [[False, True]]),
        (4, [[True, False], [True, True]], [[False, True]]),
        (5, [[True, False], [True, True]], [[True, True]]),
        (100, [[True, False], [True, True]], [[True, True]]),
    ]
    for k, wa, wb in want:
        got = select_tiles([a, b], k, sizes)
        assert got[0].tolist() == wa and got[1].tolist() == wb, k
        assert got[0].dtype == torch.bool


def test_select_tiles_rejects_bad_input():
    s = [torch.zeros(2, 2, dtype=torch.float64)]
    with pytest.raises(ValueError, match="k"):
        select_tiles(s, -1, [torch.ones(2, 2)])
    with pytest.raises(ValueError, match="sizes"):
        select_tiles(s, 1, [torch.ones(2, 3)])
    with pytest.raises(ValueError, match="sizes"):
        select_tiles(s, 1, [])
    with pytest.raises(ValueError, match="sizes"):
        select_tiles(s, 1, [torch.zeros(2, 2)])
    assert select_tiles([], 5, []) == []
    with pytest.raises(ValueError, match="tile"):
        tile_scores(torch.zeros(4), (2, 2, 1, 1), (2, 0))
    with pytest.raises(ValueError, match="geometry"):
        tile_scores(torch.zeros(4), (2, 2, 1), (2, 2))
    with pytest.raises(ValueError, match="groups"):
        tile_scores(torch.zeros(12), (3, 2, 2, 2), (2, 2))
    with pytest.raises(ValueError, match="scores_flat"):
        tile_scores(torch.zeros(5), (2, 2, 1, 1), (2, 2))


# ------------------------------------------------------------------------ models and training

# The helpers' CNN with its second convolution in 2 groups (tiles must not cross them).
make = functools.partial(helpers.make, channels=8, groups=2)

# Non-square tiles with edge tiles in every layer (and across the groups of the CNN's second conv).
TILES = {"mlp": (4, 8), "cnn": (3, 2)}


# ---------------------------------------------------------------------------------------------
# The dense emulation of the tile rule: dense weights and momentum, w0 from the layers' seeds,
# tiles cut and ranked with plain loops. Written independently of procrustes_kernels.tiles.
# ---------------------------------------------------------------------------------------------
def dense_tiles(module, tile):
    """``[(layer-shaped bool mask, element count)]`` of every tile, in row-major tile order."""
    w = module.weight
    rows, cols = w.shape[0], w.shape[1]
    groups = getattr(module, "groups", 1)
    rpg = rows // groups
    bn, bc = tile
    out = []
    for g in range(groups):
        for r0 in range(0, rpg, bn):
            for c0 in range(0, cols, bc):
                m = torch.zeros(w.shape, dtype=torch.bool)
                m[g * rpg + r0 : g * rpg + min(r0 + bn, rpg), c0 : min(c0 + bc, cols)] = True
                out.append((m, int(m.sum())))
    return out


def choose_tiles(candidates, k):
    """``candidates``: ``[(mean, layer, tile index, count)]``; the tile rule of the optimizer."""
    ranked = sorted((c for c in candidates if c[0] > 0), key=lambda c: (-c[0], c[1], c[2]))
    chosen, used = set(), 0
    for _mean, layer, idx, count in ranked:
        if used + count > k:
            break
        used += count
        chosen.add((layer, idx))
    return chosen


def emulate_tiles(sparse_model, data, steps, lr, budget, momentum, wd, init_decay, tile, scope):
    model = pk.densify(copy.deepcopy(sparse_model))
    budgeted = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    weights = [m.weight for m in budgeted]
    w0 = [
        init_values(w.seed, w.weight_numel, w.bound).view(tuple(w.shape))
        for _, w in pk.budgeted_weights(sparse_model)
    ]
    tiles = [dense_tiles(m, tile) for m in budgeted]
    others = [p for p in model.parameters() if all(p is not w for w in weights)]
    sgd = torch.optim.SGD(others, lr=lr, momentum=momentum, weight_decay=wd)
    tracked = [torch.zeros_like(w, dtype=torch.bool) for w in weights]
    mom = [torch.zeros_like(w) for w in weights]
    total = sum(w.numel() for w in weights)
    k = budget if isinstance(budget, int) else max(1, round(budget * total))
    masks_per_step = []
    for n in range(1, steps + 1):
        x, y = data[n - 1]
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        d = torch.tensor(decay_factor(n, init_decay), dtype=torch.float32)
        with torch.no_grad():
            cands, moms, candidates = [], [], []
            for i, w in enumerate(weights):
                g = w.grad.add(w, alpha=wd) if wd else w.grad
                m = torch.where(tracked[i], mom[i].mul(momentum).add(g), g) if momentum else g
                c = w.add(m, alpha=-lr)
                s = (c - w0[i] * d).abs()
                cands.append(c)
                moms.append(m)
                for j, (tm, count) in enumerate(tiles[i]):
                    candidates.append((float(s[tm].double().sum()) / count, i, j, count))
            if scope == "global":
                chosen = choose_tiles(candidates, k)
            else:
                chosen = set()
                for i, w in enumerate(weights):
                    kl = max(1, round(w.numel() * (k / total)))
                    chosen |= choose_tiles([c for c in candidates if c[1] == i], kl)
            masks = []
            for i, w in enumerate(weights):
                mk = torch.zeros_like(w, dtype=torch.bool)
                for j, (tm, _) in enumerate(tiles[i]):
                    if (i, j) in chosen:
                        mk |= tm
                masks.append(mk)
            for i, w in enumerate(weights):
                w.copy_(torch.where(masks[i], cands[i], w0[i] * d))
                mom[i] = torch.where(masks[i], moms[i], torch.zeros_like(moms[i]))
                tracked[i] = masks[i]
            sgd.step()
        masks_per_step.append(masks)
    return model, masks_per_step


def assert_whole_tiles(opt):
    """Every layer's tracked set is a union of whole tiles (counted from the bits alone)."""
    bn, bc = opt.tile
    for w in opt.weights:
        rows, cols, ksize, groups = w.geometry
        index = build_tile_index(w.bits, rows, cols, ksize, groups, bn, bc)
        sizes = tile_sizes((rows, cols, ksize, groups), (bn, bc)).to(torch.int32)
        nnz = index.tile_nnz.cpu()
        assert torch.all((nnz == 0) | (nnz == sizes)), "a tile is partly tracked"


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("init_decay", [1.0, 0.9], ids=["dropback", "procrustes"])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 5e-3)], ids=["sgd", "momentum_wd"])
def test_matches_dense_tile_emulation_for_30_steps(kind, scope, init_decay, momentum, wd):
    steps, lr, budget, tile = 30, 0.1, 0.2, TILES[kind]
    model = make(kind)
    data = batches(kind, steps)
    ref_model, ref_masks = emulate_tiles(
        model, data, steps, lr, budget, momentum, wd, init_decay, tile, scope
    )
    cls = pk.DropBack if init_decay == 1.0 else pk.Procrustes  # Procrustes: 0.9, "quantile"
    opt = cls(
        model.parameters(),
        lr=lr,
        budget=budget,
        momentum=momentum,
        weight_decay=wd,
        scope=scope,
        granularity="tile",
        tile=tile,
    )
    assert opt.init_decay == init_decay

    def check(n):
        assert len(opt.weights) == len(ref_masks[n])
        for w, want in zip(opt.weights, ref_masks[n]):
            assert torch.equal(w.storage.mask(), want.flatten()), f"mask differs at step {n + 1}"
        assert_whole_tiles(opt)
        assert 0 < opt.tracked_count <= opt.budget
        if scope == "layer":
            assert all(c <= b for c, b in zip(opt.layer_counts, opt.layer_budgets))

    train(model, opt, data, steps, on_step=check)
    want = [m.weight for m in ref_model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for got, w in zip(sparse_weights(model), want):
        assert torch.equal(got, w.detach())
    want_biases = [m.bias for m in ref_model.modules() if getattr(m, "bias", None) is not None]
    got_biases = [m.bias for m in budgeted_modules(model) if m.bias is not None]
    assert len(got_biases) == len(want_biases) > 0
    for got, w in zip(got_biases, want_biases):
        assert torch.equal(got.detach(), w.detach())


def test_tile_granularity_ignores_selection():
    data = batches("mlp", 6)
    runs = []
    for selection in ("topk", "quantile", "quantile_paper"):
        model = make("mlp")
        opt = pk.DropBack(
            model.parameters(),
            lr=0.1,
            budget=0.2,
            selection=selection,
            granularity="tile",
            tile=(4, 8),
        )
        train(model, opt, data, 6)
        assert [r.state_dict() for r in opt.rules] == [None]  # tiles are ranked exactly
        runs.append(sparse_weights(model))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


# ------------------------------------------------------------------------------------ backends


def backend_run(kind, backend, scope, device="cpu", steps=3):
    model = make(kind).to(device)
    data = [(x.to(device), y.to(device)) for x, y in batches(kind, steps, seed=7)]
    opt = pk.DropBack(
        model.parameters(),
        lr=0.1,
        budget=0.25,
        momentum=0.9,
        weight_decay=1e-3,
        scope=scope,
        granularity="tile",
        tile=TILES[kind],
    )
    history = []
    with ops.use_backend(backend):
        train(
            model,
            opt,
            data,
            steps,
            on_step=lambda n: history.append([(w.bits.cpu(), w.values.cpu()) for w in opt.weights]),
        )
    return history


@pytest.mark.parametrize("kind,scope", [("mlp", "global"), ("mlp", "layer"), ("cnn", "global")])
def test_backends_choose_the_same_tiles(kind, scope):
    available = ops.available_backends()
    assert available["reference"] and available["triton"], available
    # Each backend against the reference on its own device (Triton on the GPU when there is one).
    triton_device = "cuda" if torch.cuda.is_available() else "cpu"
    for backend, device in (("cpp", "cpu"), ("triton", triton_device)):
        if not available[backend]:
            pytest.fail(f"backend {backend} is not available: {ops.backend_error(backend)}")
        want = backend_run(kind, "reference", scope, device)
        got = backend_run(kind, backend, scope, device)
        for step, (g, w) in enumerate(zip(got, want)):
            for i, ((bg, vg), (bw, vw)) in enumerate(zip(g, w)):
                assert torch.equal(bg, bw), f"{backend}, step {step + 1}, layer {i}: tiles differ"
                # Compaction is the reference's arithmetic on every backend (Triton: the fallback).
                assert torch.equal(vg, vw), f"{backend}, step {step + 1}, layer {i}: values differ"


# ---------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "cls,kw",
    [
        (pk.DropBack, {"momentum": 0.9, "weight_decay": 1e-3}),
        (pk.Procrustes, {"momentum": 0.9, "scope": "layer"}),
    ],
)
def test_checkpoint_resume_is_bit_identical(cls, kw):
    n_steps, m_steps = 6, 5
    kw = {**kw, "granularity": "tile", "tile": TILES["cnn"]}
    data = batches("cnn", n_steps + m_steps)
    straight = make("cnn")
    opt = cls(straight.parameters(), lr=0.05, budget=0.2, **kw)
    train(straight, opt, data, n_steps + m_steps)

    first = make("cnn")
    opt1 = cls(first.parameters(), lr=0.05, budget=0.2, **kw)
    train(first, opt1, data, n_steps)
    blob = save_bytes(first, opt1)
    extra = opt1.state_dict()["dropback"]
    assert extra["granularity"] == "tile" and tuple(extra["tile"]) == TILES["cnn"]

    resumed = make("cnn", seed=99)  # different init: everything must come from the checkpoint
    opt2 = cls(resumed.parameters(), lr=0.05, budget=0.2, **kw)
    ckpt = torch.load(io.BytesIO(blob))
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, data, m_steps, start=n_steps)

    for a, b in zip(sparse_weights(straight), sparse_weights(resumed)):
        assert torch.equal(a, b)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert_same_tensor(a, b, name)
    assert opt.state_dict()["dropback"] == opt2.state_dict()["dropback"]


def test_load_state_dict_checks_granularity_and_tile():
    data = batches("mlp", 3)
    model = make("mlp")
    element = pk.DropBack(model.parameters(), lr=0.1, budget=0.2, momentum=0.9)
    train(model, element, data, 3)
    saved_element = element.state_dict()
    assert saved_element["dropback"]["granularity"] == "element"

    tiled_model = make("mlp")
    tiled = pk.DropBack(
        tiled_model.parameters(), lr=0.1, budget=0.2, granularity="tile", tile=(4, 8)
    )
    train(tiled_model, tiled, data, 3)
    saved_tile = tiled.state_dict()

    fresh_model = make("mlp")
    fresh = pk.DropBack(
        fresh_model.parameters(), lr=0.1, budget=0.2, granularity="tile", tile=(4, 8)
    )
    before = snapshot(fresh_model, fresh)
    with pytest.raises(ValueError, match="granularity"):
        fresh.load_state_dict(saved_element)
    other_tile = pk.DropBack(
        make("mlp").parameters(), lr=0.1, budget=0.2, granularity="tile", tile=(8, 4)
    )
    with pytest.raises(ValueError, match="tile"):
        other_tile.load_state_dict(saved_tile)
    # A checkpoint from before the granularity existed is element-granular.
    old = copy.deepcopy(saved_element)
    del old["dropback"]["granularity"], old["dropback"]["tile"]
    with pytest.raises(ValueError, match="granularity"):
        fresh.load_state_dict(old)
    assert_same_state(before, snapshot(fresh_model, fresh))
    assert fresh.step_count == 0

    plain_model = make("mlp")
    plain = pk.DropBack(plain_model.parameters(), lr=0.1, budget=0.2, momentum=0.9)
    plain_model.load_state_dict(model.state_dict())
    plain.load_state_dict(old)
    assert plain.step_count == 3
    # The tile of an element-granular optimizer is not used, so it is not compared.
    other_model = make("mlp")
    other_model.load_state_dict(model.state_dict())
    other = pk.DropBack(other_model.parameters(), lr=0.1, budget=0.2, momentum=0.9, tile=(2, 2))
    other.load_state_dict(saved_element)
    assert other.step_count == 3
    # The tile may come back as a list (e.g. through JSON).
    listed = copy.deepcopy(saved_tile)
    listed["dropback"]["tile"] = list(listed["dropback"]["tile"])
    same = pk.DropBack(
        make("mlp").parameters(), lr=0.1, budget=0.2, granularity="tile", tile=(4, 8)
    )
    same.load_state_dict(listed)
    assert same.step_count == 3


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"granularity": "block"}, "granularity"),
        ({"granularity": None}, "granularity"),
        ({"granularity": ["tile"]}, "granularity"),
        ({"granularity": "tile", "tile": (0, 4)}, "tile"),
        ({"granularity": "tile", "tile": (4, -1)}, "tile"),
        ({"granularity": "tile", "tile": (4,)}, "tile"),
        ({"granularity": "tile", "tile": (4, 4, 4)}, "tile"),
        ({"granularity": "tile", "tile": 4}, "tile"),
        ({"granularity": "tile", "tile": (4.0, 4)}, "tile"),
        ({"granularity": "tile", "tile": (True, 4)}, "tile"),
        ({"granularity": "tile", "tile": "32x32"}, "tile"),
        ({"granularity": "tile", "tile": None}, "tile"),
        ({"tile": (0, 0)}, "tile"),
    ],
)
def test_bad_arguments_raise_and_leave_model_unchanged(kw, match):
    model = make("mlp")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match) as err:
        pk.DropBack(model.parameters(), lr=0.1, budget=0.1, **kw)
    assert "expected" in str(err.value)
    with pytest.raises(ValueError, match=match):
        pk.Procrustes(model.parameters(), lr=0.1, budget=0.1, **kw)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert_same_tensor(before[k], after[k], k)
    weights = pk.budgeted_weights(model)
    assert len(weights) == 3 and all(w.grad is None for _, w in weights)


def test_repr_shows_granularity():
    model = make("mlp")
    assert "granularity='element'" in repr(pk.DropBack(model.parameters(), lr=0.1, budget=0.1))
    assert "tile=" not in repr(pk.DropBack(model.parameters(), lr=0.1, budget=0.1))
    r = repr(pk.Procrustes(model.parameters(), lr=0.1, budget=0.1, granularity="tile", tile=[8, 4]))
    assert "granularity='tile', tile=(8, 4)" in r


@pytest.mark.parametrize("selection", ["topk", "quantile"])
def test_element_granularity_is_unchanged(selection):
    data = batches("cnn", 6)
    a, b = make("cnn"), make("cnn")
    opt_a = pk.DropBack(a.parameters(), lr=0.1, budget=0.1, momentum=0.9, selection=selection)
    opt_b = pk.DropBack(
        b.parameters(),
        lr=0.1,
        budget=0.1,
        momentum=0.9,
        selection=selection,
        granularity="element",
        tile=(3, 2),
    )
    train(a, opt_a, data, 6)
    train(b, opt_b, data, 6)
    assert len(opt_a.weights) == len(opt_b.weights) == 3
    for wa, wb in zip(opt_a.weights, opt_b.weights):
        assert torch.equal(wa.bits, wb.bits)
        assert torch.equal(wa.values, wb.values)
    extra_a, extra_b = opt_a.state_dict()["dropback"], opt_b.state_dict()["dropback"]
    assert extra_a.pop("tile") == (32, 32) and extra_b.pop("tile") == (3, 2)
    assert extra_a == extra_b and extra_a["granularity"] == "element"
