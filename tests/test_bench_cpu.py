"""Smoke test of bench_cpu.py: every provider of the pass table and every configuration of the
step table gets a row with positive numbers and its ratio to the baseline measured beside it.
Timings are not asserted (they live in benchmarks/results/)."""

import csv
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / "benchmarks" / "bench_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_every_row(tmp_path, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    bench.main(
        [
            "--quick",
            "--rounds",
            "2",
            "--steps",
            "2",
            "--models",
            "mlp",
            "--tag",
            "t",
            "--densities",
            "0.1",
        ]
    )
    passes = _rows(tmp_path / "cpu_passes_t.csv")
    providers = {"nn", "materialise", "sparse", "sparse_keep"}
    assert providers <= {r["provider"] for r in passes}
    for r in passes:
        assert float(r["ms"]) > 0 and r["command"].startswith("bench_cpu.py")
        if r["provider"] == "nn":
            assert float(r["x_nn"]) == 1.0
    steps = _rows(tmp_path / "cpu_steps_t.csv")
    assert [(r["method"], r["reselect_every"]) for r in steps] == [
        ("dense", "1"),
        ("dropback", "1"),
        ("dropback", "10"),
        ("procrustes", "1"),
        ("procrustes", "10"),
        ("procrustes_layer", "1"),
        ("procrustes_layer", "10"),
    ]
    for r in steps:
        assert float(r["ms"]) > 0 and float(r["peak_mb"]) > 0
    assert steps[4]["keep_ms"] and steps[4]["paths"] == "sparse"  # Procrustes after its decay
    assert steps[6]["keep_ms"] and steps[6]["paths"] == "sparse"  # the same, per-layer budgets
    assert steps[2]["keep_ms"] and steps[2]["paths"] == "dense"  # DropBack: w0 is not zero
    for table in ("passes", "steps"):
        assert (tmp_path / f"cpu_{table}_t.md").read_text().startswith("# CPU benchmark")


@pytest.mark.parametrize(
    "argv", [["--providers", "nn,bogus"], ["--models", "vgg"], ["--rounds", "0"]]
)
def test_bad_arguments_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as err:
        _bench().main(argv)
    assert err.value.code == 2 and "argument" in capsys.readouterr().err
