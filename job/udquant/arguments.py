"""argparse types of the numeric options: a value that cannot work is refused with its reason,
before anything runs or is billed."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def finite_number(what: str, *, above: float | None = None, at_least: float | None = None,
                  at_most: float | None = None, scale: float = 1.0) -> Callable[[str], float]:
    """A finite float (still finite once multiplied by scale, e.g. GB to bytes) above or at least a bound, and at
    most another."""
    bound = f" > {above:g}" if above is not None else f" >= {at_least:g}" if at_least is not None else ""
    bound += f"{' and' if bound else ''} <= {at_most:g}" if at_most is not None else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        fits = (above is None or value > above) and (at_least is None or value >= at_least) \
            and (at_most is None or value <= at_most)
        if not (math.isfinite(value * scale) and fits):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} (a finite number{bound})")
        return value

    return parse


def whole_number(what: str, *, at_least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = at_least - 1
        if value < at_least:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} (a whole number >= {at_least})")
        return value

    return parse
