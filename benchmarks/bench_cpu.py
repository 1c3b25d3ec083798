"""Sparse training on the CPU: layer passes and whole training steps, time and peak memory.

Two tables, every ratio against a baseline measured in the same run (providers interleaved round
by round, medians over rounds, so a noisy machine hits every provider alike):

``passes``: one ``SparseLinear`` training pass (forward + backward, input gradient included) per
shape and density, untracked weights exact zeros (Procrustes after its decay):

* ``nn``: ``nn.Linear`` with the same weight (the baseline, ``x_nn``);
* ``materialise``: ``compute="dense"``: the effective weight written, then ATen's GEMMs;
* ``sparse``: ``compute="sparse"``: forward and input gradient by the C++ kernels, the dense weight
  gradient ``dY^T X`` (a step that selects: ``reselect_every=1``);
* ``sparse_keep``: the same, on a step that keeps the tracked set (``reselect_every > 1``): the
  weight gradient is sampled at the tracked positions (SDDMM), the whole pass sparse;
* ``sparseprop``: SparseProp's ``SparseLinear``, when installed (its build needs pybind11's
  headers: ``CPLUS_INCLUDE_PATH=$(python -c 'import pybind11; print(pybind11.get_include())')
  pip install --no-build-isolation sparseprop``).

``steps``: whole training steps (forward, backward, optimizer step; ``zero_grad`` before each, outside
the timing and the memory window) of a 4 x 4096^2 MLP
at batch 64 and of ResNet-18 (CIFAR shapes, batch 32): dense with SGD momentum against DropBack and
Procrustes (after its decay and its quantile estimator's warm-up) at a 10% budget, with
``reselect_every`` 1 and 10 (the time of an average step of the interval; selecting and keeping
steps also apart); ``procrustes_layer`` is Procrustes with ``scope="layer"`` (10% of every layer
instead of 10% of the model). Each configuration runs in its own process, its timed steps first,
then as many untimed ones for the memory: a step's peak memory is the process's peak resident
memory during that step (Linux: VmHWM, reset before each step, after freed memory is handed back
to the system) above what the process held before the model was built: the model, optimizer
state, activations and every transient. ``peak_mb`` is the largest over those steps,
``select_peak_mb`` / ``keep_peak_mb`` over the steps that select / keep the tracked set.

    python benchmarks/bench_cpu.py                      # both tables
    python benchmarks/bench_cpu.py --table passes --densities 0.1,0.05
    python benchmarks/bench_cpu.py --quick              # small shapes, a smoke run

Rows go to ``benchmarks/results/cpu_passes.csv`` / ``cpu_steps.csv`` (``--tag`` names other files)
with the machine description and the command line in every row, and a Markdown table beside each
(``cpu_passes.md`` / ``cpu_steps.md``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, machine_info, print_table, write_csv  # noqa: E402

import procrustes_kernels as pk  # noqa: E402
from procrustes_kernels.cli import comma_list, fractions, int_at_least  # noqa: E402
from procrustes_kernels.storage import BlockStorage  # noqa: E402

PASS_SHAPES = [(1024, 1024, 256), (4096, 1024, 128)]  # out, in, tokens
QUICK_SHAPES = [(256, 192, 64)]
PROVIDERS = ("nn", "materialise", "sparse", "sparse_keep", "sparseprop")
STEP_COLUMNS = [
    "model",
    "method",
    "reselect_every",
    "ms",
    "select_ms",
    "keep_ms",
    "peak_mb",
    "select_peak_mb",
    "keep_peak_mb",
    "x_dense_time",
    "x_dense_select_memory",
    "x_dense_keep_memory",
    "paths",
]


def _sparseprop():
    try:
        from sparseprop.modules import SparseLinear as SPLinear
    except ImportError:
        return None
    return SPLinear


def _zeroed_layer(out_f: int, in_f: int, density: float, seed: int) -> pk.SparseLinear:
    """A SparseLinear with ``density`` of its weights tracked and the rest exact zeros."""
    g = torch.Generator().manual_seed(seed)
    layer = pk.SparseLinear(in_f, out_f, seed=seed)
    w = layer.weight.effective()
    mask = torch.rand(w.shape, generator=g) < density
    layer.weight.set_tracked(BlockStorage.from_mask(w, mask, layer.weight.block_size), scale=0.0)
    return layer


def _pass_fns(out_f: int, in_f: int, m: int, density: float, providers: list[str]) -> dict:
    layer = _zeroed_layer(out_f, in_f, density, seed=out_f + in_f)
    dense = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        dense.weight.copy_(layer.weight.effective())
        dense.bias.copy_(layer.bias)
    x = torch.randn(m, in_f, requires_grad=True)
    gy = torch.randn(m, out_f)

    def run(module):
        def f():
            x.grad = None
            for p in module.parameters():
                p.grad = None
            module(x).backward(gy)

        return f

    def sparse(keep: bool, mode: str):
        def f():
            layer.weight.compute = mode
            layer.weight.set_sampled_grad(keep)
            run(layer)()

        return f

    fns = {
        "nn": run(dense),
        "materialise": sparse(False, "dense"),
        "sparse": sparse(False, "sparse"),
        "sparse_keep": sparse(True, "sparse"),
    }
    sp = _sparseprop()
    if sp is not None:
        fns["sparseprop"] = run(sp.from_dense(dense))
    return {k: v for k, v in fns.items() if k in providers}


def bench_passes(args, info: dict) -> list[dict]:
    rows = []
    shapes = QUICK_SHAPES if args.quick else PASS_SHAPES
    for out_f, in_f, m in shapes:
        for density in args.densities:
            fns = _pass_fns(out_f, in_f, m, density, args.providers)
            times: dict[str, list[float]] = {k: [] for k in fns}
            for f in fns.values():
                f()  # warm-up
            for _ in range(args.rounds):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            for name, t in med.items():
                rows.append(
                    {
                        "shape": f"{out_f}x{in_f}/{m}",
                        "density": density,
                        "provider": name,
                        "ms": round(t, 3),
                        "x_nn": round(t / med["nn"], 3) if "nn" in med else "",
                        **info,
                    }
                )
            print_table(rows[-len(med) :], ["shape", "density", "provider", "ms", "x_nn"])
    return rows


# ------------------------------------------------------------------------------- training steps
def mlp4096(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        *[m for _ in range(4) for m in (torch.nn.Linear(width, width), torch.nn.ReLU())][:-1]
    )


class _Block(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(cout)
        self.c2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = torch.nn.BatchNorm2d(cout)
        self.short = torch.nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(y)) + self.short(x))


def resnet18_cifar(width: int = 64) -> torch.nn.Module:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), 10 classes."""
    layers = [torch.nn.Conv2d(3, width, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(width)]
    layers.append(torch.nn.ReLU())
    cin = width
    for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for j in range(2):
            layers.append(_Block(cin, cout, 2 if (i and not j) else 1))
            cin = cout
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(cin, 10)]
    return torch.nn.Sequential(*layers)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _trim() -> None:
    """Hand memory the allocator holds but no tensor uses back to the system (glibc), so a
    window starts from what is live, not from what an earlier step left cached."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Start a new peak-RSS window (Linux: clear_refs 5 resets VmHWM); False where it cannot."""
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


