"""The C++ sparse compute kernels (csrc/spmm.cpp via ops/compute/cpp.py) against the reference.

Golden tiny cases first (hand-checkable numbers), then fresh random weights of odd shapes: empty
rows, an all-zero layer, full density, groups, strides, dilations, a 1x1 kernel, a batch of one,
every instruction set this CPU has, one and two threads. The sampled weight gradient (SDDMM) is
checked against the dense gradient picked at the tracked positions.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_verbose, compressed_weight, random_mask

from procrustes_kernels.ops import available_backends
from procrustes_kernels.ops.compute import reference

pytestmark = pytest.mark.skipif(
    not available_backends()["cpp"], reason="the C++ extension is not built here"
)

if available_backends()["cpp"]:
    from procrustes_kernels import _C
    from procrustes_kernels.ops.compute import cpp

TOL = dict(rtol=1e-5, atol=1e-5)


def _tol(terms: float) -> dict:
    """TOL for sums of ``terms`` products of N(0, 1) numbers: float32 rounding grows with the
    length of the sum (and the two sides sum in different orders)."""
    return dict(rtol=1e-5, atol=max(1e-5, 1e-6 * terms))


@pytest.fixture(params=["simd", "baseline"])
def isa(request):
    """Every kernel runs at the CPU's best instruction set and at the baseline one."""
    level = _C.simd_level()
    if request.param == "baseline":
        _C.set_simd_level(0)
    yield request.param
    _C.set_simd_level(level)


@pytest.fixture(params=[1, 2])
def threads(request):
    before = _C.max_threads()
    _C.set_max_threads(request.param)
    yield request.param
    _C.set_max_threads(before)


def _dense(values, bits, index):
    return reference.dense_weight(values, bits, index, torch.float32)


# ------------------------------------------------------------------------------- golden cases
def test_golden_linear():
    # W = [[1, 0, 2], [0, 0, 0], [0, 3, 0]] (row 1 empty), x = [[1, 2, 3], [4, 5, 6]].
    mask = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.bool)
    values, bits, index = compressed_weight(mask, torch.tensor([1.0, 2.0, 3.0]), device="cpu")
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y = cpp.sparse_linear(x, values, bits, index, torch.tensor([0.5, -1.0, 0.0]))
    assert y.tolist() == [[7.5, -1.0, 6.0], [16.5, -1.0, 15.0]]
    dy = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, -1.0]])
    assert cpp.sparse_linear_t(dy, values, bits, index).tolist() == [
        [1.0, 3.0, 2.0],
        [0.0, -3.0, 0.0],
    ]
    # dW = dy^T x at (0, 0), (0, 2), (2, 1): 1*1 + 0*4, 1*3 + 0*6, 1*2 + -1*5.
    assert cpp.sddmm_linear(x, dy, values, bits, index).tolist() == [1.0, 3.0, -3.0]


def test_golden_conv():
    # One 2x2 kernel [[1, 0], [0, 2]] on a 3x3 image 1..9, stride 1, no padding.
    mask = torch.tensor([1, 0, 0, 1], dtype=torch.bool)
    values, bits, index = compressed_weight(
        mask, torch.tensor([1.0, 2.0]), rows=1, cols=1, ksize=4, device="cpu"
    )
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    y = cpp.sparse_conv2d(x, values, bits, index, (2, 2))
    assert y.tolist() == [[[[1 + 10, 2 + 12], [4 + 16, 5 + 18]]]]
    dy = torch.ones(1, 1, 2, 2)
    dx = cpp.sparse_conv2d_t(dy, values, bits, index, (3, 3), (2, 2))
    assert dx.tolist() == [[[[1.0, 1.0, 0.0], [1.0, 3.0, 2.0], [0.0, 2.0, 2.0]]]]
    # dW at (0, 0): 1 + 2 + 4 + 5; at (1, 1): 5 + 6 + 8 + 9.
    assert cpp.sddmm_conv2d(x, dy, values, bits, index, (2, 2)).tolist() == [12.0, 28.0]


# ------------------------------------------------------------------------------ random shapes
LINEAR = [  # tokens, rows, cols, density
    (1, 1, 1, 1.0),
    (7, 5, 3, 0.5),
    (33, 70, 301, 0.1),  # rows not a multiple of anything, cols past a 64-bit word
    (130, 64, 100, 1.0),  # full density
    (5, 9, 17, 0.0),  # all-zero layer
    (65, 257, 129, 0.02),  # mostly empty rows
    (0, 8, 8, 0.5),  # no tokens
    (16, 33, 40, 0.3),  # one whole tile of tokens
    (17, 3, 700, 0.2),  # a tile and one token; wide: the input gradient in parts of features
    (47, 300, 70, 0.5),  # the forward in parts of rows
    (3, 2, 70000, 0.01),  # a tile buffer past the size kept between calls
    # the column decode: ranges of 256 rows decoded by different threads, words with more than
    # eight tracked bits, rows starting inside a word, a range ending where the next one begins
    (19, 600, 130, 0.9),
    (21, 513, 61, 1.0),
    (18, 700, 67, 0.13),
]


