"""Demo: dense SGD vs DropBack vs Procrustes on a small CNN with a 10x weight budget.

All three runs start from the same seed-derived initial weights and see the same batches. The
default dataset is scikit-learn's 8x8 digits (no download); ``--mnist DIR`` / ``--cifar10 DIR``
use files already on disk. Prints a results table and writes ``OUT/results.csv`` and
``OUT/accuracy.png``::

    python -m procrustes_kernels.demo                 # digits, ~1-2 minutes on 2 CPU cores
    python -m procrustes_kernels.demo --quick         # smoke test
    python -m procrustes_kernels.demo --init-decay 0.9
    python -m procrustes_kernels.demo --mnist ~/data/mnist --max-train 10000 --epochs 5
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import cli
from .convert import densify, sparsify
from .data import Dataset, load_cifar10, load_digits, load_mnist
from .optim import DropBack, Procrustes
from .weight import is_budgeted

CSV_COLUMNS = ("method", "test_acc_pct", "tracked_weights", "compression_x", "stored_bytes",
               "wall_time_s", "command")  # fmt: skip


@dataclass
class RunResult:
    method: str
    test_acc: float
    tracked: int
    total: int
    stored_bytes: int
    wall_s: float
    acc_per_epoch: list[float] = field(default_factory=list)

    @property
    def compression(self) -> float:
        return self.total / max(self.tracked, 1)


def make_model(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """LeNet-5-like CNN; the adaptive pool makes the flatten size 64*2*2 for any H, W >= 4."""
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def weight_count(model: nn.Module) -> int:
    """Weights of the conv / linear layers (biases excluded), dense or sparse."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def tracked_count(model: nn.Module) -> int:
    """Stored weights: the tracked sets of sparse layers, every weight of dense ones."""
    n = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            n += m.weight.nnz if is_budgeted(m.weight) else m.weight.numel()
    return n


def stored_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    return buf.getbuffer().nbytes


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(y), batch)
    )
    model.train()
    return 100.0 * correct / max(len(y), 1)


def train(
    method: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Dataset,
    epochs: int,
    batch_size: int,
    seed: int,
) -> RunResult:
    """Train with a per-step cosine schedule; data order depends on ``seed`` only."""
    gen = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    accs: list[float] = []
    start = time.perf_counter()
    model.train()
    with tqdm(range(epochs), desc=f"{method:<10}", unit="ep", leave=True) as bar:
        for _ in bar:
            perm = torch.randperm(n, generator=gen)
            total_loss = 0.0
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.item() * len(idx)
            accs.append(evaluate(model, data.x_test, data.y_test))
            bar.set_postfix(loss=f"{total_loss / n:.3f}", acc=f"{accs[-1]:.1f}%")
    wall = time.perf_counter() - start
    return RunResult(
        method,
        accs[-1],
        tracked_count(model),
        weight_count(model),
        stored_bytes(model, opt),
        wall,
        accs,
    )


def load_data(args: argparse.Namespace) -> Dataset:
    if args.mnist:
        data = load_mnist(args.mnist)
    elif args.cifar10:
        data = load_cifar10(args.cifar10)
    else:
        data = load_digits(seed=args.seed)
    if args.max_train and args.max_train < len(data.y_train):
        keep = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(args.seed))
        keep = keep[: args.max_train].sort().values
        data.x_train, data.y_train = data.x_train[keep], data.y_train[keep]
    return data


