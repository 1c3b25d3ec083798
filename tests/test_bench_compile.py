"""bench_compile.py on CPU in its quick form (no timings): every case traces in one graph with no
break, compiles with fullgraph, keeps one graph over changing tracked counts, and exports with
the custom ops of its compute path."""

import csv
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_run_reports_the_trace_facts(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_compile", ROOT / "benchmarks" / "bench_compile.py"
        )
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        out = tmp_path / "compile.csv"
        bench.main(["--quick", "--steps", "6", "--out", str(out)])
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    with out.open() as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(bench.CASES)
    for case, r in rows.items():
        assert (r["graphs"], r["breaks"], r["fullgraph"]) == ("1", "0", "ok")
        assert int(r["train_graphs"]) <= 2
        assert case == "nn" or int(r["counts"]) > 2  # the tracked counts did change
        assert r["device"] == "cpu"
    assert rows["nn"]["export"] == "ok"
    assert rows["dropback materialise"]["export"] == "ok: materialize"
    assert rows["procrustes sparse"]["export"] == "ok: sparse_linear"
