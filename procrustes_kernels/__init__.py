"""procrustes_kernels: train PyTorch networks on a pruned weight budget.

DropBack trains only the weights that moved most from their initial value and regenerates every
other weight from a seed; Procrustes lets the initial values decay to zero, selects with a quantile
estimate instead of a sort, and keeps weights in a block format that serves W and W^T.

Quick use::

    import procrustes_kernels as pk
    pk.sparsify(model, seed=0)  # nn.Linear / nn.Conv2d / attention weights become budgeted
    opt = pk.DropBack(model.parameters(), lr=0.1, budget=0.1)  # or pk.Procrustes(...)
"""

from .convert import densify, set_compute, sparsify
from .data import Dataset, load_cifar10, load_dataset, load_digits, load_mnist
from .gradient import TrackedGradient
from .layers import SparseConv2d, SparseLinear
from .optim import DropBack, Procrustes, decay_factor, decay_for_steps, linear_decay_factor
from .philox import derive_seed, init_values, philox_uniform
from .storage import BlockStorage
from .tracing import dynamic_tracked_counts
from .weight import BudgetedWeight, budgeted_weights, is_budgeted

__version__ = "0.1.0"

__all__ = [
    "BlockStorage",
    "BudgetedWeight",
    "Dataset",
    "DropBack",
    "Procrustes",
    "SparseConv2d",
    "SparseLinear",
    "TrackedGradient",
    "budgeted_weights",
    "decay_factor",
    "decay_for_steps",
    "densify",
    "derive_seed",
    "dynamic_tracked_counts",
    "init_values",
    "is_budgeted",
    "linear_decay_factor",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "philox_uniform",
    "set_compute",
    "sparsify",
]
