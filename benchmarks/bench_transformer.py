"""A small GPT-style byte model on a weight budget: dense AdamW against the AdamW rule.

The text ships with Python itself: the bytes of the standard library's ``.py`` sources, split into
training and validation sets by file name (every ``--val-every``-th file of the sorted list is
validation), so the two never share a file. The model is a pre-norm decoder: byte embedding and
learned positions (dense), ``--layers`` blocks of causal ``nn.MultiheadAttention`` and a 4x GELU
MLP, a final LayerNorm and the output head. ``pk.sparsify`` budgets every linear weight and the
attention's input projections (q, k, v), so the attention projections, the MLPs and the head train
on the budget; embeddings, norms and biases stay dense.

Methods, each with the same initial weights, data order and learning-rate schedule (linear
warm-up, cosine decay); the dense and the sparse runs each take the learning rate that was best for
them in a sweep (``benchmarks/results/transformer_lr_sweep.md``: a tenth of the weights, each
moving about ``lr`` per AdamW step, wants a few times the dense rate):

* ``dense``: ``torch.optim.AdamW`` on the nn model;
* ``dropback``: ``pk.DropBack(update="adamw")``, exact top-k, initial values kept;
* ``procrustes``: ``pk.Procrustes(update="adamw")``, quantile selection, untracked weights decaying
  linearly to zero half way through training (``decay_steps``).

Reported per (method, budget): validation loss (nats per byte, mean over ``--val-batches`` fixed
batches) and its ratio to the dense run's, training loss at the end, stored weights, time.
Rows go to ``benchmarks/results/transformer_<tag>.csv`` with machine info and the command, a plot
of the validation curves to ``.png`` and a table to ``.md``.

    python benchmarks/bench_transformer.py --lr 0.012 --sparse-lr 0.04   # the defaults, ~3 min a run
    python benchmarks/bench_transformer.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, machine_info, print_table  # noqa: E402

import procrustes_kernels as pk  # noqa: E402
from procrustes_kernels import cli  # noqa: E402

METHODS = ("dense", "dropback", "procrustes")


# -- data -----------------------------------------------------------------------------------------
def stdlib_text(val_every: int, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation bytes (uint8) from the standard library's sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if len(files) < 2 * val_every:
        raise RuntimeError(f"expected Python sources under {root}, found {len(files)} files")
    train, val = bytearray(), bytearray()
    for i, path in enumerate(files):
        dest = val if i % val_every == 0 else train
        if len(dest) < (max_bytes // val_every if dest is val else max_bytes):
            dest += path.read_bytes()
    return (
        torch.frombuffer(train, dtype=torch.uint8).long(),
        torch.frombuffer(val, dtype=torch.uint8).long(),
    )


def batch_at(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple:
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


# -- model ----------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ByteGPT(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)
        self.register_buffer(
            "mask", torch.triu(torch.ones(context, context, dtype=torch.bool), 1), persistent=False
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:t]
        for block in self.blocks:
            x = block(x, self.mask[:t, :t])
        return self.head(self.ln(x))


# -- one run --------------------------------------------------------------------------------------
def evaluate(model: nn.Module, val: torch.Tensor, starts: torch.Tensor, args) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for chunk in starts.split(args.batch_size):
            x, y = batch_at(val, chunk, args.context)
            total += float(F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum"))
    model.train()
    return total / (starts.numel() * args.context)


def run_one(method, budget, init, train, val, val_starts, args) -> dict:
    model = copy.deepcopy(init)
    if method == "dense":
        model = pk.densify(model)
        opt = torch.optim.AdamW(
            model.parameters(), lr=args.lr, betas=args.betas, weight_decay=args.weight_decay
        )
    else:
        kw = dict(
            update="adamw", betas=args.betas, weight_decay=args.weight_decay, scope=args.scope
        )
        lr = args.sparse_lr
        if method == "dropback":
            opt = pk.DropBack(model.parameters(), lr, budget=budget, **kw)
        else:
            opt = pk.Procrustes(
                model.parameters(), lr, budget=budget, decay_steps=args.steps // 2, **kw
            )
    warm = max(1, round(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda t: (
            min(1.0, (t + 1) / warm)
            * 0.5
            * (1 + math.cos(math.pi * min(t, args.steps) / args.steps))
        ),
    )
    gen = torch.Generator().manual_seed(args.seed)
    curve, losses = [], []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(
            0, train.numel() - args.context - 1, (args.batch_size,), generator=gen
        )
        x, y = batch_at(train, starts, args.context)
        opt.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(model, val, val_starts, args)))
            print(
                f"  {method:<10} budget {budget:<6g} step {step:>5} val {curve[-1][1]:.4f}",
                flush=True,
            )
    wall = time.perf_counter() - start
    total = sum(w.numel() for _, w in pk.budgeted_weights(init))
    stored = total if method == "dense" else sum(w.nnz for _, w in pk.budgeted_weights(model))
    # where the budget went: tracked fraction of the attention, MLP and head weights
    parts = {"attn": [0, 0], "mlp": [0, 0], "head": [0, 0]}
    if method != "dense":
        for name, w in pk.budgeted_weights(model):
            part = "attn" if ".attn." in name else "mlp" if ".mlp." in name else "head"
            parts[part][0] += w.nnz
            parts[part][1] += w.numel()
    density = " ".join(f"{k} {a / b:.3f}" for k, (a, b) in parts.items() if b)
    return {
        "method": method,
        "budget": budget,
        "val_loss": round(curve[-1][1], 4),
        "train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "stored_weights": stored,
        "total_weights": total,
        "wall_s": round(wall, 1),
        "density": density or "1",
        "curve": curve,
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        steps, vals = zip(*r["curve"])
        label = (
            r["method"] if r["method"] == "dense" else f"{r['method']} 1/{round(1 / r['budget'])}"
        )
        ax.plot(steps, vals, label=label, ls="--" if r["method"] == "dense" else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"names from {METHODS}")
    p.add_argument(
        "--budgets", type=cli.fractions, default=(0.1, 0.04), help="fractions of the weights"
    )
    size = cli.int_at_least(1)
    p.add_argument("--steps", type=size, default=None, help="training steps (default 1200)")
    p.add_argument("--batch-size", type=size, default=32)
    p.add_argument("--context", type=size, default=64)
    p.add_argument("--d-model", type=size, default=96)
    p.add_argument("--layers", type=size, default=3)
    p.add_argument("--heads", type=size, default=4)
    p.add_argument(
        "--lr", type=cli.float_at_least(0), default=0.012, help="dense AdamW's lr (its best here)"
    )
    p.add_argument(
        "--sparse-lr",
        type=cli.float_at_least(0),
        default=0.04,
        help="lr of the sparse runs (their best here; results/transformer_lr_sweep.md)",
    )
    p.add_argument("--betas", type=cli.betas, default=(0.9, 0.99), help="AdamW's beta1,beta2")
    p.add_argument("--scope", choices=("global", "layer"), default="global", help="budget scope")
    p.add_argument(
        "--dense-head",
        action="store_true",
        help="keep the output head dense (budget the attention and MLP weights only)",
    )
    p.add_argument("--weight-decay", type=cli.float_at_least(0), default=0.01)
    p.add_argument(
        "--warmup",
        type=cli.number_in(0, 1, high_open=True),
        default=0.05,
        help="fraction of steps of lr warm-up",
    )
    p.add_argument("--clip", type=cli.float_at_least(0), default=1.0, help="gradient norm clipping")
    p.add_argument("--eval-every", type=size, default=100)
    p.add_argument("--val-batches", type=size, default=16)
    p.add_argument(
        "--val-every", type=cli.int_at_least(2), default=10, help="every n-th source file validates"
    )
    p.add_argument("--max-bytes", type=size, default=4_000_000, help="training text cap")
    p.add_argument("--seed", type=cli.int_at_least(0), default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, 30 steps (a smoke run; sets the sizes, so not with --steps)",
    )
    p.add_argument("--tag", default="stdlib")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick and args.steps is not None:
        p.error("--quick: sets the steps and sizes of a smoke run; expected no --steps with it")
    if args.quick:
        args.steps, args.eval_every, args.val_batches = 30, 15, 2
        args.d_model, args.layers, args.context, args.batch_size = 32, 1, 32, 8
        args.max_bytes, args.tag = 300_000, args.tag + "_quick"
    args.steps = 1200 if args.steps is None else args.steps
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: expected names from {METHODS}, got {m!r}")
    budgets = list(args.budgets)
    if args.d_model % args.heads:
        p.error(f"--heads: expected a divisor of --d-model {args.d_model}, got {args.heads}")
    command = shlex.join(
        ["python", "benchmarks/bench_transformer.py", *(argv if argv is not None else sys.argv[1:])]
    )

    train, val = stdlib_text(args.val_every, args.max_bytes)
    val_starts = torch.randint(
        0,
        val.numel() - args.context - 1,
        (args.val_batches * args.batch_size,),
        generator=torch.Generator().manual_seed(1234),
    )
    torch.manual_seed(args.seed)
    init = pk.sparsify(
        ByteGPT(args.d_model, args.layers, args.heads, args.context),
        seed=args.seed,
        filter=(lambda name, m: name != "head") if args.dense_head else None,
    )
    total = sum(w.numel() for _, w in pk.budgeted_weights(init))
    print(
        f"{train.numel()} training / {val.numel()} validation bytes; "
        f"{sum(p.numel() for p in init.parameters())} parameters, {total} budgeted",
        flush=True,
    )
    rows = []
    for method in methods:
        for budget in [1.0] if method == "dense" else budgets:
            rows.append(run_one(method, budget, init, train, val, val_starts, args))
    dense = next((r["val_loss"] for r in rows if r["method"] == "dense"), None)
    for r in rows:
        r["vs_dense"] = round(r["val_loss"] / dense, 4) if dense else ""
    info = machine_info(torch.device("cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    cols = [
        "method",
        "budget",
        "val_loss",
        "vs_dense",
        "train_loss",
        "stored_weights",
        "total_weights",
        "density",
        "wall_s",
    ]
    stem = args.out / f"transformer_{args.tag}"
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*cols, *info, "command"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**{c: r[c] for c in cols}, **info, "command": command})
    title = (
        f"byte GPT d{args.d_model} x{args.layers} ctx {args.context} batch {args.batch_size}, "
        f"AdamW lr {args.lr:g}"
        + (f" (sparse {args.sparse_lr:g})" if args.sparse_lr else "")
        + f", {args.steps} steps; stdlib sources"
    )
    plot(rows, stem.with_suffix(".png"), title)
    with stem.with_suffix(".md").open("w") as f:
        f.write(f"`{command}`\n\n{title}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        f.write("\n" + "".join("| " + " | ".join(str(r[c]) for c in cols) + " |\n" for r in rows))
    print()
    print_table(rows, cols)
    print(f"\nwrote {stem}.csv, .png and .md")
    return rows


if __name__ == "__main__":
    main()