def write_outputs(results: list[RunResult], title: str, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in results:
            w.writerow(
                [
                    r.method,
                    f"{r.test_acc:.2f}",
                    r.tracked,
                    f"{r.compression:.2f}",
                    r.stored_bytes,
                    f"{r.wall_s:.1f}",
                    command,
                ]
            )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        epochs = range(1, len(r.acc_per_epoch) + 1)
        ax.plot(
            epochs,
            r.acc_per_epoch,
            marker="o",
            ms=3,
            label=f"{r.method} ({r.test_acc:.1f}%, {r.compression:.1f}x)",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    lo = min(min(r.acc_per_epoch) for r in results)
    ax.set_ylim(max(0.0, min(lo, 80.0) - 2), 100.5)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m procrustes_kernels.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--mnist", metavar="DIR", help="MNIST IDX files (default: sklearn digits)")
    src.add_argument("--cifar10", metavar="DIR", help="CIFAR-10 python batches")
    p.add_argument("--epochs", type=cli.int_at_least(1), default=20)
    p.add_argument("--batch-size", type=cli.int_at_least(1), default=64)
    p.add_argument("--lr", type=cli.float_at_least(0), default=0.1)
    p.add_argument("--momentum", type=cli.number_in(0, 1, high_open=True), default=0.9)
    p.add_argument(
        "--budget", type=cli.fraction, default=0.1, help="tracked fraction in (0, 1] (0.1 = 10x)"
    )
    p.add_argument(
        "--init-decay",
        type=cli.number_in(0, 1, low_open=True),
        default=None,
        help="Procrustes per-step decay as in the paper, e.g. 0.9 (default: linear decay "
        "reaching zero at half of training, decay_steps)",
    )
    p.add_argument("--seed", type=cli.int_at_least(0), default=0)
    p.add_argument(
        "--max-train",
        type=cli.int_at_least(1),
        default=None,
        metavar="N",
        help="use a random subset of N training examples",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--quick", action="store_true", help="2 epochs, for a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 2)
    command = shlex.join(["python", "-m", "procrustes_kernels.demo", *(argv or sys.argv[1:])])

    data = load_data(args)
    total_steps = args.epochs * math.ceil(len(data.y_train) / args.batch_size)
    if args.init_decay is None:
        half = max(total_steps // 2, 1)
        decay_kw = {"decay_steps": half}
        decay_txt = f"decay_steps={half} (linear decay, zero at step {half + 1}/{total_steps})"
    else:
        decay_kw = {"init_decay": args.init_decay}
        decay_txt = f"init_decay={args.init_decay:g}"
    print(f"{data!r}, {args.epochs} epochs x {total_steps // args.epochs} steps")

    torch.manual_seed(args.seed)
    sparse = sparsify(make_model(data.input_shape, data.num_classes), seed=args.seed)
    mom = args.momentum
    dense, db, pc = densify(copy.deepcopy(sparse)), copy.deepcopy(sparse), copy.deepcopy(sparse)
    runs: list[tuple[str, nn.Module, torch.optim.Optimizer]] = [
        ("dense", dense, torch.optim.SGD(dense.parameters(), args.lr, momentum=mom)),
        ("DropBack", db, DropBack(db.parameters(), args.lr, budget=args.budget, momentum=mom,
                                  init_decay=1.0, selection="topk")),
        ("Procrustes", pc, Procrustes(pc.parameters(), args.lr, budget=args.budget, momentum=mom,
                                      selection="quantile", **decay_kw)),
    ]  # fmt: skip

    results = [
        train(name, model, opt, data, args.epochs, args.batch_size, args.seed)
        for name, model, opt in runs
    ]

    title = (
        f"{data.name}: budget {args.budget:g} ({1 / args.budget:.0f}x), "
        f"lr {args.lr:g} cosine, momentum {args.momentum:g}, batch {args.batch_size}, "
        f"{args.epochs} epochs, seed {args.seed}\nProcrustes {decay_txt}"
    )
    print(f"\n{title}")
    print(
        f"{'method':<11}{'test acc %':>11}{'tracked':>10}{'compr. x':>10}"
        f"{'stored B':>10}{'wall s':>8}"
    )
    for r in results:
        print(
            f"{r.method:<11}{r.test_acc:>11.2f}{r.tracked:>10}{r.compression:>10.2f}"
            f"{r.stored_bytes:>10}{r.wall_s:>8.1f}"
        )
    write_outputs(results, title, args.out, command)
    print(f"wrote {args.out / 'results.csv'} and {args.out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
