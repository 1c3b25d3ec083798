"""Tests for procrustes_kernels.layers: SparseLinear / SparseConv2d against the real nn layers, and
``sparsify`` / ``densify`` of plain models.

A budgeted weight is a :class:`~procrustes_kernels.weight.BudgetedWeight` parameter at
``module.weight``. Every comparison builds the nn layer with the *same* effective weight and bias
(copied from ``effective_weight()``), feeds both the same input and the same upstream gradient, and
compares the output, the input gradient, the bias gradient and the budgeted ``weight.grad`` (the
dense gradient autograd leaves there) vs the nn layer's ``weight.grad``.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close_verbose
from torch import nn

import procrustes_kernels as pk
from procrustes_kernels.convert import densify, sparsify
from procrustes_kernels.layers import SparseConv2d, SparseLinear
from procrustes_kernels.philox import derive_seed, init_bound, init_values
from procrustes_kernels.storage import BlockStorage
from procrustes_kernels.weight import BudgetedWeight

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


def _weight_of(layer: nn.Module | BudgetedWeight) -> BudgetedWeight:
    w = layer if isinstance(layer, BudgetedWeight) else layer.weight
    assert pk.is_budgeted(w)
    return w


def _track_random(
    layer: nn.Module | BudgetedWeight, density: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give the budgeted weight of ``layer`` (a module or the weight itself) a random tracked set;
    returns (dense values, mask). Values are ~N(0, 1), far from the init range, so a
    tracked/untracked mix-up cannot go unnoticed."""
    w = _weight_of(layer)
    shape = tuple(w.shape)
    mask = torch.rand(shape) < density
    dense = torch.randn(shape, dtype=w.values.dtype)
    dense = torch.where(dense == 0, torch.ones_like(dense), dense)
    w.set_tracked(BlockStorage.from_mask(dense, mask, w.block_size))
    assert w.nnz == int(mask.sum())
    return dense, mask


def _linear_twin(layer: SparseLinear) -> nn.Linear:
    twin = nn.Linear(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        dtype=layer.weight.values.dtype,
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
        dtype=layer.weight.values.dtype,
    )
    with torch.no_grad():
        twin.weight.copy_(layer.effective_weight())
        if layer.bias is not None:
            twin.bias.copy_(layer.bias)
    return twin


def _compare_with_twin(layer: nn.Module, twin: nn.Module, x: torch.Tensor) -> None:
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
    grad = layer.weight.grad
    assert grad is not None
    # The gradient is the plain dense gradient of the effective weight, not a budgeted weight.
    assert type(grad) is torch.Tensor and not pk.is_budgeted(grad)
    assert_close_verbose(grad, twin.weight.grad, RTOL, ATOL)
    if layer.bias is not None:
        assert_close_verbose(layer.bias.grad, twin.bias.grad, RTOL, ATOL)
    # The packed values never get a .grad: the dense gradient lives in weight.grad.
    assert layer.weight.values.grad is None


# ---------------------------------------------------------------------------------------------
# golden tiny case
# ---------------------------------------------------------------------------------------------


def _golden_layer() -> tuple[SparseLinear, torch.Tensor, torch.Tensor]:
    layer = SparseLinear(3, 2, seed=12345)
    dense = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    layer.weight.set_tracked(BlockStorage.from_mask(dense, mask, layer.weight.block_size))
    return layer, dense, mask


def test_golden_tiny_linear_effective_weight():
    layer, dense, mask = _golden_layer()
    layer.weight.set_scale(0.5)
    assert layer.nnz == 3 and layer.weight.nnz == 3
    assert layer.weight.values.tolist() == [1.0, 3.0, 6.0]
    w0 = layer.initial_weight()
    assert w0.shape == (2, 3) and w0.dtype == torch.float32
    assert torch.equal(w0, layer.weight.initial_values())
    eff = layer.effective_weight()
    assert torch.equal(eff, torch.where(mask, dense, 0.5 * w0))
    assert torch.equal(eff, layer.weight.effective())
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
    layer.weight.set_scale(0.0)
    eff = layer.effective_weight()
    assert torch.equal(eff, torch.where(mask, dense, torch.zeros(())))
    assert torch.equal(eff[~mask], torch.zeros(3))
    assert not torch.signbit(eff[~mask]).any()


