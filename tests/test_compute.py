"""Sparse layers' compute paths: materialise + nn op vs sparse kernels, and the automatic choice."""

import pytest
import torch
from helpers import DEVICE, assert_close_verbose

import procrustes_kernels as pk
from procrustes_kernels import compute
from procrustes_kernels.ops import use_backend
from procrustes_kernels.storage import BlockStorage

DEV = DEVICE  # where the Triton kernels run: the GPU, else the interpreter on CPU tensors
# cuBLAS / cuDNN may use other summation orders (and TF32 for convolutions) than the kernels.
TOL = 1e-5 if DEV.type == "cpu" else 2e-3


# On a GPU, compare float32 paths without TF32 (cuBLAS / cuDNN and the kernels alike).
pytestmark = pytest.mark.usefixtures("no_tf32")


def _zero_untracked(layer, density):
    """Track a random ``density`` of the layer's weights and make the rest exact zeros."""
    w = layer.weight.effective()
    mask = torch.rand(w.shape).to(w.device) < density
    layer.weight.set_tracked(BlockStorage.from_mask(w, mask, layer.weight.block_size), scale=0.0)
    assert layer.weight.scale_value == 0.0 and float(layer.weight.scale) == 0.0
    return layer


def _run(layer, x, mode):
    layer.compute = mode
    layer.weight.grad = None
    if layer.bias is not None:
        layer.bias.grad = None
    xx = x.clone().requires_grad_()
    y = layer(xx)
    (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape)).sum().backward()
    bias_grad = None if layer.bias is None else layer.bias.grad.clone()
    grad = layer.weight.grad
    assert not pk.is_budgeted(grad) and grad.shape == layer.weight.shape
    return y.detach(), xx.grad, grad.clone(), bias_grad, layer.weight.last_path


LAYERS = [
    ("linear", lambda: pk.SparseLinear(45, 37, seed=1), (5, 3, 45)),
    ("linear-nobias-2d", lambda: pk.SparseLinear(33, 70, bias=False, seed=2), (9, 33)),
    ("conv", lambda: pk.SparseConv2d(6, 8, 3, stride=2, padding=1, groups=2, seed=3), (2, 6, 9, 7)),
    (
        "conv-same-reflect",
        lambda: pk.SparseConv2d(4, 5, (2, 3), padding="same", padding_mode="reflect", seed=4),
        (4, 6, 5),
    ),
    (
        "conv-dilated",
        lambda: pk.SparseConv2d(3, 17, 3, dilation=2, padding=2, bias=False, seed=5),
        (1, 3, 8, 8),
    ),
    ("depthwise", lambda: pk.SparseConv2d(8, 8, 3, padding=1, groups=8, seed=6), (2, 8, 5, 5)),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[entry[0] for entry in LAYERS])
def test_sparse_path_matches_dense(backend, name, make, shape):
    layer = _zero_untracked(make().to(DEV), 0.3)
    x = torch.randn(shape).to(DEV)
    dense = _run(layer, x, "dense")
    with use_backend(backend):
        sparse = _run(layer, x, "sparse")
    assert dense[4] == "dense" and sparse[4] == "sparse"
    for a, b in zip(sparse[:4], dense[:4]):
        if b is None:
            assert a is None
        else:
            assert_close_verbose(a, b, rtol=TOL, atol=TOL)


