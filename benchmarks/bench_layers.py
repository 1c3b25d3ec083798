"""Sparse layers against nn layers: forward, backward and full training step, memory and bytes.

For ``SparseLinear`` and ``SparseConv2d`` at realistic shapes (GPU: 4096x4096 with 8192 tokens,
the 3x3 layers of ResNet-18 at batch 64; CPU: smaller shapes), weight densities from 100% to 1%,
element and tile granularity (whole ``compute_tile`` tiles tracked), float32 and bfloat16, three
providers are timed in the same run:

* ``nn``: ``nn.Linear`` / ``nn.Conv2d`` holding the same effective weight, SGD with momentum for
  the step (the baseline every ratio ``x_nn`` is taken against);
* ``materialise``: the sparse layer with ``compute="dense"`` (effective weight written, then cuBLAS /
  cuDNN), Procrustes step;
* ``sparse``: ``compute="sparse"``: forward and backward-data from the compressed weight (Triton
  kernels on CUDA, the C++ kernels on the CPU; ``bench_cpu.py`` is the CPU comparison, with the
  sampled weight gradient and SparseProp), Procrustes step.

Untracked weights are exact zeros (Procrustes after its decay). ``fwd`` is a forward pass without
autograd, ``bwd`` is (forward + backward) minus ``fwd``, ``step`` is zero_grad + forward + backward +
optimizer step (the tracked set is re-selected every step, so the tile index is rebuilt too).
``auto`` says which path ``compute="auto"`` takes for that layer. Peak memory (CUDA) is the peak
allocated during forward + backward above what was allocated before; ``bytes`` is the layer's
persistent state (weights or compressed storage, bias).

A second table measures load balancing on a skewed mask (an eighth of the row tiles dense, 5% of
the other tiles tracked): the forward kernel with the plain grid, the persistent kernel with a balanced schedule
(heaviest work units first, dealt in snake order) and with a contiguous static split, plus each
schedule's makespan (longest program / mean program, in weight tiles), which needs no GPU.

    python benchmarks/bench_layers.py               # defaults for this device
    python benchmarks/bench_layers.py --quick       # small shapes, two densities
    python benchmarks/bench_layers.py --densities 0.1,0.01 --dtypes bf16 --kinds linear

Rows are appended to ``benchmarks/results/bench_layers_<device>.csv`` (``--out``) with the machine
description as each cell is measured (the load-balancing table first, in ``*_schedules.csv``), so
an interrupted run keeps what it measured; a cell that fails records its error and the grid goes
on. A plot of step time against density goes beside the CSV.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, machine_info, print_table, time_ms, write_csv  # noqa: E402

import procrustes_kernels as pk  # noqa: E402
from procrustes_kernels import compute  # noqa: E402
from procrustes_kernels.ops import backend_for, kernel  # noqa: E402
from procrustes_kernels.ops.compute.index import (  # noqa: E402
    build_schedule,
    build_tile_index,
    schedule_makespan,
    tile_mask,
)
from procrustes_kernels.storage import BlockStorage, pack_bits  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("nn", "materialise", "sparse")
# Weight tile (kernel tile and selection tile): 32 x 32 weights for linear layers, 16 x 16 channel
# pairs with their 3x3 kernels (2304 weights) for convolutions, so that a 64-channel layer has 16.
TILES = {"linear": (32, 32), "conv": (16, 16)}
TILE = TILES["linear"]


def _sparse_backend(device: torch.device) -> str:
    """Which implementation runs the sparse compute ops here: Triton on CUDA, the C++ kernels on
    the CPU (the reference where they are not built)."""
    return backend_for(device)


def cases(device: torch.device, quick: bool, kinds: list[str]) -> list[dict]:
    """Layer shapes per device: (name, kind, constructor arguments, input shape)."""
    gpu = device.type == "cuda"
    out = []
    if "linear" in kinds:
        if gpu:
            d, tokens = (1024, 2048) if quick else (4096, 8192)
        else:
            d, tokens = (256, 64) if quick else (1024, 512)
        out.append(
            {
                "name": f"linear {d}x{d} x{tokens}",
                "kind": "linear",
                "args": (d, d),
                "x": (tokens, d),
            }
        )
    if "conv" in kinds:
        if gpu:
            batch, specs = (
                (16, [(128, 28)]) if quick else (64, [(64, 56), (128, 28), (256, 14), (512, 7)])
            )
        else:
            batch, specs = (2, [(64, 8)]) if quick else (8, [(64, 16), (128, 8)])
        for ch, hw in specs:
            out.append(
                {
                    "name": f"conv3x3 {ch}ch {hw}x{hw} b{batch}",
                    "kind": "conv",
                    "args": (ch, ch, 3),
                    "x": (batch, ch, hw, hw),
                }
            )
    return out


def make_layer(case: dict, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    kw = {"seed": 1, "device": device, "dtype": dtype, "compute_tile": TILES[case["kind"]]}
    if case["kind"] == "linear":
        return pk.SparseLinear(*case["args"], **kw)
    return pk.SparseConv2d(*case["args"], padding=1, **kw)


def set_density(
    layer: pk.SparseLinear | pk.SparseConv2d, density: float, granularity: str, gen: torch.Generator
) -> None:
    """Track ``density`` of the weights (random single elements, or that fraction of the tiles,
    rounded, at random); untracked weights become zeros."""
    weight = layer.weight
    rows, cols, ksize, groups = weight.geometry
    device = weight.values.device
    if granularity == "element":
        mask = torch.rand(weight.weight_numel, generator=gen, device=device) < density
    else:
        tile = layer.compute_tile
        shape = (groups * -(-(rows // groups) // tile[0]), -(-cols // tile[1]))
        count = shape[0] * shape[1]
        pick = torch.randperm(count, generator=gen, device=device)[: round(density * count)]
        tiles = torch.zeros(count, dtype=torch.bool, device=device)
        tiles[pick] = True
        mask = tile_mask(tiles.view(shape), rows, cols, ksize, groups, *tile)
    w = pk.init_values(weight.seed, weight.weight_numel, weight.bound, device=device).to(
        weight.values.dtype
    )
    shape = tuple(weight.shape)
    weight.set_tracked(
        BlockStorage.from_mask(w.view(shape), mask.view(shape), weight.block_size), scale=0.0
    )


def dense_twin(layer: pk.SparseLinear | pk.SparseConv2d) -> torch.nn.Module:
    return layer.to_dense()


def layer_bytes(module: torch.nn.Module) -> int:
    if pk.is_budgeted(getattr(module, "weight", None)):
        n = module.weight.storage.nbytes
        return n + (
            module.bias.numel() * module.bias.element_size() if module.bias is not None else 0
        )
    return sum(p.numel() * p.element_size() for p in module.parameters())


def optimizer_for(module: torch.nn.Module, provider: str, density: float, granularity: str):
    if provider == "nn":
        return torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    kw = {"granularity": "tile", "tile": module.compute_tile} if granularity == "tile" else {}
    # Start past the decay (d_n = 0 from the next step on): untracked weights stay zeros.
    opt = pk.Procrustes(
        module.parameters(), lr=1e-3, budget=float(density), momentum=0.9, init_decay=1e-9, **kw
    )
    opt.step_count = 1
    return opt


def measure(module, x, grad_out, opt, device, repeats) -> dict:
    def fwd():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        xx = x.detach().requires_grad_()
        module(xx).backward(grad_out)

    def step():
        opt.zero_grad()
        xx = x.detach().requires_grad_()
        module(xx).backward(grad_out)
        opt.step()

    t_fwd = time_ms(fwd, device, repeats, warmup=3)["median_ms"]
    t_fb = time_ms(fwd_bwd, device, repeats, warmup=1)["median_ms"]
    peak = ""
    if device.type == "cuda":
        opt.zero_grad()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    t_step = time_ms(step, device, repeats, warmup=2)["median_ms"]
    return {"fwd_ms": t_fwd, "bwd_ms": max(0.0, t_fb - t_fwd), "step_ms": t_step, "peak_mb": peak}


def run_layers(args, device, info, out: Path) -> list[dict]:
    """Every cell of the grid; each row is appended to ``out`` as soon as it is measured, so an
    interrupted run keeps what it did."""
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for case in cases(device, args.quick, args.kinds):
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            x = torch.randn(case["x"], device=device, dtype=dtype)
            for granularity in args.granularities:
                for density in args.densities:
                    layer = make_layer(case, dtype, device)
                    set_density(layer, density, granularity, gen)
                    index = compute.tile_index(layer.weight)
                    with torch.no_grad():
                        y = layer(x)
                    auto = layer.last_path
                    grad_out = torch.randn_like(y)
                    nn_time = None
                    for provider in args.providers:
                        module = dense_twin(layer) if provider == "nn" else layer
                        if provider != "nn":
                            set_density(layer, density, granularity, gen)
                            layer.compute = "dense" if provider == "materialise" else "sparse"
                        opt = optimizer_for(module, provider, density, granularity)
                        error = ""
                        try:
                            m = measure(module, x, grad_out, opt, device, args.repeats)
                        except Exception as err:  # recorded in the row; the grid goes on
                            error = f"{type(err).__name__}: {str(err)[:200]}"
                            nan = float("nan")
                            m = {"fwd_ms": nan, "bwd_ms": nan, "step_ms": nan, "peak_mb": ""}
                        if provider == "nn":
                            nn_time = m
                        row = {
                            "case": case["name"],
                            "dtype": dname,
                            "granularity": granularity,
                            "density": density,
                            "tile_density": round(index.tile_density, 4),
                            "provider": provider,
                            "backend": _sparse_backend(device) if provider == "sparse" else "",
                            "auto": auto,
                            "fwd_ms": round(m["fwd_ms"], 3),
                            "bwd_ms": round(m["bwd_ms"], 3),
                            "step_ms": round(m["step_ms"], 3),
                            "x_nn_fwd": "",
                            "x_nn_step": "",
                            "peak_mb": m["peak_mb"],
                            "bytes": layer_bytes(module),
                            "error": error,
                        }
                        if nn_time is not None:
                            row["x_nn_fwd"] = round(m["fwd_ms"] / nn_time["fwd_ms"], 3)
                            row["x_nn_step"] = round(m["step_ms"] / nn_time["step_ms"], 3)
                        rows.append({**row, **info})
                        write_csv([rows[-1]], out)
                        print(
                            f"{row['case']:>26} {dname} {granularity:>7} {density:<5} "
                            f"{provider:>11}: step {row['step_ms']} ms (x_nn {row['x_nn_step']}) "
                            f"{error}",
                            flush=True,
                        )
                        del module, opt
                        gc.collect()
                    del layer
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


def skewed_index(rows: int, cols: int, device: torch.device, gen: torch.Generator):
    """An eighth of the row tiles fully dense, the other row tiles with 5% of their tiles tracked."""
    tiles_n, tiles_c = -(-rows // TILE[0]), -(-cols // TILE[1])
    tiles = torch.rand(tiles_n, tiles_c, generator=gen, device=device) < 0.05
    tiles[: max(1, tiles_n // 8)] = True
    mask = tile_mask(tiles, rows, cols, 1, 1, *TILE)
    bits = pack_bits(mask)
    return bits, build_tile_index(bits, rows, cols, 1, 1, *TILE)


def run_schedules(args, device, info) -> list[dict]:
    """Forward kernel on a skewed mask: grid vs balanced vs unbalanced persistent schedule.

    On CPU only the makespans are computed (the Triton kernels' timings need a GPU).
    """
    gen = torch.Generator(device=device).manual_seed(1)
    if device.type == "cuda":
        d, tokens = (1024, 2048) if args.quick else (4096, 8192)
        programs = torch.cuda.get_device_properties(device).multi_processor_count * 2
    else:
        (d, tokens), programs = ((256, 256) if args.quick else (1024, 512)), 4
    bits, index = skewed_index(d, d, device, gen)
    work = index.row_tile_work()
    block_m = 128 if device.type == "cuda" else 64
    m_tiles = -(-tokens // block_m)
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    values = torch.randn(index.nnz, device=device, dtype=dtype)
    sparse_linear = kernel("sparse_linear", device)
    for schedule in ("grid", "balanced", "unbalanced"):
        if schedule == "grid":
            makespan = ""
        else:
            s = build_schedule(work, m_tiles, programs, balanced=schedule == "balanced")
            longest, mean = schedule_makespan(s, work)
            makespan = round(longest / mean, 3)
        ms = ""
        if _sparse_backend(device) == "triton" and device.type == "cuda":
            fn = lambda s=schedule: sparse_linear(x, values, bits, index, schedule=s)  # noqa: E731
            ms = round(time_ms(fn, device, args.repeats, warmup=2)["median_ms"], 3)
        rows.append(
            {
                "case": f"skewed linear {d}x{d} x{tokens}",
                "dtype": str(dtype).replace("torch.", ""),
                "schedule": schedule,
                "programs": "" if schedule == "grid" else programs,
                "makespan_ratio": makespan,
                "fwd_ms": ms,
                "tile_density": round(index.tile_density, 4),
                **info,
            }
        )
    if rows and rows[0]["fwd_ms"] != "":
        for r in rows:
            r["x_grid"] = round(r["fwd_ms"] / rows[0]["fwd_ms"], 3)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    keys = sorted({(r["case"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, (case, dname) in zip(axes[0], keys):
        for provider in PROVIDERS:
            for gran, style in (("element", "-o"), ("tile", "--s")):
                pts = sorted(
                    (r["density"], r["x_nn_step"])
                    for r in rows
                    if r["case"] == case
                    and r["dtype"] == dname
                    and r["provider"] == provider
                    and r["granularity"] == gran
                    and r["x_nn_step"] != ""
                )
                if pts and provider != "nn":
                    ax.plot(*zip(*pts), style, label=f"{provider} ({gran})")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("weight density")
        ax.set_ylabel("step time / nn step time")
        ax.set_title(f"{case}\n{dname}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes, densities 1.0 and 0.1")
    ap.add_argument("--kinds", default="linear,conv")
    ap.add_argument("--densities", default=None, help="comma list (default 1,.5,.25,.1,.05,.01)")
    ap.add_argument("--granularities", default="element,tile")
    ap.add_argument("--dtypes", default=None, help="bf16,fp32 on CUDA, fp32 on CPU")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--out", default=None, help="CSV path (default results/bench_layers_<device>.csv)"
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.kinds = args.kinds.split(",")
    if args.densities is None:
        args.densities = "1,0.1" if args.quick else "1,0.5,0.25,0.1,0.05,0.01"
    args.densities = [float(d) for d in args.densities.split(",")]
    args.granularities = args.granularities.split(",")
    args.dtypes = (args.dtypes or ("bf16,fp32" if gpu else "fp32")).split(",")
    args.providers = args.providers.split(",")
    if "nn" not in args.providers:
        args.providers.insert(0, "nn")
    if args.repeats is None:
        args.repeats = 5 if gpu else 3
    for name, values, allowed in (
        ("--dtypes", args.dtypes, DTYPES),
        ("--providers", args.providers, PROVIDERS),
        ("--granularities", args.granularities, ("element", "tile")),
        ("--kinds", args.kinds, ("linear", "conv")),
    ):
        bad = [v for v in values if v not in allowed]
        if bad:
            ap.error(f"{name}: expected values in {tuple(allowed)}, got {bad}")
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)

    info = machine_info(device)
    out = Path(args.out) if args.out else RESULTS / f"bench_layers_{device.type}.csv"
    sched = run_schedules(args, device, info)
    print("\nload balancing on a skewed mask:")
    print_table(
        sched, ["case", "dtype", "schedule", "programs", "makespan_ratio", "fwd_ms", "x_grid"]
    )
    write_csv(sched, out.with_name(out.stem + "_schedules.csv"))
    rows = run_layers(args, device, info, out)
    cols = [
        "case",
        "dtype",
        "granularity",
        "density",
        "tile_density",
        "provider",
        "auto",
        "fwd_ms",
        "bwd_ms",
        "step_ms",
        "x_nn_fwd",
        "x_nn_step",
        "peak_mb",
        "bytes",
    ]
    print(
        f"\nlayers ({info['device']}, torch {info['torch']}, sparse backend {_sparse_backend(device)}):"
    )
    print_table(rows, cols)
    plot(rows, out.with_suffix(".png"))
    print(f"rows appended to {out}")


if __name__ == "__main__":
    main()