def test_golden_tiny_linear_init_scale_one_is_w0():
    layer, dense, mask = _golden_layer()
    # The default.
    assert float(layer.weight.scale) == 1.0 and layer.weight.scale_value == 1.0
    assert layer.weight.scale.dtype == torch.float32 and layer.weight.scale.dim() == 0
    assert torch.equal(layer.effective_weight(), torch.where(mask, dense, layer.initial_weight()))


def test_empty_tracked_set_is_scaled_w0():
    layer = SparseLinear(7, 5, seed=3)
    assert layer.weight.nnz == 0
    assert torch.equal(layer.effective_weight(), layer.initial_weight())
    layer.weight.set_scale(0.25)
    assert torch.equal(layer.effective_weight(), 0.25 * layer.initial_weight())


def test_set_tracked_rejects_wrong_shape_block_size_is_layout_only():
    layer = SparseLinear(3, 2, seed=1)
    bad_shape = BlockStorage.from_mask(torch.ones(3, 2), torch.ones(3, 2, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="shape"):
        layer.weight.set_tracked(bad_shape)
    assert layer.weight.nnz == 0  # a rejected storage changes nothing
    # The storage layout (flat bits, packed values, group pointers) does not depend on the block
    # size, so BudgetedWeight.set_tracked takes a storage of another block size as the same
    # tracked set; the weight keeps its own block size.
    dense = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, True, True]])
    other_block = BlockStorage.from_mask(dense, mask, 4)
    layer.weight.set_tracked(other_block)
    assert layer.weight.block_size == 16 and layer.weight.storage.block_size == 16
    assert torch.equal(layer.effective_weight(), torch.where(mask, dense, layer.initial_weight()))


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
    assert isinstance(layer, nn.Linear) and pk.is_budgeted(layer.weight)
    dense, mask = _track_random(layer, 0.3)
    layer.weight.set_scale(init_scale)
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
    assert a.weight.block_size == 16 and b.weight.block_size == 3
    dense = torch.randn(11, 29)
    mask = torch.rand(11, 29) < 0.4
    a.weight.set_tracked(BlockStorage.from_mask(dense, mask, a.weight.block_size))
    b.weight.set_tracked(BlockStorage.from_mask(dense, mask, b.weight.block_size))
    assert torch.equal(a.effective_weight(), b.effective_weight())
    x = torch.randn(4, 29)
    assert torch.equal(a(x), b(x))
    assert not a.weight.values.requires_grad and not b.weight.values.requires_grad


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
    assert isinstance(layer, nn.Conv2d) and pk.is_budgeted(layer.weight)
    k, c, r, s = tuple(layer.weight.shape)
    assert layer.weight.block_size == layer.block_size == r * s
    # fan_in = c * r * s: the geometry's columns (input channels per group) x kernel positions.
    assert layer.weight.geometry == (k, c, r * s, layer.groups)
    assert layer.weight.bound == init_bound(c * r * s)
    dense, mask = _track_random(layer, 0.3)
    layer.weight.set_scale(init_scale)
    eff = layer.effective_weight()
    expected = torch.where(mask, dense, layer.initial_weight() * torch.tensor(init_scale))
    assert torch.equal(eff, expected)
    twin = _conv_twin(layer)
    assert twin.weight.shape == eff.shape
    _compare_with_twin(layer, twin, torch.randn(input_shape))


