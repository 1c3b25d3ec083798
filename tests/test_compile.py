"""The kernels as torch.library custom ops, and torch.compile of a sparsified model.

``procrustes::materialize`` is checked with ``torch.library.opcheck`` (schema, fake
implementation, autograd registration, AOT dispatch) on every CPU backend, the Triton one through
the interpreter; then a conv + linear model with budgeted weights is traced without graph breaks,
compiled with ``fullgraph=True``, and trained compiled to the same weights as eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import procrustes_kernels as pk
from procrustes_kernels.ops import available_backends, use_backend
from procrustes_kernels.storage import BlockStorage

BACKENDS = [b for b, ok in available_backends().items() if ok]
# Triton runs on CUDA tensors where there is a GPU, through the interpreter on CPU tensors otherwise.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _weight(numel_shape=(7, 45), density=0.3, scale=0.6, seed=3):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(numel_shape, generator=g)
    mask = torch.rand(numel_shape, generator=g) < density
    return BlockStorage.from_mask(dense, mask, 16), torch.tensor(scale, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.6, 0.0])
def test_materialize_op_passes_opcheck_and_matches_the_reference(backend, scale):
    st, s = _weight(scale=scale)
    if backend == "triton":
        st, s = st.to(DEV), s.to(DEV)
    args = (st.values, st.bits, st.group_ptr, s, 12345, 0.125, st.numel, scale != 0.0)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.procrustes.materialize, args)
        got = torch.ops.procrustes.materialize(*args)
    want = pk.ops.update.reference.materialize(
        12345, 0.125, scale, st.values, st.bits, st.group_ptr, st.numel, torch.float32
    )
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0)


def test_materialize_op_golden_tiny_case():
    # 10 weights, elements 1 and 8 tracked: every other one is scale * w0.
    st = BlockStorage.from_indices((10,), 4, torch.tensor([1, 8]), torch.tensor([5.0, -2.0]))
    w0 = pk.init_values(7, 10, 0.5)
    out = torch.ops.procrustes.materialize(
        st.values, st.bits, st.group_ptr, torch.tensor(0.5), 7, 0.5, 10, True
    )
    want = w0 * 0.5
    want[1], want[8] = 5.0, -2.0
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def _cnn():
    torch.manual_seed(0)
    return pk.sparsify(
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
        ),
        seed=0,
    )


def _batch(i=0):
    g = torch.Generator().manual_seed(i)
    return torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


@pytest.mark.parametrize("trained", [False, True])
def test_forward_and_backward_trace_without_graph_breaks(trained):
    model = _cnn()
    if trained:  # tracked sets and a decay factor below 1
        opt = pk.Procrustes(model.parameters(), lr=0.1, budget=0.2, momentum=0.9, decay_steps=4)
        for i in range(2):
            opt.zero_grad()
            x, y = _batch(i)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert 0 < model[0].weight.scale_value < 1 and model[0].weight.nnz > 0
        model.zero_grad()
    x, y = _batch(5)

    def loss(x):
        return F.cross_entropy(model(x), y)

    explained = torch._dynamo.explain(loss)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(x)
    got.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = loss(x)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        assert type(g) is torch.Tensor
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_compiled_model_trains_to_the_eager_weights():
    eager = _cnn()
    comp = copy.deepcopy(eager)
    opts = [pk.DropBack(m.parameters(), lr=0.1, budget=0.1, momentum=0.9) for m in (eager, comp)]
    fwd = torch.compile(comp)
    for i in range(4):
        x, y = _batch(i)
        for model, opt in ((eager, opts[0]), (fwd, opts[1])):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(eager.parameters(), comp.parameters()):
        a = a.effective() if pk.is_budgeted(a) else a.detach()
        b = b.effective() if pk.is_budgeted(b) else b.detach()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["dropback", "procrustes"])
def test_tracked_counts_are_dynamic_sizes_not_recompiles(method):
    import torch._dynamo.utils as dynamo_utils

    eager = _cnn()
    comp = copy.deepcopy(eager)

    def make(m):
        if method == "dropback":
            return pk.DropBack(m.parameters(), lr=0.1, budget=0.1, momentum=0.9)
        return pk.Procrustes(m.parameters(), lr=0.1, budget=0.1, momentum=0.9, decay_steps=4)

    opts = [make(eager), make(comp)]
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    fwd = torch.compile(comp)
    counts = set()
    with pk.dynamic_tracked_counts():
        for i in range(10):
            x, y = _batch(i)
            for model, opt in ((eager, opts[0]), (fwd, opts[1])):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            counts.add(tuple(w.nnz for w in opts[1].weights))
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    assert len(counts) > 3  # the counts did change from step to step
    # nothing tracked at the first call; one graph for every count after it; for Procrustes one
    # more once untracked weights are zeros
    assert graphs <= (2 if method == "dropback" else 3), graphs
    for a, b in zip(eager.parameters(), comp.parameters()):
        a = a.effective() if pk.is_budgeted(a) else a.detach()
        b = b.effective() if pk.is_budgeted(b) else b.detach()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
