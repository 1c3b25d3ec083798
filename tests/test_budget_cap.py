"""The budget is a bound: an estimated selection never tracks more than ``ceil(1.1 k)`` weights on
any step (a step that would is redone by the exact top-k), and tracks 0.9 k to 1.1 k after its
warm-up on ordinary runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import procrustes_kernels as pk
from procrustes_kernels.rules import budget_cap


def _digits_run(opt_kw, steps, schedule):
    data = pk.load_digits(seed=0)
    torch.manual_seed(0)
    model = pk.sparsify(
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, 10),
        ),
        seed=0,
    )
    opt = pk.Procrustes(model.parameters(), lr=0.1, budget=0.1, momentum=0.9, **opt_kw)
    sched = schedule(opt)
    gen = torch.Generator().manual_seed(0)
    counts, layer_counts = [], []
    for _ in range(steps):
        idx = torch.randint(0, len(data.y_train), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
        sched.step()
        counts.append(opt.tracked_count)
        layer_counts.append(opt.layer_counts)
    return opt, counts, layer_counts


RESTARTS = lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=40)  # noqa: E731
COSINE = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)  # noqa: E731


@pytest.mark.parametrize(
    "kw,schedule",
    [
        ({}, RESTARTS),
        ({"decay_steps": 200}, RESTARTS),
        ({"decay_steps": 200, "scope": "layer"}, RESTARTS),
    ],
    ids=["restarts", "linear_decay", "per_layer"],
)
def test_the_count_never_exceeds_the_cap(kw, schedule):
    opt, counts, layer_counts = _digits_run(kw, 160, schedule)
    if opt.scope == "global":
        assert max(counts) <= budget_cap(opt.budget)
    else:
        for per_layer in layer_counts:
            assert all(c <= budget_cap(b) for c, b in zip(per_layer, opt.layer_budgets))
    # the runs that overshot before the cap existed do fire it (the test is not vacuous)
    assert opt.capped_steps > 0
    assert opt.state_dict()["dropback"]["selectors"][0]["capped"] > 0


def test_the_paper_walk_is_capped_too():
    model = pk.sparsify(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)), seed=0)
    opt = pk.Procrustes(model.parameters(), lr=0.1, budget=0.1, selection="quantile_paper")
    opt.rules[0].selector.theta = 1e-20  # the walk starts far too low: it keeps almost all
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.tracked_count == opt.budget  # redone by the exact top-k
    assert opt.capped_steps == 1


def test_the_count_stays_near_the_budget_after_the_warm_up():
    opt, counts, _ = _digits_run({"decay_steps": 150}, 300, COSINE)
    k = opt.budget
    after = counts[opt.rules[0].selector.warmup_steps :]
    assert all(0.9 * k <= c <= 1.1 * k for c in after), (min(after) / k, max(after) / k)


def test_budget_cap():
    assert [budget_cap(k) for k in (1, 9, 10, 11, 100, 1000)] == [2, 10, 11, 13, 111, 1100]
    assert budget_cap(5020) == math.ceil(1.1 * 5020)


def test_a_checkpoint_from_before_the_cap_loads():
    model = pk.sparsify(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)), seed=0)
    opt = pk.Procrustes(model.parameters(), lr=0.1, budget=0.1)
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sd = opt.state_dict()
    sd["dropback"]["selectors"][0].pop("capped")
    opt2 = pk.Procrustes(model.parameters(), lr=0.1, budget=0.1)
    opt2.load_state_dict(sd)
    assert opt2.capped_steps == 0 and opt2.step_count == 1
