"""Accuracy on a weight budget: DropBack and Procrustes against dense training and two baselines.

For each model, budget (fraction of the conv/linear weights kept) and seed, this trains:

* ``dense``: plain SGD on the nn layers (same seed-derived initial weights as the sparse runs);
* ``dropback``: DropBack, exact top-k, initial values kept (init_decay 1);
* ``procrustes``: Procrustes as in the paper, init_decay 0.9 per step, quantile selection;
* ``procrustes_rel``: Procrustes with a decay tied to the length of training: linear, untracked
  weights reach exactly zero half way (``decay_steps`` = half the training steps,
  ``--decay-frac``), the library's recommendation for short runs;
* ``dropback_tile`` / ``procrustes_rel_tile``: the same with the GPU-shaped granularity: whole
  ``--tile`` tiles (output x input features / channels, whole kernels) tracked or regenerated, the
  unit the sparse compute kernels skip;
* ``static``: a random tracked set chosen at initialisation and never changed, untracked weights
  zero (the same number of stored weights, no reselection); the kept initial weights are scaled by
  ``1 / sqrt(layer density)`` so the signal keeps the dense init's scale (the stronger baseline);
* ``gmp``: gradual magnitude pruning (Zhu & Gupta 2017): dense training with the cubic sparsity
  schedule ``s_t = s_f * (1 - (1 - t / T)^3)`` pruning by magnitude every few steps until 75% of
  training, then fine-tuning the survivors.

Reported per (model, method, budget): test accuracy mean and std over seeds, stored weights, bytes
of the stored model in the block format (values + bitmask + pointers, biases dense), and the weight
diffusion ``||W_final - W_init||_2`` the DropBack paper tracks. Rows go to
``benchmarks/results/accuracy_<dataset>.csv`` with the command line, a plot of accuracy against the
budget to ``accuracy_<dataset>.png`` and a markdown table to ``accuracy_<dataset>.md``.

    python benchmarks/bench_accuracy.py                  # digits, both LeNets, 3 seeds
    python benchmarks/bench_accuracy.py --quick          # smoke run
    python benchmarks/bench_accuracy.py --mnist DIR --models lenet300,lenet5 --epochs 10
    python benchmarks/bench_accuracy.py --cifar10 DIR --models resnet --epochs 30
    python benchmarks/bench_accuracy.py --optimizer adamw --lr 0.003 --weight-decay 0.01 \
        --methods dense,dropback,procrustes_rel --budgets 0.2,0.1,0.04

With ``--optimizer adamw`` every method trains with AdamW instead of SGD with momentum: ``dense``
with ``torch.optim.AdamW``, the sparse methods with the library's ``update="adamw"`` rule, the two
baselines with AdamW on their masked weights; outputs are then ``accuracy_<dataset>_adamw.*``.
``--reselect-every R`` makes the sparse methods keep their tracked sets between every R-th step
(``reselect_every``; name the outputs with ``--tag``).

Over 600 lines on purpose: one script per experiment is what a reader
runs; its parts (data, models, training loops, the report) are short and used only here.
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, machine_info, print_table  # noqa: E402

import procrustes_kernels as pk  # noqa: E402
from procrustes_kernels import BlockStorage, cli  # noqa: E402

METHODS = (
    "dense",
    "dropback",
    "procrustes",
    "procrustes_rel",
    "dropback_tile",
    "procrustes_rel_tile",
    "static",
    "gmp",
)
SPARSE_METHODS = (
    "dropback",
    "procrustes",
    "procrustes_rel",
    "dropback_tile",
    "procrustes_rel_tile",
)
# Sparse methods may carry a budget scope: "procrustes_rel@layer" keeps each layer's share.
DEFAULT_METHODS = (
    "dense",
    "dropback",
    "procrustes",
    "procrustes_rel",
    "procrustes_rel@layer",
    "dropback_tile",
    "procrustes_rel_tile",
    "static",
    "gmp",
)
BUDGETS = (1 / 5, 1 / 10, 1 / 25, 1 / 50)


# -- models ---------------------------------------------------------------------------------------
def lenet300(shape: tuple[int, int, int], classes: int) -> nn.Module:
    """LeNet-300-100: the MLP of the DropBack paper's MNIST experiment."""
    c, h, w = shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, classes),
    )


