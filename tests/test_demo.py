"""Smoke test of the demo end to end (accuracy is measured by running the demo, not asserted here)."""

import csv

from procrustes_kernels import demo


def test_demo_quick_writes_table_and_plot(tmp_path, capsys):
    demo.main(["--quick", "--epochs", "1", "--max-train", "256", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Procrustes decay_steps=" in out  # the decay used is always printed
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["dense", "DropBack", "Procrustes"]
    dense, dropback, procrustes = rows
    assert int(dense["tracked_weights"]) == 52768
    assert int(dropback["tracked_weights"]) == round(0.1 * 52768)
    assert 0.5 * 5277 < int(procrustes["tracked_weights"]) < 1.5 * 5277
    assert int(dropback["stored_bytes"]) < 0.2 * int(dense["stored_bytes"])
    assert all(0.0 <= float(r["test_acc_pct"]) <= 100.0 for r in rows)
    png = (tmp_path / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
