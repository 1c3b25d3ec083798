"""Sparse layers' compute paths: materialise + nn op vs sparse kernels, and the automatic choice."""

import pytest
import torch
from conftest import assert_close_verbose

import procrustes_kernels as pk
from procrustes_kernels import compute
from procrustes_kernels.ops import use_backend
from procrustes_kernels.storage import BlockStorage


def _zero_untracked(layer, density, generator=None):
    """Track a random ``density`` of the layer's weights and make the rest exact zeros."""
    w = layer.effective_weight()
    mask = torch.rand(w.shape, generator=generator) < density
    layer.set_tracked(BlockStorage.from_mask(w, mask, layer.block_size))
    layer.init_scale.fill_(0.0)
    return layer


def _run(layer, x, mode):
    layer.compute = mode
    layer.dense_grad = None
    if layer.bias is not None:
        layer.bias.grad = None
    xx = x.clone().requires_grad_()
    y = layer(xx)
    (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    bias_grad = None if layer.bias is None else layer.bias.grad.clone()
    return y.detach(), xx.grad, layer.dense_grad.clone(), bias_grad, layer.last_path


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
    layer = _zero_untracked(make(), 0.3)
    x = torch.randn(shape)
    dense = _run(layer, x, "dense")
    with use_backend(backend):
        sparse = _run(layer, x, "sparse")
    assert dense[4] == "dense" and sparse[4] == "sparse"
    for a, b in zip(sparse[:4], dense[:4]):
        if b is None:
            assert a is None
        else:
            assert_close_verbose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_sparse_path_extremes(density):
    layer = _zero_untracked(pk.SparseLinear(20, 18, seed=7), density)
    x = torch.randn(4, 20)
    dense = _run(layer, x, "dense")
    with use_backend("triton"):
        sparse = _run(layer, x, "sparse")
    for a, b in zip(sparse[:4], dense[:4]):
        assert_close_verbose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_sparse_path():
    layer = _zero_untracked(pk.SparseLinear(40, 24, seed=8, dtype=torch.bfloat16), 0.25)
    x = torch.randn(6, 40, dtype=torch.bfloat16)
    dense = _run(layer, x, "dense")
    with use_backend("triton"):
        sparse = _run(layer, x, "sparse")
    for a, b in zip(sparse[:4], dense[:4]):
        assert_close_verbose(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_forced_sparse_needs_zero_untracked():
    layer = pk.SparseLinear(8, 4, seed=0, compute="sparse")
    before = layer.init_scale.clone()
    with pytest.raises(ValueError, match="init_scale == 0"):
        layer(torch.randn(2, 8))
    assert torch.equal(layer.init_scale, before)
    layer = _zero_untracked(pk.SparseLinear(8, 4, seed=0, dtype=torch.float64), 0.5)
    layer.compute = "sparse"
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        layer(torch.randn(2, 8, dtype=torch.float64))


def test_bad_compute_arguments():
    with pytest.raises(ValueError, match="expected compute in"):
        pk.SparseLinear(4, 4, compute="fast")
    with pytest.raises(ValueError, match="compute_tile"):
        pk.SparseConv2d(4, 4, 3, compute_tile=(16, 24))
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
    layer = _zero_untracked(pk.SparseLinear(300, 260, seed=9), 0.0)
    x = torch.randn(3, 300)
    # The CPU backends have no fast sparse compute: auto materialises.
    layer(x)
    assert layer.last_path == "dense"
    with use_backend("triton"):
        layer(x)  # 78k weights, no tile holds a tracked weight
        assert layer.last_path == "sparse"
        # Large enough, but every tile is non-empty: materialise.
        _zero_untracked(layer, 0.5)
        layer(x)
        assert layer.last_path == "dense"
        # Untracked weights not (yet) zero: only the dense path is valid.
        layer.init_scale.fill_(0.5)
        layer(x)
        assert layer.last_path == "dense"
        # Small layers stay on the materialise path.
        small = _zero_untracked(pk.SparseLinear(20, 20, seed=1), 0.0)
        small(torch.randn(2, 20))
        assert small.last_path == "dense"
        monkeypatch.setattr(compute, "AUTO_MIN_WEIGHTS", 1)
        small(torch.randn(2, 20))
        assert small.last_path == "sparse"


def test_tile_index_cache_follows_tracked_set():
    layer = _zero_untracked(pk.SparseLinear(50, 40, seed=10), 0.2)
    first = compute.tile_index(layer)
    assert compute.tile_index(layer) is first
    assert first.nnz == layer.nnz
    _zero_untracked(layer, 0.6)  # set_tracked: new bits
    second = compute.tile_index(layer)
    assert second is not first and second.nnz == layer.nnz
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    _zero_untracked(layer, 0.1)
    layer.load_state_dict(state)  # copies into the buffers in place
    assert compute.tile_index(layer).nnz == layer.nnz
    layer.compute_tile = (16, 64)
    assert compute.tile_index(layer).block_n == 16


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
        opt = pk.Procrustes(model, lr=0.05, budget=0.2, init_decay=0.5, selection="topk")
        x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 10, (16,))
        paths = []
        for _ in range(40):
            pk.set_compute(model, mode if float(model[0].init_scale) == 0 else "dense")
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            paths.append(model[0].last_path)
            opt.step()
        return [m.effective_weight() for m in (model[0], model[3])], paths

    dense, _ = run("dense")
    with use_backend("triton"):
        sparse, paths = run("sparse")
    assert "sparse" in paths
    for a, b in zip(sparse, dense):
        assert_close_verbose(a, b, rtol=1e-3, atol=1e-4)


def test_tile_granularity_makes_empty_kernel_tiles(monkeypatch):
    """With tile granularity the optimizer aligns the kernels' tiles with its own, so after the
    decay every dropped tile is skipped and auto takes the sparse kernels."""
    monkeypatch.setattr(compute, "AUTO_MIN_WEIGHTS", 1)

    def run(backend):
        torch.manual_seed(0)
        model = pk.sparsify(
            torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)),
            seed=5,
        )
        opt = pk.Procrustes(
            model, lr=0.05, budget=0.25, init_decay=0.3, granularity="tile", tile=(16, 16)
        )
        assert all(m.compute_tile == (16, 16) for m in (model[0], model[2]))
        x, y = torch.randn(24, 96), torch.randint(0, 10, (24,))
        paths = []
        with use_backend(backend):
            for _ in range(20):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                paths.append(model[0].last_path)
                opt.step()
        index = compute.tile_index(model[0])
        selected = index.tile_nnz > 0
        assert int(index.tile_nnz[selected].min()) == 16 * 16  # whole tiles only
        return model, paths, index

    dense_model, dense_paths, _ = run("cpp")
    sparse_model, sparse_paths, index = run("triton")
    assert set(dense_paths) == {"dense"}
    assert sparse_paths[0] == "dense" and sparse_paths[-1] == "sparse"
    assert index.tile_density <= 0.3
    for a, b in zip(sparse_model, dense_model):
        if isinstance(a, pk.SparseLayer):
            assert_close_verbose(a.effective_weight(), b.effective_weight(), rtol=1e-3, atol=1e-4)


def test_sparse_ops_dispatch():
    from procrustes_kernels.ops.sparse import SPARSE_FUNCTIONS, get_sparse_ops, sparse_backend

    for forced, expected in (("reference", "reference"), ("cpp", "reference"), ("triton", "triton")):
        with use_backend(forced):
            ops = get_sparse_ops("cpu")
            assert sparse_backend("cpu") == ops.name == expected
            assert all(callable(getattr(ops, f)) for f in SPARSE_FUNCTIONS)