# ---------------------------------------------------------------------------------------------
# weight.grad bookkeeping (torch semantics: backward accumulates, zero_grad() clears)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_weight_grad_accumulates_across_backward_calls(kind):
    if kind == "linear":
        layer = SparseLinear(19, 7, seed=9)
        shape = (6, 19)
    else:
        layer = SparseConv2d(3, 4, 3, padding=1, seed=9)
        shape = (2, 3, 7, 9)
    _track_random(layer, 0.3)
    layer.weight.set_scale(0.6)
    twin = _linear_twin(layer) if kind == "linear" else _conv_twin(layer)
    assert layer.weight.grad is None

    grads = []
    for _ in range(2):
        x = torch.randn(shape)
        ys, yd = layer(x), twin(x)
        up = torch.randn_like(yd)
        ys.backward(up)
        g = torch.autograd.grad(yd, twin.weight, up)[0]
        grads.append(g)
        if len(grads) == 1:
            assert_close_verbose(layer.weight.grad, g, RTOL, ATOL)
            first = layer.weight.grad.clone()
    assert_close_verbose(layer.weight.grad, grads[0] + grads[1], RTOL, ATOL)
    assert not torch.equal(layer.weight.grad, first)
    assert layer.weight.values.grad is None
    # zero_grad() clears it (set_to_none, as torch.optim / nn.Module do by default) ...
    layer.zero_grad()
    assert layer.weight.grad is None
    # ... and the next backward starts afresh.
    x = torch.randn(shape)
    up = torch.randn_like(twin(x))
    layer(x).backward(up)
    g = torch.autograd.grad(twin(x), twin.weight, up)[0]
    assert_close_verbose(layer.weight.grad, g, RTOL, ATOL)


def test_weight_grad_sums_over_two_uses_in_one_forward():
    layer = SparseLinear(8, 8, seed=4)
    _track_random(layer, 0.5)
    twin = _linear_twin(layer)
    x = torch.randn(3, 8)
    layer(layer(x)).sum().backward()
    twin(twin(x)).sum().backward()
    assert_close_verbose(layer.weight.grad, twin.weight.grad, RTOL, ATOL)


def test_weight_grad_none_without_use():
    used = SparseLinear(5, 4, seed=1)
    unused = SparseLinear(5, 4, seed=2)
    assert used.weight.grad is None and unused.weight.grad is None
    used(torch.randn(2, 5)).sum().backward()
    assert used.weight.grad is not None
    assert unused.weight.grad is None
    # No graph under no_grad: nothing is recorded either.
    with torch.no_grad():
        unused(torch.randn(2, 5))
    assert unused.weight.grad is None


def test_input_only_grad_does_not_touch_weight_grad():
    layer = SparseLinear(5, 4, seed=1)
    x = torch.randn(2, 5, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).sum(), x)
    assert gx.shape == x.shape
    assert layer.weight.grad is None


# ---------------------------------------------------------------------------------------------
# to_dense / densify / sparsify
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_to_dense(bias):
    layer = SparseLinear(13, 6, bias=bias, seed=8)
    _track_random(layer)
    layer.weight.set_scale(0.4)
    d = layer.to_dense()
    assert type(d) is nn.Linear and not pk.is_budgeted(d.weight)
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
    layer.weight.set_scale(0.4)
    d = layer.to_dense()
    assert type(d) is nn.Conv2d and not pk.is_budgeted(d.weight)
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