@pytest.mark.parametrize("m,rows,cols,density", LINEAR)
def test_linear_matches_reference(m, rows, cols, density, isa, threads):
    mask = random_mask(rows, cols, density, seed=rows + m)
    values, bits, index = compressed_weight(mask, device="cpu", seed=m)
    x, dy, bias = torch.randn(m, cols), torch.randn(m, rows), torch.randn(rows)
    assert_close_verbose(
        cpp.sparse_linear(x, values, bits, index, bias),
        reference.sparse_linear(x, values, bits, index, bias),
        **_tol(cols * density),
    )
    assert_close_verbose(
        cpp.sparse_linear_t(dy, values, bits, index),
        reference.sparse_linear_t(dy, values, bits, index),
        **_tol(rows * density),
    )
    got = cpp.sddmm_linear(x, dy, values, bits, index)
    assert got.shape == values.shape
    assert_close_verbose(got, reference.sddmm_linear(x, dy, values, bits, index), **_tol(m))
    assert_close_verbose(got, (dy.t() @ x)[mask], **_tol(m))


CONV = [  # batch, in, out, hw, kernel, stride, padding, dilation, groups, density
    (2, 3, 4, (7, 9), (3, 3), (1, 1), (1, 1), (1, 1), 1, 0.4),
    (3, 4, 6, (11, 8), (3, 2), (2, 3), (1, 2), (2, 1), 2, 0.3),
    (2, 8, 8, (5, 5), (1, 1), (2, 2), (0, 0), (1, 1), 4, 0.5),  # 1x1, strided, grouped
    (1, 6, 6, (6, 7), (3, 3), (1, 1), (1, 1), (1, 1), 6, 1.0),  # depthwise, full density
    (2, 5, 7, (9, 9), (5, 3), (3, 1), (2, 0), (1, 2), 1, 0.0),  # all-zero layer
    (4, 16, 33, (8, 8), (3, 3), (2, 2), (1, 1), (1, 1), 1, 0.05),  # mostly empty rows
    (1, 2, 3, (4, 4), (4, 4), (1, 1), (0, 0), (1, 1), 1, 0.6),  # one output pixel
    (4, 3, 5, (40, 38), (3, 3), (1, 1), (1, 1), (1, 1), 1, 0.3),  # SDDMM over ranges of L
    # Blocks of input channels (forward) and of output rows (input gradient), some rows empty
    # in a block: their partial sums carry over.
    (2, 150, 130, (5, 6), (3, 3), (2, 2), (1, 1), (1, 1), 1, 0.1),
    (1, 200, 180, (4, 4), (3, 3), (1, 1), (1, 1), (1, 1), 1, 0.02),
    (1, 96, 192, (3, 5), (3, 3), (1, 1), (1, 1), (1, 1), 2, 0.05),
]


