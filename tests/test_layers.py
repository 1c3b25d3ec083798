"""Tests for procrustes_kernels.layers: SparseLinear / SparseConv2d against the real nn layers.

Every comparison builds the nn layer with the *same* effective weight and bias (copied from
``effective_weight()``), feeds both the same input and the same upstream gradient, and compares
the output, the input gradient, the bias gradient and ``layer.dense_grad`` vs ``weight.grad``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_verbose
from torch import nn

from procrustes_kernels.layers import (
    SparseConv2d,
    SparseLayer,
    SparseLinear,
    densify,
    sparsify,
)
from procrustes_kernels.philox import derive_seed, init_bound, init_values
from procrustes_kernels.storage import BlockStorage

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add contention (10x slower when busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _track_random(layer: SparseLayer, density: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Give ``layer`` a random tracked set; returns (dense values, mask). Values are ~N(0, 1), far
    from the init range, so a tracked/untracked mix-up cannot go unnoticed."""
    shape = layer.weight_shape
    mask = torch.rand(shape) < density
    dense = torch.randn(shape, dtype=layer.values.dtype)
    dense = torch.where(dense == 0, torch.ones_like(dense), dense)
    layer.set_tracked(BlockStorage.from_mask(dense, mask, layer.block_size))
    assert layer.nnz == int(mask.sum())
    return dense, mask


def _linear_twin(layer: SparseLinear) -> nn.Linear:
    twin = nn.Linear(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        dtype=layer.values.dtype,
    )
    with torch.no_grad():
        twin.weight.copy_(layer.effective_weight())
        if layer.bias is not None:
            twin.bias.copy_(layer.bias)
    return twin


def _conv_twin(layer: SparseConv2d) -> nn.Conv2d:
    twin = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        dtype=layer.values.dtype,
    )
    with torch.no_grad():
        twin.weight.copy_(layer.effective_weight())
        if layer.bias is not None:
            twin.bias.copy_(layer.bias)
    return twin


def _compare_with_twin(layer: SparseLayer, twin: nn.Module, x: torch.Tensor) -> None:
    """Forward + backward of both with the same input and upstream gradient; compare all."""
    xs = x.clone().requires_grad_(True)
    xd = x.clone().requires_grad_(True)
    ys = layer(xs)
    yd = twin(xd)
    assert_close_verbose(ys, yd, RTOL, ATOL)
    upstream = torch.randn_like(yd)
    ys.backward(upstream)
    yd.backward(upstream)
    assert_close_verbose(xs.grad, xd.grad, RTOL, ATOL)
    assert layer.dense_grad is not None
    assert_close_verbose(layer.dense_grad, twin.weight.grad, RTOL, ATOL)
    if layer.bias is not None:
        assert_close_verbose(layer.bias.grad, twin.bias.grad, RTOL, ATOL)
    # The packed values never get a .grad: the dense gradient lives in layer.dense_grad.
    assert layer.values.grad is None


# ---------------------------------------------------------------------------------------------
# golden tiny case
# ---------------------------------------------------------------------------------------------


def _golden_layer() -> tuple[SparseLinear, torch.Tensor, torch.Tensor]:
    layer = SparseLinear(3, 2, seed=12345)
    dense = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    layer.set_tracked(BlockStorage.from_mask(dense, mask, layer.block_size))
    return layer, dense, mask


def test_golden_tiny_linear_effective_weight():
    layer, dense, mask = _golden_layer()
    layer.init_scale.fill_(0.5)
    assert layer.nnz == 3
    assert layer.values.tolist() == [1.0, 3.0, 6.0]
    w0 = layer.initial_weight()
    assert w0.shape == (2, 3) and w0.dtype == torch.float32
    eff = layer.effective_weight()
    assert torch.equal(eff, torch.where(mask, dense, 0.5 * w0))
    # Spelled out element by element.
    assert eff[0, 0] == 1.0 and eff[0, 2] == 3.0 and eff[1, 2] == 6.0
    assert (
        eff[0, 1] == 0.5 * w0[0, 1] and eff[1, 0] == 0.5 * w0[1, 0] and eff[1, 1] == 0.5 * w0[1, 1]
    )
    # Forward with unit vectors picks out columns of the effective weight (+ bias).
    out = layer(torch.eye(3))
    assert torch.allclose(out, eff.t() + layer.bias, rtol=0, atol=1e-7)


