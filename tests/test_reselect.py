"""``reselect_every=R``: steps that keep the tracked set, and the sampled weight gradient.

The rule (docs/training_rule.md): step n selects iff (n - 1) % R == 0; the others keep T' = T,
tracked weights take the base update, untracked ones are d_n * w0. Such steps read the gradient
at tracked positions only, so backward computes just those (TrackedGradient, SDDMM). Checked
here: the rule against a hand computation, the sampled gradient against the dense one, the
gradient tools a user applies to it, exact resume inside an interval, both CPU backends, errors.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_verbose
from helpers.training import assert_same_state, batches, make, snapshot, train

import procrustes_kernels as pk
from procrustes_kernels.gradient import TrackedGradient
from procrustes_kernels.ops import available_backends, use_backend

BACKENDS = ["reference"] + (["cpp"] if available_backends()["cpp"] else [])


def _opt(model, cls=pk.DropBack, R=4, **kw):
    kw = {"lr": 0.1, "budget": 0.2, "momentum": 0.9, "weight_decay": 1e-3, **kw}
    return cls(model.parameters(), reselect_every=R, **kw)


def _kinds(model, opt, data, steps):
    """For each step: "S" when the first budgeted weight's gradient was sampled, else "D"."""
    kinds = []
    w = pk.budgeted_weights(model)[0][1]
    for n in range(steps):
        x, y = data[n]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kinds.append("S" if isinstance(w.grad, TrackedGradient) else "D")
        opt.step()
    return "".join(kinds)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sampled_on_the_steps_that_keep_the_tracked_set(kind):
    model = make(kind)
    opt = _opt(model, R=3)
    data = batches(kind, 8)
    assert _kinds(model, opt, data, 8) == "DSSDSSDS"
    assert "reselect_every=3" in repr(opt)
    assert opt.reselects(1) and not opt.reselects(2) and opt.reselects(4)
    other = make(kind)
    assert _kinds(other, _opt(other, R=1), data, 3) == "DDD"


def test_keep_step_is_the_base_update_of_the_tracked_weights():
    model = make("mlp")
    opt = _opt(model, R=5, lr=0.05, momentum=0.9, weight_decay=0.01)
    data = batches("mlp", 3)
    train(model, opt, data, 1)  # a selecting step: tracked sets and momentum exist
    weights = [w for _, w in pk.budgeted_weights(model)]
    before = [(w.bits, w.values.clone(), opt.state[w]["momentum_buffer"].clone()) for w in weights]
    x, y = data[1]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [w.grad.values.clone() for w in weights]
    d_prev = [w.scale_value for w in weights]
    opt.step()
    for w, (bits, v, m), g, d in zip(weights, before, grads, d_prev):
        assert w.bits is bits  # the tracked set is kept, object and all
        g = g.add(v, alpha=0.01)
        m_new = m.mul(0.9).add_(g)
        assert torch.equal(opt.state[w]["momentum_buffer"], m_new)
        assert torch.equal(w.values, v.add(m_new, alpha=-0.05))
        assert w.scale_value == min(d, opt.decay_at(2))


@pytest.mark.parametrize("cls", [pk.DropBack, pk.Procrustes])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sampled_gradient_trains_like_the_dense_gradient(cls, kind):
    """The same run with dense gradients sampled by the optimizer: the same tracked sets, values
    equal to the rounding of the SDDMM's float32 sums."""

    def run(sampled):
        model = make(kind)
        opt = _opt(model, cls, R=4, **({"decay_steps": 6} if cls is pk.Procrustes else {}))
        data = batches(kind, 14)
        for n in range(14):
            if not sampled:
                for w in opt.weights:
                    w.set_sampled_grad(False)
            train(model, opt, data, 1, start=n)
        return model

    a, b = run(True), run(False)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if pk.is_budgeted(p):
            assert torch.equal(p.bits, q.bits), name
            assert_close_verbose(p.values, q.values, rtol=1e-5, atol=1e-6)
        else:
            assert_close_verbose(p, q, rtol=1e-5, atol=1e-6)


