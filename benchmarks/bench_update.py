"""Time of one optimizer step over N budgeted weights, per backend, against the authors' emulation.

Providers:

* ``baseline``: what the authors' emulation does (dense weights and dense stored initial values,
  ``torch.topk`` over all scores, boolean masks); decay and quantile do not change its cost.
* ``reference``: the library's pure-PyTorch path.
* ``cpp`` / ``triton``: the compiled CPU backend and the Triton kernels, when available. On a
  machine without a GPU, Triton runs in its CPU interpreter: those rows check that the path runs
  and are no performance claim (only sizes up to ``--interpret-max`` are timed).

Each row gives the median step time, the speedup against the baseline measured in the same run, and
on GPU the effective gradient bandwidth as a fraction of the measured copy bandwidth. Rows are
appended to ``benchmarks/results/bench_update.csv`` with the machine description.

    python benchmarks/bench_update.py                 # defaults for this device
    python benchmarks/bench_update.py --quick         # small sizes, a smoke run
    python benchmarks/bench_update.py --sizes 1e6,1e7 --budgets 0.1 --providers baseline,cpp
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton kernels can only run through the interpreter here; set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    copy_bandwidth_gbs,
    machine_info,
    print_table,
    time_ms,
    write_csv,
)

import procrustes_kernels as pk  # noqa: E402
from procrustes_kernels import ops  # noqa: E402

COLS = 1000  # inputs per row of the benchmark's linear layers
LAYERS = 4


def layer_shapes(numel: int) -> list[tuple[int, int]]:
    rows = max(1, round(numel / LAYERS / COLS))
    return [(rows, COLS)] * LAYERS


class SparseModel(torch.nn.Module):
    def __init__(self, shapes: list[tuple[int, int]], device: torch.device) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            pk.SparseLinear(c, r, bias=False, device=device, seed=i)
            for i, (r, c) in enumerate(shapes)
        )


class AuthorsStyleStep:
    """One step as the authors' emulation computes it: everything dense, torch.topk, masks."""

    def __init__(
        self, model: SparseModel, k: int, lr: float, momentum: float, decay: float
    ) -> None:
        self.w0 = [layer.initial_weight().flatten() for layer in model.layers]
        self.W = [w.clone() for w in self.w0]
        self.mom = [torch.zeros_like(w) for w in self.w0]
        self.k, self.lr, self.mu, self.decay = k, lr, momentum, decay

    def step(self, grads: list[torch.Tensor]) -> None:
        for W, m, g in zip(self.W, self.mom, grads):
            m.mul_(self.mu).add_(g.flatten())
            W.add_(m, alpha=-self.lr)
        scores = torch.cat([(W - self.decay * w0).abs() for W, w0 in zip(self.W, self.w0)])
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[torch.topk(scores, self.k, sorted=False).indices] = True
        for W, w0, keep in zip(self.W, self.w0, torch.split(mask, [w.numel() for w in self.W])):
            W.copy_(torch.where(keep, W, self.decay * w0))


def bench_one(
    provider: str,
    selection: str,
    numel: int,
    budget: float,
    device: torch.device,
    repeats: int,
) -> dict[str, float]:
    shapes = layer_shapes(numel)
    model = SparseModel(shapes, device)
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn((r, c), device=device, generator=gen) * 1e-2 for r, c in shapes]
    lr, mu = 0.01, 0.9
    if provider == "baseline":
        base = AuthorsStyleStep(model, round(budget * sum(r * c for r, c in shapes)), lr, mu, 1.0)
        return time_ms(lambda: base.step(grads), device, repeats)
    kw = {"init_decay": 0.9, "selection": "quantile", "quantile_warmup": 1}
    if selection == "topk":
        kw = {"init_decay": 1.0, "selection": "topk"}
    with ops.use_backend(provider):
        opt = pk.DropBack(model.parameters(), lr=lr, budget=budget, momentum=mu, **kw)

        def step() -> None:
            for layer, g in zip(model.layers, grads):
                layer.weight.grad = g
            opt.step()

        step()  # first step: the tracked set and momentum reach their steady size
        return time_ms(step, device, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", help="comma-separated budgeted weight counts, e.g. 1e6,1e7")
    parser.add_argument("--budgets", default="0.1,0.04")
    parser.add_argument("--providers", default="baseline,reference,cpp,triton")
    parser.add_argument("--selections", default="topk,quantile")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--interpret-max",
        type=float,
        default=1e6,
        help="largest size timed through the Triton interpreter",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--out", default=str(RESULTS / "bench_update.csv"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    elif args.quick:
        sizes = [10**5, 10**6]
    else:
        sizes = [10**6, 10**7, 25_600_000, 10**8] if gpu else [10**6, 10**7]
    repeats = args.repeats or (3 if args.quick else (20 if gpu else 5))
    budgets = [float(b) for b in args.budgets.split(",")]
    available = ops.available_backends()
    info = machine_info(device)
    bandwidth = copy_bandwidth_gbs(device) if gpu else float("nan")

    rows = []
    for numel in sizes:
        real = sum(r * c for r, c in layer_shapes(numel))
        for budget in budgets:
            base_ms = None
            for provider in args.providers.split(","):
                if provider != "baseline" and not available.get(provider, False):
                    print(
                        f"skip {provider}: not available ({ops.backend_error(provider)})",
                        file=sys.stderr,
                    )
                    continue
                interpreted = provider == "triton" and not gpu
                if interpreted and numel > args.interpret_max:
                    continue
                selections = ["topk"] if provider == "baseline" else args.selections.split(",")
                for selection in selections:
                    t = bench_one(
                        provider, selection, numel, budget, device, 1 if interpreted else repeats
                    )
                    if provider == "baseline":
                        base_ms = t["median_ms"]
                    grad_gbs = real * 4 / (t["median_ms"] * 1e-3) / 1e9
                    row = {
                        "weights": real,
                        "budget": budget,
                        "provider": provider + (" (interpreter)" if interpreted else ""),
                        "selection": selection,
                        "median_ms": round(t["median_ms"], 3),
                        "p20_ms": round(t["p20_ms"], 3),
                        "p80_ms": round(t["p80_ms"], 3),
                        "speedup_vs_baseline": round(base_ms / t["median_ms"], 2)
                        if base_ms
                        else "",
                        "grad_read_gbs": round(grad_gbs, 2),
                        "copy_bw_gbs": round(bandwidth, 1) if gpu else "",
                        "grad_read_x_copy_time": round(bandwidth / 2 / grad_gbs, 2) if gpu else "",
                        **info,
                    }
                    rows.append(row)
                    print(
                        f"{real:>11,d} w  budget {budget:<5} {row['provider']:<24} {selection:<9}"
                        f" {row['median_ms']:>10.2f} ms  x{row['speedup_vs_baseline']}",
                        flush=True,
                    )
    if rows:
        write_csv(rows, Path(args.out))
        print()
        print(
            f"device: {info['device']}  ({info['host_cpu']}, torch {info['torch']}, triton {info['triton']})"
        )
        cols = ["weights", "budget", "provider", "selection", "median_ms", "speedup_vs_baseline"]
        if gpu:
            cols += ["grad_read_gbs", "grad_read_x_copy_time"]
        print_table(rows, cols)
        print(f"\nrows appended to {args.out}")


if __name__ == "__main__":
    main()
