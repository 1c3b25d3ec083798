"""How closely each backend must reproduce the reference: one table, :data:`TOLERANCES`, used by
``test_backend_equivalence.py`` and by the backend-specific test files.

Whatever the backend, these are exact: the effective weight (:func:`materialize`); the
histograms, as the reference bins the backend's own scores (so they are the reference's histograms
but for the scores that differ, :func:`assert_histogram`); the tracked sets, group pointers and tie
counts of a compaction (thresholds are chosen so that they do not depend on the last bit of a
score, see :attr:`Tolerance.ties_at_scores`); and the paper walk. The table says the rest:

* ``cpp``: bit for bit everywhere (it even follows this PyTorch build's choice of fusing
  ``a.add(b, alpha=s)`` into one multiply-add).
* ``triton``: the candidate ``c = W - lr m`` is rounded twice where the reference may round once
  (the product ``lr m`` on its own), so scores agree to one rounding of each of the candidate's
  terms (``|W| <= |c| + lr |m|``) and of the score itself, zero scores exactly; compacted
  values and momentum to a relative ``values_rtol`` of their largest magnitude; the sparse compute
  ops to the rounding of a float32 sum (any summation order) and of the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .compare import assert_close_verbose, assert_compacted, assert_same

__all__ = ["Tolerance", "TOLERANCES", "assert_histogram"]


@dataclass(frozen=True)
class Tolerance:
    # Scores: None for bit for bit, else (a, b): |got - want| <= a (|c| + lr |m|) + b |want| + 1e-45
    # (c, m: the reference's candidate and momentum), and got == 0 exactly where want == 0.
    scores: tuple[float, float] | None
    # Compacted values and momentum, by the layer dtype: None for bit for bit.
    values_rtol: dict[torch.dtype, float] | None
    # Sparse compute outputs, by the input dtype (atol = rtol * max(1, max |want|)); None: exact.
    compute_rtol: dict[torch.dtype, float] | None
    # Whether thresholds equal to a score value (ties decided by its last bit) can be used.
    ties_at_scores: bool
    # The optimizer's stored values, momentum and effective weights over a training run.
    training_rtol: float | None

    def assert_scores(self, got, want, c, m, lr: float, where=""):
        """``got`` against the reference's scores ``want`` of candidates ``c`` and momenta ``m``
        (``update.reference.candidates``) of a step with learning rate ``lr``."""
        assert got.dtype == torch.float32 and got.shape == want.shape, where
        got, want = got.cpu(), want.cpu()
        assert not got.isnan().any() or want.isnan().any(), f"{where}: an element was not written"
        if self.scores is None:
            assert_same(got, want, where)
            return
        # Zero scores are exact (an untouched weight's candidate is its untracked value) ...
        assert torch.equal(got == 0, want == 0), f"{where}: zero scores differ"
        # ... the others up to one rounding of each term of c = W - lr m and of the score itself.
        a, b = self.scores
        terms = c.cpu().double().abs() + lr * m.cpu().double().abs()
        tol = a * terms + b * want.double().abs() + 1e-45
        err = (got.double() - want.double()).abs()
        assert torch.all(err <= tol), (
            f"{where}: max error {float(err.max())}, worst at {int((err - tol).argmax())}"
        )

    def assert_compacted(self, got, want, dtype: torch.dtype, where=""):
        rtol = None if self.values_rtol is None else self.values_rtol[dtype]
        assert_compacted(got, want, rtol, where)
        assert got.values.dtype == dtype, f"{where}: values of dtype {got.values.dtype}"

    def assert_compute(self, got: torch.Tensor, want: torch.Tensor, where=""):
        got, want = got.cpu(), want.cpu()
        if self.compute_rtol is None:
            assert_same(got, want, where)
            return
        rtol = self.compute_rtol[want.dtype]
        scale = float(want.abs().max()) if want.numel() else 0.0
        assert_close_verbose(got, want, rtol=rtol, atol=rtol * max(scale, 1.0))

    def assert_trained(self, got: torch.Tensor, want: torch.Tensor, where=""):
        if self.training_rtol is None:
            assert_same(got, want, where)
            return
        scale = float(want.abs().max()) if want.numel() else 0.0
        rtol = self.training_rtol
        assert_close_verbose(got.cpu(), want.cpu(), rtol=rtol, atol=rtol * scale)


def assert_histogram(
    got: torch.Tensor, want: torch.Tensor, own: torch.Tensor, moved: int, where=""
) -> None:
    """A backend's histogram ``got`` of its scores: exactly ``own`` (the reference's binning of the
    backend's own scores), and the reference's ``want`` up to the ``moved`` scores that differ from
    the reference's (each moves one count at most); bit-for-bit scores make it ``want`` exactly."""
    assert_same(got, own, f"{where} (the binning of its own scores)")
    diff = int((got.cpu() - want.cpu()).abs().sum())
    assert diff <= 2 * moved, f"{where}: {diff} counts differ, {moved} scores do"


TOLERANCES = {
    "cpp": Tolerance(
        scores=None,
        values_rtol=None,
        # The update ops are bit-identical; the compute ops sum in another order (float32).
        compute_rtol={torch.float32: 1e-5},
        ties_at_scores=True,
        training_rtol=None,
    ),
    "triton": Tolerance(
        scores=(2.0**-22, 2.0**-23),
        values_rtol={
            torch.float64: 1e-12,
            torch.float32: 1e-6,
            torch.float16: 1e-2,
            torch.bfloat16: 1e-2,
        },
        compute_rtol={torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2},
        ties_at_scores=False,
        training_rtol=1e-6,
    ),
}
