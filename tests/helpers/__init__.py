"""Helpers shared by the test files (``from helpers import ...``; ``tests/`` is on ``sys.path``
through the rootdir conftest).

* :mod:`.compare`: comparisons with readable failures (``assert_close_verbose``, bit-identical
  ``assert_same``, ``assert_compacted`` for :class:`~procrustes_kernels.ops.Compacted` results).
* :mod:`.segments`: inputs of the update ops (random and hand-made :class:`Segment` s, thresholds)
  and of the compute ops (compressed weights with their tile index).
* :mod:`.training`: the small models, batches and training loop of the optimizer tests, and exact
  comparisons of saved states.
* :mod:`.tolerances`: how closely each backend must reproduce the reference (one table).
* :mod:`.sm90`: compile a Triton kernel snippet for sm_90 in a subprocess, without a GPU.

Fixtures (``poison``, the seeded RNG) stay in ``conftest.py``.
"""

from .compare import assert_close_verbose, assert_compacted, assert_same
from .segments import (
    BOUND,
    DEVICE,
    PARAMS,
    SEED,
    compressed_weight,
    gap_threshold,
    index_to,
    random_mask,
    random_segment,
    random_weight,
    segment_from_mask,
    segment_to,
    threshold_with_ties,
)
from .sm90 import compile_for_sm90, without_gpu
from .tolerances import TOLERANCES, Tolerance, assert_histogram
from .training import (
    assert_same_state,
    assert_same_tensor,
    batches,
    budgeted_modules,
    cnn,
    make,
    mlp,
    save_bytes,
    snapshot,
    sparse_weights,
    train,
)

__all__ = [
    "BOUND",
    "DEVICE",
    "PARAMS",
    "SEED",
    "TOLERANCES",
    "Tolerance",
    "assert_close_verbose",
    "assert_compacted",
    "assert_histogram",
    "assert_same",
    "assert_same_state",
    "assert_same_tensor",
    "batches",
    "budgeted_modules",
    "cnn",
    "compile_for_sm90",
    "compressed_weight",
    "gap_threshold",
    "index_to",
    "make",
    "mlp",
    "random_mask",
    "random_segment",
    "random_weight",
    "save_bytes",
    "segment_from_mask",
    "segment_to",
    "snapshot",
    "sparse_weights",
    "threshold_with_ties",
    "train",
    "without_gpu",
]
