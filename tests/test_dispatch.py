"""The single dispatch point: per-device defaults, forcing by function, context and environment."""

import pytest
import torch

from procrustes_kernels import ops
from procrustes_kernels.ops.update import reference


def test_reference_always_available():
    assert ops.available_backends()["reference"] is True
    assert ops.backend_error("reference") is None


def test_cpu_default_prefers_cpp_when_built():
    expected = "cpp" if ops.available_backends()["cpp"] else "reference"
    assert ops.backend_for("cpu") == expected
    assert ops.backend_for(torch.device("cpu")) == expected


def test_use_backend_restores_previous_choice():
    before = ops.backend_for("cpu")
    with ops.use_backend("reference"):
        assert ops.backend_for("cpu") == "reference"
        assert ops.kernel("compact", "cpu") is reference.compact
    assert ops.backend_for("cpu") == before


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("PROCRUSTES_BACKEND", "reference")
    assert ops.backend_for("cpu") == "reference"
    monkeypatch.setenv("PROCRUSTES_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PROCRUSTES_BACKEND"):
        ops.backend_for("cpu")


def test_bad_backend_names_are_rejected():
    with pytest.raises(ValueError, match="set_backend"):
        ops.set_backend("cuda")
    with pytest.raises(ValueError, match="use_backend|set_backend"):
        with ops.use_backend("gpu"):
            pass
    assert ops.backend_for("cpu") in ops.BACKENDS


def test_import_does_not_initialise_cuda():
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = "import procrustes_kernels, torch; print(torch.cuda.is_initialized())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "False"
