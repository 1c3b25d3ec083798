"""The budgeted weight as a PyTorch weight: ``layer.weight``, gradients in ``.grad``, torch.optim
conventions, standard tools (clipping, GradScaler, freezing, hooks, state_dict, nn utilities)."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import helpers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import procrustes_kernels as pk

DATA = Path(__file__).parent / "data"


def mlp() -> nn.Module:
    return helpers.mlp(12, 16, 5)


def cnn() -> nn.Module:  # one convolution and the head, for [B, 2, 5, 5] inputs
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )


def batch(kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(9, 12, generator=g), torch.randint(0, 5, (9,), generator=g)
    return torch.randn(7, 2, 5, 5, generator=g), torch.randint(0, 3, (7,), generator=g)


MODELS = {"mlp": mlp, "cnn": cnn}


def pair(kind: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A sparsified model and its dense copy (same effective weights)."""
    sparse = pk.sparsify(MODELS[kind](), seed=seed)
    return sparse, pk.densify(copy.deepcopy(sparse))


def loss_of(model: nn.Module, kind: str, seed: int = 0) -> torch.Tensor:
    x, y = batch(kind, seed)
    return F.cross_entropy(model(x), y)


def effective(model: nn.Module) -> list[torch.Tensor]:
    return [p.effective() if pk.is_budgeted(p) else p.detach().clone() for p in model.parameters()]


# -- 1. the design ----------------------------------------------------------------------------------


def test_budgeted_weight_is_an_nn_parameter_shaped_like_the_dense_weight():
    model = pk.sparsify(cnn(), seed=1)
    conv, lin = model[0], model[3]
    assert type(conv) is nn.Conv2d and type(lin) is nn.Linear  # modules keep their class
    for m, shape in ((conv, (4, 2, 3, 3)), (lin, (3, 100))):
        w = m.weight
        assert isinstance(w, nn.Parameter) and isinstance(w, pk.BudgetedWeight)
        assert pk.is_budgeted(w) and not pk.is_budgeted(m.bias)
        assert tuple(w.shape) == shape and w.dtype == torch.float32 and w.device.type == "cpu"
        assert w.requires_grad and w.is_leaf
        assert w.nnz == 0 and w.scale_value == 1.0
        torch.testing.assert_close(w.effective(), w.initial_values(), rtol=0, atol=0)
    assert [n for n, _ in pk.budgeted_weights(model)] == ["0.weight", "3.weight"]
    assert "nnz=0/72" in repr(conv.weight)


def test_reads_see_the_effective_weight_and_keep_autograd():
    model = pk.sparsify(mlp(), seed=2)
    w = model[0].weight
    dense = w.effective()
    torch.testing.assert_close(w * 2, dense * 2, rtol=0, atol=0)
    torch.testing.assert_close(w.t(), dense.t(), rtol=0, atol=0)
    torch.testing.assert_close(w.sum(), dense.sum())
    torch.testing.assert_close(w[3], dense[3], rtol=0, atol=0)
    torch.testing.assert_close(torch.matmul(torch.ones(2, 12), w.T), torch.ones(2, 12) @ dense.T)
    (w**2).sum().backward()
    assert type(w.grad) is torch.Tensor
    torch.testing.assert_close(w.grad, 2 * dense)
    assert torch.zeros_like(w).shape == w.shape and type(torch.zeros_like(w)) is torch.Tensor


def test_detach_clone_to_and_deepcopy_keep_the_compressed_form():
    model = pk.sparsify(mlp(), seed=3)
    opt = pk.DropBack(model.parameters(), lr=0.1, budget=0.2)
    loss_of(model, "mlp").backward()
    opt.step()
    w = model[0].weight
    for other in (w.detach(), w.clone(), copy.deepcopy(w), w.to(torch.float64)):
        assert isinstance(other, pk.BudgetedWeight)
        assert other.nnz == w.nnz and other.seed == w.seed
        torch.testing.assert_close(other.effective().to(w.dtype), w.effective(), rtol=0, atol=0)
    assert w.clone().values.data_ptr() != w.values.data_ptr()
    assert w.to(torch.float64).values.dtype == torch.float64
    assert not w.detach().requires_grad
    twin = copy.deepcopy(model)
    assert twin[0].weight is not w and twin[0].weight.values.data_ptr() != w.values.data_ptr()
    torch.testing.assert_close(twin(batch("mlp")[0]), model(batch("mlp")[0]), rtol=0, atol=0)
    model.double()
    assert model[0].weight is w and w.dtype == torch.float64 and w.values.dtype == torch.float64


@pytest.mark.parametrize(
    "write",
    [
        lambda w: w.add_(1.0),
        lambda w: w.zero_(),
        lambda w: w.mul_(2.0),
        lambda w: nn.init.kaiming_uniform_(w),
        lambda w: nn.init.zeros_(w),
        lambda w: torch.add(torch.ones(w.shape), 1, out=w),
    ],
)
def test_writes_it_cannot_honour_raise_and_change_nothing(write):
    w = pk.sparsify(mlp(), seed=4)[0].weight
    before = w.effective()
    with torch.no_grad(), pytest.raises(RuntimeError, match="pk.DropBack / pk.Procrustes"):
        write(w)
    torch.testing.assert_close(w.effective(), before, rtol=0, atol=0)


