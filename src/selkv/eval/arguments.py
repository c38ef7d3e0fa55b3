"""argparse types for the counts the command line takes: a bad count stops before the model loads."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (``why`` explains the bound in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{why}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # what argparse calls the type in its messages
    return parse


positive_int = at_least(1)
non_negative_int = at_least(0)


def fraction(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {value}")
    return value


def positive_number(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value
