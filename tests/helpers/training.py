"""Small models, batches and the training loop of the optimizer tests, and exact comparisons of
what a model and its optimizer store."""

from __future__ import annotations

import copy
import io

import torch
import torch.nn.functional as F
from torch import nn

import procrustes_kernels as pk

__all__ = [
    "mlp",
    "cnn",
    "make",
    "batches",
    "train",
    "sparse_weights",
    "budgeted_modules",
    "save_bytes",
    "snapshot",
    "assert_same_tensor",
    "assert_same_state",
]


def mlp(*widths: int) -> nn.Module:
    """Linear layers of the given widths with ReLUs between them (default 20-33-17-5)."""
    widths = widths or (20, 33, 17, 5)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.ReLU()] if i else []
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def cnn(channels: int = 7, groups: int = 1) -> nn.Module:
    """Two convolutions (the second strided, without bias, in ``groups``) and a linear head, for
    ``[B, 2, 8, 8]`` inputs and 5 classes."""
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, channels, 3, stride=2, groups=groups, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 3 * 3, 5),
    )


def make(kind: str, seed: int = 3, **cnn_kw) -> nn.Module:
    """``mlp()`` or ``cnn(**cnn_kw)``, sparsified with ``seed``, from ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    return pk.sparsify(mlp() if kind == "mlp" else cnn(**cnn_kw), seed=seed)


def batches(kind: str, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of 16 for :func:`make`'s models (5 classes)."""
    g = torch.Generator().manual_seed(seed)
    shape = (16, 20) if kind == "mlp" else (16, 2, 8, 8)
    return [
        (torch.randn(shape, generator=g), torch.randint(0, 5, (16,), generator=g))
        for _ in range(steps)
    ]


def train(model, opt, data, steps, start=0, on_step=None) -> None:
    """Steps ``start .. start + steps - 1`` on ``data[n]`` with cross-entropy; ``on_step(n)``
    after each."""
    for n in range(start, start + steps):
        x, y = data[n]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if on_step is not None:
            on_step(n)


def sparse_weights(model) -> list[torch.Tensor]:
    """The effective weight of every budgeted weight, in model order."""
    return [w.effective() for _, w in pk.budgeted_weights(model)]


def budgeted_modules(model) -> list[nn.Module]:
    """The modules whose weight is budgeted, in model order (for their biases)."""
    return [m for m in model.modules() if pk.is_budgeted(getattr(m, "weight", None))]


def save_bytes(model, opt) -> bytes:
    """``torch.save`` of the model's and the optimizer's state dicts."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    return buf.getvalue()


def snapshot(model, opt):
    """Deep copies of the model's and the optimizer's state dicts."""
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def assert_same_tensor(a, b, key="") -> None:
    """Bitwise equality; for budgeted weights of everything stored (tracked set, seed, scale),
    not only of the effective weight."""
    assert pk.is_budgeted(a) == pk.is_budgeted(b), key
    if pk.is_budgeted(a):
        assert a.seed == b.seed and a.scale_value == b.scale_value, key
        for inner in ("values", "bits", "group_ptr", "scale"):
            assert torch.equal(getattr(a, inner), getattr(b, inner)), (key, inner)
    assert torch.equal(a, b), key


def assert_same_state(a, b) -> None:
    """Two :func:`snapshot` s are the same: every tensor, the optimizer's extra state, groups."""
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for key in ma:
        assert_same_tensor(ma[key], mb[key], key)
    assert oa["dropback"] == ob["dropback"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for key, value in oa["state"][i].items():
            assert _same_bits(value, ob["state"][i][key]), (i, key)


_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (a NaN equals the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = _INT_OF[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)
