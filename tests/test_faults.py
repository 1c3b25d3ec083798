"""Fault injection: a step is all or nothing.

Non-finite values in gradients, hyperparameters, stored state, updates that overflow, and
exceptions raised inside each pass of a step (through ``monkeypatch`` on the ops the rules call):
after each fault the model and the optimizer equal the last good state bit for bit, and carrying
on (in place, or from a checkpoint taken after the fault) matches an uninterrupted run.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_state, batches, make, snapshot, train

import procrustes_kernels as pk
from procrustes_kernels import ops

CONFIGS = {
    "dropback_topk": (pk.DropBack, {"momentum": 0.9, "weight_decay": 1e-3}),
    "procrustes_quantile": (pk.Procrustes, {"momentum": 0.9, "quantile_warmup": 2}),
    "tiles": (pk.DropBack, {"granularity": "tile", "tile": (4, 4)}),
    "paper": (pk.Procrustes, {"selection": "quantile_paper"}),
    "adamw": (pk.DropBack, {"update": "adamw", "weight_decay": 0.01}),
    "adamw_quantile": (pk.Procrustes, {"update": "adamw", "decay_steps": 6}),
}
STEPS, FAULT_AT = 8, 4


def _build(config, kind="cnn"):
    cls, kw = CONFIGS[config]
    model = make(kind)
    lr = 0.01 if kw.get("update") == "adamw" else 0.05
    return model, cls(model.parameters(), lr=lr, budget=0.15, **kw)


def _backward(model, opt, batch):
    x, y = batch
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()


def _uninterrupted(config, kind="cnn"):
    model, opt = _build(config, kind)
    train(model, opt, batches(kind, STEPS), STEPS)
    return snapshot(model, opt)


def _run_with_fault(config, fault, kind="cnn", reload=False):
    """Steps 0..STEPS-1, where step FAULT_AT first meets ``fault(model, opt)`` (which returns
    what undoes it): the faulty step must raise and change nothing, then the same batch is
    retried."""
    data = batches(kind, STEPS)
    model, opt = _build(config, kind)
    train(model, opt, data, FAULT_AT)
    _backward(model, opt, data[FAULT_AT])
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    undo = fault(model, opt)
    before = snapshot(model, opt)  # (with the fault's own change, e.g. of a param group)
    with pytest.raises((FloatingPointError, RuntimeError)) as err:
        opt.step()
    assert_same_state(snapshot(model, opt), before)
    if undo is not None:
        undo()
    if reload:  # a restart from the checkpoint of the last good state
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        model, opt = _build(config, kind)
        ckpt = torch.load(io.BytesIO(buf.getvalue()))
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
    for p, g in zip(model.parameters(), grads):
        p.grad = None if g is None else g.clone()
    opt.step()
    train(model, opt, data, STEPS - FAULT_AT - 1, start=FAULT_AT + 1)
    assert_same_state(snapshot(model, opt), _uninterrupted(config, kind))
    return str(err.value)


# ------------------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize("config", ["dropback_topk", "adamw"])
@pytest.mark.parametrize(
    "key,value",
    [("lr", float("nan")), ("lr", float("inf")), ("weight_decay", float("nan"))],
)
def test_a_non_finite_hyperparameter_refuses_the_step(config, key, value):
    def fault(model, opt):
        old = opt.param_groups[0][key]
        opt.param_groups[0][key] = value

        def undo():
            opt.param_groups[0][key] = old

        return undo

    msg = _run_with_fault(config, fault)
    assert f"param_groups[0]['{key}']" in msg


@pytest.mark.parametrize(
    "config,key,value",
    [
        ("dropback_topk", "momentum", float("nan")),
        ("adamw", "eps", float("inf")),
        ("adamw", "betas", (float("nan"), 0.999)),
    ],
)
def test_other_non_finite_hyperparameters_refuse_the_step(config, key, value):
    def fault(model, opt):
        old = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        return lambda: opt.param_groups[0].__setitem__(key, old)

    assert f"['{key}']" in _run_with_fault(config, fault)


def test_an_out_of_range_hyperparameter_set_later_is_refused():
    model, opt = _build("dropback_topk")
    _backward(model, opt, batches("cnn", 1)[0])
    opt.param_groups[0]["momentum"] = 1.5
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="momentum in \\[0, 1\\)"):
        opt.step()
    assert_same_state(snapshot(model, opt), before)


# ---------------------------------------------------------------------------- overflowing updates
@pytest.mark.parametrize("config", list(CONFIGS))
def test_an_overflowing_weight_update_refuses_the_step(config):
    def fault(model, opt):
        w = opt.weights[1]
        saved = w.grad.clone()
        w.grad.fill_(3e38)
        old = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = 10.0 if "update" not in CONFIGS[config][1] else 1e38

        def undo():
            w.grad.copy_(saved)
            for g, lr in zip(opt.param_groups, old):
                g["lr"] = lr

        return undo

    if "update" in CONFIGS[config][1]:
        # AdamW normalises the gradient; its overflow comes from g^2 (the second moments)
        def fault(model, opt):  # noqa: F811
            w = opt.weights[1]
            saved = w.grad.clone()
            w.grad.view(-1)[::3] = 3e38

            def undo():
                w.grad.copy_(saved)

            return undo

    msg = _run_with_fault(config, fault)
    assert "is not finite" in msg


def test_an_overflowing_bias_update_refuses_the_step():
    def fault(model, opt):
        bias = model[0].bias
        saved = bias.grad.clone()
        bias.grad.fill_(3e38)
        old = opt.param_groups[0]["lr"]
        opt.param_groups[0]["lr"] = 10.0

        def undo():
            bias.grad.copy_(saved)
            opt.param_groups[0]["lr"] = old

        return undo

    msg = _run_with_fault("dropback_topk", fault)
    assert "is not finite" in msg and "(shape (6,))" in msg and "new param" in msg


# -------------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("config", ["dropback_topk", "procrustes_quantile", "adamw"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_gradient_at_a_random_position_refuses_the_step(config, seed, value):
    gen = torch.Generator().manual_seed(seed)

    def fault(model, opt):
        params = [p for p in model.parameters() if p.grad is not None]
        p = params[int(torch.randint(len(params), (1,), generator=gen))]
        i = int(torch.randint(p.grad.numel(), (1,), generator=gen))
        saved = p.grad.reshape(-1)[i].clone()
        p.grad.reshape(-1)[i] = value

        def undo():
            p.grad.reshape(-1)[i] = saved

        return undo

    assert "non-finite gradient" in _run_with_fault(config, fault)


@pytest.mark.parametrize(
    "config,key", [("dropback_topk", "momentum_buffer"), ("adamw", "exp_avg_sq")]
)
def test_a_non_finite_stored_moment_refuses_the_step(config, key):
    def fault(model, opt):
        buf = opt.state[opt.weights[0]][key]
        saved = buf.clone()
        buf[0] = float("nan")
        return lambda: buf.copy_(saved)

    assert key in _run_with_fault(config, fault)


# ------------------------------------------------------------------- exceptions inside the passes
PASSES = ["radix_histogram", "log_histogram", "compact", "compact_mask", "scores"]
# The passes each configuration's step (after the quantile warm-up) calls, each at least twice.
CALLS = {
    "dropback_topk": ["radix_histogram", "compact"],
    "procrustes_quantile": ["compact"],
    "tiles": ["scores", "compact_mask"],
    "paper": ["scores", "compact_mask"],
    "adamw": ["radix_histogram", "compact"],
    "adamw_quantile": ["log_histogram", "compact"],
}


@pytest.mark.parametrize(
    "config,op", [(config, op) for config, used in CALLS.items() for op in used]
)
@pytest.mark.parametrize("nth", [1, 2])
def test_an_exception_inside_a_pass_changes_nothing(config, op, nth, monkeypatch):
    calls = {"n": 0}
    real = getattr(ops, op)

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            raise RuntimeError(f"injected failure in {op}")
        return real(*args, **kwargs)

    def fault(model, opt):
        monkeypatch.setattr(ops, op, failing)
        return lambda: monkeypatch.setattr(ops, op, real)

    data = batches("cnn", STEPS)
    model, opt = _build(config)
    train(model, opt, data, FAULT_AT)
    _backward(model, opt, data[FAULT_AT])
    before = snapshot(model, opt)
    fault(model, opt)
    with pytest.raises(RuntimeError, match=f"injected failure in {op}"):
        opt.step()
    monkeypatch.setattr(ops, op, real)
    assert_same_state(snapshot(model, opt), before)
    opt.step()
    train(model, opt, data, STEPS - FAULT_AT - 1, start=FAULT_AT + 1)
    assert_same_state(snapshot(model, opt), _uninterrupted(config))


def test_every_pass_is_injected_somewhere():
    assert {op for used in CALLS.values() for op in used} == set(PASSES)


# ------------------------------------------------------------------------------------ restarts
@pytest.mark.parametrize("config", ["procrustes_quantile", "adamw_quantile"])
def test_a_restart_from_the_last_good_checkpoint_matches_an_uninterrupted_run(config):
    def fault(model, opt):
        w = opt.weights[0]
        saved = w.grad.clone()
        w.grad.view(-1)[5] = float("nan")
        return lambda: w.grad.copy_(saved)

    _run_with_fault(config, fault, reload=True)


def test_deep_copies_taken_before_a_fault_are_unaffected():
    model, opt = _build("adamw")
    data = batches("cnn", 3)
    train(model, opt, data, 2)
    copies = copy.deepcopy((model, opt))
    _backward(model, opt, data[2])
    lr = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step()
    opt.param_groups[0]["lr"] = lr
    assert_same_state(snapshot(*copies), snapshot(model, opt))