def lenet5(shape: tuple[int, int, int], classes: int) -> nn.Module:
    """LeNet-5 (6 and 16 5x5 filters, 120-84 dense); small inputs are padded instead of shrunk."""
    c, h, _ = shape
    side = 5 if h >= 28 else 2
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=0 if h >= 28 else 2),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(side),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, classes),
    )


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


def resnet(shape: tuple[int, int, int], classes: int) -> nn.Module:
    """A small ResNet (16-32-64 channels, one basic block per stage) for CIFAR-10 sized inputs."""
    return nn.Sequential(
        nn.Conv2d(shape[0], 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        _Block(16, 16, 1),
        _Block(16, 32, 2),
        _Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, classes),
    )


MODELS = {"lenet300": lenet300, "lenet5": lenet5, "resnet": resnet}


# -- the two baselines ----------------------------------------------------------------------------
def _budgeted(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def dense_optimizer(params, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The dense baseline's optimizer: SGD with momentum, or AdamW (``--optimizer``)."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=args.lr, betas=args.betas, weight_decay=args.weight_decay
        )
    return torch.optim.SGD(
        params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )


class MaskedSGD:
    """The dense optimizer on a model whose budgeted weights are multiplied by fixed-shape masks.

    ``static`` sets the masks once; ``gmp`` updates them on its schedule. Masked weights stay exactly
    zero (their gradient and momentum are masked too).
    """

    def __init__(
        self, model: nn.Module, args: argparse.Namespace, masks: list[torch.Tensor]
    ) -> None:
        self.opt = dense_optimizer(model.parameters(), args)
        self.layers = _budgeted(model)
        self.masks = masks
        self.apply_masks()

    def rescale_kept(self) -> None:
        """Scale the kept weights by ``1 / sqrt(density)`` of their layer, so a layer's outputs
        start with the variance of the dense init (without it, 5 layers at 10% density shrink the
        signal ~300x and the static LeNet-5 does not train at all)."""
        with torch.no_grad():
            for layer, mask in zip(self.layers, self.masks):
                density = float(mask.float().mean())
                if density > 0:
                    layer.weight.mul_(density**-0.5)

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    def apply_masks(self) -> None:
        with torch.no_grad():
            for layer, mask in zip(self.layers, self.masks):
                layer.weight.mul_(mask)
                for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                    buf = self.opt.state.get(layer.weight, {}).get(key)
                    if buf is not None:
                        buf.mul_(mask)

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def step(self) -> None:
        for layer, mask in zip(self.layers, self.masks):
            layer.weight.grad.mul_(mask)
        self.opt.step()
        self.apply_masks()


def random_masks(model: nn.Module, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    """k weights chosen uniformly over all budgeted weights (global, like the sparse budget)."""
    sizes = [m.weight.numel() for m in _budgeted(model)]
    keep = torch.zeros(sum(sizes), dtype=torch.bool)
    keep[torch.randperm(sum(sizes), generator=gen)[:k]] = True
    return [m.view_as(layer.weight) for m, layer in zip(torch.split(keep, sizes), _budgeted(model))]


def magnitude_masks(model: nn.Module, k: int) -> list[torch.Tensor]:
    """Keep the k largest-magnitude weights over all budgeted layers."""
    weights = [m.weight.detach().abs().flatten() for m in _budgeted(model)]
    flat = torch.cat(weights)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, k).indices] = True
    return [
        m.view_as(layer.weight)
        for m, layer in zip(torch.split(keep, [w.numel() for w in weights]), _budgeted(model))
    ]