def test_golden_tiny_linear_init_scale_zero_gives_exact_zeros():
    layer, dense, mask = _golden_layer()
    layer.init_scale.fill_(0.0)
    eff = layer.effective_weight()
    assert torch.equal(eff, torch.where(mask, dense, torch.zeros(())))
    assert torch.equal(eff[~mask], torch.zeros(3))
    assert not torch.signbit(eff[~mask]).any()


def test_golden_tiny_linear_init_scale_one_is_w0():
    layer, dense, mask = _golden_layer()
    assert float(layer.init_scale) == 1.0  # the default
    assert torch.equal(layer.effective_weight(), torch.where(mask, dense, layer.initial_weight()))


def test_empty_tracked_set_is_scaled_w0():
    layer = SparseLinear(7, 5, seed=3)
    assert layer.nnz == 0
    assert torch.equal(layer.effective_weight(), layer.initial_weight())
    layer.init_scale.fill_(0.25)
    assert torch.equal(layer.effective_weight(), 0.25 * layer.initial_weight())


def test_set_tracked_rejects_wrong_shape_or_block_size():
    layer = SparseLinear(3, 2, seed=1)
    bad_shape = BlockStorage.from_mask(torch.ones(3, 2), torch.ones(3, 2, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="shape"):
        layer.set_tracked(bad_shape)
    bad_block = BlockStorage.from_mask(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="block_size"):
        layer.set_tracked(bad_block)


# ---------------------------------------------------------------------------------------------
# SparseLinear vs nn.Linear
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init_scale", [1.0, 0.37, 0.0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "in_features, out_features, input_shape",
    [
        (123, 37, (5, 123)),
        (41, 13, (9, 7, 41)),
        (17, 3, (17,)),  # 1-D input
        (16, 16, (4, 16)),  # rows exactly one block
        (1, 1, (3, 1)),
    ],
    ids=["5x123->37", "9x7x41->13", "1d", "block-aligned", "1x1"],
)
def test_linear_matches_nn_linear(in_features, out_features, input_shape, bias, init_scale):
    layer = SparseLinear(in_features, out_features, bias=bias, seed=2024)
    dense, mask = _track_random(layer, 0.3)
    layer.init_scale.fill_(init_scale)
    eff = layer.effective_weight()
    expected = torch.where(mask, dense, layer.initial_weight() * torch.tensor(init_scale))
    assert torch.equal(eff, expected)
    if init_scale == 0.0:
        assert torch.equal(eff[~mask], torch.zeros(int((~mask).sum())))
    _compare_with_twin(layer, _linear_twin(layer), torch.randn(input_shape))


def test_linear_weight_requires_no_grad_on_values_and_block_size_irrelevant():
    """The block size only changes the storage layout, not the math."""
    a = SparseLinear(29, 11, seed=5, block_size=16)
    b = SparseLinear(29, 11, seed=5, block_size=3)
    dense = torch.randn(11, 29)
    mask = torch.rand(11, 29) < 0.4
    a.set_tracked(BlockStorage.from_mask(dense, mask, a.block_size))
    b.set_tracked(BlockStorage.from_mask(dense, mask, b.block_size))
    assert torch.equal(a.effective_weight(), b.effective_weight())
    x = torch.randn(4, 29)
    assert torch.equal(a(x), b(x))


# ---------------------------------------------------------------------------------------------
# SparseConv2d vs nn.Conv2d
# ---------------------------------------------------------------------------------------------

_IMG = (2, 4, 11, 13)  # odd image sizes


def _case(cid, input_shape=_IMG, in_channels=4, out_channels=5, kernel_size=3, **kw):
    return pytest.param(
        dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, **kw),
        input_shape,
        id=cid,
    )


