"""The two ranks of tests/test_distributed.py: one process per rank, started by the test as
``python -m helpers.distributed RANK PORT OUT_DIR`` (as torchrun starts a training script), each
writing its results to ``OUT_DIR/rank<RANK>.pt``; and the model, optimizer and data both the ranks
and the single-process comparisons use."""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys
import traceback

import torch
import torch.distributed as dist
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


def model() -> nn.Module:
    torch.manual_seed(0)  # biases and dense layers: the same on every rank, as a user seeds them
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )
    return pk.sparsify(net, seed=0)


def optimizer(kind: str, selection: str, params):
    kw = dict(lr=0.1, budget=0.2, momentum=0.9, selection=selection)
    if kind == "dropback":
        return pk.DropBack(params, **kw)
    return pk.Procrustes(params, decay_steps=6, **kw)


def batch(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def state(net: nn.Module) -> torch.Tensor:
    return torch.cat(
        [(p.effective() if pk.is_budgeted(p) else p.detach()).flatten() for p in net.parameters()]
    )


def train(ddp, opt, rank: int, steps: range) -> None:
    for i in steps:
        x, y = batch(1000 * i + rank)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()


def run_rank(rank: int, port: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(120, exit=True)  # a hung rank shows where it hangs
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
            net = model()
            ddp = nn.parallel.DistributedDataParallel(net)
            opt = optimizer(kind, selection, ddp.parameters())
            train(ddp, opt, rank, range(15))
            results[f"{kind}-{selection}"] = (state(net), opt.layer_counts, opt.step_count)

        # 2. step 1 against one process on both ranks' data
        net = model()
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = optimizer("procrustes", "topk", ddp.parameters())
        train(ddp, opt, rank, range(1))
        results["step1"] = state(net)

        # 3. no_sync: two micro-batches per rank, the gradient all-reduced once
        net = model()
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = optimizer("dropback", "topk", ddp.parameters())
        opt.zero_grad()
        with ddp.no_sync():
            x, y = batch(50 + rank)
            F.cross_entropy(ddp(x), y).backward()
        x, y = batch(60 + rank)
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        results["no_sync"] = state(net)

        # 4. checkpoint on rank 0 after 5 steps, resume on every rank
        path = os.path.join(out_dir, "ckpt.pt")
        net = model()
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = optimizer("procrustes", "quantile", ddp.parameters())
        train(ddp, opt, rank, range(5))
        if rank == 0:
            torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, path)
        dist.barrier()
        train(ddp, opt, rank, range(5, 10))
        results["uninterrupted"] = state(net)
        resumed = model()
        ckpt = torch.load(path)
        resumed.load_state_dict(ckpt["model"])
        ddp = nn.parallel.DistributedDataParallel(resumed)
        opt = optimizer("procrustes", "quantile", ddp.parameters())
        opt.load_state_dict(ckpt["opt"])
        train(ddp, opt, rank, range(5, 10))
        results["resumed"] = state(resumed)
    except BaseException:
        traceback.print_exc()
        ok = False
    else:
        ok = True
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without tearing anything down. Freeing the last DistributedDataParallel drops the last
    # reference to the gloo process group, whose destructor joins its worker thread while holding
    # the GIL; that thread may still be freeing a finished collective, which needs the GIL: both
    # ranks then hang at exit (seen under load, gdb: ~ProcessGroupGloo -> std::thread::join
    # against AsyncAllreduceWork::~AsyncAllreduceWork -> take_gil). The results are on disk.
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    run_rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
