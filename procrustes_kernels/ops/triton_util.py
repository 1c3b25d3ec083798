"""Host and device plumbing shared by every Triton kernel of the package (``update/`` and
``compute/``): whether Triton interprets, argument checks and conversions, launch defaults, and
the one rounding helper.

Imported only by the Triton backends, so importing the package never imports Triton.
"""

from __future__ import annotations

import struct

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "INTERPRETED",
    "OFFS64_FROM",
    "needs_offs64",
    "check_device",
    "check_launch",
    "default_block",
    "nonempty",
    "f32",
    "f64_bits",
    "is_pow2_at_least",
    "round_to",
]


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """``x`` rounded to ``dtype`` once, to nearest even, on the GPU and in the interpreter alike.

    The interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even); integer
    rounding on the bit pattern gives torch's result on both. Conversions between the two 16-bit
    types go through float32 (exact), as torch's do; float64 converts directly (one rounding).
    """
    if x.dtype == dtype:
        y = x
    elif x.dtype == tl.float64:
        y = x.to(dtype)
    elif dtype == tl.bfloat16:
        xf = x.to(tl.float32)
        b = xf.to(tl.int32, bitcast=True)
        r = (b + (0x7FFF + ((b >> 16) & 1))) >> 16
        r = tl.where(xf != xf, 0x7FC0, r)
        y = r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif dtype == tl.float64:
        y = x.to(dtype)
    else:
        y = x.to(tl.float32).to(dtype)
    return y


# triton.jit chose interpreter or compiler when Triton was imported, whatever the environment says
# now (TRITON_INTERPRET=1 must be set before); only the interpreter takes CPU tensors.
INTERPRETED = not isinstance(round_to, triton.runtime.jit.JITFunction)

# Tensors spanning this many elements need int64 offsets. Read at each launch, so that tests can
# lower it to run the int64 path on small tensors.
OFFS64_FROM = 2**31


def needs_offs64(*spans: int) -> bool:
    """Whether offsets up to ``max(spans)`` need int64 arithmetic in a kernel."""
    return max(spans) >= OFFS64_FROM


def check_device(fn: str, t: Tensor, name: str = "a tensor") -> None:
    """CUDA tensors, or CPU tensors under the interpreter."""
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            f"{fn}: expected CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, "
            f"for CPU tensors), got {name} on {t.device}"
        )


def is_pow2_at_least(v: object, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low and not v & (v - 1)


def check_launch(
    fn: str,
    block: int | None,
    num_warps: int | None,
    num_stages: int | None = None,
    *,
    block_name: str = "block_m",
    block_min: int = 16,
) -> None:
    """Launch overrides, when given: ``block`` a power of two >= ``block_min``, ``num_warps`` a
    power of two up to 32, ``num_stages`` a positive int."""
    if block is not None and not is_pow2_at_least(block, block_min):
        raise ValueError(
            f"{fn}: expected {block_name} a power of two >= {block_min}, got {block!r}"
        )
    if num_warps is not None and not (is_pow2_at_least(num_warps, 1) and num_warps <= 32):
        raise ValueError(f"{fn}: expected num_warps a power of two <= 32, got {num_warps!r}")
    if num_stages is not None and not (
        isinstance(num_stages, int) and not isinstance(num_stages, bool) and num_stages >= 1
    ):
        raise ValueError(f"{fn}: expected num_stages a positive int, got {num_stages!r}")


def default_block(n: int, low: int, gpu: int, interpreter: int, *, shrink: bool = True) -> int:
    """The default block along a dimension of ``n``: ``gpu`` compiled, ``interpreter`` (large:
    its cost is per program instance) interpreted; with ``shrink``, a small ``n`` takes the next
    power of two (at least ``low``) instead of a whole default block."""
    cap = interpreter if INTERPRETED else gpu
    if not shrink and not INTERPRETED:
        return cap
    return min(cap, max(low, triton.next_power_of_2(max(int(n), 1))))


def nonempty(t: Tensor) -> Tensor:
    """``t``, or a one-element stand-in when it is empty: a kernel argument is never null."""
    return t if t.numel() else torch.empty(1, dtype=t.dtype, device=t.device)


def f32(x: float) -> float:
    """``x`` rounded to float32 as torch rounds it: kernels take their float32 scalars exact."""
    return float(np.float32(x))


def f64_bits(x: float) -> int:
    """The int64 bit pattern of a float64 scalar (Triton passes Python floats as float32)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]
