"""DistributedDataParallel over a sparsified model: 2 gloo processes on the CPU (loopback).

DDP all-reduces the dense gradients of the budgeted weights like any gradient; every rank then
runs the same deterministic update, so ranks stay bit-identical. One spawn runs every scenario
(each rank writes its results to a file, the test compares them):

* DropBack / Procrustes x topk / quantile, 15 steps on different data per rank: ranks identical;
* step 1 of the 2-process run against one process on both ranks' data (mean loss);
* ``no_sync()`` gradient accumulation against one process on the accumulated gradient;
* a rank-0 checkpoint after 5 steps resumed on both ranks: bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import procrustes_kernels as pk

WORLD = 2
CONFIGS = [
    ("dropback", "topk"),
    ("dropback", "quantile"),
    ("procrustes", "topk"),
    ("procrustes", "quantile"),
]


def _model() -> nn.Module:
    torch.manual_seed(0)  # biases and dense layers: the same on every rank, as a user seeds them
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )
    return pk.sparsify(net, seed=0)


def _opt(kind: str, selection: str, params):
    kw = dict(lr=0.1, budget=0.2, momentum=0.9, selection=selection)
    if kind == "dropback":
        return pk.DropBack(params, **kw)
    return pk.Procrustes(params, decay_steps=6, **kw)


def _batch(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _state(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [(p.effective() if pk.is_budgeted(p) else p.detach()).flatten() for p in model.parameters()]
    )


def _train(ddp, opt, rank: int, steps: range) -> None:
    for i in steps:
        x, y = _batch(1000 * i + rank)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # two ranks share the cores: no oversubscribed thread pools
    if pk.ops.available_backends()["cpp"]:
        from procrustes_kernels.ops.update import cpp

        cpp.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    results: dict = {}
    try:
        # 1. ranks stay identical
        for kind, selection in CONFIGS:
            model = _model()
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = _opt(kind, selection, ddp.parameters())
            _train(ddp, opt, rank, range(15))
            results[f"{kind}-{selection}"] = (_state(model), opt.layer_counts, opt.step_count)

        # 2. step 1 against one process on both ranks' data
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = _opt("procrustes", "topk", ddp.parameters())
        _train(ddp, opt, rank, range(1))
        results["step1"] = _state(model)

        # 3. no_sync: two micro-batches per rank, the gradient all-reduced once
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = _opt("dropback", "topk", ddp.parameters())
        opt.zero_grad()
        with ddp.no_sync():
            x, y = _batch(50 + rank)
            F.cross_entropy(ddp(x), y).backward()
        x, y = _batch(60 + rank)
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        results["no_sync"] = _state(model)

        # 4. checkpoint on rank 0 after 5 steps, resume on every rank
        path = os.path.join(out_dir, "ckpt.pt")
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = _opt("procrustes", "quantile", ddp.parameters())
        _train(ddp, opt, rank, range(5))
        if rank == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        dist.barrier()
        _train(ddp, opt, rank, range(5, 10))
        results["uninterrupted"] = _state(model)
        resumed = _model()
        ckpt = torch.load(path)
        resumed.load_state_dict(ckpt["model"])
        ddp = nn.parallel.DistributedDataParallel(resumed)
        opt = _opt("procrustes", "quantile", ddp.parameters())
        opt.load_state_dict(ckpt["opt"])
        _train(ddp, opt, rank, range(5, 10))
        results["resumed"] = _state(resumed)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 150  # a hung rank fails the test instead of stalling the suite
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the 2-process run did not finish within 150 s")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("config", [f"{k}-{s}" for k, s in CONFIGS])
def test_ranks_stay_bit_identical_on_different_data(ranks, config):
    (a, counts_a, steps_a), (b, counts_b, steps_b) = ranks[0][config], ranks[1][config]
    assert steps_a == steps_b == 15
    assert counts_a == counts_b and sum(counts_a) > 0
    assert torch.equal(a, b)


def test_first_step_equals_one_process_on_both_ranks_data(ranks):
    model = _model()
    opt = _opt("procrustes", "topk", model.parameters())
    xs, ys = zip(*(_batch(r) for r in range(WORLD)))
    opt.zero_grad()
    F.cross_entropy(model(torch.cat(xs)), torch.cat(ys)).backward()  # the mean over both ranks
    opt.step()
    want = _state(model)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["step1"], want, rtol=1e-5, atol=1e-6)


def test_no_sync_accumulation_equals_one_process(ranks):
    model = _model()
    opt = _opt("dropback", "topk", model.parameters())
    opt.zero_grad()
    for r in range(WORLD):  # each rank's two micro-batch gradients, averaged over the ranks
        for seed in (50 + r, 60 + r):
            x, y = _batch(seed)
            (F.cross_entropy(model(x), y) / WORLD).backward()
    opt.step()
    want = _state(model)
    assert torch.equal(ranks[0]["no_sync"], ranks[1]["no_sync"])
    torch.testing.assert_close(ranks[0]["no_sync"], want, rtol=1e-5, atol=1e-6)


def test_rank0_checkpoint_resumes_bit_identically(ranks):
    for r in range(WORLD):
        assert torch.equal(ranks[r]["resumed"], ranks[r]["uninterrupted"])
    assert torch.equal(ranks[0]["resumed"], ranks[1]["resumed"])


def test_different_seeds_on_the_ranks_are_refused_at_start_up():
    # DDP's start-up broadcast writes rank 0's weights into the others; a budgeted weight built
    # from another seed cannot take them, and says why.
    model = _model()
    other = pk.sparsify(
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
        ),
        seed=1,
    )
    w = model[0].weight
    before = w.effective().clone()
    with pytest.raises(TypeError, match="same pk.sparsify seed"):
        with torch.no_grad():
            w.copy_(other[0].weight.effective())
    assert torch.equal(w.effective(), before)
    with torch.no_grad():
        w.copy_(w.effective().clone())  # its own values: nothing to change, nothing refused
    assert torch.equal(w.effective(), before)
