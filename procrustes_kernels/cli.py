"""Argument types for the command lines (the demo and the benchmark scripts): each refuses a bad
value with argparse's own one-line error and exit code 2, naming the argument and what it expects.

    p.add_argument("--epochs", type=cli.int_at_least(1), default=20)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = [
    "int_at_least",
    "number_in",
    "fraction",
    "float_at_least",
    "comma_list",
    "fractions",
    "betas",
]


def int_at_least(low: int) -> Callable[[str], int]:
    """An int ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def number_in(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A finite float in the interval from ``low`` to ``high`` (closed unless said open)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number in {interval}, got {text!r}"
            ) from None
        ok = (
            math.isfinite(value)
            and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high)
        )
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


def float_at_least(low: float) -> Callable[[str], float]:
    """A finite float ``>= low``."""
    return number_in(low, math.inf, high_open=True)


fraction = number_in(0.0, 1.0, low_open=True)  # a budget: (0, 1]


def comma_list(item: Callable[[str], float], length: int | None = None) -> Callable[[str], tuple]:
    """Comma-separated values, each parsed by ``item`` (one of the types above); ``length``
    values exactly when given."""

    def parse(text: str) -> tuple:
        parts = text.split(",")
        if length is not None and len(parts) != length:
            raise argparse.ArgumentTypeError(
                f"expected {length} comma-separated values, got {text!r}"
            )
        return tuple(item(v) for v in parts)

    parse.__name__ = f"comma-separated {item.__name__}"
    return parse


fractions = comma_list(fraction)  # budgets: "0.1,0.04"
betas = comma_list(number_in(0.0, 1.0, high_open=True), 2)  # AdamW's "beta1,beta2"
