"""A 2-process DistributedDataParallel run of a sparsified CNN: do the ranks stay identical, and
what does a step cost?

NCCL with one GPU per rank where there are two GPUs; otherwise gloo, both ranks on the one GPU
(or on the CPU with ``--device cpu``). Trains ``--steps`` Procrustes steps (top-k, decay to zero)
on different data per rank, then compares the ranks' weights bit for bit and prints the median
step time. Exit status 1 when the ranks differ.

    python benchmarks/ddp_check.py [--device cuda|cpu] [--steps 30]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import procrustes_kernels as pk  # noqa: E402
from procrustes_kernels.demo import make_model  # noqa: E402

WORLD = 2


def _worker(rank: int, port: int, device_type: str, steps: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    gpus = torch.cuda.device_count() if device_type == "cuda" else 0
    backend = "nccl" if gpus >= WORLD else "gloo"
    device = torch.device(f"cuda:{rank % gpus}") if gpus else torch.device("cpu")
    if gpus:
        torch.cuda.set_device(device)
    else:  # the ranks share the CPU's cores: one thread each, not an oversubscribed pool
        torch.set_num_threads(max(1, (os.cpu_count() or WORLD) // WORLD))
        if pk.ops.available_backends()["cpp"]:
            from procrustes_kernels.ops.update import cpp

            cpp.set_num_threads(torch.get_num_threads())
    dist.init_process_group(
        backend, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    torch.manual_seed(0)
    model = pk.sparsify(make_model((1, 8, 8), 10), seed=0).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if gpus else None)
    opt = pk.Procrustes(ddp.parameters(), lr=0.05, budget=0.1, momentum=0.9, decay_steps=10)
    gen = torch.Generator(device=device).manual_seed(100 + rank)
    times = []
    for _ in range(steps):
        x = torch.randn(64, 1, 8, 8, device=device, generator=gen)
        y = torch.randint(0, 10, (64,), device=device, generator=gen)
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        if gpus:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    state = torch.cat(
        [(p.effective() if pk.is_budgeted(p) else p.detach()).flatten() for p in model.parameters()]
    )
    gathered = [torch.empty_like(state) for _ in range(WORLD)]
    dist.all_gather(gathered, state)
    if rank == 0:
        same = all(torch.equal(gathered[0], g) for g in gathered[1:])
        paths = {w.last_path for w in opt.weights}
        with open(out, "w") as f:
            f.write(
                f"backend {backend}, device {device}, {steps} steps: ranks identical: {same}; "
                f"tracked {opt.layer_counts}; paths {sorted(paths)}; "
                f"median step {statistics.median(times[steps // 3 :]):.3f} ms\n"
            )
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(f"/tmp/ddp_check_{os.getpid()}.txt")
    mp.spawn(_worker, args=(port, args.device, args.steps, str(out)), nprocs=WORLD, join=True)
    line = out.read_text()
    out.unlink()
    print(line, end="")
    return 0 if "ranks identical: True" in line else 1


if __name__ == "__main__":
    sys.exit(main())
