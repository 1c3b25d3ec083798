"""Regeneration without materialisation: ``materialize`` over a range of whole groups (every
backend against the reference's slice of the whole weight), and the materialise path's GEMMs a
panel of output rows at a time (:mod:`procrustes_kernels.panels`) against the nn ops on the whole
effective weight, with no call ever writing more than one panel of a layer's weight."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_verbose
from helpers.training import train
from test_backend_equivalence import implementation, implementations

import procrustes_kernels as pk
from procrustes_kernels import ops, panels
from procrustes_kernels.ops.update import reference as ref
from procrustes_kernels.storage import GROUP_SIZE, BlockStorage, group_pointers, pack_bits

SEED, BOUND = 11, 0.25


def _storage(n, density, gen, dtype=torch.float32):
    mask = torch.rand(n, generator=gen) < density
    bits = pack_bits(mask)
    values = torch.randn(int(mask.sum()), generator=gen).to(dtype)
    return values, bits, group_pointers(bits, n)


# ------------------------------------------------------------------------- materialize over a range
def test_golden_range():
    """600 weights, 3 tracked: the second group alone, then the last (short) one."""
    n = 600
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[3, 300, 599]] = True
    bits = pack_bits(mask)
    values = torch.tensor([1.5, -2.0, 4.0])
    gp = group_pointers(bits, n)
    mid = ref.materialize(SEED, BOUND, 0.0, values, bits, gp, n, torch.float32, 256, 256)
    want = torch.zeros(256)
    want[300 - 256] = -2.0
    assert torch.equal(mid, want)
    last = ref.materialize(SEED, BOUND, 0.0, values, bits, gp, n, torch.float32, 512)
    assert last.shape == (88,) and last[-1] == 4.0 and last[:-1].eq(0).all()


@pytest.mark.parametrize("backend", implementations("materialize"))
@pytest.mark.parametrize("n", [1, 255, 256, 257, 5 * 256 + 77])
@pytest.mark.parametrize("scale", [0.0, 0.37])
def test_range_is_the_slice_of_the_whole_weight(poison, backend, n, scale):
    gen = torch.Generator().manual_seed(n)
    values, bits, gp = _storage(n, 0.3, gen)
    fn = implementation(backend, "materialize", {torch.float32})
    whole = ref.materialize(SEED, BOUND, scale, values, bits, gp, n, torch.float32)
    ngroups = -(-n // GROUP_SIZE)
    for g0 in range(ngroups + 1):
        for g1 in range(g0, ngroups + 1):
            start, stop = min(n, g0 * GROUP_SIZE), min(n, g1 * GROUP_SIZE)
            out = fn(SEED, BOUND, scale, values, bits, gp, n, torch.float32, start, stop - start)
            assert torch.equal(out, whole[start:stop]), (start, stop)


@pytest.mark.parametrize("backend", implementations("materialize"))
@pytest.mark.parametrize(
    "start,count", [(1, None), (256, 3), (0, 1025), (-256, None), (512, -1), (256.0, None)]
)
def test_bad_range_is_refused(backend, start, count):
    gen = torch.Generator().manual_seed(0)
    n = 1000
    values, bits, gp = _storage(n, 0.3, gen)
    fn = implementation(backend, "materialize", {torch.float32})
    with pytest.raises(ValueError, match="start"):
        fn(SEED, BOUND, 0.5, values, bits, gp, n, torch.float32, start, count)


def test_the_op_takes_a_range_and_its_fake_the_size():
    gen = torch.Generator().manual_seed(1)
    n = 3 * 256 + 5
    values, bits, gp = _storage(n, 0.2, gen)
    scale = torch.tensor(0.5)
    args = (values, bits, gp, scale, SEED, BOUND, n, True, 256, 512)
    torch.library.opcheck(torch.ops.procrustes.materialize, args)
    got = torch.ops.procrustes.materialize(*args)
    whole = ref.materialize(SEED, BOUND, 0.5, values, bits, gp, n, torch.float32)
    assert torch.equal(got, whole[256:768])
    assert torch.equal(ops.materialize(*args[:-2], 768), whole[768:])


# ---------------------------------------------------------------------------------------- panels
def _track(weight, density, scale, gen):
    shape = tuple(weight.shape)
    mask = torch.rand(shape, generator=gen) < density
    dense = torch.randn(shape, generator=gen) * 0.1
    weight.set_tracked(BlockStorage.from_mask(dense, mask, weight.block_size), scale=scale)


@pytest.fixture
def small_panels(monkeypatch):
    """Panels of at most 1000 weights, and the element counts of every materialize call."""
    monkeypatch.setattr(panels, "PANEL_WEIGHTS", 1000)
    counts = []
    real = ops.materialize

    def counting(*args):
        out = real(*args)
        counts.append(out.numel())
        return out

    monkeypatch.setattr(panels.ops, "materialize", counting)
    return counts


def _nn_ref(layer, x, eff):
    if isinstance(layer, pk.SparseLinear):
        return F.linear(x, eff, layer.bias)
    return layer._conv_forward(x, eff, layer.bias)


def _compare(layer, x, scale=0.3, density=0.15, rtol=1e-5, atol=1e-6, counts=None):
    gen = torch.Generator().manual_seed(5)
    w = layer.weight
    _track(w, density, scale, gen)
    eff = w.effective().detach().clone().requires_grad_()
    if counts is not None:
        counts.clear()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(xa)
    want = _nn_ref(layer, xb, eff)
    assert w.last_path == "dense"
    assert_close_verbose(out, want, rtol=rtol, atol=atol)
    g = torch.randn(out.shape, generator=gen).to(out.dtype)
    out.backward(g)
    want.backward(g)
    assert_close_verbose(xa.grad, xb.grad, rtol=rtol, atol=atol)
    assert_close_verbose(w.grad, eff.grad.to(w.grad.dtype), rtol=rtol, atol=atol)
    if layer.bias is not None:
        assert layer.bias.grad is not None
    if counts is not None:
        # forward and backward each wrote the weight a panel at a time, never whole
        p = panels.Panels(w, torch.float32)
        assert counts and max(counts) <= max(1000, p.multiple * p.row_len)
        assert max(counts) < w.weight_numel
        assert sum(counts) == 2 * w.weight_numel


CASES = [
    ("linear", lambda: pk.SparseLinear(48, 70), (4, 6, 48)),
    ("linear no bias", lambda: pk.SparseLinear(64, 37, bias=False), (9, 64)),
    ("conv", lambda: pk.SparseConv2d(16, 40, 3, padding=1), (2, 16, 9, 11)),
    ("conv strided", lambda: pk.SparseConv2d(16, 40, 3, stride=2, dilation=2), (2, 16, 13, 10)),
    ("conv groups", lambda: pk.SparseConv2d(32, 64, 3, padding=1, groups=4), (2, 32, 7, 9)),
    ("conv same even", lambda: pk.SparseConv2d(16, 24, 4, padding="same"), (3, 16, 8, 7)),
    ("conv unbatched", lambda: pk.SparseConv2d(64, 40, 1, bias=False), (64, 5, 6)),
]


@pytest.mark.parametrize("name,make_layer,shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_panels_equal_the_whole_weight(small_panels, name, make_layer, shape, scale):
    torch.manual_seed(0)
    layer = make_layer()
    layer.weight.compute = "dense"
    _compare(layer, torch.randn(shape), scale=scale, counts=small_panels)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_panels_of_an_empty_and_a_full_layer(small_panels, density):
    torch.manual_seed(1)
    _compare(pk.SparseLinear(48, 70), torch.randn(5, 48), density=density, counts=small_panels)


def test_panels_in_float64_and_under_autocast(small_panels):
    torch.manual_seed(2)
    layer = pk.SparseLinear(48, 70, dtype=torch.float64)
    _compare(layer, torch.randn(5, 48, dtype=torch.float64), counts=small_panels)
    layer = pk.SparseConv2d(16, 40, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _compare(layer, torch.randn(2, 16, 6, 6), rtol=2e-2, atol=2e-2)


def test_a_layer_of_one_panel_is_written_whole(small_panels):
    torch.manual_seed(3)
    layer = pk.SparseLinear(20, 30)  # 600 weights
    _compare(layer, torch.randn(4, 20))
    assert small_panels and set(small_panels) == {600}  # the plain materialise path


def test_panel_rows_start_groups_and_hold_whole_conv_groups():
    for layer in (pk.SparseLinear(37, 600), pk.SparseConv2d(24, 96, 3, groups=8)):
        p = panels.Panels(layer.weight, torch.float32, panel_weights=2000)
        spans = list(p)
        assert spans[0][0] == 0 and spans[-1][1] == p.nrows
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        for _, r1 in spans[:-1]:
            assert (r1 * p.row_len) % GROUP_SIZE == 0
            if isinstance(layer, pk.SparseConv2d):
                assert r1 % (96 // 8) == 0


def test_training_with_panels_is_training_without(monkeypatch):
    """DropBack (untracked weights regenerated) with and without panels, per-step and
    every-3-steps selection: the same tracked sets and values up to the rounding of the input
    gradient's panel sums."""
    from torch import nn

    real, parts = ops.materialize, []

    def counting(*args):
        out = real(*args)
        parts.append(out.numel() < args[6])  # a panel, not the whole weight
        return out

    monkeypatch.setattr(panels.ops, "materialize", counting)
    models = {
        "mlp": lambda: nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 5)),
        "cnn": lambda: nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 3 * 3, 5),
        ),
    }
    gen = torch.Generator().manual_seed(0)
    data = {
        "mlp": [(torch.randn(16, 48, generator=gen), torch.randint(0, 5, (16,))) for _ in range(6)],
        "cnn": [
            (torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,))) for _ in range(6)
        ],
    }

    def run(panel_weights, kind, R):
        monkeypatch.setattr(panels, "PANEL_WEIGHTS", panel_weights)
        torch.manual_seed(0)
        model = pk.sparsify(models[kind](), seed=4)
        opt = pk.DropBack(model.parameters(), lr=0.1, budget=0.2, momentum=0.9, reselect_every=R)
        train(model, opt, data[kind], 6)
        return model

    for kind in ("mlp", "cnn"):
        for R in (1, 3):
            parts.clear()
            a = run(64, kind, R)
            assert any(parts), "no layer was written a panel at a time"
            b = run(1 << 30, kind, R)
            for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
                if pk.is_budgeted(p):
                    assert torch.equal(p.bits, q.bits), (kind, R, name)
                    assert_close_verbose(p.values, q.values, rtol=1e-5, atol=1e-6)
                else:
                    assert_close_verbose(p, q, rtol=1e-5, atol=1e-6)