_CONV_CASES = [
    _case("k1", kernel_size=1),
    _case("k3"),
    _case("k3x5", kernel_size=(3, 5)),
    _case("stride2", stride=2),
    _case("stride2x3", stride=(2, 3), kernel_size=(3, 5)),
    _case("pad0-explicit", padding=0),
    _case("pad2", padding=2),
    _case("pad1x2", padding=(1, 2), kernel_size=(3, 5)),
    _case("same-k3", padding="same"),
    _case("same-k1", padding="same", kernel_size=1),
    _case("same-k3x5", padding="same", kernel_size=(3, 5)),
    _case("same-even-4x2", padding="same", kernel_size=(4, 2)),
    _case("same-dil2", padding="same", dilation=2),
    _case("same-even-4x2-dil2", padding="same", kernel_size=(4, 2), dilation=2),
    _case("valid", padding="valid", kernel_size=(3, 5)),
    _case("dil2", dilation=2),
    _case("dil1x2-pad1x2", dilation=(1, 2), padding=(1, 2)),
    _case("groups3", input_shape=(2, 6, 11, 13), in_channels=6, out_channels=9, groups=3),
    _case(
        "groups3-stride-pad-dil",
        input_shape=(2, 6, 11, 13),
        in_channels=6,
        out_channels=9,
        groups=3,
        stride=(2, 3),
        padding=(1, 2),
        dilation=2,
        kernel_size=(3, 5),
    ),
    _case("depthwise", input_shape=(2, 6, 11, 13), in_channels=6, out_channels=6, groups=6),
    _case("nobias", bias=False),
    _case(
        "nobias-groups3",
        input_shape=(2, 6, 9, 7),
        in_channels=6,
        out_channels=9,
        groups=3,
        bias=False,
    ),
    _case("unbatched", input_shape=(4, 11, 13)),
    _case("unbatched-same-even", input_shape=(4, 11, 13), padding="same", kernel_size=(4, 2)),
    _case("unbatched-groups3", input_shape=(6, 9, 7), in_channels=6, out_channels=9, groups=3),
    _case("batch1", input_shape=(1, 4, 5, 7)),
]

# Every non-zeros padding mode against every padding flavour (and unbatched input).
for _mode in ("zeros", "reflect", "replicate", "circular"):
    _CONV_CASES += [
        _case(f"{_mode}-pad2", padding=2, padding_mode=_mode),
        _case(f"{_mode}-pad1x2-k3x5", padding=(1, 2), kernel_size=(3, 5), padding_mode=_mode),
        _case(
            f"{_mode}-same-even-4x2-dil2",
            padding="same",
            kernel_size=(4, 2),
            dilation=2,
            padding_mode=_mode,
        ),
        # Odd total padding (4 - 1 = 3 rows, 1 column): the extra row/column goes bottom/right.
        _case(f"{_mode}-same-even-4x2", padding="same", kernel_size=(4, 2), padding_mode=_mode),
        _case(
            f"{_mode}-unbatched-same-even-2x4",
            input_shape=(4, 11, 13),
            padding="same",
            kernel_size=(2, 4),
            padding_mode=_mode,
        ),
        _case(f"{_mode}-valid", padding="valid", padding_mode=_mode),
        _case(f"{_mode}-unbatched-pad1", input_shape=(4, 11, 13), padding=1, padding_mode=_mode),
        _case(
            f"{_mode}-groups3-stride2x3-nobias",
            input_shape=(2, 6, 11, 13),
            in_channels=6,
            out_channels=9,
            groups=3,
            stride=(2, 3),
            padding=(2, 1),
            bias=False,
            padding_mode=_mode,
        ),
    ]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("init_scale", [1.0, 0.37, 0.0])
@pytest.mark.parametrize("kwargs, input_shape", _CONV_CASES)
def test_conv2d_matches_nn_conv2d(kwargs, input_shape, init_scale):
    layer = SparseConv2d(**kwargs, seed=77)
    k, c, r, s = layer.weight_shape
    assert layer.block_size == r * s
    assert layer.fan_in == c * r * s
    dense, mask = _track_random(layer, 0.3)
    layer.init_scale.fill_(init_scale)
    eff = layer.effective_weight()
    expected = torch.where(mask, dense, layer.initial_weight() * torch.tensor(init_scale))
    assert torch.equal(eff, expected)
    twin = _conv_twin(layer)
    assert twin.weight.shape == eff.shape
    _compare_with_twin(layer, twin, torch.randn(input_shape))


# ---------------------------------------------------------------------------------------------
# dense_grad bookkeeping
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dense_grad_accumulates_across_backward_calls(kind):
    if kind == "linear":
        layer = SparseLinear(19, 7, seed=9)
        shape = (6, 19)
    else:
        layer = SparseConv2d(3, 4, 3, padding=1, seed=9)
        shape = (2, 3, 7, 9)
    _track_random(layer, 0.3)
    layer.init_scale.fill_(0.6)
    twin = _linear_twin(layer) if kind == "linear" else _conv_twin(layer)
    assert layer.dense_grad is None

    grads = []
    for _ in range(2):
        x = torch.randn(shape)
        ys, yd = layer(x), twin(x)
        up = torch.randn_like(yd)
        ys.backward(up)
        g = torch.autograd.grad(yd, twin.weight, up)[0]
        grads.append(g)
        if len(grads) == 1:
            assert_close_verbose(layer.dense_grad, g, RTOL, ATOL)
            first = layer.dense_grad.clone()
    assert_close_verbose(layer.dense_grad, grads[0] + grads[1], RTOL, ATOL)
    assert not torch.equal(layer.dense_grad, first)
    assert layer.values.grad is None