def test_model_apply_with_an_init_function_no_longer_skips_budgeted_layers():
    model = pk.sparsify(mlp(), seed=5)
    seen = []

    def init(m):
        if isinstance(m, nn.Linear):  # True for budgeted layers: they are not skipped
            seen.append(m)
            nn.init.xavier_uniform_(m.weight)

    with pytest.raises(RuntimeError, match="pk.DropBack"):
        model.apply(init)
    assert len(seen) == 1
    model[0].weight.reset_tracked()  # the way to re-initialise a budgeted weight
    assert model[0].weight.nnz == 0


# -- 2. gradients the standard way ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_grad_is_the_dense_models_weight_gradient(kind):
    sparse, dense = pair(kind, seed=6)
    loss_of(sparse, kind).backward()
    loss_of(dense, kind).backward()
    for ps, pd in zip(sparse.parameters(), dense.parameters()):
        assert type(ps.grad) is torch.Tensor and ps.grad.shape == ps.shape
        torch.testing.assert_close(ps.grad, pd.grad, rtol=1e-5, atol=1e-7)


def test_zero_grad_and_accumulation_behave_as_on_nn_layers():
    sparse, dense = pair("mlp", seed=7)
    for model in (sparse, dense):
        loss_of(model, "mlp", 0).backward()
        loss_of(model, "mlp", 1).backward()  # accumulates
    for ps, pd in zip(sparse.parameters(), dense.parameters()):
        torch.testing.assert_close(ps.grad, pd.grad, rtol=1e-5, atol=1e-7)
    sparse.zero_grad()
    assert all(p.grad is None for p in sparse.parameters())
    opt = pk.DropBack(sparse.parameters(), lr=0.1, budget=0.1)
    loss_of(sparse, "mlp").backward()
    opt.zero_grad()
    assert all(p.grad is None for p in sparse.parameters())
    loss_of(sparse, "mlp").backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in sparse.parameters())


