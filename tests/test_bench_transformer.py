"""Smoke test of the transformer benchmark's --quick mode: the byte model trains dense and on the
AdamW rule end to end and the outputs are written. The losses themselves are in
benchmarks/results/transformer_*.md."""

import csv
import importlib.util
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_run_writes_csv_plot_and_table(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_transformer", ROOT / "benchmarks" / "bench_transformer.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--out", str(tmp_path)])
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("dense", 1.0),
        ("dropback", 0.1),
        ("dropback", 0.04),
        ("procrustes", 0.1),
        ("procrustes", 0.04),
    ]
    for r in rows:
        assert math.isfinite(r["val_loss"]) and 0 < r["val_loss"] < math.log(256) + 0.5
        if r["method"] == "dropback":
            assert r["stored_weights"] == round(r["budget"] * r["total_weights"])
        elif r["method"] == "procrustes":
            assert 0.9 * r["budget"] * r["total_weights"] <= r["stored_weights"]
            assert r["stored_weights"] <= 1.1 * r["budget"] * r["total_weights"] + 1
    with (tmp_path / "transformer_stdlib_quick.csv").open() as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == 5 and saved[0]["command"].startswith("python benchmarks/bench_transformer")
    assert (tmp_path / "transformer_stdlib_quick.png").read_bytes().startswith(b"\x89PNG")
