"""DistributedDataParallel over a sparsified model: 2 gloo processes on the CPU (loopback).

DDP all-reduces the dense gradients of the budgeted weights like any gradient; every rank then
runs the same deterministic update, so ranks stay bit-identical. Two processes
(helpers/distributed.py, started as torchrun would) run every scenario and write their results;
the test compares them:

* DropBack / Procrustes x topk / quantile, 15 steps on different data per rank: ranks identical;
* step 1 of the 2-process run against one process on both ranks' data (mean loss);
* ``no_sync()`` gradient accumulation against one process on the accumulated gradient;
* a rank-0 checkpoint after 5 steps resumed on both ranks: bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers.distributed import CONFIGS, WORLD, batch, model, optimizer, state
from torch import nn

import procrustes_kernels as pk

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    out = tmp_path_factory.mktemp("ddp")
    port = str(_free_port())
    # One fresh process per rank, as torchrun starts them (nothing inherited from this one).
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "helpers.distributed", str(rank), port, str(out)],
            cwd=TESTS,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])},
        )
        for rank in range(WORLD)
    ]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=180)[0])  # a hung rank fails, never stalls
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            logs.append(proc.communicate()[0])
    if any(q.returncode != 0 for q in procs):
        pytest.fail(
            "a rank failed:\n"
            + "\n".join(f"--- rank {r}:\n{log[-3000:]}" for r, log in enumerate(logs))
        )
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("config", [f"{k}-{s}" for k, s in CONFIGS])
def test_ranks_stay_bit_identical_on_different_data(ranks, config):
    (a, counts_a, steps_a), (b, counts_b, steps_b) = ranks[0][config], ranks[1][config]
    assert steps_a == steps_b == 15
    assert counts_a == counts_b and sum(counts_a) > 0
    assert torch.equal(a, b)


def test_first_step_equals_one_process_on_both_ranks_data(ranks):
    net = model()
    opt = optimizer("procrustes", "topk", net.parameters())
    xs, ys = zip(*(batch(r) for r in range(WORLD)))
    opt.zero_grad()
    F.cross_entropy(net(torch.cat(xs)), torch.cat(ys)).backward()  # the mean over both ranks
    opt.step()
    want = state(net)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["step1"], want, rtol=1e-5, atol=1e-6)


def test_no_sync_accumulation_equals_one_process(ranks):
    net = model()
    opt = optimizer("dropback", "topk", net.parameters())
    opt.zero_grad()
    for r in range(WORLD):  # each rank's two micro-batch gradients, averaged over the ranks
        for seed in (50 + r, 60 + r):
            x, y = batch(seed)
            (F.cross_entropy(net(x), y) / WORLD).backward()
    opt.step()
    want = state(net)
    assert torch.equal(ranks[0]["no_sync"], ranks[1]["no_sync"])
    torch.testing.assert_close(ranks[0]["no_sync"], want, rtol=1e-5, atol=1e-6)


def test_rank0_checkpoint_resumes_bit_identically(ranks):
    for r in range(WORLD):
        assert torch.equal(ranks[r]["resumed"], ranks[r]["uninterrupted"])
    assert torch.equal(ranks[0]["resumed"], ranks[1]["resumed"])


def test_different_seeds_on_the_ranks_are_refused_at_start_up():
    # DDP's start-up broadcast writes rank 0's weights into the others; a budgeted weight built
    # from another seed cannot take them, and says why.
    net = model()
    other = pk.sparsify(
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
        ),
        seed=1,
    )
    w = net[0].weight
    before = w.effective().clone()
    with pytest.raises(TypeError, match="same pk.sparsify seed"):
        with torch.no_grad():
            w.copy_(other[0].weight.effective())
    assert torch.equal(w.effective(), before)
    with torch.no_grad():
        w.copy_(w.effective().clone())  # its own values: nothing to change, nothing refused
    assert torch.equal(w.effective(), before)