@pytest.mark.parametrize("b,c,n,hw,k,s,p,d,g,density", CONV)
def test_conv_matches_reference(b, c, n, hw, k, s, p, d, g, density, isa, threads):
    ksize = k[0] * k[1]
    mask = random_mask(n, (c // g) * ksize, density, seed=n + c)
    values, bits, index = compressed_weight(
        mask, rows=n, cols=c // g, ksize=ksize, groups=g, device="cpu", seed=b
    )
    x, bias = torch.randn(b, c, *hw), torch.randn(n)
    w = _dense(values, bits, index).view(n, c // g, *k)
    y = F.conv2d(x, w, bias, s, p, d, g)
    dy = torch.randn_like(y)
    assert_close_verbose(cpp.sparse_conv2d(x, values, bits, index, k, s, p, d, bias), y, **TOL)
    assert_close_verbose(
        cpp.sparse_conv2d_t(dy, values, bits, index, hw, k, s, p, d),
        reference.sparse_conv2d_t(dy, values, bits, index, hw, k, s, p, d),
        **TOL,
    )
    got = cpp.sddmm_conv2d(x, dy, values, bits, index, k, s, p, d)
    want = torch.nn.grad.conv2d_weight(x, w.shape, dy, s, p, d, g).reshape(-1)[mask.reshape(-1)]
    assert_close_verbose(got, want, rtol=1e-5, atol=1e-4)
    assert_close_verbose(
        got, reference.sddmm_conv2d(x, dy, values, bits, index, k, s, p, d), rtol=1e-5, atol=1e-4
    )


def test_long_conv_sddmm_does_not_depend_on_threads():
    mask = random_mask(6, 4 * 9, 0.4, seed=4)
    values, bits, index = compressed_weight(mask, rows=6, cols=4, ksize=9, device="cpu")
    x, dy = torch.randn(5, 4, 45, 41), torch.randn(5, 6, 45, 41)
    before = _C.max_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            _C.set_max_threads(t)
            outs.append(cpp.sddmm_conv2d(x, dy, values, bits, index, (3, 3), (1, 1), (1, 1)))
    finally:
        _C.set_max_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_linear_sddmm_long_runs_and_large_workspace():
    # 4500 tokens: the SDDMM sums ranges of L; x^T and dy^T (4.1M floats) exceed the workspace
    # kept between calls, which is released after it and allocated again by the next call.
    mask = random_mask(20, 900, 0.05, seed=5)
    values, bits, index = compressed_weight(mask, device="cpu")
    x, dy = torch.randn(4500, 900), torch.randn(4500, 20)
    expected = (dy.t().double() @ x.double())[mask].float()
    for _ in range(2):
        got = cpp.sddmm_linear(x, dy, values, bits, index)
        assert_close_verbose(got, expected, rtol=1e-4, atol=1e-3)
    small = cpp.sddmm_linear(x[:3], dy[:3], values, bits, index)
    assert_close_verbose(small, (dy[:3].t() @ x[:3])[mask], **TOL)


@pytest.mark.parametrize("rows,cols", [(1, 1), (33, 70), (64, 32), (100, 257)])
def test_transpose_matches_torch(rows, cols, threads):
    x = torch.randn(rows, cols)
    out = torch.empty(cols, rows)
    _C.transpose(x.numpy().reshape(-1), rows, cols, out.numpy().reshape(-1))
    assert torch.equal(out, x.t())


@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_linear_decode_matches_dense(groups, isa, threads):
    """Grouped token-major kernels (a 1x1 convolution's layout): row n reads its group's features."""
    rows, cols = 270 * groups, 37
    mask = random_mask(rows, cols, 0.7, seed=groups)
    values, bits, index = compressed_weight(mask, rows=rows, cols=cols, groups=groups, device="cpu")
    rpg = rows // groups
    w = _dense(values, bits, index).reshape(rows, cols)
    full = torch.block_diag(*[w[g * rpg : (g + 1) * rpg] for g in range(groups)])
    x, dy = torch.randn(23, cols * groups), torch.randn(23, rows)
    assert_close_verbose(cpp.sparse_linear(x, values, bits, index), x @ full.t(), **_tol(cols))
    assert_close_verbose(cpp.sparse_linear_t(dy, values, bits, index), dy @ full, **_tol(rpg))


def test_results_do_not_depend_on_threads():
    mask = random_mask(300, 500, 0.1, seed=3)
    values, bits, index = compressed_weight(mask, device="cpu")
    x, dy = torch.randn(97, 500), torch.randn(97, 300)
    before = _C.max_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            _C.set_max_threads(t)
            outs.append(
                (
                    cpp.sparse_linear(x, values, bits, index),
                    cpp.sparse_linear_t(dy, values, bits, index),
                    cpp.sddmm_linear(x, dy, values, bits, index),
                )
            )
    finally:
        _C.set_max_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- bad input
def test_bad_arguments_name_the_argument():
    mask = random_mask(6, 10, 0.5, seed=1)
    values, bits, index = compressed_weight(mask, device="cpu")
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"x.shape\[1\] == 10"):
        cpp.sparse_linear(torch.randn(4, 9), values, bits, index)
    with pytest.raises(TypeError, match="float32"):
        cpp.sparse_linear(x.double(), values, bits, index)
    with pytest.raises(ValueError, match="tracked weights, values has"):
        cpp.sparse_linear(x, values[:-1], bits, index)
    with pytest.raises(ValueError, match="bits of length"):
        cpp.sparse_linear(x, values, bits[:-1], index)
    with pytest.raises(ValueError, match="same rows"):
        cpp.sddmm_linear(x, torch.randn(3, 6), values, bits, index)
    conv_values, conv_bits, _ = compressed_weight(random_mask(6, 20, 0.5), device="cpu")
    with pytest.raises(ValueError, match="expected head >= max"):
        _C.spmm_backward(
            values=conv_values.numpy(),
            bits=conv_bits.numpy(),
            rows=6,
            cols=10,
            ksize=2,
            groups=1,
            phases=1,
            phase=torch.zeros(2, dtype=torch.int32).numpy(),
            shift=torch.tensor([0, 3]).numpy(),
            L=4,
            dy=torch.zeros(40).numpy(),
            head=0,
            out=torch.zeros(80).numpy(),
        )


def test_conv_bad_sizes():
    mask = random_mask(4, 3 * 9, 0.5, seed=2)
    values, bits, index = compressed_weight(mask, rows=4, cols=3, ksize=9, device="cpu")
    with pytest.raises(ValueError, match="kernel_size with 9 positions"):
        cpp.sparse_conv2d(torch.randn(1, 3, 5, 5), values, bits, index, (2, 2))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        cpp.sparse_conv2d(torch.randn(1, 3, 2, 2), values, bits, index, (3, 3))
    with pytest.raises(ValueError, match="spatial size"):
        cpp.sparse_conv2d_t(torch.randn(1, 4, 2, 2), values, bits, index, (5, 5), (3, 3))
