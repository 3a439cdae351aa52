"""Argument types for numeric options: a value out of range is an exit-2 message naming the option, before
any work starts."""
from __future__ import annotations

import argparse
import math


def _number(text: str, cast):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def whole(least: int):
    """A whole number >= least."""
    def check(text: str) -> int:
        value = _number(text, int)
        if value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text}")
        return value
    check.__name__ = f"whole number >= {least}"
    return check


def positive(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def nonnegative(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value