def test_sparse_kernels_after_the_decay_sample_the_gradient():
    """A decayed Procrustes layer large enough for the C++ kernels: forward, input gradient and
    sampled weight gradient all sparse, equal to the materialise path's."""
    if not available_backends()["cpp"]:
        pytest.skip("the C++ extension is not built here (the reference path is tested above)")
    torch.manual_seed(0)
    model = pk.sparsify(
        torch.nn.Sequential(torch.nn.Linear(300, 260), torch.nn.ReLU(), torch.nn.Linear(260, 5)),
        seed=2,
    )
    opt = _opt(model, pk.Procrustes, R=3, budget=0.1, decay_steps=2)
    x, y = torch.randn(40, 300), torch.randint(0, 5, (40,))
    for _ in range(4):
        train(model, opt, [(x, y)], 1)
    layer = model[0]
    assert layer.weight.scale_value == 0.0 and layer.weight.sampled_grad
    grads = {}
    for mode in ("sparse", "dense"):
        layer.weight.compute = mode
        opt.zero_grad()
        xx = x.clone().requires_grad_()
        F.cross_entropy(model(xx), y).backward()
        assert layer.weight.last_path == mode
        grads[mode] = (layer.weight.grad.values.clone(), xx.grad.clone())
    for a, b in zip(grads["sparse"], grads["dense"]):
        assert_close_verbose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_inside_an_interval_is_exact(backend):
    data = batches("cnn", 13)
    with use_backend(backend):
        model = make("cnn")
        opt = _opt(model, pk.Procrustes, R=5, selection="quantile", decay_steps=8)
        train(model, opt, data, 7)  # steps 1..7: the next one keeps the tracked set
        saved = snapshot(model, opt)
        train(model, opt, data, 6, start=7)
        want = snapshot(model, opt)

        model2 = make("cnn")
        opt2 = _opt(model2, pk.Procrustes, R=5, selection="quantile", decay_steps=8)
        model2.load_state_dict(saved[0])
        opt2.load_state_dict(saved[1])
        assert all(w.sampled_grad for w in opt2.weights)
        train(model2, opt2, data, 6, start=7)
    assert_same_state(snapshot(model2, opt2), want)


