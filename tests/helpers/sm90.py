"""Compile Triton kernels for sm_90 without a GPU: the interpreter accepts things the compiler
rejects (and the other way round), so every kernel file has one test that lowers its kernels to
cubins for the GPU machine's target, in a subprocess without ``TRITON_INTERPRET``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

__all__ = ["compile_for_sm90", "without_gpu"]

ROOT = Path(__file__).resolve().parents[2]

# On a GPU the other tests compile every kernel for real (and the check would only repeat them).
without_gpu = pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the other tests compile every kernel for real"
)

# What every snippet starts with: the imports and ``compile_sm90(fn, sig, consts, **options)``,
# which lowers one kernel (``sig``: the non-constexpr arguments' types, ``consts``: the constexpr
# values), prints ``compiled <name>`` and returns the compiled kernel.
PRELUDE = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_sm90(fn, sig, consts, **options):
    src = ASTSource(fn, {**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
    options = {"num_warps": 4, "enable_fp_fusion": False, **options}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    print("compiled", fn.__name__)
    return kernel
"""


def compile_for_sm90(snippet: str, cache_dir: Path, expected: int, timeout: float = 300) -> str:
    """Run ``snippet`` (after :data:`PRELUDE`) in a fresh interpreter without ``TRITON_INTERPRET``,
    with the repository on ``PYTHONPATH`` and its Triton cache in ``cache_dir``; assert that it
    exits cleanly after compiling ``expected`` kernels. Returns its stdout."""
    script = PRELUDE + textwrap.dedent(snippet)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(cache_dir))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    compiled = out.stdout.count("compiled")
    assert compiled == expected, f"compiled {compiled} kernels, expected {expected}:\n{out.stdout}"
    return out.stdout
