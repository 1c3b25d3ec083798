"""Smoke test of the accuracy benchmark's --quick mode: it runs end to end and writes its outputs.
Accuracy itself is not asserted here; it lives in benchmarks/results/."""

import csv
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_accuracy", ROOT / "benchmarks" / "bench_accuracy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_csv_plot_and_table(tmp_path):
    bench = _load()
    rows = bench.main(["--quick", "--out", str(tmp_path)])
    methods = {r["method"] for r in rows}
    assert methods == set(bench.DEFAULT_METHODS)
    with (tmp_path / "accuracy_digits_quick.csv").open() as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == len(rows) == 1 + 2 * (len(bench.DEFAULT_METHODS) - 1)
    assert all(
        r["command"].startswith("python benchmarks/bench_accuracy.py --quick") for r in saved
    )
    for r in saved:
        budget = float(r["budget"])
        total = int(r["total_weights"])
        stored = int(r["stored_weights"])
        if r["method"] == "dense":
            assert stored == total
        elif r["method"].endswith("_tile"):  # whole tiles, up to the budget
            assert round(budget * total) - 16 * 16 < stored <= round(budget * total)
        elif r["method"].startswith("procrustes"):  # the quantile estimate is approximate
            assert abs(stored - budget * total) <= 0.25 * budget * total
        else:
            assert stored == round(budget * total)
        assert float(r["diffusion"]) >= 0 and int(r["stored_bytes"]) > 0
    png = (tmp_path / "accuracy_digits_quick.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    table = (tmp_path / "accuracy_digits_quick.md").read_text()
    assert "| model | method | budget |" in table and "procrustes_rel@layer" in table