def test_dense_grad_sums_over_two_uses_in_one_forward():
    layer = SparseLinear(8, 8, seed=4)
    _track_random(layer, 0.5)
    twin = _linear_twin(layer)
    x = torch.randn(3, 8)
    layer(layer(x)).sum().backward()
    twin(twin(x)).sum().backward()
    assert_close_verbose(layer.dense_grad, twin.weight.grad, RTOL, ATOL)


def test_dense_grad_none_without_use():
    used = SparseLinear(5, 4, seed=1)
    unused = SparseLinear(5, 4, seed=2)
    assert used.dense_grad is None and unused.dense_grad is None
    used(torch.randn(2, 5)).sum().backward()
    assert used.dense_grad is not None
    assert unused.dense_grad is None
    # No graph under no_grad: nothing is recorded either.
    with torch.no_grad():
        unused(torch.randn(2, 5))
    assert unused.dense_grad is None


def test_input_only_grad_does_not_touch_dense_grad():
    layer = SparseLinear(5, 4, seed=1)
    x = torch.randn(2, 5, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).sum(), x)
    assert gx.shape == x.shape
    assert layer.dense_grad is None


# ---------------------------------------------------------------------------------------------
# to_dense / densify / sparsify
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_to_dense(bias):
    layer = SparseLinear(13, 6, bias=bias, seed=8)
    _track_random(layer)
    layer.init_scale.fill_(0.4)
    d = layer.to_dense()
    assert type(d) is nn.Linear
    assert (d.in_features, d.out_features) == (13, 6)
    assert (d.bias is not None) == bias
    assert torch.equal(d.weight, layer.effective_weight())
    x = torch.randn(3, 13)
    assert_close_verbose(d(x), layer(x), RTOL, ATOL)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=(2, 3), padding=(1, 2), dilation=2, groups=3, padding_mode="reflect"),
        dict(padding="same", kernel_size=(4, 2), bias=False, padding_mode="circular"),
        dict(padding="valid", padding_mode="replicate"),
    ],
    ids=["strided-groups-reflect", "same-circular-nobias", "valid-replicate"],
)
def test_conv_to_dense(kwargs):
    kwargs = {"kernel_size": 3, **kwargs}
    layer = SparseConv2d(6, 9, **kwargs, seed=8)
    _track_random(layer)
    layer.init_scale.fill_(0.4)
    d = layer.to_dense()
    assert type(d) is nn.Conv2d
    for attr in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ):
        assert getattr(d, attr) == getattr(layer, attr), attr
    assert (d.bias is None) == (layer.bias is None)
    assert torch.equal(d.weight, layer.effective_weight())
    x = torch.randn(2, 6, 11, 13)
    assert_close_verbose(d(x), layer(x), RTOL, ATOL)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(
            6,
            9,
            (3, 5),
            stride=(2, 3),
            padding=(1, 2),
            groups=3,
            bias=False,
            padding_mode="reflect",
        )
        self.act = nn.ReLU()
        self.inner = nn.Sequential(nn.Conv2d(9, 4, 1), nn.Tanh())

    def forward(self, x):
        return self.inner(self.act(self.conv(x)))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding="same", padding_mode="circular")
        self.block = _Block()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 5, 10), nn.ReLU())
        self.fc = nn.Linear(10, 3, bias=False)

    def forward(self, x):
        return self.fc(self.head(self.block(self.stem(x))))


_NET_INPUT = (2, 3, 11, 13)


def _dense_names(model):
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


