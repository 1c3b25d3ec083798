"""Command lines refuse bad values the argparse way: exit code 2 and one line naming the argument,
no traceback; the benchmark scripts' conflicting options are refused, not silently overridden."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from procrustes_kernels import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refused(main, argv, capsys, argument):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and argument in lines[0], lines
    return lines[0]


@pytest.mark.parametrize(
    "argv,argument",
    [
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "x"], "--epochs"),
        (["--budget", "2"], "--budget"),
        (["--budget", "0"], "--budget"),
        (["--lr", "nan"], "--lr"),
        (["--momentum", "1"], "--momentum"),
        (["--init-decay", "0"], "--init-decay"),
        (["--batch-size", "0"], "--batch-size"),
        (["--max-train", "-3"], "--max-train"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_demo_refuses_bad_values(argv, argument, capsys):
    line = _refused(demo.main, argv, capsys, argument)
    assert "expected" in line


@pytest.mark.parametrize(
    "argv,argument",
    [
        (["--seeds", "0"], "--seeds"),
        (["--epochs", "0"], "--epochs"),
        (["--jobs", "0"], "--jobs"),
        (["--budgets", "0.1,2"], "--budgets"),
        (["--budgets", "a"], "--budgets"),
        (["--lr", "-1"], "--lr"),
        (["--quick", "--budgets", "0.5"], "--quick"),
        (["--quick", "--seeds", "3"], "--quick"),
        (["--optimizer", "adamw", "--momentum", "0.5"], "--momentum"),
        (["--betas", "0.9,1.5"], "--betas"),
        (["--warmup", "1"], "--warmup"),
    ],
)
def test_bench_accuracy_refuses_bad_and_conflicting_values(argv, argument, capsys):
    _refused(_bench("bench_accuracy").main, argv, capsys, argument)


@pytest.mark.parametrize(
    "argv,argument",
    [
        (["--steps", "0"], "--steps"),
        (["--budgets", "1.5"], "--budgets"),
        (["--heads", "5"], "--heads"),
        (["--methods", "sgd"], "--methods"),
        (["--quick", "--steps", "100"], "--quick"),
    ],
)
def test_bench_transformer_refuses_bad_and_conflicting_values(argv, argument, capsys):
    _refused(_bench("bench_transformer").main, argv, capsys, argument)
