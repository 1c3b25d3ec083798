"""The optimizer against a straightforward dense emulation of the training rule, plus its contract:
SGD equivalence at full budget, exact checkpoint resume, bad arguments, failure atomicity."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_same_state,
    assert_same_tensor,
    batches,
    budgeted_modules,
    make,
    mlp,
    save_bytes,
    snapshot,
    sparse_weights,
    train,
)
from torch import nn

import procrustes_kernels as pk
from procrustes_kernels.optim import decay_factor, linear_decay_factor


# ---------------------------------------------------------------------------------------------
# The dense emulation: stores w0 and W densely, applies masks. Written independently of the
# library's optimizer; only the seed-derived initial values are taken from the layers.
# ---------------------------------------------------------------------------------------------
def emulate(sparse_model, data, steps, lr, budget, momentum, wd, init_decay, scope="global"):
    model = pk.densify(copy.deepcopy(sparse_model))
    budgeted = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    weights = [m.weight for m in budgeted]
    assert not any(pk.is_budgeted(w) for w in weights)
    w0 = [w.initial_values() for _, w in pk.budgeted_weights(sparse_model)]
    assert len(w0) == len(weights)
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
        d_n = init_decay(n) if callable(init_decay) else decay_factor(n, init_decay)
        d = torch.tensor(d_n, dtype=torch.float32)
        cands, moms, scores = [], [], []
        with torch.no_grad():
            for i, w in enumerate(weights):
                g = w.grad.add(w, alpha=wd) if wd else w.grad
                m = torch.where(tracked[i], mom[i].mul(momentum).add(g), g) if momentum else g
                c = w.add(m, alpha=-lr)
                cands.append(c)
                moms.append(m)
                scores.append((c - w0[i] * d).abs())
            if scope == "global":
                flat = torch.cat([s.flatten() for s in scores])
                order = torch.sort(flat, descending=True, stable=True).indices[:k]
                order = order[flat[order] > 0]
                keep = torch.zeros_like(flat, dtype=torch.bool)
                keep[order] = True
                masks = [
                    mk.view_as(s)
                    for mk, s in zip(torch.split(keep, [s.numel() for s in scores]), scores)
                ]
            else:
                masks = []
                for s in scores:
                    kl = max(1, round(s.numel() * k / total))
                    flat = s.flatten()
                    order = torch.sort(flat, descending=True, stable=True).indices[:kl]
                    order = order[flat[order] > 0]
                    keep = torch.zeros_like(flat, dtype=torch.bool)
                    keep[order] = True
                    masks.append(keep.view_as(s))
            for i, w in enumerate(weights):
                w.copy_(torch.where(masks[i], cands[i], w0[i] * d))
                mom[i] = torch.where(masks[i], moms[i], torch.zeros_like(moms[i]))
                tracked[i] = masks[i]
            sgd.step()
        masks_per_step.append([mk.clone() for mk in masks])
    return model, masks_per_step


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("init_decay", [1.0, 0.9], ids=["dropback", "procrustes_topk"])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 5e-3)], ids=["sgd", "momentum_wd"])
def test_matches_dense_emulation_for_50_steps(kind, init_decay, momentum, wd):
    steps, lr, budget = 50, 0.1, 0.1
    model = make(kind)
    data = batches(kind, steps)
    ref, ref_masks = emulate(model, data, steps, lr, budget, momentum, wd, init_decay)
    opt = pk.DropBack(
        model.parameters(),
        lr=lr,
        budget=budget,
        momentum=momentum,
        weight_decay=wd,
        init_decay=init_decay,
    )
    layers = budgeted_modules(model)
    assert len(layers) == len(opt.weights) == 3
    assert all(m.weight is w for m, w in zip(layers, opt.weights))

    def check_masks(n):
        for w, expected in zip(opt.weights, ref_masks[n]):
            assert torch.equal(w.storage.mask(), expected.flatten()), (
                f"mask differs at step {n + 1}"
            )

    train(model, opt, data, steps, on_step=check_masks)
    ref_weights = [m.weight for m in ref.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for got, want in zip(sparse_weights(model), ref_weights):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    ref_biases = [
        m.bias
        for m in ref.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None
    ]
    got_biases = [m.bias for m in layers if m.bias is not None]
    for got, want in zip(got_biases, ref_biases):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=0)
    assert opt.tracked_count == round(budget * opt.total_weights)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_linear_decay_matches_dense_emulation(kind):
    """``decay_steps``: d_n falls linearly to exactly 0 at step decay_steps + 1 and stays there."""
    steps, lr, budget, decay_steps = 40, 0.1, 0.1, 25
    model = make(kind)
    data = batches(kind, steps)
    ref, _ = emulate(
        model, data, steps, lr, budget, 0.9, 1e-3, lambda n: linear_decay_factor(n, decay_steps)
    )
    opt = pk.Procrustes(
        model.parameters(), lr=lr, budget=budget, momentum=0.9, weight_decay=1e-3,
        selection="topk", decay_steps=decay_steps,
    )  # fmt: skip
    assert opt.init_decay == 1.0 and opt.decay_steps == decay_steps
    scales = []

    def record_scale(n):
        w = opt.weights[0]
        # the 0-d float32 tensor is the float32 rounding of the Python float
        assert float(w.scale) == float(torch.tensor(w.scale_value, dtype=torch.float32))
        scales.append(float(w.scale))

    train(model, opt, data, steps, on_step=record_scale)
    assert scales[0] == 1.0 and scales[1] == pytest.approx(1 - 1 / 25)
    assert scales[24] == pytest.approx(1 / 25) and scales[25] == 0.0 and scales[-1] == 0.0
    ref_weights = [m.weight for m in ref.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for got, want in zip(sparse_weights(model), ref_weights):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)


def test_matches_dense_emulation_per_layer_scope():
    steps = 20
    model = make("cnn")
    data = batches("cnn", steps)
    ref, _ = emulate(model, data, steps, 0.05, 0.2, 0.9, 0.0, 0.95, scope="layer")
    opt = pk.DropBack(
        model.parameters(), lr=0.05, budget=0.2, momentum=0.9, init_decay=0.95, scope="layer"
    )
    train(model, opt, data, steps)
    ref_weights = [m.weight for m in ref.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(opt.weights) == len(ref_weights) == 3
    for got, want, w in zip(sparse_weights(model), ref_weights, opt.weights):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
        assert w.nnz == max(1, round(w.weight_numel * opt.budget / opt.total_weights))


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 1e-2)])
def test_full_budget_without_decay_is_plain_sgd(momentum, wd):
    steps = 15
    model = make("cnn")
    dense = pk.densify(copy.deepcopy(model))
    data = batches("cnn", steps)
    opt = pk.DropBack(model.parameters(), lr=0.1, budget=1.0, momentum=momentum, weight_decay=wd)
    sgd = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=momentum, weight_decay=wd)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    sched_dense = torch.optim.lr_scheduler.StepLR(sgd, step_size=5, gamma=0.5)
    train(model, opt, data, steps, on_step=lambda n: sched.step())
    train(dense, sgd, data, steps, on_step=lambda n: sched_dense.step())
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    got_params = list(pk.densify(copy.deepcopy(model)).parameters())
    assert len(got_params) == len(list(dense.parameters())) == 5
    for got, want in zip(got_params, dense.parameters()):
        assert not pk.is_budgeted(got)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "cls,kw",
    [
        (pk.DropBack, {"momentum": 0.9, "weight_decay": 1e-3}),
        (pk.Procrustes, {"momentum": 0.9, "init_decay": 0.8}),
        (pk.Procrustes, {"scope": "layer"}),
        (pk.DropBack, {"selection": "quantile_paper"}),
    ],
)
def test_checkpoint_resume_is_bit_identical(cls, kw):
    n_steps, m_steps = 7, 6
    data = batches("cnn", n_steps + m_steps)
    straight = make("cnn")
    opt = cls(straight.parameters(), lr=0.05, budget=0.15, **kw)
    train(straight, opt, data, n_steps + m_steps)

    first = make("cnn")
    opt1 = cls(first.parameters(), lr=0.05, budget=0.15, **kw)
    train(first, opt1, data, n_steps)
    blob = save_bytes(first, opt1)

    resumed = make("cnn", seed=99)  # different init: everything must come from the checkpoint
    opt2 = cls(resumed.parameters(), lr=0.05, budget=0.15, **kw)
    ckpt = torch.load(io.BytesIO(blob))
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, data, m_steps, start=n_steps)

    assert len(sparse_weights(straight)) == len(sparse_weights(resumed)) == 3
    for a, b in zip(sparse_weights(straight), sparse_weights(resumed)):
        assert torch.equal(a, b)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert_same_tensor(a, b, name)
    assert opt.state_dict()["dropback"] == opt2.state_dict()["dropback"]


def test_checkpoint_holds_only_the_budget():
    """model + optimizer state at 10x stores <= 0.2x the bytes of the dense model with SGD momentum."""
    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    model = pk.sparsify(copy.deepcopy(dense), seed=0)
    opt = pk.DropBack(model.parameters(), lr=0.05, budget=0.1, momentum=0.9)
    sgd = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9)
    data = [(torch.randn(8, 256), torch.randint(0, 10, (8,))) for _ in range(3)]
    train(model, opt, data, 3)
    train(dense, sgd, data, 3)
    sparse_bytes, dense_bytes = len(save_bytes(model, opt)), len(save_bytes(dense, sgd))
    assert sparse_bytes <= 0.2 * dense_bytes, (sparse_bytes, dense_bytes)


def test_decayed_weights_become_exact_zeros():
    model = make("mlp")
    data = batches("mlp", 40)
    opt = pk.Procrustes(model.parameters(), lr=0.1, budget=0.1, init_decay=0.5, selection="topk")
    train(model, opt, data, 40)
    assert decay_factor(40, 0.5) == 0.0
    assert len(opt.weights) == 3
    for weight in opt.weights:
        assert float(weight.scale) == 0.0 and weight.scale_value == 0.0
        w = weight.effective().flatten()
        untracked = ~weight.storage.mask()
        assert torch.all(w[untracked] == 0)
    assert opt.tracked_count == opt.budget


@pytest.mark.parametrize("init_decay", [1.0, 0.97])
def test_quantile_tracks_near_budget_in_training(init_decay):
    torch.manual_seed(0)
    model = pk.sparsify(nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)), seed=1)
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g))
        for _ in range(40)
    ]
    opt = pk.Procrustes(
        model.parameters(), lr=0.05, budget=0.1, momentum=0.9, init_decay=init_decay
    )
    counts = []
    train(model, opt, data, 40, on_step=lambda n: counts.append(opt.tracked_count / opt.budget))
    # Warm-up steps read their own histogram: the count is the budget up to one bin's resolution.
    assert all(c == pytest.approx(1.0, abs=0.02) for c in counts[:10]), counts
    assert all(0.85 <= c <= 1.15 for c in counts[10:]), counts
    assert opt.tracked_count == sum(opt.layer_counts)


def test_int_budget_and_repr():
    model = make("mlp")
    opt = pk.DropBack(model.parameters(), lr=0.1, budget=100)
    train(model, opt, batches("mlp", 2), 2)
    assert opt.tracked_count == 100
    assert "budget=100/" in repr(opt)


def _weight_grads(opt):
    return [w.grad for w in opt.weights if w.grad is not None]


def test_weight_grad_follows_torch_optim_semantics():
    """The dense gradient of a budgeted weight is its ``.grad`` (a plain tensor); ``step()`` does
    not clear it (as in torch.optim), ``zero_grad()`` does."""
    model = make("mlp")
    opt = pk.DropBack(model.parameters(), lr=0.1, budget=0.1)
    x, y = batches("mlp", 1)[0]
    F.cross_entropy(model(x), y).backward()
    grads = _weight_grads(opt)
    assert len(grads) == 3
    for w, g in zip(opt.weights, grads):
        assert not pk.is_budgeted(g) and g.shape == w.shape and g.dtype == w.dtype
        assert w.values.grad is None
    opt.step()
    assert opt.step_count == 1
    after = _weight_grads(opt)
    assert len(after) == 3 and all(a is g for a, g in zip(after, grads))
    opt.step()  # the same gradients once more: a legal step, as with torch.optim.SGD
    assert opt.step_count == 2
    opt.zero_grad()
    assert _weight_grads(opt) == []
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="backward"):
        opt.step()
    assert opt.step_count == 2
    F.cross_entropy(model(x), y).backward()
    assert len(_weight_grads(opt)) == 3
    opt.zero_grad()
    assert _weight_grads(opt) == []


@pytest.mark.parametrize("named", [True, False], ids=["module", "parameters"])
@pytest.mark.parametrize("where", ["sparse", "bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_gradient_raises_and_changes_nothing(where, value, named):
    model = make("cnn")
    # A module stands for its parameters, with their names for the error messages.
    opt = pk.Procrustes(model if named else model.parameters(), lr=0.1, budget=0.1, momentum=0.9)
    data = batches("cnn", 4)
    train(model, opt, data, 3)
    before = snapshot(model, opt)
    x, y = data[3]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    # cnn parameters: 0.weight, 0.bias, 2.weight, 5.weight, 5.bias
    if where == "sparse":
        assert opt.weights[1] is model[2].weight
        opt.weights[1].grad.view(-1)[5] = value
        match = "'2.weight'" if named else r"param_groups\[0\]\['params'\]\[2\]"
    else:
        model[0].bias.grad[0] = value
        match = "'0.bias'" if named else r"param_groups\[0\]\['params'\]\[1\]"
    with pytest.raises(FloatingPointError, match=match):
        opt.step()
    assert_same_state(before, snapshot(model, opt))
    assert opt.step_count == 3


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"budget": 0}, "budget"),
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"budget": -0.1}, "budget"),
        ({"budget": -3}, "budget"),
        ({"budget": 10**9}, "budget"),
        ({"budget": True}, "budget"),
        ({"budget": "10%"}, "budget"),
        ({"selection": "foo"}, "selection"),
        ({"init_decay": 0.0}, "init_decay"),
        ({"init_decay": 1.5}, "init_decay"),
        ({"init_decay": -0.9}, "init_decay"),
        ({"scope": "row"}, "scope"),
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"zero_cutoff": 2.0}, "zero_cutoff"),
        ({"decay_steps": 0}, "decay_steps"),
        ({"decay_steps": 2.5}, "decay_steps"),
        ({"decay_steps": True}, "decay_steps"),
        ({"decay_steps": 10, "init_decay": 0.9}, "either init_decay or decay_steps"),
    ],
)
def test_bad_arguments_raise_and_leave_model_unchanged(kw, match):
    model = make("mlp")
    before = copy.deepcopy(model.state_dict())
    args = {"lr": 0.1, "budget": 0.1, **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        pk.DropBack(model.parameters(), **args)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert_same_tensor(before[k], after[k], k)


def test_model_without_sparse_layers_is_rejected():
    with pytest.raises(ValueError, match="sparsify"):
        pk.DropBack(mlp().parameters(), lr=0.1, budget=0.1)
    with pytest.raises(ValueError, match="sparsify"):
        pk.DropBack(mlp(), lr=0.1, budget=0.1)  # a module is still accepted
    with pytest.raises(ValueError, match="expected parameters with budgeted weights, found none"):
        pk.DropBack([torch.zeros(3)], lr=0.1, budget=0.1)
    # Not an iterable of parameters: torch.optim's own check.
    with pytest.raises(TypeError, match="iterable"):
        pk.DropBack(torch.zeros(3), lr=0.1, budget=0.1)


def test_load_state_dict_rejects_mismatch_and_changes_nothing():
    model = make("mlp")
    opt = pk.DropBack(model.parameters(), lr=0.1, budget=0.1, momentum=0.9)
    train(model, opt, batches("mlp", 3), 3)
    saved = opt.state_dict()
    other = make("mlp")
    opt_other = pk.DropBack(other.parameters(), lr=0.1, budget=0.1, momentum=0.9)
    before = snapshot(other, opt_other)
    # The model's tracked sets were not loaded first: momentum does not line up.
    with pytest.raises(ValueError, match="momentum"):
        opt_other.load_state_dict(saved)
    assert_same_state(before, snapshot(other, opt_other))
    quantile = pk.DropBack(model.parameters(), lr=0.1, budget=0.1, selection="quantile")
    with pytest.raises(ValueError, match="selection"):
        quantile.load_state_dict(saved)
    with pytest.raises(ValueError, match="DropBack"):
        opt_other.load_state_dict(torch.optim.SGD(mlp().parameters(), lr=0.1).state_dict())


def test_decay_helpers():
    assert decay_factor(0, 0.9) == decay_factor(1, 0.9) == 1.0
    assert decay_factor(3, 0.9) == pytest.approx(0.81)
    assert decay_factor(176, 0.9) == 0.0  # 0.9**175 < 1e-8
    d = pk.decay_for_steps(1000)
    assert decay_factor(1000, d) > 0 and decay_factor(1002, d) == 0.0
    with pytest.raises(ValueError, match="steps"):
        pk.decay_for_steps(0)
    assert [linear_decay_factor(n, 4) for n in range(7)] == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_load_state_dict_rejects_another_decay_schedule():
    model = make("mlp")
    opt = pk.Procrustes(model.parameters(), lr=0.1, budget=0.1, selection="topk", decay_steps=10)
    train(model, opt, batches("mlp", 2), 2)
    saved = opt.state_dict()
    for kw, key in (({"init_decay": 0.9}, "init_decay"), ({"decay_steps": 20}, "decay_steps")):
        other = pk.Procrustes(model.parameters(), lr=0.1, budget=0.1, selection="topk", **kw)
        with pytest.raises(ValueError, match=key):
            other.load_state_dict(saved)
        assert other.step_count == 0
    paper = pk.Procrustes(model.parameters(), lr=0.1, budget=0.1, selection="topk").state_dict()
    with pytest.raises(ValueError, match="init_decay"):
        pk.Procrustes(
            model.parameters(), lr=0.1, budget=0.1, selection="topk", init_decay=0.95
        ).load_state_dict(paper)
    same = pk.Procrustes(model.parameters(), lr=0.1, budget=0.1, selection="topk", decay_steps=10)
    same.load_state_dict(saved)
    assert same.step_count == 2 and same.decay_at(3) == pytest.approx(0.8)


def test_numeric_arguments_take_what_pytorch_takes():
    # numpy scalars and 0-d tensors, as torch.optim accepts them, for the constructor and groups
    import numpy as np

    def run(**kw):
        model = make("mlp")
        opt = pk.DropBack(model.parameters(), **kw)
        train(model, opt, batches("mlp", 2), 2)
        return opt, [
            p.detach().clone() if not pk.is_budgeted(p) else p.effective()
            for p in model.parameters()
        ]

    ref_opt, want = run(lr=0.1, budget=0.2, momentum=0.9, weight_decay=1e-4)
    for kw in (
        dict(lr=np.float32(0.1), budget=np.float64(0.2), momentum=np.float64(0.9)),
        dict(lr=torch.tensor(0.1, dtype=torch.float64), budget=0.2, momentum=torch.tensor(0.9)),
    ):
        kw = {"weight_decay": np.float64(1e-4), **kw}
        opt, got = run(**kw)
        assert type(opt.param_groups[0]["lr"]) is float and opt.budget == ref_opt.budget
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    model = make("mlp")
    counted = pk.DropBack(model.parameters(), lr=0.1, budget=np.int64(50))
    assert counted.budget == 50
    with pytest.raises(ValueError, match="lr"):
        pk.DropBack(model.parameters(), lr=torch.tensor([0.1, 0.2]), budget=0.2)
    with pytest.raises(TypeError, match="budget"):
        pk.DropBack(model.parameters(), lr=0.1, budget=torch.tensor(True))


def test_fine_tuning_a_decayed_model_keeps_it_decayed():
    # A trained Procrustes model (untracked weights exactly zero) loaded under a fresh optimizer:
    # the decay belongs to the weight, so the fresh schedule's d_1 = 1 does not bring w0 back.
    model = make("mlp")
    opt = pk.Procrustes(model.parameters(), lr=0.1, budget=0.1, momentum=0.9, decay_steps=3)
    train(model, opt, batches("mlp", 6), 6)
    assert all(w.scale_value == 0.0 for w in opt.weights)
    ckpt = copy.deepcopy(model.state_dict())
    for fresh_opt in (
        lambda m: pk.Procrustes(m.parameters(), lr=0.05, budget=0.1, momentum=0.9),
        lambda m: pk.DropBack(m.parameters(), lr=0.05, budget=0.1),
    ):
        tuned = make("mlp", seed=5)
        tuned.load_state_dict(ckpt)
        opt2 = fresh_opt(tuned)
        train(tuned, opt2, batches("mlp", 3, seed=7), 3)
        for w in opt2.weights:
            assert w.scale_value == 0.0
            assert int((w.effective() != 0).sum()) <= w.nnz  # only tracked weights are nonzero
        assert opt2.tracked_count <= opt2.budget


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", ["dropback-topk", "procrustes-quantile"])
def test_a_copied_optimizer_steps_exactly_like_the_original(how, kind):
    import pickle

    model = make("mlp")
    if kind == "dropback-topk":
        opt = pk.DropBack(model.parameters(), lr=0.1, budget=0.1, momentum=0.9)
    else:
        opt = pk.Procrustes(model.parameters(), lr=0.1, budget=0.1, momentum=0.9, decay_steps=8)
    train(model, opt, batches("mlp", 3), 3)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert repr(opt2) == repr(opt)
    assert all(any(p is q for q in model2.parameters()) for p in opt2.weights)
    data = batches("mlp", 4, seed=11)
    train(model, opt, data, 4)
    train(model2, opt2, data, 4)
    assert opt2.step_count == opt.step_count == 7
    for a, b in zip(model.parameters(), model2.parameters()):
        a = a.effective() if pk.is_budgeted(a) else a.detach()
        b = b.effective() if pk.is_budgeted(b) else b.detach()
        assert torch.equal(a, b)


def test_every_constructor_argument_is_checked_when_given():
    import numpy as np

    model = make("mlp")
    for key, bad in (("drift_window", 1.5), ("quantile_warmup", "a"), ("drift_window", 0)):
        with pytest.raises(ValueError, match=key):
            pk.Procrustes(
                model.parameters(), lr=0.1, budget=0.1, selection="quantile", **{key: bad}
            )
    opt = pk.Procrustes(
        model.parameters(), lr=0.1, budget=0.1, decay_steps=np.int64(4), quantile_warmup=np.int32(2)
    )
    assert opt.decay_steps == 4 and type(opt.decay_steps) is int


def test_an_incomplete_optimizer_checkpoint_is_refused_before_anything_changes():
    model = make("mlp")
    opt = pk.Procrustes(model.parameters(), lr=0.1, budget=0.1, momentum=0.9, selection="quantile")
    train(model, opt, batches("mlp", 3), 3)
    good = copy.deepcopy(opt.state_dict())
    fresh = pk.Procrustes(
        model.parameters(), lr=0.1, budget=0.1, momentum=0.9, selection="quantile"
    )
    before = copy.deepcopy(fresh.state_dict())
    bad_cases = []
    for key in ("step", "tracked_count", "selectors", "budget"):
        bad = copy.deepcopy(good)
        del bad["dropback"][key]
        bad_cases.append((bad, "lacks"))
    for selectors in ([], [None], [{"theta": 0.1}], [good["dropback"]["selectors"][0]] * 2):
        bad = copy.deepcopy(good)
        bad["dropback"]["selectors"] = selectors
        bad_cases.append((bad, "selection state"))
    bad = copy.deepcopy(good)
    bad["dropback"]["step"] = -1
    bad_cases.append((bad, "step"))
    for bad, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(bad)
        assert repr(fresh.state_dict()) == repr(before)  # nothing applied
    fresh.load_state_dict(good)
    assert fresh.step_count == 3 and fresh.rules[0].state_dict() == opt.rules[0].state_dict()
