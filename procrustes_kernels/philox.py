"""Seeded regeneration of initial weights, bit-identical to Triton's ``tl.rand``.

Untracked weights are never stored: their initial value ``w0[i]`` is a pure function of the layer
seed and the flat index ``i``, recomputed wherever it is needed. For that to work across backends the
random stream must be reproducible bit for bit on every device, so it is Triton's own generator
(Philox4x32-10, counter = (offset lo, offset hi, 0, 0), key = (seed lo, seed hi)) written with int64
tensor arithmetic. Only integer operations and one correctly rounded float multiply are involved, so
the Triton kernels, the C++ backend and this reference produce identical bits.

``w0 = bound * (2 * u - 1)`` with ``bound = 1 / sqrt(fan_in)`` reproduces the default
``nn.Linear`` / ``nn.Conv2d`` initialisation U(-bound, bound).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "philox_randint",
    "philox_uniform",
    "init_bound",
    "init_values",
    "derive_seed",
    "seed_words",
    "MASK32",
]

MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUNDS = 10
# Largest float32 scale with (2**31 - 1) * scale < 1 after rounding (the value tl.rand uses).
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(a: torch.Tensor, const: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * const`` for ``0 <= a < 2**32``, exact in int64.

    The 64-bit product would overflow int64, so the constant is split into 16-bit halves and the
    partial products (each below 2**48) are recombined.
    """
    c_hi, c_lo = const >> 16, const & 0xFFFF
    p_lo = a * c_lo
    t = a * c_hi + (p_lo >> 16)
    hi = t >> 16
    lo = ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def seed_words(seed: int) -> tuple[int, int]:
    """The two 32-bit key words of ``seed`` (checked: a Python int in [-2**63, 2**64), taken as
    its uint64 reinterpretation, as ``tl.rand`` does)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"philox: expected seed to be a Python int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"philox: expected seed in [-2**63, 2**64), got {seed}")
    seed &= 0xFFFFFFFFFFFFFFFF  # the uint64 reinterpretation tl.rand applies
    return seed & MASK32, seed >> 32


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """First Philox4x32-10 output word for each offset, as int64 in [0, 2**32).

    Equals ``tl.randint(seed, offsets)`` reinterpreted as uint32. ``offsets`` is any integer tensor
    (int32 or int64; negative offsets follow Triton's two's-complement split into 32-bit words).
    """
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"philox_randint(): expected offsets of dtype int32 or int64, got {offsets.dtype}"
        )
    k0, k1 = seed_words(seed)
    off = offsets.to(torch.int64)
    c0 = off & MASK32
    if offsets.dtype == torch.int64:
        c1 = (off >> 32) & MASK32
    else:
        c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & MASK32
        k1 = (k1 + _KEY_B) & MASK32
    return c0


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) per offset, bit-identical to ``tl.rand(seed, offsets)``."""
    x = philox_randint(seed, offsets)
    x = torch.where(x >= 2**31, x - 2**32, x)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)  # tl.rand's ~x for negatives
    # int -> float32 conversion rounds to nearest even, then one float32 multiply: as on GPU.
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def init_bound(fan_in: int) -> float:
    """``1 / sqrt(fan_in)`` rounded to float32: the U(-b, b) bound of nn.Linear / nn.Conv2d."""
    if fan_in <= 0:
        raise ValueError(f"init_bound(): expected fan_in > 0, got {fan_in}")
    return float(torch.tensor(1.0 / math.sqrt(fan_in), dtype=torch.float32))


def init_values(
    seed: int,
    numel: int,
    bound: float,
    *,
    start: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Initial values ``w0[i] = bound * (2 * u(seed, i) - 1)`` for ``i in [start, start + numel)``.

    float32, flat. The arithmetic order (2u, minus 1, times bound, each rounded to float32) is part
    of the contract: kernels on other backends repeat it exactly.
    """
    if numel < 0:
        raise ValueError(f"init_values(): expected numel >= 0, got {numel}")
    dtype = torch.int32 if start + numel <= 2**31 else torch.int64
    offsets = torch.arange(start, start + numel, dtype=dtype, device=device)
    u = philox_uniform(seed, offsets)
    b = torch.tensor(bound, dtype=torch.float32, device=u.device)
    return (2.0 * u - 1.0) * b


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def derive_seed(model_seed: int, position: int) -> int:
    """Seed of the layer at ``position`` (0, 1, ...) of a model seeded with ``model_seed``.

    A splitmix64 hash of both, truncated to 63 bits so it fits a signed int64 buffer: the same
    model seed gives the same layer seeds on every machine, and neighbouring positions get
    unrelated streams.
    """
    if position < 0:
        raise ValueError(f"derive_seed(): expected position >= 0, got {position}")
    h = _splitmix64((model_seed & 0xFFFFFFFFFFFFFFFF) ^ _splitmix64(position + 1))
    return h >> 1