PADDED = [
    ("zeros-asymmetric-same", dict(padding="same"), (2, 4, 7, 6)),
    ("circular", dict(padding=(1, 2), padding_mode="circular"), (2, 4, 7, 6)),
    ("replicate-same", dict(padding="same", padding_mode="replicate"), (4, 7, 6)),
    ("valid", dict(padding="valid", stride=(2, 1)), (2, 4, 7, 6)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("name,kw,shape", PADDED, ids=[entry[0] for entry in PADDED])
def test_sparse_conv_padding_modes(name, kw, shape):
    """Asymmetric zero padding and the other padding modes go through F.pad, then the kernel."""
    layer = _zero_untracked(pk.SparseConv2d(4, 6, (2, 4), seed=11, **kw).to(DEV), 0.4)
    x = torch.randn(shape).to(DEV)
    dense = _run(layer, x, "dense")
    with use_backend("triton"):
        sparse = _run(layer, x, "sparse")
    for a, b in zip(sparse[:4], dense[:4]):
        assert_close_verbose(a, b, rtol=TOL, atol=TOL)


def test_channels_last_input():
    layer = _zero_untracked(pk.SparseConv2d(5, 7, 3, padding=1, seed=12).to(DEV), 0.3)
    x = torch.randn(2, 5, 6, 6).to(DEV).contiguous(memory_format=torch.channels_last)
    dense = _run(layer, x, "dense")
    with use_backend("triton"):
        sparse = _run(layer, x, "sparse")
    for a, b in zip(sparse[:4], dense[:4]):
        assert_close_verbose(a, b, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_sparse_path_extremes(density):
    layer = _zero_untracked(pk.SparseLinear(20, 18, seed=7).to(DEV), density)
    x = torch.randn(4, 20).to(DEV)
    dense = _run(layer, x, "dense")
    with use_backend("triton"):
        sparse = _run(layer, x, "sparse")
    for a, b in zip(sparse[:4], dense[:4]):
        assert_close_verbose(a, b, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_input_gradient_alone_leaves_weight_grad_alone(backend, kind):
    """``autograd.grad(y, x)`` must not feed the optimizer a weight gradient (as on the
    materialise path); ``backward()`` afterwards still does."""
    if kind == "linear":
        layer, x = pk.SparseLinear(30, 20, seed=13), torch.randn(4, 30)
    else:
        layer, x = pk.SparseConv2d(3, 4, 3, seed=13), torch.randn(2, 3, 6, 6)
    layer = _zero_untracked(layer.to(DEV), 0.3)
    x = x.to(DEV).requires_grad_()
    for mode in ("dense", "sparse"):
        layer.compute = mode
        layer.weight.grad = None
        with use_backend(backend):
            (gx,) = torch.autograd.grad(layer(x).square().sum(), x)
            assert layer.weight.grad is None, mode
            layer(x).square().sum().backward(inputs=[x])
            assert layer.weight.grad is None, mode
            layer(x).square().sum().backward()
        assert layer.weight.last_path == mode
        assert layer.weight.grad is not None and gx.shape == x.shape


def test_frozen_weights_and_no_bias_on_sparse_path():
    layer = _zero_untracked(pk.SparseLinear(16, 8, bias=False, seed=14).to(DEV), 0.5)
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 16).to(DEV).requires_grad_()
    with use_backend("triton"):
        layer.compute = "sparse"
        layer(x).sum().backward()
    assert layer.last_path == "sparse"
    assert layer.weight.grad is None and x.grad is not None


def test_second_order_gradient_is_refused():
    """The sparse kernels' backward is not differentiable: say so instead of a silent zero."""
    layer = _zero_untracked(pk.SparseLinear(12, 6, seed=15).to(DEV), 0.5)
    layer.compute = "sparse"
    x = torch.randn(3, 12).to(DEV).requires_grad_()
    with use_backend("triton"):
        (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="twice"):
            gx.square().sum().backward()


def test_autocast_bf16_on_sparse_path():
    layer = _zero_untracked(pk.SparseLinear(32, 16, seed=16).to(DEV), 0.3)
    x = torch.randn(5, 32).to(DEV)
    outs = []
    for mode in ("dense", "sparse"):
        layer.compute = mode
        layer.weight.grad = None
        with use_backend("triton"), torch.autocast(DEV.type, dtype=torch.bfloat16):
            y = layer(x)
            y.float().sum().backward()
        assert layer.last_path == mode
        outs.append((y.float(), layer.weight.grad.float()))
        assert y.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32
    for a, b in zip(*outs):
        assert_close_verbose(a, b, rtol=2e-2, atol=2e-2)


def test_inference_mode_layers_use_the_sparse_path():
    with torch.inference_mode():
        layer = _zero_untracked(pk.SparseLinear(24, 12, seed=17, compute="sparse").to(DEV), 0.3)
        x = torch.randn(4, 24).to(DEV)
        with use_backend("triton"):
            y = layer(x)
            y_again = layer(x)
        want = torch.nn.functional.linear(x, layer.effective_weight(), layer.bias)
    assert layer.last_path == "sparse"
    assert_close_verbose(y, want, rtol=TOL, atol=TOL)
    assert torch.equal(y, y_again)


def test_bf16_sparse_path():
    layer = _zero_untracked(pk.SparseLinear(40, 24, seed=8, dtype=torch.bfloat16), 0.25)
    x = torch.randn(6, 40, dtype=torch.bfloat16)
    dense = _run(layer, x, "dense")
    with use_backend("triton"):
        sparse = _run(layer, x, "sparse")
    for a, b in zip(sparse[:4], dense[:4]):
        assert_close_verbose(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_forced_sparse_needs_zero_untracked():
    """The C++ kernels read tracked weights only: compute="sparse" with untracked weights
    ``scale * w0`` is refused there (the Triton kernels regenerate them)."""
    layer = pk.SparseLinear(8, 4, seed=0, compute="sparse")
    before = layer.weight.scale.clone()
    with use_backend("cpp"), pytest.raises(ValueError, match=r"cpp backend .* \(weight scale 0\)"):
        layer(torch.randn(2, 8))
    assert torch.equal(layer.weight.scale, before) and layer.weight.scale_value == 1.0
    assert layer.last_path is None
    layer = _zero_untracked(pk.SparseLinear(8, 4, seed=0, dtype=torch.float64), 0.5)
    layer.compute = "sparse"
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        layer(torch.randn(2, 8, dtype=torch.float64))


def test_bad_compute_arguments():
    with pytest.raises(ValueError, match="expected compute in"):
        pk.SparseLinear(4, 4, compute="fast")
    with pytest.raises(ValueError, match="compute_tile"):
        pk.SparseConv2d(4, 4, 3, compute_tile=(16, 24))
    with pytest.raises(ValueError, match="compute_tile"):
        pk.SparseLinear(4, 4, compute_tile=(128, 32))
    layer = pk.SparseLinear(4, 4)
    with pytest.raises(ValueError, match="expected compute in"):
        layer.compute = "gpu"
    assert layer.compute == "auto"
    model = torch.nn.Sequential(pk.SparseLinear(4, 4), pk.SparseLinear(4, 4))
    with pytest.raises(ValueError, match="compute_tile"):
        pk.set_compute(model, "sparse", compute_tile=(8, 8))
    assert all(m.compute == "auto" for m in model)
    pk.set_compute(model, "dense", compute_tile=(64, 16))
    assert all(m.compute == "dense" and m.compute_tile == (64, 16) for m in model)


def test_auto_choice(monkeypatch):
    cpu_layer = _zero_untracked(pk.SparseLinear(300, 260, seed=9), 0.0)
    # On the CPU, the C++ kernels up to AUTO_MAX_DENSITY_CPU; the reference has no fast path.
    with use_backend("reference"):
        cpu_layer(torch.randn(3, 300))
    assert cpu_layer.last_path == "dense"
    if pk.ops.available_backends()["cpp"]:
        with use_backend("cpp"):
            cpu_layer(torch.randn(3, 300))
            assert cpu_layer.last_path == "sparse"
            _zero_untracked(cpu_layer, 0.5)
            cpu_layer(torch.randn(3, 300))
            assert cpu_layer.last_path == "dense"
            double = _zero_untracked(pk.SparseLinear(300, 260, seed=9).double(), 0.0)
            double(torch.randn(3, 300).double())  # float64: only the materialise path
            assert double.last_path == "dense"
    layer = _zero_untracked(pk.SparseLinear(300, 260, seed=9).to(DEV), 0.0)
    x = torch.randn(3, 300).to(DEV)
    with use_backend("triton"):
        layer(x)  # 78k weights, no tile holds a tracked weight
        assert layer.last_path == "sparse"
        # Large enough, but every tile is non-empty: materialise.
        _zero_untracked(layer, 0.5)
        layer(x)
        assert layer.last_path == "dense"
        # Untracked weights not (yet) zero: only the dense path is valid.
        layer.weight.set_scale(0.5)
        layer(x)
        assert layer.last_path == "dense"
        # Small layers stay on the materialise path.
        small = _zero_untracked(pk.SparseLinear(20, 20, seed=1).to(DEV), 0.0)
        small(torch.randn(2, 20).to(DEV))
        assert small.last_path == "dense"
        monkeypatch.setattr(compute, "AUTO_MIN_WEIGHTS", 1)
        small(torch.randn(2, 20).to(DEV))
        assert small.last_path == "sparse"


@pytest.mark.skipif(
    not pk.ops.available_backends()["cpp"], reason="the C++ backend is not built: no CPU choice"
)
@pytest.mark.parametrize(
    "stride, padding, density, path",
    [
        (1, 1, 0.10, "sparse"),  # 8x8 input, grid 10x10 per 8x8 outputs: 0.10 x 1.5625 <= 0.27
        (1, 1, 0.19, "dense"),  # 0.30 > 0.27
        (1, 0, 0.14, "sparse"),  # no padding: an 8x8 grid per 6x6 outputs, 0.14 x 1.78 <= 0.27
        (2, 1, 0.09, "sparse"),  # strided: 5x5 phases per 4x4 outputs, 0.14 <= 0.16
        (2, 1, 0.13, "dense"),  # 0.20 > 0.16
        (1, 0, 0.25, "dense"),  # above AUTO_MAX_DENSITY_CPU
    ],
)
def test_auto_choice_of_a_convolution_on_the_cpu(stride, padding, density, path):
    """A convolution takes the C++ kernels only while its density times its grid overhead is at
    most AUTO_MAX_CONV_DENSITY_CPU (unit stride, strided) and its density at most
    AUTO_MAX_DENSITY_CPU."""
    torch.manual_seed(0)
    conv = pk.SparseConv2d(64, 64, 3, stride=stride, padding=padding, seed=4)
    layer = _zero_untracked(conv, density)
    w = layer.weight
    overhead = compute.conv_grid_overhead((8, 8), (3, 3), (stride,) * 2, (padding,) * 2, (1, 1))
    limit = min(
        compute.AUTO_MAX_DENSITY_CPU, compute.AUTO_MAX_CONV_DENSITY_CPU[stride > 1] / overhead
    )
    assert (w.nnz <= limit * w.weight_numel) == (path == "sparse"), (w.nnz / w.weight_numel, limit)
    with use_backend("cpp"):
        layer(torch.randn(2, 64, 8, 8))
    assert w.last_path == path


def test_conv_grid_overhead():
    # 3x3, padding 1 on 8x8: a 10x10 grid per 8x8 outputs; stride 2: 5x5 phases per 4x4 outputs.
    assert compute.conv_grid_overhead((8, 8), (3, 3), (1, 1), (1, 1), (1, 1)) == 100 / 64
    assert compute.conv_grid_overhead((8, 8), (3, 3), (2, 2), (1, 1), (1, 1)) == 25 / 16
    assert compute.conv_grid_overhead((8, 8), (1, 1), (1, 1), (0, 0), (1, 1)) == 1.0
    assert compute.conv_grid_overhead((2, 2), (5, 5), (1, 1), (0, 0), (1, 1)) == 1.0  # no output


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_failed_forward_does_not_record_a_path(monkeypatch, kind):
    import procrustes_kernels.functional as functional

    if kind == "linear":
        layer, x, target = pk.SparseLinear(8, 4, seed=2), torch.randn(2, 8), "_sparse_linear"
    else:
        layer, x = pk.SparseConv2d(3, 4, 3, seed=2), torch.randn(2, 3, 5, 5)
        target = "_sparse_conv2d"
    layer = _zero_untracked(layer, 0.5)
    layer(x)
    assert layer.last_path == "dense"

    def broken(*args):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(functional, target, broken)
    layer.compute = "sparse"
    with pytest.raises(RuntimeError, match="kernel failed"):
        layer(x)
    assert layer.last_path == "dense"
    # The same on a plain module that sparsify converted (F.linear / F.conv2d on its weight).
    plain = pk.sparsify(torch.nn.Sequential(layer.to_dense()), seed=2)[0]
    assert type(plain) in (torch.nn.Linear, torch.nn.Conv2d) and pk.is_budgeted(plain.weight)
    _zero_untracked(plain, 0.5)
    plain.weight.compute = "sparse"
    with pytest.raises(RuntimeError, match="kernel failed"):
        plain(x)
    assert plain.weight.last_path is None


def test_tile_index_cache_follows_tracked_set():
    layer = _zero_untracked(pk.SparseLinear(50, 40, seed=10), 0.2)
    first = compute.tile_index(layer.weight)
    assert compute.tile_index(layer.weight) is first
    assert first.nnz == layer.nnz
    _zero_untracked(layer, 0.6)  # set_tracked: new bits
    second = compute.tile_index(layer.weight)
    assert second is not first and second.nnz == layer.nnz
    # In-place change of the very same bits tensor (same nnz, other positions): rebuilt.
    w = layer.weight
    bits = w.bits
    other = _zero_untracked(pk.SparseLinear(50, 40, seed=11), 0.0)
    mask = layer.storage.mask().flip(0)
    other.weight.set_tracked(
        BlockStorage.from_mask(other.weight.effective(), mask.view(40, 50), 16)
    )
    assert other.nnz == layer.nnz
    with torch.no_grad():  # copies into the weight's tensors in place
        for inner in ("values", "bits", "group_ptr"):
            getattr(w, inner).copy_(getattr(other.weight, inner))
    assert layer.weight is w and w.bits is bits
    third = compute.tile_index(w)
    assert third is not second
    assert torch.equal(third.tile_nnz, compute.tile_index(other.weight).tile_nnz)
    assert not torch.equal(third.tile_nnz, second.tile_nnz)
    assert compute.tile_index(w) is third
    # Loading a checkpoint (copy_ into the budgeted weight) also changes the tracked set.
    back = _zero_untracked(pk.SparseLinear(50, 40, seed=12), 0.2)
    layer.load_state_dict(back.state_dict())
    assert layer.weight is w
    fourth = compute.tile_index(w)
    assert fourth is not third
    assert torch.equal(fourth.tile_nnz, compute.tile_index(back.weight).tile_nnz)
    layer.compute_tile = (16, 64)
    assert compute.tile_index(layer.weight).block_n == 16


def test_procrustes_training_on_sparse_path_tracks_dense_path():
    """After the decay, a step computed on the sparse path updates like the materialise path."""

    def run(mode):
        torch.manual_seed(0)
        model = pk.sparsify(
            torch.nn.Sequential(
                torch.nn.Conv2d(1, 4, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.Flatten(),
                torch.nn.Linear(4 * 6 * 6, 10),
            ),
            seed=3,
        )
        model = model.to(DEV)
        assert type(model[0]) is torch.nn.Conv2d and pk.is_budgeted(model[0].weight)
        opt = pk.Procrustes(
            model.parameters(), lr=0.05, budget=0.2, init_decay=0.5, selection="topk"
        )
        x, y = torch.randn(16, 1, 6, 6).to(DEV), torch.randint(0, 10, (16,)).to(DEV)
        paths = []
        for _ in range(40):
            pk.set_compute(model, mode if model[0].weight.scale_value == 0 else "dense")
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            paths.append(model[0].weight.last_path)
            opt.step()
        return [m.weight.effective() for m in (model[0], model[3])], paths

    dense, _ = run("dense")
    with use_backend("triton"):
        sparse, paths = run("sparse")
    assert "sparse" in paths
    for a, b in zip(sparse, dense):
        assert_close_verbose(a, b, rtol=1e-3, atol=1e-4)


def _regenerated(layer, density, scale):
    """Track a random ``density`` of the weights; the others stay ``scale * w0`` (not zeros)."""
    w = layer.weight.effective()
    mask = torch.rand(w.shape).to(w.device) < density
    layer.weight.set_tracked(BlockStorage.from_mask(w, mask, layer.weight.block_size), scale=scale)
    assert layer.weight.regen() is not None and layer.weight.scale_value != 0.0
    return layer


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[entry[0] for entry in LAYERS])
def test_regenerating_sparse_path_matches_dense(backend, name, make, shape):
    """DropBack's weights (untracked ``scale * w0``): compute="sparse" on a backend whose kernels
    regenerate them gives the materialise path's output and gradients."""
    layer = _regenerated(make().to(DEV), 0.3, 0.6)
    x = torch.randn(shape).to(DEV)
    dense = _run(layer, x, "dense")
    with use_backend(backend):
        sparse = _run(layer, x, "sparse")
    assert sparse[4] == "sparse"
    for a, b in zip(sparse[:4], dense[:4]):
        if b is None:
            assert a is None
        else:
            assert_close_verbose(a, b, rtol=TOL, atol=TOL)


def test_dropback_training_on_regenerating_kernels_tracks_dense_path():
    """DropBack (no decay: untracked weights stay w0) trained on the Triton kernels, which
    regenerate w0 in their tile loads, keeps the materialise path's tracked sets and values."""

    def run(mode):
        torch.manual_seed(0)
        model = pk.sparsify(
            torch.nn.Sequential(
                torch.nn.Conv2d(1, 4, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.Flatten(),
                torch.nn.Linear(4 * 6 * 6, 10),
            ),
            seed=5,
        ).to(DEV)
        pk.set_compute(model, mode)
        opt = pk.DropBack(model.parameters(), lr=0.05, budget=0.2, momentum=0.9)
        x, y = torch.randn(16, 1, 6, 6).to(DEV), torch.randint(0, 10, (16,)).to(DEV)
        for _ in range(6):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            assert model[3].weight.last_path == mode
            opt.step()
        return [(m.weight.bits.cpu(), m.weight.effective().cpu()) for m in (model[0], model[3])]

    dense = run("dense")
    with use_backend("triton"):
        sparse = run("sparse")
    for (bits_a, w_a), (bits_b, w_b) in zip(sparse, dense):
        assert torch.equal(bits_a, bits_b)
        assert_close_verbose(w_a, w_b, rtol=1e-4, atol=1e-5)


def test_tile_granularity_makes_empty_kernel_tiles(monkeypatch):
    """With tile granularity the optimizer aligns the kernels' tiles with its own, so after the
    decay every dropped tile is skipped and auto takes the sparse kernels."""
    monkeypatch.setattr(compute, "AUTO_MIN_WEIGHTS", 1)

    def run(backend, device):
        torch.manual_seed(0)
        model = pk.sparsify(
            torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)),
            seed=5,
        ).to(device)
        opt = pk.Procrustes(
            model.parameters(),
            lr=0.05,
            budget=0.25,
            init_decay=0.3,
            granularity="tile",
            tile=(16, 16),
        )
        assert all(m.weight.compute_tile == (16, 16) for m in (model[0], model[2]))
        x, y = torch.randn(24, 96).to(device), torch.randint(0, 10, (24,)).to(device)
        paths = []
        with use_backend(backend):
            for _ in range(20):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                paths.append(model[0].weight.last_path)
                opt.step()
        index = compute.tile_index(model[0].weight)
        selected = index.tile_nnz > 0
        assert int(index.tile_nnz[selected].min()) == 16 * 16  # whole tiles only
        return model, paths, index

    dense_model, dense_paths, _ = run("reference", "cpu")  # no fast CPU path: materialises
    sparse_model, sparse_paths, index = run("triton", DEV)
    assert set(dense_paths) == {"dense"}
    assert sparse_paths[0] == "dense" and sparse_paths[-1] == "sparse"
    assert index.tile_density <= 0.3
    compared = 0
    for a, b in zip(sparse_model, dense_model):
        if pk.is_budgeted(getattr(a, "weight", None)):
            got = a.weight.effective().cpu()
            assert_close_verbose(got, b.weight.effective(), rtol=1e-3, atol=1e-4)
            compared += 1
    assert compared == 2


def test_sparse_ops_dispatch():
    from procrustes_kernels import ops
    from procrustes_kernels.ops.compute import cpp, reference, triton_conv, triton_linear

    triton_impl = {
        "sparse_linear": triton_linear.sparse_linear,
        "sparse_linear_t": triton_linear.sparse_linear_t,
        "sparse_conv2d": triton_conv.sparse_conv2d,
        "sparse_conv2d_t": triton_conv.sparse_conv2d_t,
    }
    for forced in ("reference", "cpp", "triton"):
        with use_backend(forced):
            for op in ops.COMPUTE_OPS:
                own = {"triton": triton_impl, "cpp": {o: getattr(cpp, o) for o in ops.COMPUTE_OPS}}
                want = own.get(forced, {}).get(op, getattr(reference, op))
                assert ops.kernel(op, "cpu") is want


def test_tf32_setting_read_through_either_api():
    """The kernels follow PyTorch's TF32 settings, new API or legacy flags; reading them never
    raises (in a subprocess: the new API, once used, changes process-wide state)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from procrustes_kernels.ops.compute.triton_common import allows_tf32\n"
        "assert allows_tf32('matmul') == torch.backends.cuda.matmul.allow_tf32\n"
        "torch.backends.cuda.matmul.allow_tf32 = True\n"
        "assert allows_tf32('matmul')\n"
        "torch.backends.fp32_precision = 'tf32'\n"
        "assert allows_tf32('matmul')\n"
        "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
        "assert not allows_tf32('matmul')\n"
        "torch.backends.cudnn.conv.fp32_precision = 'ieee'\n"
        "assert not allows_tf32('conv')\n"
        "torch.backends.cudnn.conv.fp32_precision = 'tf32'\n"
        "assert allows_tf32('conv')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
