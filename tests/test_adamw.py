"""The AdamW variant of the rule (``update="adamw"``, procrustes_kernels/adamw.py).

Golden tiny cases of the moments first, then a dense emulation written out from
docs/training_rule.md, the dense parameters against ``torch.optim.AdamW``, state sizes, checkpoints,
the Procrustes decay and the argument checks. The backends' agreement on whole AdamW runs is in
test_backend_equivalence.py.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_tensor, batches, make, save_bytes, sparse_weights, train
from torch import nn

import procrustes_kernels as pk
from procrustes_kernels.adamw import (
    AdamWMoments,
    budget_scales,
    direction,
    factored_update,
    moments,
)
from procrustes_kernels.philox import init_values

B1, B2, EPS = 0.9, 0.999, 1e-8


# ------------------------------------------------------------------------------------ golden
def test_golden_factored_second_moment():
    g = torch.tensor([[1.0, 2.0, 0.0], [0.0, 2.0, 4.0]], dtype=torch.float64)
    row, col = factored_update(None, None, g.flatten(), 2, 0.5)
    # row means of g^2: 5/3, 20/3; column means: 1/2, 4, 8; times (1 - beta2) = 0.5
    torch.testing.assert_close(row, torch.tensor([5 / 6, 20 / 6], dtype=torch.float64))
    torch.testing.assert_close(col, torch.tensor([0.25, 2.0, 4.0], dtype=torch.float64))
    row2, col2 = factored_update(row, col, torch.zeros(6, dtype=torch.float64), 2, 0.5)
    torch.testing.assert_close(row2, row * 0.5)
    torch.testing.assert_close(col2, col * 0.5)


def test_golden_moments_and_direction():
    # 2 x 2 weight, element 1 tracked with moments (m_old 1, v_old 2), step 3 of the weight.
    g = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    tracked = torch.tensor([False, True, False, False])
    row = torch.tensor([1.0, 3.0], dtype=torch.float64)
    col = torch.tensor([2.0, 4.0], dtype=torch.float64)
    state = AdamWMoments(
        step=2,
        exp_avg=torch.tensor([1.0], dtype=torch.float64),
        exp_avg_sq=torch.tensor([2.0], dtype=torch.float64),
        row=None,
        col=None,
    )
    m, v = moments(g, tracked, state, row, col, 0.8, 0.9)
    # untracked: m = 0.2 g, v = row[i] * col[j] / mean(row) (mean 2)
    assert m.tolist() == pytest.approx([0.2, 0.8 * 1.0 + 0.2 * -2.0, 0.6, 0.1])
    assert v.tolist() == pytest.approx([1.0, 0.9 * 2.0 + 0.1 * 4.0, 3.0, 6.0])
    d = direction(m, v, 2, 0.8, 0.9, 1e-8)
    bc1, bc2 = 1 - 0.8**3, 1 - 0.9**3
    want = [
        (mi / bc1) / (math.sqrt(vi) / math.sqrt(bc2) + 1e-8)
        for mi, vi in zip(m.tolist(), v.tolist())
    ]
    assert d.tolist() == pytest.approx(want)


def test_golden_budget_scales():
    # layer a: 4 weights, mean g^2 (rows' mean) 1 at step 1 of beta2 0.5 (bc2 0.5): L = 2;
    # layer b: 12 weights, L = 8 / 0.5 = 16; G = (4 * 2 + 12 * 16) / 16 = 12.5
    rows = [torch.tensor([0.5, 1.5]), torch.tensor([8.0, 8.0, 8.0])]
    fa, fb = budget_scales(rows, [4, 12], [1, 1], [0.5, 0.5])
    assert float(fa) == pytest.approx(math.sqrt(2 / 12.5))
    assert float(fb) == pytest.approx(math.sqrt(16 / 12.5))
    zero = budget_scales([torch.zeros(2), torch.zeros(3)], [4, 6], [1, 1], [0.5, 0.5])
    assert [float(f) for f in zero] == [1.0, 1.0]


def test_an_all_zero_gradient_gives_a_zero_direction():
    g = torch.zeros(6)
    row, col = factored_update(None, None, g, 2, B2)
    m, v = moments(
        g,
        torch.zeros(6, dtype=torch.bool),
        AdamWMoments(0, None, None, None, None),
        row,
        col,
        B1,
        B2,
    )
    d = direction(m, v, 0, B1, B2, EPS)
    assert torch.equal(d, torch.zeros(6))


# ----------------------------------------------------------------------------- dense emulation
def emulate(model, data, steps, lr, budget, wd, init_decay):
    """DropBack-AdamW written out on dense tensors (global top-k, ties to the lower index)."""
    model = copy.deepcopy(model)
    weights = [w for _, w in pk.budgeted_weights(model)]
    w0 = [init_values(w.seed, w.numel(), w.bound).view(w.shape) for w in weights]
    dense = pk.densify(model)
    layers = [m for m in dense.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    others = [p for n, p in dense.named_parameters() if not n.endswith("weight")]
    adamw = torch.optim.AdamW(others, lr=lr, weight_decay=wd, foreach=False)
    k = round(budget * sum(w.numel() for w in weights))
    state = [
        dict(
            m=torch.zeros(w.numel()),
            v=torch.zeros(w.numel()),
            row=None,
            col=None,
            tracked=torch.zeros(w.numel(), dtype=torch.bool),
        )
        for w in weights
    ]
    d_prev, masks_per_step = 1.0, []
    for n in range(steps):
        x, y = data[n]
        dense.zero_grad()
        F.cross_entropy(dense(x), y).backward()
        d = pk.decay_factor(n + 1, init_decay)
        cands, scores, news = [], [], []
        t = n + 1
        factored = [
            factored_update(s["row"], s["col"], layer.weight.grad, layer.weight.shape[0], B2)
            for layer, s in zip(layers, state)
        ]
        # each layer's mean g^2 against the budget's: untracked directions carry sqrt(L / G)
        levels = [row.mean() / (1 - B2**t) for row, _ in factored]
        sizes = [layer.weight.numel() for layer in layers]
        G = sum(lv * sz for lv, sz in zip(levels, sizes)) / sum(sizes)
        for layer, s, base, (row, col), level in zip(layers, state, w0, factored, levels):
            g = layer.weight.grad.reshape(-1)
            W = layer.weight.detach().reshape(-1)
            v_fact = ((row / row.mean())[:, None] * col[None, :]).reshape(-1)
            m = torch.where(s["tracked"], s["m"] * B1 + g * (1 - B1), g * (1 - B1))
            v = torch.where(s["tracked"], s["v"] * B2 + g * g * (1 - B2), v_fact)
            D = (m / (1 - B1**t)) / (v.sqrt() / math.sqrt(1 - B2**t) + EPS)
            D = torch.where(s["tracked"], D, D * (level / G).sqrt())
            c = W.add(D.add(W, alpha=wd), alpha=-lr)
            cands.append(c)
            scores.append((c - base.reshape(-1) * d).abs())
            news.append((m, v, row, col))
        flat = torch.cat(scores)
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        order = order[flat[order] > 0]
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order] = True
        masks = torch.split(keep, [s.numel() for s in scores])
        with torch.no_grad():
            for layer, s, base, c, mask, (m, v, row, col) in zip(
                layers, state, w0, cands, masks, news
            ):
                layer.weight.copy_(torch.where(mask, c, base.reshape(-1) * d).view_as(layer.weight))
                s.update(m=m, v=v, row=row, col=col, tracked=mask.clone())
        adamw.step()
        masks_per_step.append([mk.clone() for mk in masks])
        d_prev = d
    del d_prev
    return dense, masks_per_step


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("init_decay,wd", [(1.0, 0.0), (0.9, 0.01)], ids=["dropback", "decay_wd"])
def test_matches_dense_emulation(kind, init_decay, wd):
    steps, lr, budget = 25, 0.01, 0.1
    model = make(kind)
    data = batches(kind, steps)
    ref, ref_masks = emulate(model, data, steps, lr, budget, wd, init_decay)
    opt = pk.DropBack(
        model.parameters(), lr, budget, weight_decay=wd, init_decay=init_decay, update="adamw"
    )

    def check(n):
        for i, (w, want) in enumerate(zip(opt.weights, ref_masks[n])):
            assert torch.equal(w.storage.mask(), want), f"step {n + 1}, layer {i}: tracked set"

    train(model, opt, data, steps, on_step=check)
    ref_layers = [m for m in ref.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for got, layer in zip(sparse_weights(model), ref_layers):
        torch.testing.assert_close(got, layer.weight.detach(), rtol=1e-6, atol=1e-7)
    got_rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    want_rest = [p for n, p in ref.named_parameters() if not n.endswith("weight")]
    for got, want in zip(got_rest, want_rest):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-7)
    assert opt.tracked_count == round(budget * opt.total_weights)


def test_step_one_ranks_the_weights():
    """A fresh AdamW step has the same size for every weight (g / sqrt(g^2)); the factored
    second moment makes step 1 rank them instead of keeping the first k by position."""
    model = make("mlp")
    data = batches("mlp", 1)
    opt = pk.DropBack(model.parameters(), lr=0.01, budget=0.1, update="adamw")
    train(model, opt, data, 1)
    mask = torch.cat([w.storage.mask() for w in opt.weights])
    first_k = torch.zeros_like(mask)
    first_k[: opt.budget] = True
    assert mask.sum() == opt.budget and not torch.equal(mask, first_k)
    # every layer gets some of the budget
    assert all(n > 0 for n in opt.layer_counts)


# ------------------------------------------------------------------------ dense parameters, state
def test_dense_parameters_follow_torch_adamw_exactly():
    model = make("cnn")
    others = [(n, p) for n, p in model.named_parameters() if not pk.is_budgeted(p)]
    copies = [p.detach().clone().requires_grad_(True) for _, p in others]
    opt = pk.DropBack(
        model.parameters(),
        lr=0.02,
        budget=0.2,
        update="adamw",
        betas=(0.8, 0.95),
        eps=1e-6,
        weight_decay=0.05,
    )
    ref = torch.optim.AdamW(
        copies, lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, foreach=False
    )
    for x, y in batches("cnn", 6):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for c, (_, p) in zip(copies, others):
            c.grad = p.grad.clone()
        opt.step()
        ref.step()
    for c, (name, p) in zip(copies, others):
        assert torch.equal(c, p.detach()), name


def test_state_is_held_for_tracked_weights_only():
    model = make("cnn")
    opt = pk.DropBack(model.parameters(), lr=0.01, budget=0.1, update="adamw")
    train(model, opt, batches("cnn", 5), 5)
    for w in opt.weights:
        st = opt.state[w]
        assert st["exp_avg"].numel() == st["exp_avg_sq"].numel() == w.nnz
        assert st["exp_avg_row"].shape == (w.shape[0],)
        assert st["exp_avg_col"].shape == (w.numel() // w.shape[0],)
        assert float(st["step"]) == 5
        assert bool((st["exp_avg_sq"] >= 0).all())
    per_weight = sum(sum(t.numel() for t in opt.state[w].values() if t.dim()) for w in opt.weights)
    assert per_weight < 0.5 * opt.total_weights  # two moments of 10% plus rows and columns


def test_full_budget_follows_adamw_after_the_first_step():
    """With every weight tracked, steps 2.. are AdamW's own update of the stored moments."""
    model = make("mlp")
    data = batches("mlp", 4)
    opt = pk.DropBack(model.parameters(), lr=0.01, budget=1.0, update="adamw", weight_decay=0.1)
    train(model, opt, data, 1)
    assert opt.tracked_count == opt.total_weights
    for n in range(1, 4):
        before = [
            (
                w.effective().clone(),
                opt.state[w]["exp_avg"].clone(),
                opt.state[w]["exp_avg_sq"].clone(),
            )
            for w in opt.weights
        ]
        x, y = data[n]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [w.grad.clone().reshape(-1) for w in opt.weights]
        opt.step()
        t = n + 1
        for w, (W, m, v), g in zip(opt.weights, before, grads):
            m = m * B1 + g * (1 - B1)
            v = v * B2 + g * g * (1 - B2)
            step = (m / (1 - B1**t)) / (v.sqrt() / math.sqrt(1 - B2**t) + EPS)
            want = W.reshape(-1) * (1 - 0.01 * 0.1) - 0.01 * step
            torch.testing.assert_close(w.effective().reshape(-1), want, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(opt.state[w]["exp_avg"], m, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "cls,kw",
    [
        (pk.DropBack, {}),
        (pk.Procrustes, {"decay_steps": 4}),
        (pk.DropBack, {"scope": "layer", "selection": "quantile"}),
    ],
)
def test_checkpoint_resume_is_bit_identical(cls, kw):
    data = batches("cnn", 12)
    kw = {"update": "adamw", "weight_decay": 0.01, **kw}
    straight = make("cnn")
    opt = cls(straight.parameters(), lr=0.01, budget=0.15, **kw)
    train(straight, opt, data, 12)
    first = make("cnn")
    opt1 = cls(first.parameters(), lr=0.01, budget=0.15, **kw)
    train(first, opt1, data, 7)
    ckpt = torch.load(io.BytesIO(save_bytes(first, opt1)))
    resumed = make("cnn", seed=99)
    opt2 = cls(resumed.parameters(), lr=0.01, budget=0.15, **kw)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, data, 5, start=7)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert_same_tensor(a, b, name)
    assert opt.state_dict()["dropback"] == opt2.state_dict()["dropback"]


