"""Tests for procrustes_kernels.storage: hand-checked layouts first, then properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procrustes_kernels.storage import (
    GROUP_SIZE,
    BlockStorage,
    group_pointers,
    pack_bits,
    unpack_bits,
)

PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _dense_and_mask(shape, density, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(shape, generator=g).to(dtype)
    # Zero-free values so that "tracked" and "value happens to be 0" cannot be confused.
    dense = torch.where(dense == 0, torch.ones_like(dense), dense)
    mask = torch.rand(shape, generator=g) < density
    return dense, mask


def _reference_offsets(mask_flat, shape, block_size):
    """Offsets from a full exclusive cumsum of the mask: independent of group_ptr and bits."""
    rows, row_len = shape[0], math.prod(shape[1:])
    before = torch.cumsum(mask_flat.long(), 0) - mask_flat.long()
    starts = [[k * row_len + j for j in range(0, row_len, block_size)] for k in range(rows)]
    return before[torch.tensor(starts)]


# --------------------------------------------------------------------------- golden cases


def test_golden_2x5_block2():
    # Row 0: tracked at cols 0, 2, 3; row 1: at cols 1, 4 -> flat 0, 2, 3, 6, 9.
    dense = torch.arange(1.0, 11.0).view(2, 5)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 1]], dtype=torch.bool)
    s = BlockStorage.from_mask(dense, mask, 2)

    # Byte 0: bits 0, 2, 3, 6 -> 1 + 4 + 8 + 64 = 77. Byte 1: bit 1 (flat 9) -> 2.
    assert s.bits.tolist() == [77, 2]
    assert s.bits.dtype == torch.uint8
    assert s.group_ptr.tolist() == [0, 5]
    assert s.group_ptr.dtype == torch.int64
    assert s.values.tolist() == [1.0, 3.0, 4.0, 7.0, 10.0]
    assert s.indices().tolist() == [0, 2, 3, 6, 9]

    assert (s.rows, s.row_len, s.blocks_per_row, s.numel, s.nnz) == (2, 5, 3, 10, 5)
    assert s.density == 0.5
    # Blocks: row 0 = [0,1] [2,3] [4]; row 1 = [5,6] [7,8] [9].
    assert s.block_offsets().tolist() == [[0, 1, 3], [3, 4, 4]]
    assert s.block_counts().tolist() == [[1, 2, 0], [1, 0, 1]]
    assert s.read_block(0, 1).tolist() == [3.0, 4.0]
    assert s.read_block(0, 2).tolist() == [0.0]
    assert s.read_block(1, 0).tolist() == [0.0, 7.0]
    assert s.read_block(1, 2).tolist() == [10.0]

    expected = torch.tensor([[1.0, 0, 3, 4, 0], [0, 7, 0, 0, 10]])
    assert torch.equal(s.to_dense(), expected)
    assert torch.equal(s.to_dense_transposed(), expected.t())
    # 5 fp32 values + 2 bytes of bits + 2 int64 pointers.
    assert s.nbytes == 5 * 4 + 2 + 2 * 8


def test_golden_multi_group_linear():
    # 3 x 200 weight, every 7th flat element tracked, linear block of 16 (last block is 8 long).
    shape = (3, 200)
    flat = torch.arange(600)
    mask = (flat % 7 == 0).view(shape)
    s = BlockStorage.from_mask(flat.float().view(shape), mask, 16)

    # Multiples of 7 below 256: 0..252 -> 37; below 512: 0..511 -> 74; below 600: 86.
    assert s.group_ptr.tolist() == [0, 37, 74, 86]
    assert s.bits.numel() == 75
    # Flat 0 and 7 are in byte 0 (bits 0 and 7); flat 14 is bit 6 of byte 1.
    assert s.bits[:2].tolist() == [0b10000001, 0b01000000]
    assert s.blocks_per_row == 13
    offsets = s.block_offsets()
    # Block (1, 3) starts at 248 (group 0): multiples of 7 in [0, 248) -> 36.
    assert offsets[1, 3].item() == 36
    # Block (2, 5) starts at 480 (group 1): 37 + multiples of 7 in [256, 480) = 37 + 32.
    assert offsets[2, 5].item() == 69
    # Last block of row 0 covers [192, 200): only 196 is tracked.
    assert s.block_counts()[0, 12].item() == 1
    assert s.read_block(0, 12).tolist() == [0, 0, 0, 0, 196.0, 0, 0, 0]


def test_golden_conv_blocks_are_kernels():
    # (K, C, R, S) = (2, 3, 2, 2); block = one 2x2 kernel.
    dense = torch.arange(1.0, 25.0).view(2, 3, 2, 2)
    mask = torch.zeros(2, 3, 2, 2, dtype=torch.bool)
    mask[0, 1] = torch.tensor([[True, False], [False, True]])
    mask[1, 2, 1, 0] = True
    s = BlockStorage.from_mask(dense, mask, 4)
    assert s.indices().tolist() == [4, 7, 22]
    assert s.block_offsets().tolist() == [[0, 0, 2], [2, 2, 2]]
    assert s.block_counts().tolist() == [[0, 2, 0], [0, 0, 1]]
    assert s.read_block(0, 1).view(2, 2).tolist() == [[5.0, 0.0], [0.0, 8.0]]
    assert s.read_block(1, 2).tolist() == [0.0, 0.0, 23.0, 0.0]
    wt = s.to_dense_transposed()
    assert wt.shape == (3, 2, 2, 2)
    assert torch.equal(wt, (dense * mask).transpose(0, 1))


def test_pack_bits_golden_and_padding():
    mask = torch.tensor([1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1], dtype=torch.bool)
    bits = pack_bits(mask)
    assert bits.tolist() == [0b10000011, 0b00000100]
    assert torch.equal(unpack_bits(bits, 11), mask)
    assert group_pointers(bits, 11).tolist() == [0, 4]
    # Padding bits past numel are not counted.
    assert group_pointers(torch.tensor([0xFF], dtype=torch.uint8), 3).tolist() == [0, 3]
    assert pack_bits(torch.zeros(0, dtype=torch.bool)).numel() == 0
    assert group_pointers(torch.zeros(0, dtype=torch.uint8), 0).tolist() == [0]


@pytest.mark.parametrize("shape", [(1,), (1, 1), (1, 1, 1, 1)])
@pytest.mark.parametrize("tracked", [False, True])
def test_single_element(shape, tracked):
    dense = torch.full(shape, 2.5)
    s = BlockStorage.from_mask(dense, torch.full(shape, tracked), 1)
    assert s.nnz == int(tracked)
    assert s.bits.tolist() == [int(tracked)]
    assert s.group_ptr.tolist() == [0, int(tracked)]
    assert s.block_offsets().tolist() == [[0]]
    assert s.block_counts().tolist() == [[int(tracked)]]
    assert s.read_block(0, 0).tolist() == [2.5 if tracked else 0.0]
    assert torch.equal(s.to_dense(), dense * tracked)
    if len(shape) > 1:
        assert torch.equal(s.to_dense_transposed(), (dense * tracked).transpose(0, 1))


@pytest.mark.parametrize("shape,block", [((5, 77), 16), ((4, 3, 3, 3), 9), ((1, 300), 16)])
def test_empty_and_full(shape, block):
    numel = math.prod(shape)
    e = BlockStorage.empty(shape, block, dtype=torch.float64)
    assert e.nnz == 0 and e.dtype == torch.float64 and e.density == 0.0
    assert e.group_ptr.numel() == math.ceil(numel / GROUP_SIZE) + 1
    assert not e.group_ptr.any() and not e.bits.any()
    assert torch.equal(e.to_dense(), torch.zeros(shape, dtype=torch.float64))
    assert not e.block_offsets().any() and not e.block_counts().any()
    # Round-trips through the validating constructor.
    BlockStorage(e.shape, e.block_size, e.values, e.bits, e.group_ptr)

    dense = torch.randn(shape)
    f = BlockStorage.from_mask(dense, torch.ones(shape, dtype=torch.bool), block)
    assert f.nnz == numel and f.density == 1.0
    assert torch.equal(f.to_dense(), dense)
    assert torch.equal(f.to_dense_transposed(), dense.transpose(0, 1))
    assert f.group_ptr[-1].item() == numel
    sizes = f.block_counts()
    assert sizes.sum().item() == numel and sizes[:, 0].eq(min(block, f.row_len)).all()


def test_compression_at_ten_percent():
    for shape in [(64, 32, 3, 3), (300, 784)]:
        numel = math.prod(shape)
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[torch.randperm(numel, generator=torch.Generator().manual_seed(0))[: numel // 10]] = 1
        block = 9 if len(shape) == 4 else 16
        s = BlockStorage.from_mask(torch.randn(shape), mask.view(shape), block)
        ratio = s.nbytes / (numel * 4)
        assert ratio <= 0.15, (shape, ratio)
        assert ratio == pytest.approx(0.139, abs=0.003)


# --------------------------------------------------------------------------- dense views


def test_to_dense_fill_scatter_gather():
    dense, mask = _dense_and_mask((6, 10), 0.4, 1)
    s = BlockStorage.from_mask(dense, mask, 4)
    fill = torch.full((6, 10), -1.0)
    fill_before = fill.clone()
    out = s.to_dense(fill)
    assert torch.equal(fill, fill_before)
    assert torch.equal(out, torch.where(mask, dense, fill))
    assert torch.equal(s.to_dense(fill.flatten()), out)

    target = torch.full((6, 10), 5.0)
    assert s.scatter_(target) is target
    assert torch.equal(target, torch.where(mask, dense, torch.full_like(dense, 5.0)))
    flat = torch.zeros(60, dtype=torch.float64)
    s.scatter_(flat)
    assert torch.equal(flat, (dense * mask).flatten().double())

    grad = torch.randn(6, 10)
    assert torch.equal(s.gather(grad), grad.flatten()[s.indices()])
    assert torch.equal(s.gather(grad.flatten()), grad[mask])


def test_autograd_through_values():
    dense, mask = _dense_and_mask((4, 9), 0.5, 2)
    s = BlockStorage.from_mask(dense, mask, 3)
    s.values.requires_grad_(True)
    weight = torch.arange(36.0).view(4, 9)
    (s.to_dense() * weight).sum().backward()
    assert torch.equal(s.values.grad, weight[mask])


def test_to_clone_repr():
    dense, mask = _dense_and_mask((8, 40), 0.3, 3)
    s = BlockStorage.from_mask(dense, mask, 16)
    c = s.clone()
    c.values.zero_()
    c.bits.zero_()
    assert s.values.abs().min() > 0 and s.bits.any()
    h = s.to(dtype=torch.float16)
    assert h.dtype == torch.float16 and h.bits.dtype == torch.uint8
    assert torch.equal(h.to_dense(), (dense * mask).half())
    r = repr(s)
    for part in ["shape=(8, 40)", "block_size=16", f"nnz={s.nnz}", f"nbytes={s.nbytes}"]:
        assert part in r
    assert "density=" in r


# --------------------------------------------------------------------------- properties


@st.composite
def shapes(draw, min_dims=1):
    kinds = ["2d", "4d", "3d"] + (["1d"] if min_dims <= 1 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "1d":
        return (draw(st.integers(1, 600)),)
    if kind == "2d":
        return (draw(st.integers(1, 40)), draw(st.integers(1, 90)))
    if kind == "3d":
        return tuple(draw(st.integers(1, 9)) for _ in range(3))
    return (
        draw(st.integers(1, 8)),
        draw(st.integers(1, 8)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
    )


@st.composite
def cases(draw, min_dims=1):
    shape = draw(shapes(min_dims))
    row_len = math.prod(shape[1:])
    if len(shape) == 4 and draw(st.booleans()):
        block = shape[2] * shape[3]
    else:
        block = draw(st.integers(1, row_len + 3))
    density = draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)))
    seed = draw(st.integers(0, 2**31 - 1))
    dense, mask = _dense_and_mask(shape, density, seed)
    return dense, mask, block


@PROPS
@given(cases())
def test_prop_round_trip_and_indices(case):
    dense, mask, block = case
    s = BlockStorage.from_mask(dense, mask, block)
    assert s.shape == tuple(dense.shape)
    assert torch.equal(s.to_dense(), dense * mask)
    assert torch.equal(s.mask(), mask.flatten())
    assert torch.equal(s.indices(), mask.flatten().nonzero().flatten())
    assert torch.equal(s.values, dense[mask])
    # The validating constructor accepts what from_mask built.
    BlockStorage(s.shape, s.block_size, s.values, s.bits, s.group_ptr)


@PROPS
@given(cases())
def test_prop_from_indices_equals_from_mask(case):
    dense, mask, block = case
    a = BlockStorage.from_mask(dense, mask, block)
    idx = mask.flatten().nonzero().flatten()
    b = BlockStorage.from_indices(dense.shape, block, idx, dense.flatten()[idx])
    for name in ["values", "bits", "group_ptr"]:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.shape == b.shape and a.block_size == b.block_size


@PROPS
@given(st.integers(0, 2100), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_prop_pack_unpack(n, density, seed):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < density
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(bits, n), mask)
    ptr = group_pointers(bits, n)
    assert ptr.numel() == (n + GROUP_SIZE - 1) // GROUP_SIZE + 1
    ends = torch.arange(ptr.numel()) * GROUP_SIZE
    cum = torch.cat([torch.zeros(1, dtype=torch.int64), mask.long().cumsum(0)])
    assert torch.equal(ptr, cum[ends.clamp(max=n)])


@PROPS
@given(cases(min_dims=2))
def test_prop_transposed(case):
    dense, mask, block = case
    s = BlockStorage.from_mask(dense, mask, block)
    wt = s.to_dense_transposed()
    assert wt.is_contiguous()
    assert torch.equal(wt, (dense * mask).transpose(0, 1))


@PROPS
@given(cases())
def test_prop_blocks(case):
    dense, mask, block = case
    s = BlockStorage.from_mask(dense, mask, block)
    masked = (dense * mask).reshape(s.rows, s.row_len)
    offsets, counts = s.block_offsets(), s.block_counts()
    assert offsets.shape == counts.shape == (s.rows, s.blocks_per_row)
    assert offsets.dtype == counts.dtype == torch.int64
    assert torch.equal(offsets, _reference_offsets(mask.flatten(), s.shape, block))
    m2 = mask.reshape(s.rows, s.row_len)
    for k in range(s.rows):
        for j in range(s.blocks_per_row):
            lo, hi = j * block, min((j + 1) * block, s.row_len)
            assert torch.equal(s.read_block(k, j), masked[k, lo:hi])
            assert counts[k, j].item() == m2[k, lo:hi].sum().item()


@PROPS
@given(cases(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_prop_nbytes(case, dtype):
    dense, mask, block = case
    s = BlockStorage.from_mask(dense.to(dtype), mask, block)
    numel = dense.numel()
    expected = (
        int(mask.sum()) * dtype.itemsize
        + math.ceil(numel / 8)
        + 8 * (math.ceil(numel / GROUP_SIZE) + 1)
    )
    assert s.nbytes == expected


# --------------------------------------------------------------------------- errors


def _good():
    dense, mask = _dense_and_mask((3, 100), 0.3, 4)
    return BlockStorage.from_mask(dense, mask, 16)


def _bad_calls():
    s = _good()
    v, b, p = s.values, s.bits, s.group_ptr
    idx = s.indices()
    bad_padding = b.clone()
    bad_padding[-1] |= 0x80  # numel 300 -> 4 valid bits in the last byte
    bad_ptr = p.clone()
    bad_ptr[1] += 1
    short_last = p.clone()
    short_last[-1] -= 1
    return [
        (
            lambda: BlockStorage((3, 100), 16, v, b.int(), p),
            ValueError,
            "BlockStorage(): expected bits of dtype torch.uint8, got torch.int32",
        ),
        (lambda: BlockStorage((3, 100), 16, v, b[:-1], p), ValueError, "bits of length"),
        (lambda: BlockStorage((3, 100), 16, v, bad_padding, p), ValueError, "padding bits"),
        (lambda: BlockStorage((3, 100), 16, v, b, p.int()), ValueError, "group_ptr of dtype"),
        (lambda: BlockStorage((3, 100), 16, v, b, p[:-1]), ValueError, "group_ptr of shape"),
        (lambda: BlockStorage((3, 100), 16, v, b, bad_ptr), ValueError, "group_ptr[1]"),
        (lambda: BlockStorage((3, 100), 16, v, b, short_last), ValueError, "group_ptr[-1]"),
        (lambda: BlockStorage((3, 100), 16, v[:-1], b, p), ValueError, "values.numel()"),
        (lambda: BlockStorage((3, 100), 16, v.long(), b, p), ValueError, "values of a floating"),
        (lambda: BlockStorage((3, 100), 16, v[None], b, p), ValueError, "values to be 1-D"),
        (lambda: BlockStorage((3, 100), 0, v, b, p), ValueError, "block_size >= 1"),
        (lambda: BlockStorage((3, 100), 2.0, v, b, p), TypeError, "block_size"),
        (lambda: BlockStorage((3, 0), 16, v, b, p), ValueError, "shape"),
        (lambda: BlockStorage((), 16, v, b, p), ValueError, "shape"),
        (lambda: BlockStorage("ab", 16, v, b, p), TypeError, "shape"),
        (lambda: BlockStorage((3, 100), 16, v.numpy(), b, p), TypeError, "values"),
        (lambda: BlockStorage.empty((3, 4), 2, dtype=torch.int32), TypeError, "dtype"),
        (
            lambda: BlockStorage.from_mask(torch.zeros(3, 4), torch.zeros(3, 4), 2),
            TypeError,
            "mask of dtype torch.bool",
        ),
        (
            lambda: BlockStorage.from_mask(torch.zeros(3, 4), torch.zeros(11, dtype=torch.bool), 2),
            ValueError,
            "mask with dense.numel() = 12",
        ),
        (
            lambda: BlockStorage.from_mask(torch.zeros(3, 4, dtype=torch.long), idx > 0, 2),
            TypeError,
            "dense of a floating",
        ),
        (
            lambda: BlockStorage.from_indices((3, 1000), 16, torch.tensor([5, 5]), torch.ones(2)),
            ValueError,
            "expected indices strictly increasing in [0, 3000), got indices[1]=5 after 5",
        ),
        (
            lambda: BlockStorage.from_indices((3, 1000), 16, torch.tensor([3000]), torch.ones(1)),
            ValueError,
            "indices strictly increasing in [0, 3000), got indices[-1]=3000",
        ),
        (
            lambda: BlockStorage.from_indices((3, 10), 16, torch.tensor([-1, 2]), torch.ones(2)),
            ValueError,
            "got indices[0]=-1",
        ),
        (
            lambda: BlockStorage.from_indices((3, 10), 16, idx.int(), torch.ones(idx.numel())),
            TypeError,
            "indices of dtype torch.int64",
        ),
        (
            lambda: BlockStorage.from_indices((3, 10), 16, torch.tensor([1, 2]), torch.ones(3)),
            ValueError,
            "values of shape (2,)",
        ),
        (lambda: s.read_block(3, 0), ValueError, "row in [0, 3)"),
        (lambda: s.read_block(0, 7), ValueError, "block in [0, 7)"),
        (lambda: s.to_dense(torch.zeros(3, 99)), ValueError, "fill of shape (3, 100)"),
        (lambda: s.scatter_(torch.zeros(100, 3).t()), ValueError, "out to be contiguous"),
        (lambda: s.scatter_(torch.zeros(299)), ValueError, "out of shape"),
        (lambda: s.gather(torch.zeros(3, 10, 10)), ValueError, "dense of shape"),
        (lambda: BlockStorage.empty((7,), 2).to_dense_transposed(), ValueError, "at least 2 dims"),
        (lambda: unpack_bits(b, 310), ValueError, "bits of length"),
        (lambda: unpack_bits(b, -1), ValueError, "numel >= 0"),
        (lambda: pack_bits(torch.zeros(3)), TypeError, "mask of dtype torch.bool"),
        (lambda: group_pointers(b.long(), 300), ValueError, "bits of dtype torch.uint8"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_inputs_raise_with_argument_name(i):
    call, exc, text = _bad_calls()[i]
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value)


def test_validate_false_skips_consistency_checks():
    s = _good()
    with pytest.raises(ValueError, match="popcount"):
        BlockStorage(s.shape, s.block_size, s.values[:-1], s.bits, s.group_ptr)
    unchecked = BlockStorage(
        s.shape, s.block_size, s.values[:-1], s.bits, s.group_ptr, validate=False
    )
    assert unchecked.values.numel() == s.values.numel() - 1
    assert unchecked.bits is s.bits and unchecked.group_ptr is s.group_ptr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU)")
def test_cuda_matches_cpu():
    dense, mask = _dense_and_mask((17, 5, 3, 3), 0.2, 5)
    cpu = BlockStorage.from_mask(dense, mask, 9)
    gpu = BlockStorage.from_mask(dense.cuda(), mask.cuda(), 9)
    assert gpu.device.type == "cuda"
    for name in ["values", "bits", "group_ptr"]:
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name))
    assert torch.equal(gpu.block_offsets().cpu(), cpu.block_offsets())
    assert torch.equal(gpu.to_dense_transposed().cpu(), cpu.to_dense_transposed())
    assert torch.equal(gpu.read_block(3, 2).cpu(), cpu.read_block(3, 2))
    assert torch.equal(cpu.to("cuda").to_dense().cpu(), cpu.to_dense())
