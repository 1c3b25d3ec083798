"""Smoke test of bench_layers.py --quick on CPU: every provider, granularity and table is produced.
Timings are not asserted (they live in benchmarks/results/)."""

import csv
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_layers", ROOT / "benchmarks" / "bench_layers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_csv_and_plot(tmp_path):
    bench = _load()
    out = tmp_path / "layers.csv"
    bench.main(["--quick", "--repeats", "1", "--out", str(out)])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == set(bench.PROVIDERS)
    assert {r["granularity"] for r in rows} == {"element", "tile"}
    assert {r["density"] for r in rows} == {"1.0", "0.1"}
    assert any(r["case"].startswith("linear") for r in rows)
    assert any(r["case"].startswith("conv") for r in rows)
    for r in rows:
        assert float(r["step_ms"]) > 0 and r["torch"] and r["date"]
        if r["provider"] == "nn":
            assert float(r["x_nn_step"]) == 1.0
    # Tile granularity at 10% leaves most tiles empty; element granularity almost none.
    tile = [r for r in rows if r["granularity"] == "tile" and r["density"] == "0.1"]
    elem = [r for r in rows if r["granularity"] == "element" and r["density"] == "0.1"]
    assert max(float(r["tile_density"]) for r in tile if r["case"].startswith("linear")) < 0.5
    assert min(float(r["tile_density"]) for r in elem) > 0.9
    # Compressed storage at 10% is far below the dense weight.
    for case in {r["case"] for r in tile}:
        nn_bytes = next(
            int(r["bytes"]) for r in tile if r["case"] == case and r["provider"] == "nn"
        )
        sparse_bytes = next(
            int(r["bytes"]) for r in tile if r["case"] == case and r["provider"] == "sparse"
        )
        assert sparse_bytes < 0.2 * nn_bytes
    with (tmp_path / "layers_schedules.csv").open() as f:
        sched = {r["schedule"]: r for r in csv.DictReader(f)}
    assert set(sched) == {"grid", "balanced", "unbalanced"}
    assert float(sched["balanced"]["makespan_ratio"]) < float(sched["unbalanced"]["makespan_ratio"])
    assert (tmp_path / "layers.png").exists()