def _layer_names(model):
    """Names of the linear / conv modules (sparsify keeps their class)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def _dense_names(model):
    """Names of the linear / conv modules whose weight is still dense."""
    return [n for n in _layer_names(model) if not pk.is_budgeted(model.get_submodule(n).weight)]


def _budgeted_modules(model):
    return [(n, m) for n, m in model.named_modules() if pk.is_budgeted(m._parameters.get("weight"))]


def _config(m):
    if isinstance(m, nn.Linear):
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
    dtype = m.weight.values.dtype if pk.is_budgeted(m.weight) else m.weight.dtype
    return {k: getattr(m, k) for k in keys} | {
        "bias": m.bias is not None,
        "dtype": dtype,
        "shape": tuple(m.weight.shape),
        "class": type(m),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsify_converts_every_layer_with_derived_seeds(dtype):
    model = _Net().to(dtype)
    names = _dense_names(model)
    assert names == ["stem", "block.conv", "block.inner.0", "head.1", "fc"]
    configs = {n: _config(model.get_submodule(n)) for n in names}
    modules = {n: model.get_submodule(n) for n in names}
    out = sparsify(model, seed=31)
    assert out is model
    assert _dense_names(model) == []
    assert [n for n, _ in pk.budgeted_weights(model)] == [f"{n}.weight" for n in names]
    for pos, n in enumerate(names):
        m = model.get_submodule(n)
        assert m is modules[n], n  # converted in place, not swapped
        assert type(m) is (nn.Conv2d if configs[n].get("kernel_size") else nn.Linear), n
        assert pk.is_budgeted(m.weight), n
        assert m.weight.seed == derive_seed(31, pos), n
        assert _config(m) == configs[n], n
        assert m.weight.nnz == 0
    y = model(torch.randn(_NET_INPUT, dtype=dtype))
    assert y.shape == (2, 3) and y.dtype == dtype


def test_sparsify_same_seed_same_weights_different_seed_different():
    def weights(seed):
        model = sparsify(_Net(), seed=seed)
        return [w.effective() for _, w in pk.budgeted_weights(model)]

    a, b, c = weights(5), weights(5), weights(6)
    assert len(a) == 5
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(not torch.equal(x, z) for x, z in zip(a, c, strict=True))


def test_sparsify_filter_respected():
    model = _Net()
    head_linear = model.head[1]
    head_weight = head_linear.weight
    head_before = head_weight.detach().clone()
    seen = []

    def keep(name, module):
        seen.append(name)
        return not name.startswith("head")

    sparsify(model, seed=3, filter=keep)
    # Left dense, untouched.
    assert model.head[1] is head_linear and model.head[1].weight is head_weight
    assert not pk.is_budgeted(model.head[1].weight)
    assert torch.equal(model.head[1].weight, head_before)
    assert seen == ["stem", "block.conv", "block.inner.0", "head.1", "fc"]
    # Positions count the converted weights (docstring: "order of the converted weights").
    converted = ["stem", "block.conv", "block.inner.0", "fc"]
    assert _dense_names(model) == ["head.1"]
    for pos, n in enumerate(converted):
        assert model.get_submodule(n).weight.seed == derive_seed(3, pos), n


def test_sparsify_bare_layers_are_converted_in_place():
    lin = nn.Linear(4, 3)
    new = sparsify(lin, seed=7)
    assert new is lin and type(new) is nn.Linear and pk.is_budgeted(new.weight)
    assert new.weight.seed == derive_seed(7, 0)
    conv = nn.Conv2d(2, 4, 3, stride=2, bias=False)
    new = sparsify(conv, seed=7)
    assert new is conv and type(new) is nn.Conv2d and pk.is_budgeted(new.weight)
    assert new.bias is None and new.stride == (2, 2)
    # A filtered-out bare layer comes back as is, its weight left dense.
    plain = nn.Linear(4, 3)
    plain_weight = plain.weight
    assert sparsify(plain, seed=7, filter=lambda n, m: False) is plain
    assert plain.weight is plain_weight and not pk.is_budgeted(plain.weight)


def test_sparsify_keeps_training_mode_and_block_size():
    model = nn.Sequential(nn.Linear(40, 8), nn.Linear(8, 2)).eval()
    sparsify(model, seed=0, linear_block_size=5)
    assert all(not m.training for m in model.modules())
    assert model[0].weight.block_size == 5 and model[1].weight.block_size == 5


def test_sparsify_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        sparsify(nn.Linear(2, 2), seed=-1)
    with pytest.raises(TypeError, match="seed"):
        sparsify(nn.Linear(2, 2), seed="x")


def test_sparsify_converts_shared_module_once():
    """A module registered twice (weight tying) gets one budgeted weight, seen at both places."""
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    sparsify(model, seed=1)
    assert _dense_names(model) == []
    assert type(model[0]) is nn.Linear and pk.is_budgeted(model[0].weight)
    assert model[2] is model[0] is shared
    assert [n for n, _ in pk.budgeted_weights(model)] == ["0.weight"]
    assert model[0].weight.seed == derive_seed(1, 0)


def test_densify_replaces_shared_module_everywhere():
    shared = SparseLinear(6, 6, seed=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    densify(model)
    assert not any(isinstance(m, SparseLinear | SparseConv2d) for m in model.modules())
    assert not any(pk.is_budgeted(p) for p in model.parameters())
    assert type(model[0]) is nn.Linear and model[2] is model[0]


def test_densify_nested_model():
    model = sparsify(_Net(), seed=11)
    for _, m in _budgeted_modules(model):
        _track_random(m, 0.2)
        m.weight.set_scale(0.5)
    x = torch.randn(_NET_INPUT)
    expected = model(x)
    weights = {n: m.weight.effective() for n, m in _budgeted_modules(model)}
    assert len(weights) == 5
    out = densify(model)
    assert out is model
    assert pk.budgeted_weights(model) == [] and _budgeted_modules(model) == []
    for n, w in weights.items():
        m = model.get_submodule(n)
        assert type(m) in (nn.Linear, nn.Conv2d), n
        assert type(m.weight) is nn.Parameter and not pk.is_budgeted(m.weight), n
        assert torch.equal(m.weight, w), n
    assert_close_verbose(model(x), expected, RTOL, ATOL)
    # A bare sparse layer comes back as its nn equivalent.
    bare = densify(SparseLinear(3, 2, seed=0))
    assert type(bare) is nn.Linear and not pk.is_budgeted(bare.weight)


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
    w = layer.weight
    bound = 1.0 / math.sqrt(fan_in)
    assert w.bound == init_bound(fan_in)
    assert abs(w.bound - bound) <= 1e-7 * bound
    w0 = layer.initial_weight()
    assert w0.shape == tuple(w.shape) and w0.dtype == torch.float32
    assert w.weight_numel == w.numel() == math.prod(w.shape)
    assert torch.equal(w0.reshape(-1), init_values(99, w.weight_numel, w.bound))
    assert float(w0.abs().max()) <= w.bound
    assert float(w0.max()) > 0.99 * bound and float(w0.min()) < -0.99 * bound
    # U(-b, b): mean 0, std b / sqrt(3); with >= 92k samples the mean is within ~0.01 b.
    assert abs(float(w0.mean())) < 0.02 * bound
    assert abs(float(w0.std()) - bound / math.sqrt(3)) < 0.02 * bound
    # Effective weight at the start is w0 itself.
    assert torch.equal(layer.effective_weight(), w0)
    # The bias continues the stream after the weights.
    out = tuple(w.shape)[0]
    expected_bias = init_values(99, out, w.bound, start=w.weight_numel)
    assert torch.equal(layer.bias.detach(), expected_bias)
    assert float(layer.bias.detach().abs().max()) <= w.bound


def test_same_seed_same_layer_different_seed_different():
    a, b, c = SparseLinear(9, 4, seed=1), SparseLinear(9, 4, seed=1), SparseLinear(9, 4, seed=2)
    assert torch.equal(a.effective_weight(), b.effective_weight())
    assert torch.equal(a.bias, b.bias)
    assert not torch.equal(a.effective_weight(), c.effective_weight())


def test_unseeded_layers_follow_torch_manual_seed():
    def build():
        torch.manual_seed(123)
        return SparseLinear(5, 3).weight.seed, SparseConv2d(2, 3, 3).weight.seed

    first, second = build(), build()
    assert first == second
    assert first[0] != first[1]
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in first)
    torch.manual_seed(124)
    assert SparseLinear(5, 3).weight.seed != first[0]


def test_seed_accepts_extremes_and_tensor():
    assert SparseLinear(2, 2, seed=0).weight.seed == 0
    assert SparseLinear(2, 2, seed=2**63 - 1).weight.seed == 2**63 - 1
    seed = SparseLinear(2, 2, seed=torch.tensor(17)).weight.seed
    assert seed == 17 and type(seed) is int


# ---------------------------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------------------------


def _old_layout(layer: nn.Module, **override) -> dict:
    """The state dict of ``layer`` in the layer-based layout of procrustes_kernels 0.1."""
    w = layer.weight
    sd = {
        "values": w.values.clone(),
        "mask_bits": w.bits.clone(),
        "group_ptr": w.group_ptr.clone(),
        "seed": torch.tensor(w.seed, dtype=torch.int64),
        "init_scale": w.scale.clone(),
    }
    if layer.bias is not None:
        sd["bias"] = layer.bias.detach().clone()
    sd.update(override)
    return sd


def _with_values(w: BudgetedWeight, values: torch.Tensor) -> BudgetedWeight:
    """``w`` with other packed values (bits and group pointers kept): a corrupt checkpoint."""
    return BudgetedWeight(
        values,
        w.bits,
        w.group_ptr,
        w.scale,
        shape=tuple(w.shape),
        seed=w.seed,
        bound=w.bound,
        block_size=w.block_size,
        groups=w.groups,
    )


def _state_dict_pair(kind):
    if kind == "linear":

        def make(seed):
            return SparseLinear(37, 11, seed=seed)

        shape = (2, 37)
    else:

        def make(seed):
            return SparseConv2d(6, 9, (3, 5), groups=3, padding=1, seed=seed)

        shape = (2, 6, 7, 9)
    src = make(1)
    _track_random(src, 0.3)
    src.weight.set_scale(0.3)
    return src, make(2), shape


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_state_dict_round_trip(kind):
    src, dst, shape = _state_dict_pair(kind)
    sd = src.state_dict()
    assert set(sd) == {"weight", "bias"}
    assert pk.is_budgeted(sd["weight"]) and sd["weight"].nnz == src.weight.nnz
    assert dst.weight.nnz == 0
    weight_param = dst.weight
    dst.load_state_dict(sd)
    assert dst.weight is weight_param  # optimizers keep holding the same parameter
    assert pk.is_budgeted(dst.weight) and isinstance(dst.weight, nn.Parameter)
    assert dst.weight.seed == src.weight.seed == 1
    assert dst.weight.nnz == src.weight.nnz > 0
    assert float(dst.weight.scale) == float(src.weight.scale) == pytest.approx(0.3)
    assert dst.weight.scale_value == src.weight.scale_value
    assert torch.equal(dst.effective_weight(), src.effective_weight())
    assert torch.equal(dst.bias, src.bias)
    x = torch.randn(shape)
    assert torch.equal(dst(x), src(x))
    # The loaded tracked set is a copy: changing the source afterwards leaves it alone.
    loaded = dst.effective_weight()
    src.weight.reset_tracked()
    assert torch.equal(dst.effective_weight(), loaded)
    assert not torch.equal(src.effective_weight(), loaded)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_state_dict_old_layout_loads(kind):
    """Checkpoints of the layer-based layout (values / mask_bits / group_ptr / seed /
    init_scale) still load into a sparse layer."""
    src, dst, shape = _state_dict_pair(kind)
    weight_param = dst.weight
    dst.load_state_dict(_old_layout(src))
    assert dst.weight is weight_param
    assert dst.weight.seed == 1 and dst.weight.nnz == src.weight.nnz > 0
    # The old layout stored init_scale as a float32 tensor: the same decay factor in float32 (the
    # precision every kernel computes ``scale * w0`` in).
    assert float(dst.weight.scale) == float(src.weight.scale)
    assert dst.weight.scale_value == float(torch.tensor(src.weight.scale_value))
    assert torch.equal(dst.effective_weight(), src.effective_weight())
    x = torch.randn(shape)
    assert torch.equal(dst(x), src(x))


def test_state_dict_round_trip_through_nested_model():
    src = sparsify(_Net(), seed=4)
    for _, m in _budgeted_modules(src):
        _track_random(m, 0.25)
        m.weight.set_scale(0.3)
    dst = sparsify(_Net(), seed=5)
    sd = src.state_dict()
    assert {k for k in sd if k.endswith(".weight")} == {n for n, _ in pk.budgeted_weights(src)}
    assert not any(k.endswith((".values", ".mask_bits", ".group_ptr", ".seed")) for k in sd)
    dst.load_state_dict(sd)
    x = torch.randn(_NET_INPUT)
    assert torch.equal(dst(x), src(x))
    # Old-layout checkpoint of the whole model (keys per module) too.
    old = {}
    for n, m in _budgeted_modules(src):
        old.update({f"{n}.{k}": v for k, v in _old_layout(m).items()})
    old.update({k: v for k, v in sd.items() if not pk.is_budgeted(v) and k not in old})
    fresh = sparsify(_Net(), seed=6)
    fresh.load_state_dict(old)
    assert torch.equal(fresh(x), src(x))


def test_state_dict_values_popcount_mismatch_raises():
    src = SparseLinear(37, 11, seed=1)
    _track_random(src, 0.3)
    sd = src.state_dict()
    popcount = src.weight.nnz
    values = sd["weight"].values
    for bad in (values[:-1].clone(), torch.cat([values, torch.ones(2)])):
        new_layout = dict(sd, weight=_with_values(sd["weight"], bad))
        broken_sds = (new_layout, _old_layout(src, values=bad))
        for broken in broken_sds:
            dst = SparseLinear(37, 11, seed=2)
            before = dst.effective_weight()
            with pytest.raises(RuntimeError) as err:
                dst.load_state_dict(broken)
            msg = str(err.value)
            assert "values" in msg and "popcount" in msg and str(popcount) in msg, msg
            assert str(bad.numel()) in msg, msg
            # A bad checkpoint leaves the weight as it was.
            assert dst.weight.nnz == 0 and dst.weight.seed == 2
            assert torch.equal(dst.effective_weight(), before)


def test_state_dict_values_too_long_or_not_1d_raises():
    src = SparseLinear(4, 3, seed=1)
    sd = src.state_dict()
    for bad in (torch.zeros(13), torch.zeros(2, 2)):
        new_layout = dict(sd, weight=_with_values(sd["weight"], bad))
        broken_sds = (new_layout, _old_layout(src, values=bad))
        for broken in broken_sds:
            dst = SparseLinear(4, 3, seed=1)
            with pytest.raises(RuntimeError, match="values"):
                dst.load_state_dict(broken)


def test_state_dict_dense_weight_refused():
    """A dense weight has no tracked set and seed to load into a budgeted weight."""
    layer = SparseLinear(4, 3, seed=1)
    dense = nn.Linear(4, 3).state_dict()
    with pytest.raises(RuntimeError, match="budgeted weight"):
        layer.load_state_dict(dense)
    assert layer.weight.nnz == 0 and layer.weight.seed == 1


def test_state_dict_load_then_zero_grad_clears_weight_grad():
    """``weight.grad`` follows torch semantics: loading a checkpoint keeps the parameter (and
    what autograd left in ``.grad``); ``zero_grad()`` clears it, and the next backward gives the
    gradient of the loaded weight alone."""
    src = SparseLinear(4, 3, seed=3)
    _track_random(src, 0.5)
    sd = src.state_dict()
    layer = SparseLinear(4, 3, seed=1)
    layer(torch.randn(2, 4)).sum().backward()
    assert layer.weight.grad is not None
    layer.load_state_dict(sd)
    layer.zero_grad()
    assert layer.weight.grad is None
    twin = _linear_twin(src)
    x = torch.randn(2, 4)
    layer(x).sum().backward()
    twin(x).sum().backward()
    assert_close_verbose(layer.weight.grad, twin.weight.grad, RTOL, ATOL)


# ---------------------------------------------------------------------------------------------
# dtype / device
# ---------------------------------------------------------------------------------------------


def test_float64_linear_matches_nn_linear():
    layer = SparseLinear(23, 9, seed=3, dtype=torch.float64)
    assert layer.weight.values.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert layer.weight.dtype == torch.float64
    _track_random(layer)
    layer.weight.set_scale(0.37)
    assert layer.effective_weight().dtype == torch.float64
    twin = _linear_twin(layer)
    _compare_with_twin(layer, twin, torch.randn(4, 23, dtype=torch.float64))
    assert layer.weight.grad.dtype == torch.float64


def test_float64_conv_matches_nn_conv():
    layer = SparseConv2d(
        6, 9, 3, groups=3, padding="same", padding_mode="reflect", seed=3, dtype=torch.float64
    )
    _track_random(layer)
    layer.weight.set_scale(0.37)
    _compare_with_twin(layer, _conv_twin(layer), torch.randn(2, 6, 7, 9, dtype=torch.float64))
    assert layer.weight.grad.dtype == torch.float64


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_to_float64_keeps_working(kind):
    if kind == "linear":
        layer = SparseLinear(23, 9, seed=3)
        shape = (4, 23)
    else:
        layer = SparseConv2d(4, 5, 3, padding=1, seed=3)
        shape = (2, 4, 7, 9)
    _track_random(layer)
    layer.weight.set_scale(0.37)
    before = layer.effective_weight()
    nnz = layer.weight.nnz
    layer = layer.to(torch.float64)
    w = layer.weight
    assert pk.is_budgeted(w) and isinstance(w, nn.Parameter) and w.requires_grad
    assert w.dtype == torch.float64
    assert w.values.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert isinstance(w.seed, int) and w.seed == 3 and w.bits.dtype == torch.uint8
    assert w.group_ptr.dtype == torch.int64
    assert w.scale.dtype == torch.float32 and w.scale_value == pytest.approx(0.37)
    assert w.nnz == nnz
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
    w = layer.weight
    assert "seed=5" in r and f"nnz={w.nnz}/{w.weight_numel}" in r and "groups=3" in r
    # The nn.Conv2d part of the repr is nn.Conv2d's own (padding_mode=reflect, padding=same).
    assert nn.Conv2d.extra_repr(layer) in r and "padding_mode=reflect" in r
    assert "seed=5" in repr(SparseLinear(3, 2, seed=5))
    # The weight's own repr tells the same.
    rw = repr(w)
    assert "BudgetedWeight" in rw and "seed=5" in rw and f"nnz={w.nnz}/{w.weight_numel}" in rw


def test_host_scalars_follow_the_weight():
    """seed / scale are Python values held by the weight, never stale: ``set_scale`` writes a new
    0-d tensor together with its Python value, ``set_tracked(scale=...)`` and
    ``load_state_dict`` update both."""
    layer = SparseLinear(6, 4, seed=5)
    w = layer.weight
    assert w.seed == 5 and w.scale_value == 1.0
    old_scale = w.scale
    w.set_scale(0.25)
    assert w.scale_value == 0.25 and float(w.scale) == 0.25
    assert w.scale is not old_scale and float(old_scale) == 1.0  # never written in place
    assert torch.equal(layer.effective_weight(), 0.25 * layer.initial_weight())
    # An old-layout checkpoint with another seed and init_scale.
    layer.load_state_dict(_old_layout(layer, seed=torch.tensor(9), init_scale=torch.tensor(0.5)))
    assert layer.weight is w
    assert w.seed == 9 and w.scale_value == 0.5 and float(w.scale) == 0.5
    assert torch.equal(layer.initial_weight().reshape(-1), init_values(9, 24, w.bound))
    # A new-layout checkpoint of another layer.
    other = SparseLinear(6, 4, seed=11)
    other.weight.set_scale(0.75)
    layer.load_state_dict(other.state_dict())
    assert w.seed == 11 and w.scale_value == 0.75 and float(w.scale) == 0.75
    # set_tracked with a scale.
    w.set_tracked(BlockStorage.empty((4, 6), w.block_size), scale=0.125)
    assert w.scale_value == 0.125 and float(w.scale) == 0.125
    with pytest.raises(ValueError, match="scale"):
        w.set_scale(1.5)
    assert w.scale_value == 0.125
    with torch.inference_mode():
        fresh = SparseLinear(6, 4, seed=7)
        fresh.weight.set_scale(0.5)
        assert fresh.weight.seed == 7 and fresh.weight.scale_value == 0.5
        assert torch.equal(fresh.effective_weight(), 0.5 * fresh.initial_weight())
