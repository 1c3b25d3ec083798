"""The kernels: one set of ops, three backends, PyTorch's dispatcher in front.

* :mod:`.contract`: what the backends agree on (op names, :class:`Segment`, :class:`StepParams`,
  :class:`Compacted`, the constants of the score statistics).
* :mod:`.update`: the weight ops of a training step (materialise, scores, histograms, compaction),
  one file per backend: ``reference.py`` (the definition), ``cpp.py`` (``csrc/``),
  ``triton_kernels.py``.
* :mod:`.compute`: the sparse linear / conv forward and input gradient from the compressed weight
  (``reference.py``, ``cpp.py``, ``triton_linear.py``, ``triton_conv.py``), the sampled weight
  gradients (SDDMM) and their tile index (``index.py``).
* :mod:`.dispatch`: which backend runs an op on which device, and the one fallback.
* :mod:`.library`: every op as a ``procrustes::`` custom op, and the functions below, which the
  rest of the package calls.
"""

from __future__ import annotations

from .contract import (
    COMPUTE_OPS,
    GRAD_OPS,
    RADIX_HIGH_BINS,
    RADIX_LOW_BINS,
    UPDATE_OPS,
    Compacted,
    Segment,
    StepParams,
)
from .dispatch import (
    BACKENDS,
    available_backends,
    backend_error,
    backend_for,
    backend_ops,
    kernel,
    set_backend,
    use_backend,
)
from .library import (
    compact,
    compact_mask,
    eager,
    log_histogram,
    materialize,
    paper_walk,
    radix_histogram,
    scores,
    sddmm_conv2d,
    sddmm_linear,
    sparse_conv2d,
    sparse_conv2d_t,
    sparse_linear,
    sparse_linear_t,
)

__all__ = [
    "BACKENDS",
    "UPDATE_OPS",
    "COMPUTE_OPS",
    "GRAD_OPS",
    "available_backends",
    "backend_error",
    "backend_for",
    "backend_ops",
    "kernel",
    "set_backend",
    "use_backend",
    "eager",
    "Segment",
    "StepParams",
    "Compacted",
    "RADIX_HIGH_BINS",
    "RADIX_LOW_BINS",
    "materialize",
    "scores",
    "log_histogram",
    "radix_histogram",
    "compact",
    "compact_mask",
    "paper_walk",
    "sparse_linear",
    "sparse_linear_t",
    "sparse_conv2d",
    "sparse_conv2d_t",
    "sddmm_linear",
    "sddmm_conv2d",
]