QUANTILE_WARMUP = 10  # Procrustes(quantile_warmup=...) default


def step_config(model_name: str, method: str, reselect: int, quick: bool, steps: int) -> dict:
    """One configuration, in this process: time per step, peak memory above the start (freed
    memory the allocator still holds is handed back before each step's window: glibc's
    malloc_trim)."""
    torch.manual_seed(0)
    gc.collect()
    _trim()
    base = _rss_mb()  # before the model: its weights, optimizer state and every transient count
    if model_name == "mlp":
        width = 512 if quick else 4096
        model, shape, classes = mlp4096(width), (64, width), width
    else:
        model, shape, classes = resnet18_cifar(16 if quick else 64), (32, 3, 32, 32), 10
    x = torch.randn(shape)
    y = torch.randint(0, classes, (shape[0],))
    if method == "dense":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        model = pk.sparsify(model, seed=1)
        # Procrustes after its decay (untracked weights zero), or DropBack (they stay w0).
        procrustes = method.startswith("procrustes")
        cls, decay = (pk.Procrustes, {"decay_steps": 2}) if procrustes else (pk.DropBack, {})
        opt = cls(
            model.parameters(),
            lr=0.01,
            budget=0.1,
            momentum=0.9,
            **decay,
            reselect_every=reselect,
            scope="layer" if method == "procrustes_layer" else "global",
        )

    def step():
        F.cross_entropy(model(x), y).backward()
        opt.step()

    # After the decay, at an interval start; Procrustes also past its estimator's warm-up (its
    # first QUANTILE_WARMUP selecting steps take a second pass over stored scores), as in training.
    warm = 3 if method == "dense" else max(3, reselect)
    if method.startswith("procrustes"):
        warm = max(warm, reselect * QUANTILE_WARMUP)
    for _ in range(warm):
        opt.zero_grad()
        step()
    # Timed steps first, then as many untimed ones for the memory: a memory window starts by
    # handing freed memory back (malloc_trim), and the pages the step then faults in again would
    # count in its time.
    times, peaks = [], []
    for _ in range(steps):
        opt.zero_grad()  # the last step's gradients go before the window, as in a training loop
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    for _ in range(steps):
        opt.zero_grad()
        per_step = _reset_peak()
        step()
        peaks.append(_peak_mb() - base)
    if not per_step:  # no per-step window here: the process's peak since it started
        peaks = [_peak_mb() - base] * len(times)
    row = {"ms": round(sum(times) / len(times), 1), "peak_mb": round(max(peaks), 1)}
    if method != "dense":
        # (the memory steps follow the timed ones: step warm + steps + i)
        for name, keeps in (("select", False), ("keep", True)):
            idx = [i for i in range(steps) if ((warm + i) % reselect != 0) == keeps]
            mem = [i for i in range(steps) if ((warm + steps + i) % reselect != 0) == keeps]
            row[f"{name}_ms"] = round(sum(times[i] for i in idx) / len(idx), 1) if idx else ""
            row[f"{name}_peak_mb"] = round(max(peaks[i] for i in mem), 1) if mem else ""
        paths = {
            m.weight.last_path
            for m in model.modules()
            if pk.is_budgeted(getattr(m, "weight", None))
        }
        row["paths"] = "/".join(sorted(p for p in paths if p))
    return row


