"""Smoke test of bench_train_step.py on CPU: every model and provider gets a row with positive
timings and its ratio to the nn step. Timings are not asserted (they live in benchmarks/results/)."""

import csv
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_run_writes_a_row_per_model_and_provider(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_train_step", ROOT / "benchmarks" / "bench_train_step.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "steps.csv"
    bench.main(["--repeats", "2", "--out", str(out)])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(bench.models()) * len(bench.PROVIDERS)
    assert {r["provider"] for r in rows} == set(bench.PROVIDERS)
    for r in rows:
        assert float(r["step_ms"]) > 0 and float(r["fwd_ms"]) > 0
        if r["provider"] == "nn":
            assert float(r["x_nn_step"]) == 1.0
        assert r["device"] == "cpu" and r["torch"]
