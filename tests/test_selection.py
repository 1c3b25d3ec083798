"""Selection rules: exact top-k with its tie rule, the histogram quantile estimator, the paper's walk."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from procrustes_kernels.selection import (
    HIST_BINS,
    PaperQuantileSelector,
    QuantileSelector,
    bin_edges,
    score_histogram,
    threshold_from_histogram,
    topk_mask,
)


def _topk_by_stable_sort(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Independent oracle: stable descending sort keeps equal scores in index order."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    order = order[scores[order] > 0]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[order] = True
    return mask


def test_topk_golden():
    s = torch.tensor([0.5, 0.2, 0.5, 0.0, 0.9])
    assert topk_mask(s, 1).tolist() == [False, False, False, False, True]
    # Tie at the k-th score goes to the lower index.
    assert topk_mask(s, 2).tolist() == [True, False, False, False, True]
    assert topk_mask(s, 3).tolist() == [True, False, True, False, True]
    # Zero scores are never tracked, even when the budget allows.
    assert topk_mask(s, 5).tolist() == [True, True, True, False, True]
    assert topk_mask(s, 0).tolist() == [False] * 5


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300), k=st.integers(0, 320), levels=st.integers(1, 6), seed=st.integers(0, 999)
)
def test_topk_matches_stable_sort_with_many_ties(n, k, levels, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, levels, (n,), generator=g).float() / 4  # heavy ties, some zeros
    mask = topk_mask(s, k)
    assert torch.equal(mask, _topk_by_stable_sort(s, k))
    assert int(mask.sum()) == min(k, int((s > 0).sum()))


def test_topk_bad_arguments():
    with pytest.raises(ValueError, match="1-D"):
        topk_mask(torch.zeros(2, 2), 1)
    with pytest.raises(ValueError, match="k >= 0"):
        topk_mask(torch.zeros(3), -1)


def test_histogram_bins_golden():
    # 1.0 has float32 bits 0x3F800000: exponent 127 -> first bin of the 2**0 octave, which is
    # 40 octaves of 32 bins above the lowest edge 2**-40.
    hist = score_histogram(torch.tensor([1.0, 1.0 + 1 / 64, 1.5, 0.0, 1e-30, 1e30]))
    assert hist.numel() == HIST_BINS
    assert hist[40 * 32] == 2  # 1.0 and 1.015625 share the bin [1, 1 + 1/32)
    assert hist[40 * 32 + 16] == 1  # 1.5
    assert hist[0] == 2  # zero and scores below 2**-40 collect in bin 0
    assert hist[-1] == 1  # above the range: last bin
    assert bin_edges(40 * 32) == (1.0, 1.03125)
    assert bin_edges(0)[0] == 0.0


def test_threshold_interpolates_inside_bin():
    # 100 scores in one bin [1, 1.03125): a tail of 25 puts theta a quarter of the way down.
    hist = torch.zeros(HIST_BINS, dtype=torch.int64)
    hist[40 * 32] = 100
    hist[40 * 32 + 32] = 10  # ten scores in [2, 2.0625)
    assert threshold_from_histogram(hist, 10) == 2.0
    expected = np.float32(1.03125 - 0.25 * 0.03125)
    assert threshold_from_histogram(hist, 35) == float(expected)
    assert threshold_from_histogram(hist, 500) == 0.0  # fewer elements than the target


def test_quantile_is_order_independent():
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(20_000, generator=g)
    a, b = QuantileSelector(), QuantileSelector()
    for step in range(5):
        s = torch.rand(20_000, generator=g) * (1 + 0.1 * step)
        ma = a.select(s, 2_000)
        mb = b.select(s[perm], 2_000)
        assert torch.equal(ma[perm], mb)
        assert a.theta == b.theta


@pytest.mark.parametrize("n", [50_000, 400_003])
def test_quantile_count_stays_near_budget_under_drift(n):
    """Scores |N(0, sigma_t)| with sigma growing 2% per step, the case the estimator was built for."""
    g = torch.Generator().manual_seed(0)
    k = n // 10
    sel = QuantileSelector(warmup_steps=1)  # from step 2 on, only the carried threshold
    counts = []
    for step in range(30):
        s = torch.randn(n, generator=g).abs() * (1.02**step)
        counts.append(int(sel.select(s, k).sum()))
    assert abs(counts[0] - k) <= 0.01 * k  # first step reads its own histogram
    assert all(0.93 * k <= c <= 1.07 * k for c in counts[3:]), counts


def test_quantile_state_round_trip():
    s = torch.rand(1000)
    a = QuantileSelector()
    a.select(s, 100)
    a.select(s * 1.1, 100)
    b = QuantileSelector()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.select(s * 1.2, 100), b.select(s * 1.2, 100))
    assert a.state_dict() == b.state_dict()


def test_paper_walk_golden():
    sel = PaperQuantileSelector(theta0=0.5, lam=0.5)
    # k/N = 1/2 -> q = 0.5: kept -> theta *= 1.25, not kept -> theta *= 0.75.
    mask = sel.select(torch.tensor([0.6, 0.6, 0.1, 0.7]), 2)
    # 0.6 > 0.5 keep (0.625); 0.6 < 0.625 drop (0.46875); 0.1 drop (0.3515625); 0.7 keep.
    assert mask.tolist() == [True, False, False, True]
    assert sel.theta == pytest.approx(0.3515625 * 1.25)


def test_paper_walk_bad_arguments():
    with pytest.raises(ValueError, match="theta0"):
        PaperQuantileSelector(theta0=0)
    with pytest.raises(ValueError, match="lam"):
        PaperQuantileSelector(lam=2)