def bench_steps(args, info: dict) -> list[dict]:
    rows = []
    for model_name in args.models:
        configs = [("dense", 1), ("dropback", 1), ("dropback", 10), ("procrustes", 1)]
        configs += [("procrustes", 10), ("procrustes_layer", 1), ("procrustes_layer", 10)]
        results = {}
        for method, r in configs:
            steps = args.steps if method == "dense" else max(args.steps, r)
            cmd = [
                sys.executable,
                __file__,
                "--one-step-config",
                json.dumps([model_name, method, r, args.quick, steps]),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[(method, r)] = json.loads(out.stdout.strip().splitlines()[-1])
        dense = results[("dense", 1)]
        for (method, r), res in results.items():
            rows.append(
                {
                    "model": model_name,
                    "method": method,
                    "reselect_every": r,
                    **res,
                    "x_dense_time": round(res["ms"] / dense["ms"], 3),
                    "x_dense_memory": round(res["peak_mb"] / dense["peak_mb"], 3),
                    **{
                        f"x_dense_{k}_memory": round(res[f"{k}_peak_mb"] / dense["peak_mb"], 3)
                        for k in ("select", "keep")
                        if res.get(f"{k}_peak_mb") not in (None, "")
                    },
                    **info,
                }
            )
        for r in rows[-len(results) :]:  # every row with every column (the CSV's header)
            for c in STEP_COLUMNS:
                r.setdefault(c, "")
        print_table(rows[-len(results) :], STEP_COLUMNS)
    return rows


def _markdown(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one-step-config"]:
        print(json.dumps(step_config(*json.loads(argv[1]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", choices=("passes", "steps", "both"), default="both")
    ap.add_argument("--quick", action="store_true", help="small shapes and models")
    ap.add_argument("--densities", type=fractions, default=[0.5, 0.1, 0.05, 0.01])
    ap.add_argument("--providers", type=comma_list(str), default=list(PROVIDERS))
    ap.add_argument("--models", type=comma_list(str), default=["mlp", "resnet18"])
    ap.add_argument("--rounds", type=int_at_least(1), default=15)
    ap.add_argument("--steps", type=int_at_least(1), default=10)
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--threads", type=int_at_least(1), default=None)
    args = ap.parse_args(argv)
    bad = set(args.providers) - set(PROVIDERS)
    if bad:
        ap.error(f"argument --providers: expected names from {PROVIDERS}, got {sorted(bad)}")
    bad = set(args.models) - {"mlp", "resnet18"}
    if bad:
        ap.error(f"argument --models: expected mlp and / or resnet18, got {sorted(bad)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {**machine_info(torch.device("cpu")), "command": " ".join(["bench_cpu.py", *argv])}
    suffix = f"_{args.tag}" if args.tag else ""
    head = [
        f"# CPU benchmark ({info['host_cpu']}, {info['cpu_threads']} threads, {info['date']})",
        "",
        f"`python benchmarks/{info['command']}`",
        "",
    ]
    if args.table in ("passes", "both"):
        rows = bench_passes(args, info)
        write_csv(rows, RESULTS / f"cpu_passes{suffix}.csv")
        md = ["## SparseLinear training pass (fwd + bwd), ms and x nn.Linear", ""]
        md.append(_markdown(rows, ["shape", "density", "provider", "ms", "x_nn"]))
        (RESULTS / f"cpu_passes{suffix}.md").write_text("\n".join(head + md) + "\n")
    if args.table in ("steps", "both"):
        rows = bench_steps(args, info)
        write_csv(rows, RESULTS / f"cpu_steps{suffix}.csv")
        md = [
            "## Training steps: dense SGD momentum vs DropBack / Procrustes (after its decay), 10%",
            "",
        ]
        md.append(_markdown(rows, STEP_COLUMNS))
        (RESULTS / f"cpu_steps{suffix}.md").write_text("\n".join(head + md) + "\n")


if __name__ == "__main__":
    main()
