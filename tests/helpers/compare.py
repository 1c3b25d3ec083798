"""Comparisons whose failures say where and by how much."""

from __future__ import annotations

import torch

from procrustes_kernels.ops.contract import Compacted

__all__ = ["assert_close_verbose", "assert_same", "assert_compacted"]


def assert_close_verbose(actual, expected, rtol, atol, max_report=5):
    """Like ``torch.testing.assert_close`` (shapes and dtypes must match), but the failure message
    gives the number of mismatches, the max abs / rel error and the first few bad indices."""
    assert isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    diff = (a - e).abs()
    bad = (diff > atol + rtol * e.abs()) | (a.isnan() != e.isnan())
    bad &= ~(a.isnan() & e.isnan())
    if not bool(bad.any()):
        return
    finite = diff.nan_to_num(nan=float("inf"))
    rel = finite / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
    idx = bad.nonzero()[:max_report]
    lines = [
        f"{int(bad.sum())} / {bad.numel()} elements mismatch (rtol={rtol}, atol={atol}); "
        f"max abs err {float(finite.max()):.3e}, max rel err {float(rel.max()):.3e}",
        "first bad indices:",
    ]
    for i in idx.tolist():
        i = tuple(i)
        lines.append(f"  {i}: actual={float(a[i])!r} expected={float(e[i])!r}")
    msg = "\n".join(lines)
    print(msg)
    raise AssertionError(msg)


def assert_same(a, b, where=""):
    """Bit-identical results: tensors (dtype, shape, bits; any device), :class:`Compacted`,
    tuples, ``None`` and numbers."""
    if isinstance(a, Compacted):
        assert isinstance(b, Compacted), f"{where}: {type(b).__name__} is not a Compacted"
        for f in ("values", "bits", "group_ptr", "momentum", "histogram"):
            assert_same(getattr(a, f), getattr(b, f), f"{where}.{f}")
        assert a.ties_used == b.ties_used, f"{where}: ties_used {a.ties_used} != {b.ties_used}"
    elif isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif a is None or b is None:
        assert a is None and b is None, f"{where}: {a!r} vs {b!r}"
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: {type(b).__name__} is not a Tensor"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
        if a.is_floating_point():  # compare bit patterns: -0.0 vs 0.0 and NaNs count
            as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            same = a.view(as_int) == b.view(as_int)
        else:
            same = a == b
        if not bool(same.all()):
            bad = torch.nonzero(~same).flatten()[:5]
            raise AssertionError(
                f"{where}: {int((~same).sum())} / {same.numel()} elements differ, first at "
                f"{bad.tolist()}: {a[bad].tolist()} vs {b[bad].tolist()}"
            )
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_compacted(got: Compacted, want: Compacted, rtol: float | None = None, where=""):
    """A compaction against the expected one: tracked set, group pointers, tie count and histogram
    exactly; values and momentum bit for bit (``rtol=None``) or to ``rtol`` relative to their
    largest magnitude."""
    assert isinstance(got, Compacted), f"{where}: {type(got).__name__} is not a Compacted"
    assert got.bits.dtype == torch.uint8 and got.group_ptr.dtype == torch.int64, where
    assert_same(got.bits, want.bits, f"{where} tracked set (bits)")
    assert_same(got.group_ptr, want.group_ptr, f"{where} group_ptr")
    assert got.ties_used == want.ties_used, (
        f"{where}: ties_used {got.ties_used} != {want.ties_used}"
    )
    assert_same(got.histogram, want.histogram, f"{where} histogram")
    for name in ("values", "momentum"):
        a, b = getattr(got, name), getattr(want, name)
        if rtol is None or b is None or a is None:
            assert_same(a, b, f"{where} {name}")
            continue
        scale = float(b.abs().max()) if b.numel() else 0.0
        assert_close_verbose(a.cpu(), b.cpu(), rtol=rtol, atol=rtol * scale)