def test_backends_agree():
    if not available_backends()["cpp"]:
        pytest.skip("the C++ extension is not built here; the reference runs in the other tests")
    data = batches("cnn", 12)
    out = []
    for backend in ("reference", "cpp"):
        with use_backend(backend):
            model = make("cnn")
            train(model, _opt(model, pk.DropBack, R=4, selection="topk"), data, 12)
            out.append(model)
    for (name, p), (_, q) in zip(out[0].named_parameters(), out[1].named_parameters()):
        if pk.is_budgeted(p):
            assert torch.equal(p.bits, q.bits), name
            assert_close_verbose(p.values, q.values, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- the gradient as a tensor
def _sampled_model():
    model = make("mlp")
    opt = _opt(model, R=10)
    data = batches("mlp", 2)
    train(model, opt, data, 1)
    opt.zero_grad()
    return model, opt, data[1]


def _backward(model, batch, scale=1.0):
    x, y = batch
    (scale * F.cross_entropy(model(x), y)).backward()


def test_accumulation_sums_the_sampled_values():
    model, opt, batch = _sampled_model()
    w = model[0].weight
    _backward(model, batch)
    once = w.grad.values.clone()
    _backward(model, batch)
    assert isinstance(w.grad, TrackedGradient)
    assert_close_verbose(w.grad.values, 2 * once, rtol=1e-6, atol=1e-7)
    opt.zero_grad(set_to_none=False)
    assert isinstance(w.grad, TrackedGradient) and not w.grad.values.any()


def test_a_dense_gradient_kept_from_before_accumulates_the_sampled_values():
    model, opt, batch = _sampled_model()
    w = model[0].weight
    old = torch.randn(w.shape)
    w.grad = old.clone()
    _backward(model, batch)
    assert type(w.grad) is torch.Tensor
    mask = pk.storage.unpack_bits(w.bits, w.weight_numel).view(w.shape)
    opt.zero_grad()
    _backward(model, batch)
    want = old.clone()
    want[mask] += w.grad.values
    _backward_dense = w.grad  # noqa: F841 (the sampled gradient alone, for the comparison)
    w.grad = old.clone()
    _backward(model, batch)
    assert_close_verbose(w.grad, want, rtol=1e-6, atol=1e-6)


def test_a_dense_gradient_meeting_a_sampled_one_is_sampled():
    model, opt, batch = _sampled_model()
    w = model[0].weight
    _backward(model, batch)
    sampled = w.grad.values.clone()
    (w * 3.0).sum().backward()  # any other use of the weight: a dense gradient of 3 everywhere
    assert isinstance(w.grad, TrackedGradient)
    assert_close_verbose(w.grad.values, sampled + 3.0, rtol=1e-6, atol=1e-6)


def test_gradient_tools_work_on_the_sampled_values():
    model, opt, batch = _sampled_model()
    _backward(model, batch)
    grads = [p.grad for p in model.parameters()]
    flat = [g.values if isinstance(g, TrackedGradient) else g for g in grads]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(f) for f in flat]))
    before = [f.clone() for f in flat]
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float(norm) / 4)
    assert_close_verbose(total, norm, rtol=1e-6, atol=0.0)
    for f, b in zip([g.values if isinstance(g, TrackedGradient) else g for g in grads], before):
        assert_close_verbose(f, b / 4, rtol=1e-5, atol=1e-8)
    torch.nn.utils.clip_grad_value_(model.parameters(), 1e-4)
    assert float(model[0].weight.grad.values.abs().max()) <= 1e-4
    g = model[0].weight.grad
    g.mul_(2.0).div_(2.0)
    assert torch.isfinite(g).all()
    dense = g.to_dense()
    assert dense.shape == model[0].weight.shape and type(dense) is torch.Tensor
    mask = pk.storage.unpack_bits(g.bits, g.numel()).view(g.shape)
    assert torch.equal(dense[mask], g.values) and not dense[~mask].any()
    assert "TrackedGradient" in repr(g)


def test_grad_scaler_unscales_the_sampled_values():
    model, opt, batch = _sampled_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    x, y = batch
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaled = model[0].weight.grad.values.clone()
    scaler.unscale_(opt)
    assert_close_verbose(model[0].weight.grad.values, scaled / 8.0, rtol=1e-6, atol=0.0)
    scaler.step(opt)
    scaler.update()
    assert opt.step_count == 2


def test_dense_reads_of_a_sampled_gradient_raise():
    model, opt, batch = _sampled_model()
    _backward(model, batch)
    g = model[0].weight.grad
    for read in (lambda: g.sum(), lambda: g[0], lambda: g @ g.t(), lambda: g.exp()):
        with pytest.raises(RuntimeError, match="tracked positions only"):
            read()


def test_hooks_see_the_sampled_gradient():
    model, opt, batch = _sampled_model()
    seen = []
    model[0].weight.register_hook(lambda g: seen.append(type(g).__name__))
    _backward(model, batch)
    assert seen == ["TrackedGradient"]


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_interval(bad):
    with pytest.raises(ValueError, match="reselect_every to be an int >= 1"):
        pk.DropBack(make("mlp").parameters(), lr=0.1, budget=0.1, reselect_every=bad)


def test_interval_needs_sgd():
    with pytest.raises(ValueError, match="reselect_every > 1 is defined for update='sgd'"):
        pk.DropBack(make("mlp").parameters(), lr=0.1, budget=0.1, update="adamw", reselect_every=2)


def test_checkpoint_of_another_interval_is_refused():
    model = make("mlp")
    opt = _opt(model, R=4)
    train(model, opt, batches("mlp", 2), 2)
    other = _opt(make("mlp"), R=2)
    with pytest.raises(ValueError, match="reselect_every=2 as configured, checkpoint has 4"):
        other.load_state_dict(copy.deepcopy(opt.state_dict()))


