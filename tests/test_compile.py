"""The kernels as torch.library custom ops, and torch.compile of a sparsified model.

Every ``procrustes::`` op is checked with ``torch.library.opcheck`` (schema, fake implementation,
autograd registration, AOT dispatch) on every backend, the Triton one through the interpreter;
then a conv + linear model with budgeted weights is traced without graph breaks (materialise path
and sparse-kernel path), compiled with ``fullgraph=True``, and trained compiled to the same
weights as eager.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import procrustes_kernels as pk
from procrustes_kernels.ops import available_backends, use_backend
from procrustes_kernels.ops.compute import reference as compute_reference
from procrustes_kernels.ops.compute.index import cached_tile_index
from procrustes_kernels.ops.contract import Regen
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


# ----------------------------------------------------------------------- every op a custom op
def _segment(n=1000, density=0.2, momentum=True, seed=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=g) < density
    st = BlockStorage.from_mask(torch.randn(n, generator=g), mask, 1)
    mom = torch.randn(st.values.numel(), generator=g) if momentum else None
    grad = torch.randn(n, generator=g) * 0.1
    seg = pk.ops.Segment(
        seed=11,
        bound=0.05,
        numel=n,
        values=st.values,
        bits=st.bits,
        group_ptr=st.group_ptr,
        grad=grad,
        momentum=mom,
        scale_prev=0.9,
    )
    return seg, pk.ops.StepParams(
        lr=0.1, momentum=0.9 if momentum else 0.0, weight_decay=1e-3, scale=0.81
    )


def _on(dev, seg):
    return dataclasses.replace(
        seg,
        values=seg.values.to(dev),
        bits=seg.bits.to(dev),
        group_ptr=seg.group_ptr.to(dev),
        grad=seg.grad.to(dev),
        momentum=None if seg.momentum is None else seg.momentum.to(dev),
        scratch={},
    )


def _flat_args(seg, p):
    from procrustes_kernels.ops.library import _flat

    return _flat(seg, p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [True, False])
def test_update_ops_pass_opcheck(backend, momentum):
    seg, p = _segment(momentum=momentum)
    if backend == "triton":
        seg = _on(DEV, seg)
    args = _flat_args(seg, p)
    keep = torch.rand(seg.numel, generator=torch.Generator().manual_seed(1)) < 0.1
    high = int(pk.ops.update.reference.scores(seg, p).view(torch.int32).max()) >> 16
    cases = {
        "scores": args,
        "log_histogram": args,
        "radix_histogram": (*args, -1),
        "compact": (*args, 0.01, 3, True),
        "compact_mask": (*args, keep.to(seg.grad.device)),
    }
    with use_backend(backend):
        for name, a in cases.items():
            torch.library.opcheck(getattr(torch.ops.procrustes, name), a)
        torch.library.opcheck(torch.ops.procrustes.radix_histogram, (*args, high))
        torch.library.opcheck(
            torch.ops.procrustes.paper_walk, (torch.rand(300, dtype=torch.float64), 0.3, 1e-3, 30)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_ops_traced_equal_eager(backend):
    # Through the custom op (a dispatch mode forces it) and directly: the same results.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    seg, p = _segment()
    if backend == "triton":
        seg = _on(DEV, seg)
    keep = (torch.arange(seg.numel) % 7 == 0).to(seg.grad.device)
    with use_backend(backend):
        want = [
            pk.ops.scores(seg, p),
            pk.ops.log_histogram(seg, p),
            pk.ops.radix_histogram(seg, p),
            pk.ops.compact(_on(seg.grad.device, seg), p, 0.01, 2, True),
            pk.ops.compact_mask(seg, p, keep),
        ]
        with Passthrough():
            assert not pk.ops.eager(seg.values)
            got = [
                pk.ops.scores(seg, p),
                pk.ops.log_histogram(seg, p),
                pk.ops.radix_histogram(seg, p),
                pk.ops.compact(_on(seg.grad.device, seg), p, 0.01, 2, True),
                pk.ops.compact_mask(seg, p, keep),
            ]
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)
    for a, b in zip(got[3:], want[3:]):
        for f in ("values", "bits", "group_ptr", "momentum", "histogram"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f
        assert a.ties_used == b.ties_used


def _compressed(rows, cols_k, density=0.3, seed=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows * cols_k, generator=g) < density
    st = BlockStorage.from_mask(torch.randn(rows * cols_k, generator=g), mask, 1)
    return st.values.to(dtype), st.bits


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compute_ops_pass_opcheck(backend):
    if backend == "triton" and not available_backends()["triton"]:
        pytest.skip("Triton is not installed")
    g = torch.Generator().manual_seed(0)
    vals, bits = _compressed(19, 37)
    geo = (19, 37, 1, 1, 16, 16)
    x = torch.randn(5, 37, generator=g)
    dy = torch.randn(5, 19, generator=g)
    cvals, cbits = _compressed(6, 3 * 9)
    cgeo = (6, 3, 9, 1, 16, 16)
    conv = ([3, 3], [1, 1], [1, 1], [1, 1])
    xc = torch.randn(2, 3, 7, 9, generator=g)
    dyc = torch.randn(2, 6, 7, 9, generator=g)
    b = torch.randn(19, generator=g)
    with use_backend(backend):
        t = lambda *ts: [u.to(DEV) if isinstance(u, torch.Tensor) else u for u in ts]  # noqa: E731
        torch.library.opcheck(torch.ops.procrustes.sparse_linear, (*t(x, vals, bits, b), *geo))
        torch.library.opcheck(torch.ops.procrustes.sparse_linear_t, (*t(dy, vals, bits), *geo))
        torch.library.opcheck(
            torch.ops.procrustes.sparse_conv2d, (*t(xc, cvals, cbits), None, *cgeo, *conv)
        )
        torch.library.opcheck(
            torch.ops.procrustes.sparse_conv2d_t, (*t(dyc, cvals, cbits), *cgeo, [7, 9], *conv)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_regenerating_compute_ops_pass_opcheck(backend):
    """The ops' keyword-only regeneration constants (untracked weights ``scale * w0``; a seed
    past 2**63 travels as the int64 of its bits). The C++ backend runs the reference then."""
    if not available_backends()[backend]:
        pytest.skip(f"the {backend} backend is not available here")
    g = torch.Generator().manual_seed(1)
    vals, bits = _compressed(19, 37)
    geo = (19, 37, 1, 1, 16, 16)
    cvals, cbits = _compressed(6, 3 * 9)
    cgeo = (6, 3, 9, 1, 16, 16)
    conv = ([3, 3], [2, 1], [1, 1], [1, 1])
    dev = DEV if backend == "triton" else torch.device("cpu")
    regen = {"regen_scale": torch.tensor(0.6, device=dev), "regen_seed": -7, "regen_bound": 0.4}
    x, dy = torch.randn(5, 37, generator=g), torch.randn(5, 19, generator=g)
    xc, dyc = torch.randn(2, 3, 7, 9, generator=g), torch.randn(2, 6, 4, 9, generator=g)
    t = lambda *ts: [u.to(dev) for u in ts]  # noqa: E731
    P = torch.ops.procrustes
    with use_backend(backend):
        torch.library.opcheck(P.sparse_linear, (*t(x, vals, bits), None, *geo), regen)
        torch.library.opcheck(P.sparse_linear_t, (*t(dy, vals, bits), *geo), regen)
        torch.library.opcheck(P.sparse_conv2d, (*t(xc, cvals, cbits), None, *cgeo, *conv), regen)
        torch.library.opcheck(
            P.sparse_conv2d_t, (*t(dyc, cvals, cbits), *cgeo, [7, 9], *conv), regen
        )
        y = P.sparse_linear(*t(x, vals, bits), None, *geo, **regen)
    index = cached_tile_index(bits, *geo)
    want_regen = Regen(regen["regen_scale"].cpu(), 2**64 - 7, 0.4)
    want = compute_reference.sparse_linear(x, vals, bits, index, regen=want_regen)
    torch.testing.assert_close(y.cpu(), want, rtol=1e-5, atol=1e-6)


def test_every_backend_implements_a_subset_and_falls_back_once():
    from procrustes_kernels.ops import backend_ops, kernel
    from procrustes_kernels.ops.update import reference

    assert backend_ops("reference") == pk.ops.UPDATE_OPS + pk.ops.COMPUTE_OPS + pk.ops.GRAD_OPS
    for name in BACKENDS:
        own = backend_ops(name)
        assert set(own) <= set(backend_ops("reference"))
        with use_backend(name):
            for op in pk.ops.UPDATE_OPS:
                if op not in own:  # e.g. compact_mask on Triton: the reference's, from kernel()
                    assert kernel(op, "cpu") is getattr(reference, op)
    if available_backends()["cpp"]:
        assert "compact" in backend_ops("cpp")
        assert set(pk.ops.COMPUTE_OPS + pk.ops.GRAD_OPS) <= set(backend_ops("cpp"))
    if available_backends()["triton"]:
        assert set(pk.ops.COMPUTE_OPS) <= set(backend_ops("triton"))


# ------------------------------------------------------------ the sparse-kernel path, compiled
def _decayed_cnn():
    model = _cnn()
    opt = pk.Procrustes(model.parameters(), lr=0.1, budget=0.2, momentum=0.9, decay_steps=2)
    for i in range(4):
        opt.zero_grad()
        x, y = _batch(i)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert model[0].weight.scale_value == 0.0 and model[3].weight.scale_value == 0.0
    model.zero_grad()
    pk.set_compute(model, "sparse")
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_kernel_path_traces_without_graph_breaks(backend):
    model = _decayed_cnn()
    x, y = _batch(9)

    def loss(x):
        return F.cross_entropy(model(x), y)

    with use_backend(backend):
        explained = torch._dynamo.explain(loss)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch._dynamo.reset()
        got = torch.compile(loss, fullgraph=True)(x)
        got.backward()
        assert model[0].weight.last_path == model[3].weight.last_path == "sparse"
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        want = loss(x)
        want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_regenerating_kernel_path_traces_without_graph_breaks(backend):
    """DropBack's weights (untracked w0, scale 1) on the kernels that regenerate them: one graph,
    the eager numbers (the decay factor is a saved tensor of the autograd function)."""
    model = _cnn()
    pk.set_compute(model, "sparse")
    assert model[0].weight.regen() is not None
    x, y = _batch(4)

    def loss(x):
        return F.cross_entropy(model(x), y)

    with use_backend(backend):
        explained = torch._dynamo.explain(loss)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch._dynamo.reset()
        got = torch.compile(loss, fullgraph=True)(x)
        got.backward()
        assert model[0].weight.last_path == model[3].weight.last_path == "sparse"
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        want = loss(x)
        want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_sparse_kernel_path_exports_with_the_custom_ops():
    model = _decayed_cnn().eval()
    x, _ = _batch(3)
    prog = torch.export.export(model, (x,))
    targets = {str(n.target) for n in prog.graph.nodes if n.op == "call_function"}
    assert "procrustes.sparse_conv2d.default" in targets
    assert "procrustes.sparse_linear.default" in targets
    torch.testing.assert_close(prog.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_onnx_export_of_the_densified_model():
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package, not installed here")
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript, not installed here")
    import io

    model = _decayed_cnn().eval()
    x, _ = _batch(3)
    want = model(x)
    dense = pk.densify(model)
    assert not any(pk.is_budgeted(p) for p in dense.parameters())
    buf = io.BytesIO()
    torch.onnx.export(dense, (x,), buf)
    assert buf.getbuffer().nbytes > 0
    torch.testing.assert_close(dense(x), want, rtol=1e-5, atol=1e-6)


def test_a_compiled_training_step_runs_the_optimizer_eagerly():
    # Compiling a whole training step (forward, backward, opt.step) works: the step is host-driven
    # and runs eagerly (one graph break), and the weights equal those of the eager loop.
    eager = _cnn()
    comp = copy.deepcopy(eager)
    opts = [pk.DropBack(m.parameters(), lr=0.1, budget=0.1, momentum=0.9) for m in (eager, comp)]

    def train_step(model, opt, x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    compiled_step = torch.compile(train_step)
    with pk.dynamic_tracked_counts():
        for i in range(3):
            x, y = _batch(i)
            want = train_step(eager, opts[0], x, y)
            got = compiled_step(comp, opts[1], x, y)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert opts[1].step_count == 3
    for a, b in zip(eager.parameters(), comp.parameters()):
        a = a.effective() if pk.is_budgeted(a) else a.detach()
        b = b.effective() if pk.is_budgeted(b) else b.detach()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
