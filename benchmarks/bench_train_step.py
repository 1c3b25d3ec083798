"""Whole training steps of small models: nn layers + torch.optim.SGD vs DropBack vs Procrustes.

What a user's loop pays per step with budgeted weights (``opt.zero_grad()``, forward, backward,
``opt.step()``), against the dense model with ``torch.optim.SGD`` measured in the same run, and the
forward pass alone (``torch.no_grad``). Models: LeNet-300-100 (784-300-100-10, batch 64) and the
demo's digits CNN (1x8x8 inputs, batch 64). Medians of repeated wall-clock runs; rows (with the
machine) are appended to ``results/bench_train_step_<device>.csv``.

    python benchmarks/bench_train_step.py [--device cuda] [--repeats 200]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS, machine_info, print_table, time_ms, write_csv  # noqa: E402

import procrustes_kernels as pk  # noqa: E402
from procrustes_kernels.demo import make_model  # noqa: E402

PROVIDERS = ("nn", "dropback", "procrustes")


def models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    mlp = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )
    return {
        "lenet300 b64": (mlp, (64, 1, 28, 28)),
        "digits cnn b64": (make_model((1, 8, 8), 10), (64, 1, 8, 8)),
    }


def optimizer(provider: str, model: nn.Module) -> torch.optim.Optimizer:
    if provider == "nn":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if provider == "dropback":
        return pk.DropBack(model.parameters(), lr=0.05, budget=0.1, momentum=0.9)
    return pk.Procrustes(model.parameters(), lr=0.05, budget=0.1, momentum=0.9, decay_steps=10)


COLUMNS = [
    "model",
    "provider",
    "compiled",
    "fwd_ms",
    "step_ms",
    "x_nn_fwd",
    "x_nn_step",
    "x_eager_step",
]


def measure(name, provider, sparse, x, y, device, repeats, compiled) -> dict:
    model = pk.densify(copy.deepcopy(sparse)) if provider == "nn" else copy.deepcopy(sparse)
    opt = optimizer(provider, model)
    fwd_model = torch.compile(model) if compiled else model
    scope = pk.dynamic_tracked_counts() if compiled else contextlib.nullcontext()

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(fwd_model(x), y).backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            fwd_model(x)

    with scope:
        for _ in range(20):  # past Procrustes' decay (its untracked weights are zeros), compiled
            step()
        forward()
        t_step = time_ms(step, device, repeats)["median_ms"]
        t_fwd = time_ms(forward, device, repeats)["median_ms"]
    if compiled:
        torch._dynamo.reset()
    return {
        "model": name,
        "provider": provider,
        "compiled": compiled,
        "fwd_ms": round(t_fwd, 3),
        "step_ms": round(t_step, 3),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile-d models")
    ap.add_argument(
        "--out", default=None, help="CSV path (default results/bench_train_step_<device>.csv)"
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    info = machine_info(device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, (dense, shape) in models().items():
        sparse = pk.sparsify(copy.deepcopy(dense), seed=0).to(device)
        x = torch.randn(shape, device=device, generator=gen)
        y = torch.randint(0, 10, (shape[0],), device=device, generator=gen)
        base, eager_step = {}, {}
        for compiled in (False, True) if args.compile else (False,):
            for provider in PROVIDERS:
                row = measure(name, provider, sparse, x, y, device, args.repeats, compiled)
                if provider == "nn" and not compiled:
                    base = {"step": row["step_ms"], "fwd": row["fwd_ms"]}
                if not compiled:
                    eager_step[provider] = row["step_ms"]
                row["x_nn_fwd"] = round(row["fwd_ms"] / base["fwd"], 3)
                row["x_nn_step"] = round(row["step_ms"] / base["step"], 3)
                row["x_eager_step"] = round(row["step_ms"] / eager_step[provider], 3)
                rows.append({**row, **info})
                print_table(rows[-1:], COLUMNS)
    out = Path(args.out) if args.out else RESULTS / f"bench_train_step_{device.type}.csv"
    write_csv(rows, out)
    print()
    print_table(rows, COLUMNS)
    print(f"rows appended to {out}")


if __name__ == "__main__":
    main()