def _config(m):
    if isinstance(m, nn.Linear | SparseLinear):
        keys = ("in_features", "out_features")
    else:
        keys = (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
        )
    dtype = m.weight.dtype if isinstance(m, nn.Linear | nn.Conv2d) else m.values.dtype
    return {k: getattr(m, k) for k in keys} | {"bias": m.bias is not None, "dtype": dtype}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsify_replaces_every_layer_with_derived_seeds(dtype):
    model = _Net().to(dtype)
    names = _dense_names(model)
    assert names == ["stem", "block.conv", "block.inner.0", "head.1", "fc"]
    configs = {n: _config(model.get_submodule(n)) for n in names}
    out = sparsify(model, seed=31)
    assert out is model
    assert _dense_names(model) == []
    for pos, n in enumerate(names):
        m = model.get_submodule(n)
        assert isinstance(m, SparseConv2d if configs[n].get("kernel_size") else SparseLinear), n
        assert m.seed_value == derive_seed(31, pos), n
        assert _config(m) == configs[n], n
        assert m.nnz == 0
    y = model(torch.randn(_NET_INPUT, dtype=dtype))
    assert y.shape == (2, 3) and y.dtype == dtype


def test_sparsify_same_seed_same_weights_different_seed_different():
    def weights(seed):
        model = sparsify(_Net(), seed=seed)
        return [m.effective_weight() for m in model.modules() if isinstance(m, SparseLayer)]

    a, b, c = weights(5), weights(5), weights(6)
    assert len(a) == 5
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(not torch.equal(x, z) for x, z in zip(a, c, strict=True))


def test_sparsify_filter_respected():
    model = _Net()
    head_linear = model.head[1]
    seen = []

    def keep(name, module):
        seen.append(name)
        return not name.startswith("head")

    sparsify(model, seed=3, filter=keep)
    assert model.head[1] is head_linear  # left dense, untouched
    assert seen == ["stem", "block.conv", "block.inner.0", "head.1", "fc"]
    # Positions count the swapped layers (docstring: "order among the swapped layers").
    swapped = ["stem", "block.conv", "block.inner.0", "fc"]
    for pos, n in enumerate(swapped):
        assert model.get_submodule(n).seed_value == derive_seed(3, pos), n


def test_sparsify_bare_layers_return_new_layer():
    lin = nn.Linear(4, 3)
    new = sparsify(lin, seed=7)
    assert isinstance(new, SparseLinear)
    assert new.seed_value == derive_seed(7, 0)
    conv = nn.Conv2d(2, 4, 3, stride=2, bias=False)
    new = sparsify(conv, seed=7)
    assert isinstance(new, SparseConv2d) and new.bias is None and new.stride == (2, 2)
    # A filtered-out bare layer comes back as is.
    assert sparsify(lin, seed=7, filter=lambda n, m: False) is lin


def test_sparsify_keeps_training_mode_and_block_size():
    model = nn.Sequential(nn.Linear(40, 8), nn.Linear(8, 2)).eval()
    sparsify(model, seed=0, linear_block_size=5)
    assert all(not m.training for m in model.modules())
    assert model[0].block_size == 5 and model[1].block_size == 5


def test_sparsify_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        sparsify(nn.Linear(2, 2), seed=-1)
    with pytest.raises(TypeError, match="seed"):
        sparsify(nn.Linear(2, 2), seed="x")


def test_sparsify_replaces_shared_module_everywhere():
    """A module registered twice (weight tying) must be swapped at both places, by one layer."""
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    sparsify(model, seed=1)
    assert _dense_names(model) == [] and not any(type(m) is nn.Linear for m in model)
    assert isinstance(model[0], SparseLinear) and model[2] is model[0]