class GradualMagnitudePruning(MaskedSGD):
    """Zhu & Gupta's cubic schedule from dense to the budget, pruning every ``every`` steps."""

    def __init__(
        self,
        model: nn.Module,
        args: argparse.Namespace,
        k: int,
        total_steps: int,
        every: int = 10,
    ) -> None:
        masks = [torch.ones_like(m.weight, dtype=torch.bool) for m in _budgeted(model)]
        super().__init__(model, args, masks)
        self.model, self.k, self.every = model, k, every
        self.n = sum(m.numel() for m in masks)
        self.end = max(1, int(0.75 * total_steps))
        self.t = 0

    def step(self) -> None:
        super().step()
        self.t += 1
        if self.t % self.every == 0 or self.t == self.end:
            final_sparsity = 1 - self.k / self.n
            frac = min(self.t / self.end, 1.0)
            sparsity = final_sparsity * (1 - (1 - frac) ** 3)
            keep = max(self.k, round((1 - sparsity) * self.n))
            if self.t <= self.end:
                self.masks = magnitude_masks(self.model, keep)
                self.apply_masks()


# -- one run --------------------------------------------------------------------------------------
def stored_model_bytes(model: nn.Module) -> int:
    """Bytes of the model in the block format: tracked values + bitmask + pointers, dense rest."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and pk.is_budgeted(m.weight):
            total += m.weight.storage.nbytes
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight.detach()
            nz = w != 0
            if bool(nz.all()):
                total += w.numel() * w.element_size()
            else:
                block = w[0, 0].numel() if w.dim() == 4 else 16
                total += BlockStorage.from_mask(w, nz, block).nbytes
        for name, p in m.named_parameters(recurse=False):
            if name != "weight":
                total += p.numel() * p.element_size()
    return total


def weight_list(model: nn.Module) -> list[torch.Tensor]:
    return [
        m.weight.effective() if pk.is_budgeted(m.weight) else m.weight.detach().clone()
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]


def run_one(
    method: str,
    sparse_init: nn.Module,
    data: pk.Dataset,
    budget: float,
    args: argparse.Namespace,
    seed: int,
) -> dict:
    total_weights = sum(w.numel() for _, w in pk.budgeted_weights(sparse_init))
    k = max(1, round(budget * total_weights))
    steps_per_epoch = math.ceil(len(data.y_train) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    method, _, scope = method.partition("@")
    if method in SPARSE_METHODS:
        model = copy.deepcopy(sparse_init)
        granularity = "tile" if method.endswith("_tile") else "element"
        base = method.removesuffix("_tile")
        decay = {
            "dropback": {"init_decay": 1.0},
            "procrustes": {"init_decay": 0.9},
            "procrustes_rel": {"decay_steps": max(1, round(total_steps * args.decay_frac))},
        }[base]
        selection = "topk" if base == "dropback" else "quantile"
        if args.optimizer == "adamw":
            rule = {"update": "adamw", "betas": args.betas}
        else:
            rule = {"momentum": args.momentum}
        opt = pk.DropBack(
            model.parameters(),
            args.lr,
            budget=k,
            weight_decay=args.weight_decay,
            **rule,
            **decay,
            selection=selection,
            scope=scope or "global",
            granularity=granularity,
            tile=args.tile,
            reselect_every=args.reselect_every,
        )
    else:
        model = pk.densify(copy.deepcopy(sparse_init))
        if method == "dense":
            opt = dense_optimizer(model.parameters(), args)
        elif method == "static":
            masks = random_masks(model, k, torch.Generator().manual_seed(seed + 12345))
            opt = MaskedSGD(model, args, masks)
            opt.rescale_kept()
        else:
            opt = GradualMagnitudePruning(model, args, k, total_steps)
    init = weight_list(model)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt.opt if isinstance(opt, MaskedSGD) else opt,
        lambda t: (
            min(1.0, (t + 1) / max(1.0, args.warmup * total_steps))
            * 0.5
            * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))
        ),
    )
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    diverged = False
    for _ in range(args.epochs):
        perm = torch.randperm(len(data.y_train), generator=gen)
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if not math.isfinite(float(loss.detach())):
                diverged = True
                break
            loss.backward()
            try:
                opt.step()
            except FloatingPointError:
                diverged = True
                break
            sched.step()
        if diverged:
            break
    wall = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(data.x_test[i : i + 1000]).argmax(1) == data.y_test[i : i + 1000]).sum())
            for i in range(0, len(data.y_test), 1000)
        )
    final = weight_list(model)
    diffusion = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(final, init)))
    stored = sum(int((w != 0).sum()) for w in final) if method in ("static", "gmp") else None
    if method == "dense":
        stored = total_weights
    elif stored is None:
        stored = sum(w.nnz for _, w in pk.budgeted_weights(model))
    if diverged:
        print(
            f"  {method}{'@' + scope if scope else ''} budget {budget:g} seed {seed}: diverged",
            flush=True,
        )
    return {
        "acc": float("nan") if diverged else 100.0 * correct / len(data.y_test),
        "diverged": diverged,
        "stored_weights": stored,
        "stored_bytes": stored_model_bytes(model),
        "diffusion": diffusion,
        "wall_s": wall,
        "total_weights": total_weights,
    }


_DATA: dict = {}


def _worker_init() -> None:
    torch.set_num_threads(1)
    if "cpp" in pk.ops.available_backends() and pk.ops.available_backends()["cpp"]:
        from procrustes_kernels.ops.update import cpp as cpp_ops

        cpp_ops.set_num_threads(1)


def _run_task(task: tuple) -> dict:
    """One (model, method, budget) configuration at one seed; data loaded once per process."""
    (model_name, method, budget), seed, args = task
    key = (args.mnist, args.cifar10, args.max_train)
    if key not in _DATA:
        _DATA[key] = load(args)
    data = _DATA[key]
    torch.manual_seed(seed)
    sparse_init = pk.sparsify(MODELS[model_name](data.input_shape, data.num_classes), seed=seed)
    return run_one(method, sparse_init, data, budget, args, seed)


def load(args: argparse.Namespace) -> pk.Dataset:
    if args.mnist:
        data = pk.load_mnist(args.mnist)
    elif args.cifar10:
        data = pk.load_cifar10(args.cifar10)
    else:
        data = pk.load_digits(seed=0)
    if args.max_train and args.max_train < len(data.y_train):
        keep = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[
            : args.max_train
        ]
        data.x_train, data.y_train = data.x_train[keep], data.y_train[keep]
    return data


def plot(rows: list[dict], models: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        dense = [r for r in mine if r["method"] == "dense"]
        if dense:
            ax.axhline(dense[0]["acc_mean"], color="k", ls="--", lw=1, label="dense")
        for method in dict.fromkeys(r["method"] for r in mine if r["method"] != "dense"):
            pts = sorted((r for r in mine if r["method"] == method), key=lambda r: r["compression"])
            if pts:
                ax.errorbar(
                    [r["compression"] for r in pts],
                    [r["acc_mean"] for r in pts],
                    yerr=[r["acc_std"] for r in pts],
                    marker="o",
                    ms=4,
                    capsize=3,
                    label=method,
                )
        ax.set_xscale("log")
        ax.set_xticks([5, 10, 25, 50], labels=["5x", "10x", "25x", "50x"])
        ax.set_xlabel("compression (all weights / stored weights)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--mnist", metavar="DIR")
    src.add_argument("--cifar10", metavar="DIR")
    p.add_argument("--models", default=None, help=f"comma-separated from {sorted(MODELS)}")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"names from {METHODS}, sparse ones optionally @layer",
    )
    p.add_argument(
        "--budgets",
        type=cli.fractions,
        default=None,
        help="fractions in (0, 1], comma-separated (default "
        + ",".join(f"{b:g}" for b in BUDGETS)
        + "; --quick: 0.1,0.04)",
    )
    p.add_argument(
        "--decay-frac",
        type=cli.number_in(0, 1, low_open=True),
        default=0.5,
        help="procrustes_rel: fraction of training after which untracked weights are zero",
    )
    p.add_argument("--tile", default="16,16", help="rows,cols of a tile for the *_tile methods")
    p.add_argument("--seeds", type=cli.int_at_least(1), default=None, help="default 3")
    p.add_argument("--epochs", type=cli.int_at_least(1), default=20)
    p.add_argument("--batch-size", type=cli.int_at_least(1), default=64)
    p.add_argument("--lr", type=cli.float_at_least(0), default=0.1)
    p.add_argument(
        "--momentum",
        type=cli.number_in(0, 1, high_open=True),
        default=None,
        help="SGD momentum (--optimizer sgd; default 0.9)",
    )
    p.add_argument(
        "--optimizer",
        choices=("sgd", "adamw"),
        default="sgd",
        help="base rule of every method: SGD with momentum, or AdamW (sparse: update='adamw')",
    )
    p.add_argument(
        "--betas",
        type=cli.betas,
        default=(0.9, 0.999),
        help="AdamW's beta1,beta2 (--optimizer adamw)",
    )
    p.add_argument("--weight-decay", type=cli.float_at_least(0), default=0.0)
    p.add_argument(
        "--reselect-every",
        type=cli.int_at_least(1),
        default=1,
        help="the sparse methods select a new tracked set every R steps (SGD only)",
    )
    p.add_argument(
        "--warmup",
        type=cli.number_in(0, 1, high_open=True),
        default=0.0,
        help="fraction of the steps of linear lr warm-up",
    )
    p.add_argument("--tag", default="", help="suffix of the output files' names")
    p.add_argument("--max-train", type=cli.int_at_least(1), default=None)
    p.add_argument(
        "--jobs", type=cli.int_at_least(1), default=1, help="runs in parallel, one thread each"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="one model, one seed, 2 budgets, 2 epochs (so not with --seeds or --budgets)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.optimizer == "adamw" and args.momentum is not None:
        p.error("--momentum: applies to --optimizer sgd; AdamW's first moment is --betas")
    if args.optimizer == "adamw" and args.reselect_every > 1:
        p.error("--reselect-every: applies to --optimizer sgd (AdamW reselects every step)")
    args.momentum = 0.9 if args.momentum is None else args.momentum
    if args.quick:
        for name in ("seeds", "budgets"):
            if getattr(args, name) is not None:
                p.error(f"--quick: sets its own --{name}; expected no --{name} with it")
        args.models = args.models or "lenet300"
        args.seeds, args.epochs = 1, min(args.epochs, 2)
        args.budgets = (0.1, 0.04)
        args.max_train = args.max_train or 512
    args.seeds = 3 if args.seeds is None else args.seeds
    budgets = list(BUDGETS if args.budgets is None else args.budgets)
    default_models = "resnet" if args.cifar10 else "lenet300,lenet5"
    models = (args.models or default_models).split(",")
    for m in models:
        if m not in MODELS:
            p.error(f"--models: expected names from {sorted(MODELS)}, got {m!r}")
    methods = args.methods.split(",")
    for m in methods:
        base, _, scope = m.partition("@")
        if (
            base not in METHODS
            or scope not in ("", "global", "layer")
            or (scope and base in ("dense", "static", "gmp"))
        ):
            p.error(f"--methods: expected names from {METHODS}, got {m!r}")
    try:
        args.tile = tuple(int(v) for v in args.tile.split(","))
        assert len(args.tile) == 2 and min(args.tile) > 0
    except (ValueError, AssertionError):
        p.error(f"--tile: expected two positive ints 'rows,cols', got {args.tile!r}")
    command = shlex.join(
        ["python", "benchmarks/bench_accuracy.py", *(argv if argv is not None else sys.argv[1:])]
    )
    data = load(args)
    tag = data.name + ("_adamw" if args.optimizer == "adamw" else "")
    tag += ("_" + args.tag if args.tag else "") + ("_quick" if args.quick else "")
    print(
        f"{data!r}; models {models}; methods {methods}; budgets {budgets}; {args.seeds} seeds",
        flush=True,
    )

    configs = [
        (model_name, method, budget)
        for model_name in models
        for method in methods
        for budget in ([1.0] if method == "dense" else budgets)
    ]
    tasks = [(cfg, seed, args) for cfg in configs for seed in range(args.seeds)]
    _DATA[(args.mnist, args.cifar10, args.max_train)] = data
    if args.jobs > 1:
        # Runs are small: one thread each, several runs at once, uses the cores better.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.jobs, initializer=_worker_init) as pool:
            results = pool.map(_run_task, tasks, chunksize=1)
    else:
        results = [_run_task(t) for t in tasks]
    by_config: dict = {}
    for (cfg, _, _), res in zip(tasks, results):
        by_config.setdefault(cfg, []).append(res)

    rows = []
    for (model_name, method, budget), runs in by_config.items():
        # A diverged run (non-finite loss or gradient) counts in "diverged", not in the mean.
        accs = [r["acc"] for r in runs if not r["diverged"]] or [float("nan")]
        row = {
            "dataset": data.name,
            "model": model_name,
            "method": method,
            "budget": round(budget, 4),
            "compression": round(
                runs[0]["total_weights"] / statistics.mean(r["stored_weights"] for r in runs), 2
            ),
            "acc_mean": round(statistics.mean(accs), 2),
            "acc_std": round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0,
            "seeds": len(runs),
            "diverged": sum(r["diverged"] for r in runs),
            "stored_weights": round(statistics.mean(r["stored_weights"] for r in runs)),
            "total_weights": runs[0]["total_weights"],
            "stored_bytes": round(statistics.mean(r["stored_bytes"] for r in runs)),
            "diffusion": round(statistics.mean(r["diffusion"] for r in runs), 3),
            "wall_s": round(statistics.mean(r["wall_s"] for r in runs), 1),
        }
        rows.append(row)
        print(
            f"{model_name:<9} {method:<21} budget {budget:<6.3g} acc {row['acc_mean']:6.2f} "
            f"+- {row['acc_std']:<5} stored {row['stored_weights']:>7} ({row['compression']}x) "
            f"diffusion {row['diffusion']:.2f}  {row['wall_s']:.1f} s/run",
            flush=True,
        )

    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info(torch.device("cpu"))
    import csv

    with (args.out / f"accuracy_{tag}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0].keys(), *info.keys(), "backend", "command"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **info, "backend": pk.ops.backend_for("cpu"), "command": command})
    rule = (
        f"AdamW lr {args.lr:g} cosine, betas {args.betas}"
        if args.optimizer == "adamw"
        else f"SGD lr {args.lr:g} cosine, momentum {args.momentum:g}"
    )
    title = (
        f"{data.name}: {rule}, warm-up {args.warmup:g}, weight decay {args.weight_decay:g}, "
        f"batch {args.batch_size}, "
        f"{args.epochs} epochs, {args.seeds} seeds (mean +- std)"
    )
    plot(rows, models, args.out / f"accuracy_{tag}.png", title)
    cols = [
        "model",
        "method",
        "budget",
        "compression",
        "acc_mean",
        "acc_std",
        "diverged",
        "stored_weights",
        "stored_bytes",
        "diffusion",
    ]
    with (args.out / f"accuracy_{tag}.md").open("w") as f:
        f.write(
            f"`{command}`\n\n{title}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        )
        for r in rows:
            f.write("| " + " | ".join(str(r[c]) for c in cols) + " |\n")
    print()
    print_table(rows, cols)
    print(f"\nwrote {args.out}/accuracy_{tag}.csv, .png and .md")
    return rows


if __name__ == "__main__":
    main()
