"""What torch.compile and torch.export make of a sparsified model, and what compiling saves.

For each model (LeNet-300-100 and the demo's digits CNN, batch 64) and each case (the nn model with
``torch.optim.SGD``, the baseline of what compiling saves; DropBack on the materialise path;
Procrustes after its decay on the sparse-kernel path, ``compute="sparse"``):

* ``graphs`` / ``breaks``: ``torch._dynamo.explain`` of forward + loss;
* ``fullgraph``: whether ``torch.compile(..., fullgraph=True)`` compiles and runs it;
* ``train_graphs``: graphs compiled over ``--steps`` training steps of the compiled model inside
  ``pk.dynamic_tracked_counts()`` while the tracked counts change (more would mean a recompile
  per step), and ``counts``: how many distinct tracked counts those steps saw;
* ``export``: whether ``torch.export.export`` of the model works, and the custom ops its graph calls;
* ``eager_ms`` / ``compiled_ms`` / ``x_eager``: forward + backward, and ``step_*``: the whole
  training step (zero_grad, forward, backward, the eager optimizer step), eager and compiled,
  timed in alternating rounds (the median of the rounds' medians; the machine is noisy).

Rows (with the machine) are appended to ``results/bench_compile_<device>.csv``.

    python benchmarks/bench_compile.py [--device cuda] [--rounds 5] [--repeats 40]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import torch._dynamo.utils as dynamo_utils
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS, machine_info, print_table, time_ms, write_csv  # noqa: E402
from bench_train_step import models  # noqa: E402

import procrustes_kernels as pk  # noqa: E402

COLUMNS = [
    "model",
    "case",
    "graphs",
    "breaks",
    "fullgraph",
    "train_graphs",
    "counts",
    "export",
    "eager_ms",
    "compiled_ms",
    "x_eager",
    "step_eager_ms",
    "step_compiled_ms",
    "step_x_eager",
]
CASES = ("nn", "dropback materialise", "procrustes sparse")


def _optimizer(case: str, model):
    if case == "nn":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if case.startswith("dropback"):
        return pk.DropBack(model.parameters(), lr=0.05, budget=0.1, momentum=0.9)
    return pk.Procrustes(model.parameters(), lr=0.05, budget=0.1, momentum=0.9, decay_steps=5)


def _prepare(case, sparse, x, y):
    """A trained copy of ``sparse`` for ``case``, with its optimizer."""
    model = pk.densify(copy.deepcopy(sparse)) if case == "nn" else copy.deepcopy(sparse)
    opt = _optimizer(case, model)
    for _ in range(8):  # past Procrustes' decay: untracked weights are zeros
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    if case.endswith("sparse"):
        pk.set_compute(model, "sparse")
    model.zero_grad()
    return model, opt


def _trace_facts(model, x, y) -> dict:
    def loss(inp):
        return F.cross_entropy(model(inp), y)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(x)
    torch._dynamo.reset()
    try:
        torch.compile(loss, fullgraph=True)(x).backward()
        fullgraph = "ok"
    except Exception as err:  # reported, not raised: this is what the row records
        fullgraph = f"{type(err).__name__}"
    model.zero_grad()
    try:
        prog = torch.export.export(copy.deepcopy(model).eval(), (x,))
        custom = sorted(
            {
                str(n.target).split(".")[1]
                for n in prog.graph.nodes
                if n.op == "call_function" and str(n.target).startswith("procrustes.")
            }
        )
        export = "ok: " + " ".join(custom) if custom else "ok"
    except Exception as err:
        export = f"{type(err).__name__}"
    torch._dynamo.reset()
    return {
        "graphs": explained.graph_count,
        "breaks": explained.graph_break_count,
        "fullgraph": fullgraph,
        "export": export,
    }


def _train_graphs(case, sparse, x, y, steps) -> tuple[int, int]:
    model, opt = _prepare(case, sparse, x, y)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    fwd = torch.compile(model)
    counts = set()
    gen = torch.Generator(device=x.device).manual_seed(1)
    with pk.dynamic_tracked_counts():
        for _ in range(steps):
            xb = x + 0.1 * torch.randn(x.shape, generator=gen, device=x.device)
            opt.zero_grad()
            F.cross_entropy(fwd(xb), y).backward()
            opt.step()
            counts.add(tuple(getattr(opt, "layer_counts", ())))
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return graphs, len(counts)


def _timings(case, sparse, x, y, device, rounds, repeats) -> dict:
    model, opt = _prepare(case, sparse, x, y)
    compiled = torch.compile(model)

    def fb(m):
        def run():
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()

        return run

    def step(m):
        def run():
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()

        return run

    out = {k: [] for k in ("eager", "compiled", "step_eager", "step_compiled")}
    with pk.dynamic_tracked_counts():
        for _ in range(3):  # compile, and the graphs of the counts after the first step
            step(compiled)()
        for _ in range(rounds):
            out["eager"].append(time_ms(fb(model), device, repeats)["median_ms"])
            out["compiled"].append(time_ms(fb(compiled), device, repeats)["median_ms"])
            out["step_eager"].append(time_ms(step(model), device, repeats)["median_ms"])
            out["step_compiled"].append(time_ms(step(compiled), device, repeats)["median_ms"])
    torch._dynamo.reset()
    med = {k: statistics.median(v) for k, v in out.items()}
    return {
        "eager_ms": round(med["eager"], 3),
        "compiled_ms": round(med["compiled"], 3),
        "x_eager": round(med["compiled"] / med["eager"], 3),
        "step_eager_ms": round(med["step_eager"], 3),
        "step_compiled_ms": round(med["step_compiled"], 3),
        "step_x_eager": round(med["step_compiled"] / med["step_eager"], 3),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--steps", type=int, default=10, help="training steps counted for recompiles")
    ap.add_argument("--quick", action="store_true", help="one model, no timings (a smoke run)")
    ap.add_argument(
        "--out", default=None, help="CSV path (default results/bench_compile_<device>.csv)"
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    info = machine_info(device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, (dense, shape) in list(models().items())[: 1 if args.quick else None]:
        sparse = pk.sparsify(copy.deepcopy(dense), seed=0).to(device)
        x = torch.randn(shape, device=device, generator=gen)
        y = torch.randint(0, 10, (shape[0],), device=device, generator=gen)
        for case in CASES:
            model, _ = _prepare(case, sparse, x, y)
            row = {"model": name, "case": case, **_trace_facts(model, x, y)}
            row["train_graphs"], row["counts"] = _train_graphs(case, sparse, x, y, args.steps)
            if not args.quick:
                row.update(_timings(case, sparse, x, y, device, args.rounds, args.repeats))
            rows.append({**row, **info})
            print_table(rows[-1:], COLUMNS)
    out = Path(args.out) if args.out else RESULTS / f"bench_compile_{device.type}.csv"
    write_csv(rows, out)
    print()
    print_table(rows, COLUMNS)
    print(f"rows appended to {out}")


if __name__ == "__main__":
    main()
