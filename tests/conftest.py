"""Shared test setup.

Triton kernels run through Triton's CPU interpreter when no GPU is present, so the variable must be
set before anything imports triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------------------------------------
# shared helpers (added for tests/test_layers.py)
# ---------------------------------------------------------------------------------------------

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_rng():
    """Every test starts from the same global torch RNG state."""
    torch.manual_seed(0)
    yield


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