def test_densify_replaces_shared_module_everywhere():
    shared = SparseLinear(6, 6, seed=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    densify(model)
    assert not any(isinstance(m, SparseLayer) for m in model)
    assert type(model[0]) is nn.Linear and model[2] is model[0]


def test_densify_nested_model():
    model = sparsify(_Net(), seed=11)
    for m in model.modules():
        if isinstance(m, SparseLayer):
            _track_random(m, 0.2)
            m.init_scale.fill_(0.5)
    x = torch.randn(_NET_INPUT)
    expected = model(x)
    weights = {
        n: m.effective_weight() for n, m in model.named_modules() if isinstance(m, SparseLayer)
    }
    out = densify(model)
    assert out is model
    assert not any(isinstance(m, SparseLayer) for m in model.modules())
    for n, w in weights.items():
        m = model.get_submodule(n)
        assert type(m) in (nn.Linear, nn.Conv2d), n
        assert torch.equal(m.weight, w), n
    assert_close_verbose(model(x), expected, RTOL, ATOL)
    # A bare sparse layer comes back as its nn equivalent.
    assert type(densify(SparseLinear(3, 2, seed=0))) is nn.Linear


# ---------------------------------------------------------------------------------------------
# init distribution and seeds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, fan_in",
    [
        (lambda: SparseLinear(512, 256, seed=99), 512),
        (lambda: SparseConv2d(24, 64, (3, 5), groups=2, seed=99), 12 * 15),
    ],
    ids=["linear", "conv-groups2"],
)
def test_init_distribution_and_bias_stream(make, fan_in):
    layer = make()
    bound = 1.0 / math.sqrt(fan_in)
    assert layer.bound == init_bound(fan_in)
    assert abs(layer.bound - bound) <= 1e-7 * bound
    w0 = layer.initial_weight()
    assert w0.shape == layer.weight_shape and w0.dtype == torch.float32
    assert torch.equal(w0.reshape(-1), init_values(99, layer.numel, layer.bound))
    assert float(w0.abs().max()) <= layer.bound
    assert float(w0.max()) > 0.99 * bound and float(w0.min()) < -0.99 * bound
    # U(-b, b): mean 0, std b / sqrt(3); with >= 92k samples the mean is within ~0.01 b.
    assert abs(float(w0.mean())) < 0.02 * bound
    assert abs(float(w0.std()) - bound / math.sqrt(3)) < 0.02 * bound
    # Effective weight at the start is w0 itself.
    assert torch.equal(layer.effective_weight(), w0)
    # The bias continues the stream after the weights.
    out = layer.weight_shape[0]
    expected_bias = init_values(99, out, layer.bound, start=layer.numel)
    assert torch.equal(layer.bias.detach(), expected_bias)
    assert float(layer.bias.detach().abs().max()) <= layer.bound


def test_same_seed_same_layer_different_seed_different():
    a, b, c = SparseLinear(9, 4, seed=1), SparseLinear(9, 4, seed=1), SparseLinear(9, 4, seed=2)
    assert torch.equal(a.effective_weight(), b.effective_weight())
    assert torch.equal(a.bias, b.bias)
    assert not torch.equal(a.effective_weight(), c.effective_weight())


def test_unseeded_layers_follow_torch_manual_seed():
    def build():
        torch.manual_seed(123)
        return SparseLinear(5, 3).seed_value, SparseConv2d(2, 3, 3).seed_value

    first, second = build(), build()
    assert first == second
    assert first[0] != first[1]
    assert all(0 <= s < 2**63 for s in first)
    torch.manual_seed(124)
    assert SparseLinear(5, 3).seed_value != first[0]


def test_seed_accepts_extremes_and_tensor():
    assert SparseLinear(2, 2, seed=0).seed_value == 0
    assert SparseLinear(2, 2, seed=2**63 - 1).seed_value == 2**63 - 1
    assert SparseLinear(2, 2, seed=torch.tensor(17)).seed_value == 17


# ---------------------------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_state_dict_round_trip(kind):
    if kind == "linear":

        def make(seed):
            return SparseLinear(37, 11, seed=seed)
    else:

        def make(seed):
            return SparseConv2d(6, 9, (3, 5), groups=3, padding=1, seed=seed)

    src = make(1)
    _track_random(src, 0.3)
    src.init_scale.fill_(0.3)
    sd = src.state_dict()
    assert set(sd) == {"values", "bias", "mask_bits", "group_ptr", "seed", "init_scale"}
    dst = make(2)
    assert dst.nnz == 0
    values_param = dst.values
    dst.load_state_dict(sd)
    assert dst.values is values_param  # optimizers keep holding the same parameter
    assert dst.seed_value == src.seed_value == 1
    assert dst.nnz == src.nnz > 0
    assert float(dst.init_scale) == float(src.init_scale)
    assert torch.equal(dst.effective_weight(), src.effective_weight())
    assert torch.equal(dst.bias, src.bias)
    x = torch.randn(2, 37) if kind == "linear" else torch.randn(2, 6, 7, 9)
    assert torch.equal(dst(x), src(x))


def test_state_dict_round_trip_through_nested_model():
    src = sparsify(_Net(), seed=4)
    for m in src.modules():
        if isinstance(m, SparseLayer):
            _track_random(m, 0.25)
            m.init_scale.fill_(0.3)
    dst = sparsify(_Net(), seed=5)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(_NET_INPUT)
    assert torch.equal(dst(x), src(x))


