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


def whole(least: int, most: int | None = None):
    """A whole number >= least (and <= most: a bound that keeps the work finite)."""
    def check(text: str) -> int:
        value = _number(text, int)
        if value < least or most is not None and value > most:
            bound = f">= {least}" if most is None else f"in {least}..{most:,}"
            raise argparse.ArgumentTypeError(f"expected a whole number {bound}, got {text}")
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


def level(text: str) -> float:
    """A confidence level: a fraction strictly between 0.5 and 1."""
    value = _number(text, float)
    if not 0.5 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a confidence level in [0.5, 1), such as 0.9, got {text}")
    return value


def renamed(parser, old: str, new: str) -> None:
    """`old` was an option name that meant two things across commands: refused, pointing to `new` (exit 2)."""
    class Refuse(argparse.Action):
        def __call__(self, parser_, namespace, values, option_string=None):
            parser_.error(f"{old} was renamed {new} (one name had two meanings across commands)")

    parser.add_argument(old, nargs="?", action=Refuse, help=argparse.SUPPRESS)
