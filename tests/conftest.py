"""Shared test setup: the Triton interpreter and the fixtures (helpers live in ``tests/helpers``).

Triton kernels run through Triton's CPU interpreter when no GPU is present, so the variable must be
set before anything imports triton.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded_rng():
    """Every test starts from the same global torch RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def poison(monkeypatch):
    """Tensors allocated with ``torch.empty`` / ``torch.empty_like`` (the kernels' outputs) start
    as NaN (floating), 0xFF (uint8) or -1 (other integers) instead of whatever was there, so that
    an element a kernel never wrote cannot pass for a right one."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(0xFF)
        elif t.dtype != torch.bool:
            t.fill_(-1)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


@pytest.fixture
def no_tf32():
    """On a GPU, float32 products without TF32 (cuBLAS / cuDNN and the kernels alike, which follow
    PyTorch's settings), so that they compare with float32 references at float32 tolerances."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