def test_state_dict_values_popcount_mismatch_raises():
    src = SparseLinear(37, 11, seed=1)
    _track_random(src, 0.3)
    sd = src.state_dict()
    popcount = src.nnz
    for bad in (sd["values"][:-1].clone(), torch.cat([sd["values"], torch.ones(2)])):
        broken = dict(sd, values=bad)
        dst = SparseLinear(37, 11, seed=2)
        with pytest.raises(RuntimeError) as err:
            dst.load_state_dict(broken)
        msg = str(err.value)
        assert "values" in msg and "popcount" in msg and str(popcount) in msg, msg
        assert str(bad.numel()) in msg, msg


def test_state_dict_values_too_long_or_not_1d_raises():
    src = SparseLinear(4, 3, seed=1)
    sd = src.state_dict()
    for bad in (torch.zeros(13), torch.zeros(2, 2)):
        dst = SparseLinear(4, 3, seed=1)
        with pytest.raises(RuntimeError, match="values"):
            dst.load_state_dict(dict(sd, values=bad))


def test_state_dict_load_resets_dense_grad():
    layer = SparseLinear(4, 3, seed=1)
    sd = layer.state_dict()
    layer(torch.randn(2, 4)).sum().backward()
    assert layer.dense_grad is not None
    layer.load_state_dict(sd)
    assert layer.dense_grad is None


# ---------------------------------------------------------------------------------------------
# dtype / device
# ---------------------------------------------------------------------------------------------


def test_float64_linear_matches_nn_linear():
    layer = SparseLinear(23, 9, seed=3, dtype=torch.float64)
    assert layer.values.dtype == torch.float64 and layer.bias.dtype == torch.float64
    _track_random(layer)
    layer.init_scale.fill_(0.37)
    assert layer.effective_weight().dtype == torch.float64
    twin = _linear_twin(layer)
    _compare_with_twin(layer, twin, torch.randn(4, 23, dtype=torch.float64))
    assert layer.dense_grad.dtype == torch.float64