def test_procrustes_adamw_decays_untracked_weights_to_zero():
    model = make("mlp")
    opt = pk.Procrustes(model.parameters(), lr=0.01, budget=0.1, decay_steps=5, update="adamw")
    train(model, opt, batches("mlp", 8), 8)
    for w in opt.weights:
        assert w.scale_value == 0.0
        assert int((w.effective() != 0).sum()) <= w.nnz
    assert opt.tracked_count <= 1.1 * opt.budget


def test_a_copied_optimizer_steps_exactly_like_the_original():
    model = make("mlp")
    opt = pk.DropBack(model.parameters(), lr=0.01, budget=0.1, update="adamw")
    data = batches("mlp", 6)
    train(model, opt, data, 3)
    model2, opt2 = copy.deepcopy((model, opt))
    train(model, opt, data, 3, start=3)
    train(model2, opt2, data, 3, start=3)
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert_same_tensor(a, b, name)
    assert "update='adamw'" in repr(opt2)


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"update": "adam"}, "expected update in"),
        ({"update": "adamw", "momentum": 0.9}, "momentum does not apply to update='adamw'"),
        ({"betas": (0.9, 0.99)}, "betas applies to update='adamw' only"),
        ({"eps": 1e-6}, "eps applies to update='adamw' only"),
        ({"update": "adamw", "betas": (0.9, 1.0)}, "expected betas to be two numbers"),
        ({"update": "adamw", "betas": 0.9}, "expected betas to be two numbers"),
        ({"update": "adamw", "eps": -1.0}, "expected eps >= 0"),
        ({"update": "adamw", "eps": float("nan")}, "expected eps >= 0"),
    ],
)
def test_bad_arguments_are_refused(kw, match):
    model = make("mlp")
    with pytest.raises(ValueError, match=match):
        pk.DropBack(model.parameters(), lr=0.01, budget=0.1, **kw)