def test_stale_sampled_gradient_on_a_selecting_step_is_refused():
    model = make("mlp")
    opt = _opt(model, R=2)
    data = batches("mlp", 3)
    train(model, opt, data, 2)  # step 2 kept the tracked set; step 3 selects
    x, y = data[2]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert not isinstance(model[0].weight.grad, TrackedGradient)
    w = model[0].weight
    w.grad = TrackedGradient(w.values.clone(), w.bits, tuple(w.shape))  # a leftover
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="needs the dense gradient"):
        opt.step()
    assert_same_state(snapshot(model, opt), before)


def test_nonfinite_sampled_gradient_leaves_everything_unchanged():
    model, opt, batch = _sampled_model()
    _backward(model, batch)
    model[0].weight.grad.values[3] = float("nan")
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    assert_same_state(snapshot(model, opt), before)


def test_compiled_training_takes_the_same_step():
    """Compiled, the gradient may stay dense (AOT autograd rebuilds the weight without the
    optimizer's flag): the optimizer samples it, so the step is the eager one."""
    model, opt, batch = _sampled_model()
    x, y = batch
    _backward(model, batch)
    eager = {n: p.grad.values.clone() for n, p in pk.budgeted_weights(model)}
    opt.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    F.cross_entropy(compiled(x), y).backward()
    for name, w in pk.budgeted_weights(model):
        assert_close_verbose(opt._tracked_grad(w), eager[name], rtol=1e-6, atol=1e-7)
    opt.step()
    assert opt.step_count == 2


@pytest.mark.parametrize("density", [0.5, 0.1])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dense_layers_on_the_cpu_pick_the_dense_gradient(kind, density, monkeypatch):
    """On the C++ backend a materialised layer denser than AUTO_MAX_DENSITY_CPU takes its tracked
    gradient from ATen's dense weight gradient (picked at the tracked positions); a sparser one
    from the SDDMM kernel. Both equal the nn layer's gradient at the tracked positions."""
    if not available_backends()["cpp"]:
        pytest.skip("the C++ extension is not built here (the rule is the C++ backend's)")
    from procrustes_kernels import compute, functional
    from procrustes_kernels.storage import BlockStorage

    torch.manual_seed(1)
    if kind == "linear":
        layer, x = pk.SparseLinear(300, 70, seed=3), torch.randn(33, 300)
        dense = torch.nn.Linear(300, 70)
    else:
        layer, x = pk.SparseConv2d(16, 24, 3, padding=1, seed=3), torch.randn(3, 16, 9, 11)
        dense = torch.nn.Conv2d(16, 24, 3, padding=1)
    w = layer.weight.effective()
    mask = torch.rand(w.shape) < density
    layer.weight.set_tracked(BlockStorage.from_mask(w, mask, layer.weight.block_size), scale=0.0)
    with torch.no_grad():
        dense.weight.copy_(layer.weight.effective())
        dense.bias.copy_(layer.bias)
    layer.weight.compute = "dense"
    layer.weight.set_sampled_grad(True)
    op = "sddmm_linear" if kind == "linear" else "sddmm_conv2d"
    calls = []
    real = getattr(functional.reference, op)
    monkeypatch.setattr(functional.reference, op, lambda *a, **k: calls.append(1) or real(*a, **k))
    assert compute.dense_tracked_grad(layer.weight, x) == (density > compute.AUTO_MAX_DENSITY_CPU)
    with use_backend("cpp"):
        layer(x).sum().backward()
    dense(x).sum().backward()
    assert isinstance(layer.weight.grad, TrackedGradient)
    assert len(calls) == (1 if density > compute.AUTO_MAX_DENSITY_CPU else 0)
    assert_close_verbose(layer.weight.grad.values, dense.weight.grad[mask], rtol=1e-5, atol=1e-5)