def test_float64_conv_matches_nn_conv():
    layer = SparseConv2d(
        6, 9, 3, groups=3, padding="same", padding_mode="reflect", seed=3, dtype=torch.float64
    )
    _track_random(layer)
    layer.init_scale.fill_(0.37)
    _compare_with_twin(layer, _conv_twin(layer), torch.randn(2, 6, 7, 9, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_to_float64_keeps_working(kind):
    if kind == "linear":
        layer = SparseLinear(23, 9, seed=3)
        shape = (4, 23)
    else:
        layer = SparseConv2d(4, 5, 3, padding=1, seed=3)
        shape = (2, 4, 7, 9)
    _track_random(layer)
    layer.init_scale.fill_(0.37)
    before = layer.effective_weight()
    layer = layer.to(torch.float64)
    assert layer.values.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert layer.seed.dtype == torch.int64 and layer.mask_bits.dtype == torch.uint8
    assert layer.group_ptr.dtype == torch.int64
    after = layer.effective_weight()
    assert after.dtype == torch.float64
    assert torch.equal(after, before.to(torch.float64))
    twin = _linear_twin(layer) if kind == "linear" else _conv_twin(layer)
    _compare_with_twin(layer, twin, torch.randn(shape, dtype=torch.float64))
    with pytest.raises(TypeError, match="input"):
        layer(torch.randn(shape))  # float32 input to the now-float64 layer


# ---------------------------------------------------------------------------------------------
# bad inputs and bad constructor arguments
# ---------------------------------------------------------------------------------------------


def test_linear_bad_inputs():
    layer = SparseLinear(41, 5, seed=0)
    with pytest.raises(ValueError, match=r"input\.shape\[-1\] == 41"):
        layer(torch.randn(3, 40))
    with pytest.raises(ValueError, match="input"):
        layer(torch.randn(()))
    with pytest.raises(TypeError, match="input"):
        layer(torch.ones(3, 41, dtype=torch.int64))
    with pytest.raises(TypeError, match="input.*float32.*float64"):
        layer(torch.randn(3, 41, dtype=torch.float64))
    with pytest.raises(TypeError, match="input"):
        layer([[0.0] * 41])


def test_conv_bad_inputs():
    layer = SparseConv2d(6, 9, 3, groups=3, seed=0)
    with pytest.raises(ValueError, match="input.*3 or 4 dims"):
        layer(torch.randn(6, 11))
    with pytest.raises(ValueError, match="input.*3 or 4 dims"):
        layer(torch.randn(1, 1, 6, 11, 13))
    with pytest.raises(ValueError, match=r"input\.shape\[-3\] == 6"):
        layer(torch.randn(2, 5, 11, 13))
    with pytest.raises(TypeError, match="input"):
        layer(torch.ones(2, 6, 11, 13, dtype=torch.int32))
    with pytest.raises(TypeError, match="input.*float32.*float64"):
        layer(torch.randn(2, 6, 11, 13, dtype=torch.float64))


@pytest.mark.parametrize(
    "ctor, exc, word",
    [
        (lambda: SparseLinear(0, 3), ValueError, "in_features"),
        (lambda: SparseLinear(3, -1), ValueError, "out_features"),
        (lambda: SparseLinear(3.0, 2), ValueError, "in_features"),
        (lambda: SparseLinear(3, 2, block_size=0), ValueError, "block_size"),
        (lambda: SparseLinear(3, 2, dtype=torch.int32), TypeError, "dtype"),
        (lambda: SparseLinear(3, 2, seed=-1), ValueError, "seed"),
        (lambda: SparseLinear(3, 2, seed=2**63), ValueError, "seed"),
        (lambda: SparseLinear(3, 2, seed="x"), TypeError, "seed"),
        (lambda: SparseLinear(3, 2, seed=1.5), TypeError, "seed"),
        (lambda: SparseLinear(3, 2, seed=True), TypeError, "seed"),
        (lambda: SparseConv2d(0, 3, 3), ValueError, "in_channels"),
        (lambda: SparseConv2d(3, 0, 3), ValueError, "out_channels"),
        (lambda: SparseConv2d(6, 9, 3, groups=4), ValueError, "groups"),
        (lambda: SparseConv2d(6, 8, 3, groups=3), ValueError, "groups"),
        (lambda: SparseConv2d(6, 9, 3, groups=0), ValueError, "groups"),
        (lambda: SparseConv2d(3, 3, 0), ValueError, "kernel_size"),
        (lambda: SparseConv2d(3, 3, 3, stride=0), ValueError, "stride"),
        (lambda: SparseConv2d(3, 3, 3, dilation=(1, 0)), ValueError, "dilation"),
        (lambda: SparseConv2d(3, 3, 3, padding=-1), ValueError, "padding"),
        (lambda: SparseConv2d(3, 3, 3, padding="foo"), ValueError, "padding"),
        (lambda: SparseConv2d(3, 3, 3, padding="same", stride=2), ValueError, "padding='same'"),
        (lambda: SparseConv2d(3, 3, 3, padding="same", stride=(1, 2)), ValueError, "stride"),
        (lambda: SparseConv2d(3, 3, 3, padding_mode="bar"), ValueError, "padding_mode"),
        (lambda: SparseConv2d(3, 3, 3, seed=-1), ValueError, "seed"),
        (lambda: SparseConv2d(3, 3, 3, seed="x"), TypeError, "seed"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_constructor_args(ctor, exc, word):
    with pytest.raises(exc) as err:
        ctor()
    assert word in str(err.value), str(err.value)


def test_repr_mentions_sparse_state():
    layer = SparseConv2d(6, 9, 3, groups=3, padding="same", padding_mode="reflect", seed=5)
    _track_random(layer, 0.5)
    r = repr(layer)
    assert "seed=5" in r and f"nnz={layer.nnz}/{layer.numel}" in r and "groups=3" in r
    assert "padding_mode='reflect'" in r
    assert "seed=5" in repr(SparseLinear(3, 2, seed=5))


def test_host_scalars_follow_their_buffers():
    """seed / init_scale are read from the device once per change, never stale."""
    layer = SparseLinear(6, 4, seed=5)
    assert layer.seed_value == 5 and layer.init_scale_value == 1.0
    layer.init_scale.fill_(0.25)  # in place
    assert layer.init_scale_value == 0.25
    layer.load_state_dict(
        {**layer.state_dict(), "seed": torch.tensor(9), "init_scale": torch.tensor(0.5)}
    )
    assert layer.seed_value == 9 and layer.init_scale_value == 0.5
    layer.init_scale = torch.tensor(0.125)  # a new tensor
    assert layer.init_scale_value == 0.125
    with torch.inference_mode():
        fresh = SparseLinear(6, 4, seed=7)
        fresh.init_scale.fill_(0.5)
        assert fresh.seed_value == 7 and fresh.init_scale_value == 0.5