def test_a_param_group_is_checked_against_the_rule():
    model = make("mlp")
    opt = pk.DropBack(list(model.parameters())[:2], lr=0.01, budget=0.1, update="adamw")
    with pytest.raises(ValueError, match="momentum does not apply"):
        opt.add_param_group({"params": list(model.parameters())[2:], "momentum": 0.9})
    opt.add_param_group({"params": list(model.parameters())[2:], "betas": (0.5, 0.9)})
    assert opt.param_groups[1]["betas"] == (0.5, 0.9) and opt.param_groups[1]["eps"] == 1e-8


def test_a_checkpoint_of_the_other_rule_is_refused():
    model = make("mlp")
    sgd = pk.DropBack(model.parameters(), lr=0.01, budget=0.1, momentum=0.9)
    train(model, sgd, batches("mlp", 2), 2)
    adam = pk.DropBack(model.parameters(), lr=0.01, budget=0.1, update="adamw")
    with pytest.raises(ValueError, match="expected update='adamw'"):
        adam.load_state_dict(sgd.state_dict())
    assert adam.step_count == 0 and not adam.state


def test_sparse_gradients_of_dense_parameters_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(8, 3))
    pk.sparsify(model, filter=lambda name, m: isinstance(m, nn.Linear))
    opt = pk.DropBack(model.parameters(), lr=0.01, budget=0.5, update="adamw")
    F.cross_entropy(model(torch.tensor([[1, 2]])), torch.tensor([0])).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="sparse gradient, which the AdamW update"):
        opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
