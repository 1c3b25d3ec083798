"""Shared helpers of the benchmark scripts: timing, machine description, CSV output."""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info(device: torch.device) -> dict[str, str]:
    """Columns describing where a number was measured, saved beside every row."""
    info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host_cpu": _cpu_name(),
        "cpu_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "commit": _git_commit(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "none"
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_ms(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median and 20/80% quantiles of ``fn``'s wall time in ms (CUDA-synchronised on GPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def copy_bandwidth_gbs(device: torch.device, numel: int = 1 << 26) -> float:
    """Measured device copy bandwidth (read + write bytes per second), the roofline reference."""
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, repeats=10, warmup=2)["median_ms"]
    return 2 * numel * 4 / (t * 1e-3) / 1e9


def write_csv(rows: list[dict], path: Path) -> None:
    """Append ``rows`` to ``path`` (header written when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys())
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