def test_nan_batch_is_refused_then_training_goes_on_after_zero_grad():
    model = pk.sparsify(mlp(), seed=8)
    opt = pk.DropBack(model.parameters(), lr=0.1, budget=0.2)
    x, y = batch("mlp")
    F.cross_entropy(model(x * float("nan")), y).backward()
    before = effective(model)
    with pytest.raises(FloatingPointError, match="non-finite gradient in"):
        opt.step()
    for a, b in zip(effective(model), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    opt.zero_grad()
    loss_of(model, "mlp").backward()
    opt.step()
    assert opt.step_count == 1 and opt.tracked_count > 0


def test_clip_grad_norm_over_model_parameters_gives_the_dense_norm():
    sparse, dense = pair("cnn", seed=9)
    loss_of(sparse, "cnn").backward()
    loss_of(dense, "cnn").backward()
    norm_s = nn.utils.clip_grad_norm_(sparse.parameters(), max_norm=0.05)
    norm_d = nn.utils.clip_grad_norm_(dense.parameters(), max_norm=0.05)
    torch.testing.assert_close(norm_s, norm_d, rtol=1e-5, atol=0)
    for ps, pd in zip(sparse.parameters(), dense.parameters()):
        torch.testing.assert_close(ps.grad, pd.grad, rtol=1e-5, atol=1e-8)  # clipped alike


def test_grad_scaler_step_equals_an_unscaled_step():
    models = [pk.sparsify(cnn(), seed=10) for _ in range(3)]
    opts = [pk.DropBack(m.parameters(), lr=0.3, budget=0.2, momentum=0.9) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plain, scaled, unscaled_by_hand = zip(models, opts)
    for step in range(3):
        for _, o in (plain, scaled, unscaled_by_hand):
            o.zero_grad()
        loss_of(plain[0], "cnn", step).backward()
        plain[1].step()
        scaler.scale(loss_of(scaled[0], "cnn", step)).backward()
        scaler.step(scaled[1])
        scaler.update()
        (loss_of(unscaled_by_hand[0], "cnn", step) * 2.0**12).backward()
        unscaled_by_hand[1].step()  # what a scaler that never unscales would do
    for a, b in zip(effective(plain[0]), effective(scaled[0])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(effective(plain[0]), effective(unscaled_by_hand[0]))
    )
    assert diff > 1e-3  # the scale matters, so the equality above is not vacuous


def test_grad_scaler_skips_a_step_with_inf_gradients():
    model = pk.sparsify(mlp(), seed=11)
    opt = pk.DropBack(model.parameters(), lr=0.1, budget=0.2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch("mlp")
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    before = effective(model)
    scaler.step(opt)
    scaler.update()
    assert opt.step_count == 0 and scaler.get_scale() < 2.0**10
    for a, b in zip(effective(model), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_post_accumulate_grad_hook_and_tensor_hooks_fire():
    model = pk.sparsify(mlp(), seed=12)
    w = model[0].weight
    seen, scaled = [], []
    w.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    model[2].weight.register_hook(lambda g: scaled.append(g) or g * 0)
    loss_of(model, "mlp").backward()
    assert len(seen) == 1 and seen[0].shape == w.shape
    torch.testing.assert_close(seen[0], w.grad)
    assert len(scaled) == 1 and not model[2].weight.grad.any()  # the hook's result is the grad


def test_frozen_layer_does_not_move_and_keeps_its_share_of_a_global_budget():
    model = pk.sparsify(mlp(), seed=13)
    opt = pk.DropBack(model.parameters(), lr=0.3, budget=0.25, momentum=0.9)
    for step in range(2):
        opt.zero_grad()
        loss_of(model, "mlp", step).backward()
        opt.step()
    model[0].requires_grad_(False)
    frozen = model[0].weight.nnz
    before = [model[0].weight.effective(), model[0].bias.detach().clone()]
    for step in range(2, 5):
        opt.zero_grad()
        loss_of(model, "mlp", step).backward()
        assert model[0].weight.grad is None
        opt.step()
    assert model[0].weight.nnz == frozen > 0
    torch.testing.assert_close(model[0].weight.effective(), before[0], rtol=0, atol=0)
    torch.testing.assert_close(model[0].bias, before[1], rtol=0, atol=0)
    assert model[2].weight.nnz <= opt.budget - frozen
    assert opt.tracked_count <= opt.budget


def test_no_grad_builds_no_graph():
    model = pk.sparsify(cnn(), seed=14)
    with torch.no_grad():
        out = model(batch("cnn")[0])
    assert not out.requires_grad
    with torch.inference_mode():
        assert not model(batch("cnn")[0]).requires_grad


# -- 3. sparsify ----------------------------------------------------------------------------------


class MyLinear(nn.Linear):
    pass


def test_sparsify_converts_subclasses_and_attention_and_keeps_classes():
    model = nn.Sequential(
        MyLinear(8, 8),
        nn.MultiheadAttention(8, 2, batch_first=True),
        nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True),
    )
    pk.sparsify(model, seed=15)
    assert type(model[0]) is MyLinear and pk.is_budgeted(model[0].weight)
    attn, cross = model[1], model[2]
    assert pk.is_budgeted(attn.in_proj_weight) and pk.is_budgeted(attn.out_proj.weight)
    assert not attn.in_proj_bias.any() and not attn.out_proj.bias.any()  # nn's zero init
    bound = (6.0 / (8 + 24)) ** 0.5  # xavier_uniform_ of the (24, 8) in_proj_weight
    assert attn.in_proj_weight.bound == pytest.approx(bound, rel=1e-6)
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        assert pk.is_budgeted(getattr(cross, name))
    assert cross.k_proj_weight.shape == (8, 6) and cross.v_proj_weight.shape == (8, 5)
    seeds = [w.seed for _, w in pk.budgeted_weights(model)]
    assert len(seeds) == 7 and len(set(seeds)) == 7
    x, kv_k, kv_v = torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    out, _ = cross(x, kv_k, kv_v)
    out.sum().backward()
    assert all(w.grad is not None for _, w in pk.budgeted_weights(cross))


def test_sparsify_keeps_the_seeds_of_the_previous_layout():
    model = pk.sparsify(cnn(), seed=7)
    assert [w.seed for _, w in pk.budgeted_weights(model)] == [
        pk.derive_seed(7, 0),
        pk.derive_seed(7, 1),
    ]
    # The bias continues the weight's random stream, as SparseLinear's does.
    ref = pk.SparseLinear(100, 3, seed=pk.derive_seed(7, 1))
    torch.testing.assert_close(model[3].bias, ref.bias, rtol=0, atol=0)
    torch.testing.assert_close(model[3].weight.effective(), ref.effective_weight(), rtol=0, atol=0)


@pytest.mark.parametrize("train", [False, True])
def test_transformer_encoder_layer_gives_the_dense_copys_output(train):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True)
    pk.sparsify(layer, seed=16)
    matrices = [p for n, p in layer.named_parameters() if p.dim() == 2]
    assert matrices and all(pk.is_budgeted(p) for p in matrices)  # every matrix weight
    dense = pk.densify(copy.deepcopy(layer))
    assert not any(pk.is_budgeted(p) for p in dense.parameters())
    layer.train(train)
    dense.train(train)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)


def test_a_tied_weight_stays_one_budgeted_parameter():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.mix = nn.Linear(6, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.tanh(self.mix(self.emb(idx))))

    model = LM()
    n_params = len(list(model.parameters()))
    pk.sparsify(model, seed=17)
    assert model.head.weight is model.emb.weight and pk.is_budgeted(model.emb.weight)
    assert len(list(model.parameters())) == n_params
    idx = torch.randint(0, 11, (4, 3))
    dense = pk.densify(copy.deepcopy(model))
    assert dense.head.weight is dense.emb.weight and not pk.is_budgeted(dense.emb.weight)
    opt = pk.DropBack(model.parameters(), lr=0.5, budget=0.3)
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    F.cross_entropy(dense(idx).flatten(0, 1), idx.flatten()).backward()
    # One gradient: both uses (embedding lookup and head) accumulate into it.
    torch.testing.assert_close(model.emb.weight.grad, dense.emb.weight.grad, rtol=1e-5, atol=1e-7)
    opt.step()
    assert model.head.weight is model.emb.weight and model.emb.weight.nnz > 0


def test_meta_device_sparsify_never_allocates_the_dense_weight():
    # A 32768 x 32768 layer: 4.3 GB as a dense float32 weight.
    script = textwrap.dedent(
        """
        import resource, torch
        from torch import nn
        import procrustes_kernels as pk
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(32768, 32768), nn.LayerNorm(32768))
        pk.sparsify(model, seed=0, device="cpu")
        w = model[0].weight
        assert pk.is_budgeted(w) and w.device.type == "cpu" and w.shape == (32768, 32768)
        assert model[0].bias.device.type == "cpu" and model[1].weight.device.type == "cpu"
        assert bool((model[1].weight == 1).all())
        stored = sum(t.numel() * t.element_size() for t in (w.values, w.bits, w.group_ptr))
        print(stored, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    stored, peak = map(int, done.stdout.split())
    dense = 32768 * 32768 * 4
    assert stored < dense / 25  # the bitmask and pointers: ~1/30 of the dense bytes
    assert peak < dense / 2, f"peak RSS {peak / 1e9:.2f} GB for a {dense / 1e9:.1f} GB weight"


def test_meta_device_model_needs_a_device():
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(ValueError, match="meta device; pass device="):
        pk.sparsify(model)
    assert not pk.is_budgeted(model[0].weight)


def test_nn_utilities_work_on_budgeted_models():
    from torch.nn.utils import fuse_conv_bn_eval, parametrize
    from torch.utils.flop_counter import FlopCounterMode

    model = pk.sparsify(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)), seed=18).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 2, 6, 6)
    fused = fuse_conv_bn_eval(model[0], model[1])
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)

    dense = pk.densify(copy.deepcopy(model))
    counts = []
    for m in (model, dense):
        with FlopCounterMode(display=False) as fc:
            m(x)
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] > 0

    class Half(nn.Module):
        def forward(self, w):
            return w * 0.5

    lin = pk.sparsify(nn.Linear(5, 3), seed=19)
    want = lin.weight.effective() * 0.5
    parametrize.register_parametrization(lin, "weight", Half())
    torch.testing.assert_close(lin.weight, want, rtol=0, atol=0)
    lin(torch.randn(4, 5)).sum().backward()
    assert lin.parametrizations.weight.original.grad is not None
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in dense.parameters())


# -- 4. the optimizer follows torch.optim ---------------------------------------------------------


def test_optimizer_takes_parameters_groups_or_a_module():
    for params in (
        lambda m: m.parameters(),
        lambda m: m,
        lambda m: [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.05}],
    ):
        model = pk.sparsify(mlp(), seed=20)
        opt = pk.DropBack(params(model), lr=0.1, budget=0.2, momentum=0.9)
        assert [id(w) for w in opt.weights] == [id(model[0].weight), id(model[2].weight)]
        loss_of(model, "mlp").backward()
        opt.step()
        assert opt.tracked_count == opt.budget


def test_foreign_optimizer_is_refused_at_its_first_step_and_changes_nothing():
    model = pk.sparsify(mlp(), seed=21)
    loss_of(model, "mlp").backward()
    before = effective(model)
    for foreign in (torch.optim.Adam, torch.optim.SGD, torch.optim.AdamW):
        opt = foreign(model.parameters(), lr=0.1)
        with pytest.raises(TypeError, match=r"budgeted weight.*pk\.DropBack / pk\.Procrustes"):
            opt.step()
        assert not opt.state
    for a, b in zip(effective(model), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    dense_only = torch.optim.SGD([model[0].bias], lr=0.1)  # no budgeted weight: fine
    dense_only.step()


def test_per_group_settings_are_honoured_and_an_lr_zero_group_stays_fixed():
    model = pk.sparsify(mlp(), seed=22)
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.0},
        {"params": list(model[2].parameters())},
    ]
    opt = pk.DropBack(groups, lr=0.2, budget=0.3, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    first = [model[0].weight.effective(), model[0].bias.detach().clone()]
    b2 = model[2].bias.detach().clone()
    for step in range(3):
        opt.zero_grad()
        loss_of(model, "mlp", step).backward()
        opt.step()
        sched.step()
    torch.testing.assert_close(model[0].weight.effective(), first[0], rtol=0, atol=0)
    torch.testing.assert_close(model[0].bias, first[1], rtol=0, atol=0)
    assert model[0].weight.nnz == 0 and not torch.equal(model[2].bias, b2)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.2 * 0.5**3]


def test_groups_with_their_own_lr_match_separate_scalings():
    # Group lr reaches the budgeted rule too: a group at lr 0.2 moves its weights as far as a
    # single-group optimizer at lr 0.2 (per-layer scope, so the budgets do not interact).
    a = pk.sparsify(mlp(), seed=23)
    b = copy.deepcopy(a)
    opt_a = pk.DropBack(
        [{"params": a[0].parameters(), "lr": 0.2}, {"params": a[2].parameters(), "lr": 0.05}],
        lr=1.0,
        budget=0.25,
        scope="layer",
    )
    opt_b0 = pk.DropBack(b[0].parameters(), lr=0.2, budget=opt_a.layer_budgets[0])
    opt_b2 = pk.DropBack(b[2].parameters(), lr=0.05, budget=opt_a.layer_budgets[1])
    for step in range(3):
        for o in (opt_a, opt_b0, opt_b2):
            o.zero_grad()
        loss_of(a, "mlp", step).backward()
        loss_of(b, "mlp", step).backward()
        opt_a.step()
        opt_b0.step()
        opt_b2.step()
    for x, y in zip(effective(a), effective(b)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_add_param_group_joins_the_global_budget():
    model = pk.sparsify(mlp(), seed=24)
    opt = pk.DropBack(model[0].parameters(), lr=0.1, budget=0.2)
    assert opt.total_weights == 12 * 16 and opt.budget == round(0.2 * 192)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.05})
    assert opt.total_weights == 12 * 16 + 16 * 5 and opt.budget == round(0.2 * 272)
    assert opt.weights[1] is model[2].weight and opt.param_groups[1]["lr"] == 0.05
    loss_of(model, "mlp").backward()
    opt.step()
    assert opt.tracked_count == opt.budget and model[2].weight.nnz > 0
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": -1.0})
    assert len(opt.param_groups) == 2


def test_optimizer_without_budgeted_weights_is_refused():
    with pytest.raises(ValueError, match="budgeted weights"):
        pk.DropBack(mlp().parameters(), lr=0.1, budget=0.1)


# -- 5. loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sparse_state_dict_loads_into_the_plain_nn_model(kind):
    sparse = pk.sparsify(MODELS[kind](), seed=25)
    opt = pk.Procrustes(sparse.parameters(), lr=0.2, budget=0.2, momentum=0.9, decay_steps=2)
    for step in range(4):
        opt.zero_grad()
        loss_of(sparse, kind, step).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(sparse.state_dict(), buf)
    buf.seek(0)
    plain = MODELS[kind]()
    plain.load_state_dict(torch.load(buf))  # weights_only=True, the default
    assert not any(pk.is_budgeted(p) for p in plain.parameters())
    x = batch(kind, 5)[0]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), sparse(x), rtol=0, atol=0)


def test_sparse_to_sparse_loading_keeps_the_compressed_form():
    src = pk.sparsify(cnn(), seed=26)
    opt = pk.DropBack(src.parameters(), lr=0.2, budget=0.2)
    loss_of(src, "cnn").backward()
    opt.step()
    dst = pk.sparsify(cnn(), seed=99)
    w = dst[0].weight
    dst.load_state_dict(src.state_dict())
    assert dst[0].weight is w  # loaded in place: optimizers keep their reference
    assert w.seed == src[0].weight.seed and w.nnz == src[0].weight.nnz
    assert torch.equal(w.bits, src[0].weight.bits)
    dense_sd = pk.densify(copy.deepcopy(src)).state_dict()
    dst.load_state_dict(dense_sd)  # exactly the values it has (DDP's start-up broadcast): no-op
    assert dst[0].weight is w and torch.equal(w.bits, src[0].weight.bits)
    dense_sd["0.weight"] = dense_sd["0.weight"] + 1e-3  # other values: no tracked set to store
    with pytest.raises(RuntimeError, match="dense weight has no tracked set"):
        dst.load_state_dict(dense_sd)
    assert torch.equal(w.effective(), src[0].weight.effective())


def test_save_size_scales_with_the_budget():
    def saved_bytes(budget: float) -> int:
        model = pk.sparsify(nn.Sequential(nn.Linear(256, 256)), seed=27)
        opt = pk.DropBack(model.parameters(), lr=0.5, budget=budget, momentum=0.9)
        model(torch.randn(8, 256)).pow(2).sum().backward()
        opt.step()
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        return buf.tell()

    dense = 256 * 256 * 4
    small, large = saved_bytes(0.05), saved_bytes(0.2)
    assert small < 0.2 * dense < large < 0.6 * dense
    assert large - small == pytest.approx(0.15 * 256 * 256 * 8, rel=0.05)  # values + momentum


def test_checkpoint_of_the_layer_layout_loads_and_resumes():
    # Written by procrustes_kernels 0.1 (SparseConv2d / SparseLinear layers with values,
    # mask_bits, group_ptr, seed and init_scale): 3 DropBack steps, then the 4th step's output.
    ckpt = torch.load(DATA / "layer_layout_v0_1.pt")
    model = pk.sparsify(
        nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(75, 4)),
        seed=0,  # other seeds than the checkpoint's: the checkpoint's win
    )
    model.load_state_dict(ckpt["model"])
    x, y = ckpt["x"], ckpt["y"]
    # The outputs were recorded on another CPU: torch's convolution rounds differently per
    # instruction set (AVX-512 there, AVX2 on some machines here), a few float32 ulps.
    close = {"rtol": 1e-6, "atol": 1e-6}
    with torch.no_grad():
        torch.testing.assert_close(model(x), ckpt["out_after_3"], **close)
    opt = pk.DropBack(model.parameters(), lr=0.2, budget=0.3, momentum=0.9)
    opt.load_state_dict(ckpt["opt"])
    assert opt.step_count == 3
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ckpt["out_after_4"], **close)


def test_deepcopy_and_pickle_of_model_and_optimizer_train_on():
    import pickle

    model = pk.sparsify(mlp(), seed=28)
    opt = pk.Procrustes(model, lr=0.2, budget=0.2, momentum=0.9, decay_steps=3)
    loss_of(model, "mlp").backward()
    opt.step()
    copies = [
        copy.deepcopy({"m": model, "o": opt}),
        pickle.loads(pickle.dumps({"m": model, "o": opt})),
    ]
    for c in copies:
        assert c["o"].weights[0] is c["m"][0].weight and c["o"].step_count == 1
        assert repr(c["o"]) == repr(opt)
    for m, o in [(model, opt)] + [(c["m"], c["o"]) for c in copies]:
        for step in range(1, 4):
            o.zero_grad()
            loss_of(m, "mlp", step).backward()
            o.step()
    for c in copies:
        for a, b in zip(effective(c["m"]), effective(model)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lazy_modules_are_refused_until_initialised():
    model = nn.Sequential(nn.Linear(4, 3), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="not initialised yet"):
        pk.sparsify(model)
    assert not pk.is_budgeted(model[0].weight)  # checked before anything changed
    model(torch.randn(1, 4))
    pk.sparsify(model)
    assert pk.is_budgeted(model[1].weight) and model[1].weight.shape == (2, 3)


@pytest.mark.parametrize(
    "write",
    [
        lambda m: m[2].weight.__setitem__((slice(None), slice(0, 4)), 0.0),
        lambda m: m[0].weight.view(-1).zero_(),
        lambda m: m[0].weight.t().mul_(2.0),
        lambda m: m[0].weight[0].copy_(torch.ones(12)),
        lambda m: m[0].weight.split(4)[1].fill_(1.0),
        lambda m: setattr(m[0].weight, "data", torch.zeros(16, 12)),
        lambda m: torch._foreach_add_(
            list(m.parameters()), [torch.ones(p.shape) for p in m.parameters()]
        ),
        lambda m: torch._foreach_mul_(list(m.parameters()), 0.0),
        lambda m: nn.utils.vector_to_parameters(
            torch.zeros(sum(p.numel() for p in m.parameters())), m.parameters()
        ),
    ],
)
def test_writes_through_views_data_and_foreach_raise_and_change_nothing(write):
    model = pk.sparsify(mlp(), seed=29)
    before = effective(model)
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot write into"):
        write(model)
    for a, b in zip(effective(model)[::2], before[::2]):  # the weights
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_views_read_the_effective_weight_and_keep_gradients():
    model = pk.sparsify(mlp(), seed=30)
    w = model[0].weight
    dense = w.effective()
    row, cols = w[2], w[:, 3:5]
    torch.testing.assert_close(row * 1, dense[2], rtol=0, atol=0)
    assert row.tolist() == dense[2].tolist() and w.tolist() == dense.tolist()
    assert w.numpy().shape == (16, 12) and cols.shape == (16, 2)
    (cols.sum() + w.t()[0].sum()).backward()
    want = torch.zeros(16, 12)
    want[:, 3:5] += 1
    want[:, 0] += 1
    torch.testing.assert_close(w.grad, want)


def test_aliases_share_the_weight_as_dense_tensors_share_storage():
    src = pk.sparsify(mlp(), seed=31)
    opt = pk.DropBack(src.parameters(), lr=0.2, budget=0.3)
    loss_of(src, "mlp").backward()
    opt.step()
    dst = pk.sparsify(mlp(), seed=32)
    sd = dst.state_dict()
    with torch.no_grad():
        sd["0.weight"].copy_(src.state_dict()["0.weight"])  # through the alias
        dst[2].weight.detach().copy_(src[2].weight)
    for a, b in zip(effective(dst)[::2], effective(src)[::2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    before = sd["0.weight"]
    loss_of(dst, "mlp").backward()
    pk.DropBack(dst.parameters(), lr=0.2, budget=0.3).step()
    torch.testing.assert_close(before.effective(), dst[0].weight.effective(), rtol=0, atol=0)
    clone = dst[0].weight.clone()  # a copy: its own state
    dst[0].weight.reset_tracked()
    assert clone.nnz > 0 and dst[0].weight.nnz == 0


def test_share_memory_is_refused():
    model = pk.sparsify(mlp(), seed=33)
    with pytest.raises(RuntimeError, match="shared memory"):
        model.share_memory()


def test_momentum_follows_the_tracked_set_when_it_is_replaced_under_a_live_optimizer():
    # What nn + SGD do: momentum stays with its weight. Here the buffer is per tracked weight, so a
    # model checkpoint loaded under a live optimizer re-aligns it to the loaded tracked set.
    a, b = pk.sparsify(mlp(), seed=34), pk.sparsify(mlp(), seed=35)
    opts = [
        pk.DropBack(m.parameters(), lr=0.2, budget=0.2, momentum=0.9, scope="layer") for m in (a, b)
    ]
    for step in range(3):
        for m, o in zip((a, b), opts):
            o.zero_grad()
            loss_of(m, "mlp", step + (0 if m is a else 7)).backward()
            o.step()
    old_bits = a[0].weight.bits.clone()
    old_mom = opts[0].state[a[0].weight]["momentum_buffer"].clone()
    a.load_state_dict(b.state_dict())
    assert a[0].weight.nnz == old_mom.numel() and not torch.equal(a[0].weight.bits, old_bits)
    # The expected buffer: dense momentum of the old positions, read at the new positions.
    dense = torch.zeros(a[0].weight.numel())
    dense[pk.storage.unpack_bits(old_bits, dense.numel())] = old_mom
    want = dense[pk.storage.unpack_bits(a[0].weight.bits, dense.numel())]
    seen = {}
    orig = pk.optim._remap_momentum
    pk.optim._remap_momentum = lambda *args: seen.setdefault(len(seen), orig(*args))
    try:
        opts[0].zero_grad()
        loss_of(a, "mlp", 9).backward()
        opts[0].step()
    finally:
        pk.optim._remap_momentum = orig
    torch.testing.assert_close(seen[0], want, rtol=0, atol=0)


def test_sparsifying_a_grown_model_again_gives_new_streams():
    model = pk.sparsify(nn.Sequential(nn.Linear(8, 8)), seed=0)
    model.append(nn.Linear(8, 8))
    pk.sparsify(model, seed=0)
    s0, s1 = model[0].weight.seed, model[1].weight.seed
    assert s0 == pk.derive_seed(0, 0) and s1 == pk.derive_seed(0, 1)


def test_sparsify_refuses_parametrized_and_integer_weights_before_changing_anything():
    from torch.nn.utils import parametrizations

    model = nn.Sequential(nn.Linear(4, 4), parametrizations.weight_norm(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="'1.weight' is parametrized"):
        pk.sparsify(model)
    assert not pk.is_budgeted(model[0].weight)
    pk.sparsify(model, filter=lambda name, m: name != "1")
    assert pk.is_budgeted(model[0].weight)
    bad = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    bad[1].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="'1.weight' to be a floating-point weight"):
        pk.sparsify(bad)
    assert not pk.is_budgeted(bad[0].weight)


def test_optimizer_refuses_sgd_options_it_does_not_implement():
    model = pk.sparsify(mlp(), seed=36)
    for key, value in (("nesterov", True), ("dampening", 0.1), ("maximize", True)):
        with pytest.raises(ValueError, match=f"expected {key}="):
            pk.DropBack([{"params": model.parameters(), key: value}], lr=0.1, budget=0.1)


def test_a_weight_listed_twice_counts_once():
    model = pk.sparsify(mlp(), seed=37)
    params = list(model.parameters())
    with pytest.warns(UserWarning, match="duplicate"):
        opt = pk.DropBack(params + params[:1], lr=0.1, budget=0.1)
    assert len(opt.weights) == 2 and opt.total_weights == 12 * 16 + 16 * 5


def test_loading_an_optimizer_state_of_another_budget_is_refused():
    model = pk.sparsify(mlp(), seed=38)
    opt = pk.DropBack(model.parameters(), lr=0.1, budget=0.2)
    loss_of(model, "mlp").backward()
    opt.step()
    other = pk.DropBack(model.parameters(), lr=0.1, budget=0.5)
    with pytest.raises(ValueError, match="expected budget="):
        other.load_state_dict(opt.state_dict())
    assert other.step_count == 0


def test_sparse_embedding_gradients_train_like_sgd():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4, sparse=True)
            self.head = nn.Linear(4, 3)

        def forward(self, idx):
            return self.head(self.emb(idx).mean(1))

    model = pk.sparsify(Bag(), seed=39)
    dense = copy.deepcopy(model.emb)
    opt = pk.DropBack(model.parameters(), lr=0.5, budget=0.5)
    idx = torch.randint(0, 10, (5, 3))
    F.cross_entropy(model(idx), torch.randint(0, 3, (5,))).backward()
    assert model.emb.weight.grad.is_sparse
    want = dense.weight.detach() - 0.5 * model.emb.weight.grad.to_dense()
    opt.step()
    torch.testing.assert_close(model.emb.weight, want)
    wd = pk.DropBack(model.parameters(), lr=0.5, budget=0.5, weight_decay=0.1)
    F.cross_entropy(model(idx), torch.randint(0, 3, (5,))).backward()
    with pytest.raises(ValueError, match="sparse gradient"):
        wd.step()


def test_a_checkpoint_of_references_saved_later_is_consistent():
    # torch.optim's state_dict references live state; a checkpoint dict taken early and saved
    # later must describe one moment (here: after the 5th step), as it does for nn + SGD.
    model = pk.sparsify(mlp(), seed=40)
    opt = pk.Procrustes(
        model.parameters(), lr=0.2, budget=0.2, momentum=0.9, decay_steps=10, scope="layer"
    )

    def step(m, o, i):
        o.zero_grad()
        loss_of(m, "mlp", i).backward()
        o.step()

    for i in range(2):
        step(model, opt, i)
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict()}
    for i in range(2, 5):
        step(model, opt, i)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    resumed = pk.sparsify(mlp(), seed=0)
    resumed.load_state_dict(loaded["model"])
    ropt = pk.Procrustes(
        resumed.parameters(), lr=0.2, budget=0.2, momentum=0.9, decay_steps=10, scope="layer"
    )
    ropt.load_state_dict(loaded["opt"])
    assert ropt.step_count == 5
    for i in range(5, 8):
        step(model, opt, i)
        step(resumed, ropt, i)
    for a, b in zip(effective(model), effective(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_momentum_alignment_survives_an_optimizer_reload():
    model = pk.sparsify(mlp(), seed=41)
    opt = pk.DropBack(model.parameters(), lr=0.2, budget=0.2, momentum=0.9, scope="layer")
    old = None
    for i in range(4):
        opt.zero_grad()
        loss_of(model, "mlp", i).backward()
        opt.step()
        if i == 1:
            old = copy.deepcopy(model.state_dict())
    opt.load_state_dict(opt.state_dict())  # a no-op reload ...
    bits = model[0].weight.bits.clone()
    buf = opt.state[model[0].weight]["momentum_buffer"].clone()
    model.load_state_dict(old)  # ... then an older model under the live optimizer
    assert not torch.equal(model[0].weight.bits, bits)
    dense = torch.zeros(model[0].weight.numel())
    dense[pk.storage.unpack_bits(bits, dense.numel())] = buf
    want = dense[pk.storage.unpack_bits(model[0].weight.bits, dense.numel())]
    got = pk.optim._remap_momentum(buf, opt._momentum_bits[0], model[0].weight.bits, dense.numel())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert opt._momentum_bits[0] is not None and torch.equal(opt._momentum_bits[0], bits)


def test_host_reads_formatting_copies_and_saving_of_views():
    import numpy as np

    w = pk.sparsify(mlp(), seed=42)[0].weight
    dense = w.effective()
    assert np.array_equal(np.from_dlpack(w.detach()), dense.numpy())
    assert torch.equal(torch.from_dlpack(w.detach()), dense)
    assert f"{w[0, 0]:.4f}" == f"{float(dense[0, 0]):.4f}"
    row = copy.deepcopy(w[1])
    assert type(row) is torch.Tensor and torch.equal(row, dense[1])
    row.zero_()  # a copy, not a view: free to write
    buf = io.BytesIO()
    torch.save(w.t(), buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf) * 1, dense.t())
    with torch.no_grad(), pytest.raises(RuntimeError, match="view of a budgeted weight"):
        w.t().data = torch.zeros(12, 16)


def test_inference_mode_views_and_cross_attention():
    attn = pk.sparsify(nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True), seed=43)
    dense = pk.densify(copy.deepcopy(attn))
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    with torch.inference_mode():
        out = attn(q, k, v)[0]
        assert attn.q_proj_weight.t().shape == (8, 8)
    with torch.no_grad():
        torch.testing.assert_close(out, dense(q, k, v)[0], rtol=1e-5, atol=1e-6)


def test_traced_and_meta_weights_take_the_custom_op():
    from torch.fx.experimental.proxy_tensor import make_fx

    lin = pk.sparsify(nn.Linear(5, 3), seed=44)
    x = torch.randn(2, 5)
    for pre_dispatch in (False, True):
        gm = make_fx(lambda x: lin(x), pre_dispatch=pre_dispatch)(x)
        assert "procrustes.materialize" in str(gm.graph)
        torch.testing.assert_close(gm(x), lin(x), rtol=0, atol=0)
    meta = pk.BudgetedWeight.initial((3, 4), seed=1, block_size=16, device="meta")
    assert meta.effective().device.type == "meta" and meta.effective().shape == (3, 4)


def test_a_weight_returned_by_a_compiled_function_keeps_its_decay_factor():
    model = pk.sparsify(mlp(), seed=45)
    opt = pk.Procrustes(model.parameters(), lr=0.2, budget=0.2, decay_steps=4)
    for i in range(2):
        opt.zero_grad()
        loss_of(model, "mlp", i).backward()
        opt.step()
    w = model[0].weight
    out = torch.compile(lambda t: t.clone())(w)
    torch._dynamo.reset()
    assert pk.is_budgeted(out) and out.scale_value == w.scale_value and 0 < w.scale_value < 1
    torch.testing.assert_close(out.effective(), w.effective(), rtol=0, atol=0)


def test_sparsify_refuses_hook_based_weight_norm():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(nn.Linear(4, 4), nn.utils.weight_norm(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="'1.weight' is not a parameter but computed"):
        pk.sparsify(model)
    assert not pk.is_budgeted(model[0].weight)


def test_deployment_paths_of_a_trained_model():
    model = pk.sparsify(cnn(), seed=46)
    opt = pk.Procrustes(model.parameters(), lr=0.2, budget=0.2, momentum=0.9, decay_steps=2)
    for i in range(4):
        opt.zero_grad()
        loss_of(model, "cnn", i).backward()
        opt.step()
    model.eval()
    x = batch("cnn", 9)[0]
    with torch.no_grad():
        want = model(x)
    plain = cnn().eval()  # the model code without the library
    plain.load_state_dict(model.state_dict())
    exported = torch.export.export(pk.densify(copy.deepcopy(model)), (x,))
    # The sparse model itself: budgeted weights exported compressed, with the custom op.
    sparse = torch.export.export(model, (x,))
    ops = [str(n.target) for n in sparse.graph.nodes if n.op == "call_function"]
    assert ops.count("procrustes.materialize.default") == 2
    assert all(pk.is_budgeted(sparse.state_dict[k]) for k in ("0.weight", "3.weight"))
    buf = io.BytesIO()
    torch.export.save(sparse, buf)
    buf.seek(0)
    reloaded = torch.export.load(buf)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=0, atol=0)
        torch.testing.assert_close(exported.module()(x), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sparse.module()(x), want, rtol=0, atol=0)
        torch.testing.assert_close(reloaded.module()(x), want, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU)")
def test_on_the_gpu_moves_trains_and_never_syncs_in_the_forward_pass():
    cpu = pk.sparsify(cnn(), seed=47)
    opt = pk.Procrustes(cpu.parameters(), lr=0.2, budget=0.2, momentum=0.9, decay_steps=3)
    loss_of(cpu, "cnn").backward()
    opt.step()
    gpu = copy.deepcopy(cpu).to("cuda")
    w = gpu[0].weight
    assert pk.is_budgeted(w) and w.device.type == "cuda" and w.values.device.type == "cuda"
    x, y = (t.to("cuda") for t in batch("cnn", 3))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        out = gpu(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.no_grad():
        torch.testing.assert_close(out.cpu(), cpu(batch("cnn", 3)[0]), rtol=1e-4, atol=1e-5)
    gopt = pk.Procrustes(gpu.parameters(), lr=0.2, budget=0.2, momentum=0.9, decay_steps=3)
    gopt.load_state_dict(opt.state_dict())
    scaler = torch.amp.GradScaler("cuda")
    for _ in range(3):
        gopt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(gpu(x), y)
        scaler.scale(loss).backward()
        scaler.step(gopt)
        scaler.update()
    assert gopt.step_count == 4 and gopt.tracked_count > 0 and torch.isfinite(loss)


def test_forward_on_the_meta_device_gives_shapes():
    lin = pk.SparseLinear(4, 3, device="meta", seed=1)
    conv = pk.sparsify(nn.Conv2d(2, 5, 3), seed=2).to("meta")
    assert lin(torch.randn(2, 4, device="meta")).shape == (2, 3)
    out = conv(torch.randn(1, 2, 6, 6, device="meta"))
    assert out.device.type == "meta" and out.shape == (1, 5, 4, 4)
