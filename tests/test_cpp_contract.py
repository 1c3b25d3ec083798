"""The constants of the C++ backend against the package's.

csrc/common.h defines the group size, the radix digits and the log-spaced score bins once for the
kernels, and csrc/bindings.cpp exports each as an attribute of ``procrustes_kernels._C``; the
Python package defines the same values for the other backends. They must agree: with a mismatch
the C++ backend would index the storage, select or bin scores differently from the others.
"""

import pytest
import torch

from procrustes_kernels.ops import contract

_C = pytest.importorskip(
    "procrustes_kernels._C",
    reason="the C++ extension procrustes_kernels._C is not built (it needs a C++17 compiler and "
    "pybind11; see setup.py)",
)

_NAMES = (
    "GROUP_SIZE",
    "RADIX_HIGH_BINS",
    "RADIX_LOW_BINS",
    "HIST_BINS",
    "HIST_MANTISSA_BITS",
    "HIST_MIN_EXP",
    "HIST_MAX_EXP",
    "HIST_SHIFT",
    "HIST_BASE",
)


@pytest.mark.parametrize("name", _NAMES)
def test_exported_constant_equals_python(name):
    assert hasattr(_C, name), f"_C does not export {name}"
    value = getattr(_C, name)
    assert isinstance(value, int) and not isinstance(value, bool)
    assert value == getattr(contract, name)


def test_radix_digits_split_the_score_bits():
    # 15 high bits (a score's sign bit is 0) and 16 low bits.
    assert _C.RADIX_HIGH_BINS == 1 << 15
    assert _C.RADIX_LOW_BINS == 1 << 16
    assert _C.RADIX_HIGH_BINS * _C.RADIX_LOW_BINS == 1 << 31


def test_log_bin_shift_and_base():
    assert _C.HIST_SHIFT == 23 - _C.HIST_MANTISSA_BITS == 18
    assert _C.HIST_BASE == (127 + _C.HIST_MIN_EXP) << _C.HIST_MANTISSA_BITS == 2784
    assert _C.HIST_BINS == (_C.HIST_MAX_EXP - _C.HIST_MIN_EXP) << _C.HIST_MANTISSA_BITS


def test_log_bins_of_exported_constants_match_python_histogram():
    from procrustes_kernels.selection import score_histogram

    gen = torch.Generator().manual_seed(0)
    # Scores across and beyond the binned range, with exact edges, zero and the extremes.
    scores = torch.cat(
        [
            torch.exp2(torch.empty(4000).uniform_(-45.0, 30.0, generator=gen)),
            torch.tensor([0.0, 2.0**_C.HIST_MIN_EXP, 2.0**_C.HIST_MAX_EXP, 1.0, 3.4e38]),
        ]
    ).to(torch.float32)
    bits = scores.view(torch.int32).to(torch.int64)
    bins = ((bits >> _C.HIST_SHIFT) - _C.HIST_BASE).clamp(0, _C.HIST_BINS - 1)
    expected = torch.bincount(bins, minlength=_C.HIST_BINS)
    assert torch.equal(score_histogram(scores), expected)
