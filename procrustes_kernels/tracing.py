"""``torch.compile`` with budgeted weights.

A budgeted weight's tracked count changes from step to step (the quantile selection moves it, a
global budget shifts between layers). TorchDynamo keeps every tensor reached through a parameter
or an nn module static by default (``force_parameter_static_shapes``,
``force_nn_module_property_static_shapes``), so each new count would compile a new graph until the
recompile limit, after which the model runs eagerly. :func:`dynamic_tracked_counts` lifts both for
the code it wraps; every budgeted weight marks its ``values`` as dynamic in size, so one graph
serves every count (a second one is compiled when untracked weights become zeros).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["dynamic_tracked_counts"]


@contextlib.contextmanager
def dynamic_tracked_counts() -> Iterator[None]:
    """Context manager for the calls of a ``torch.compile``-d model with budgeted weights (the
    training loop): tracked counts become dynamic sizes instead of a recompile per count.

    It changes only two TorchDynamo settings, and only inside the block: tensors reached through
    parameters and modules may then take dynamic sizes where their size changes between calls (a
    dense parameter never does, so its graphs are the same).
    """
    with torch._dynamo.config.patch(
        force_parameter_static_shapes=False, force_nn_module_property_static_shapes=False
    ):
        yield
