"""The one exception type for bad user input: the CLI turns it into one line on stderr, exit 2;
and the checks that raise it: a positive (or non-negative) number, one of a few choices."""

from __future__ import annotations

import math
import numbers


class UserError(Exception):
    """Input the user can fix (missing file, bad option, bad data); never a bug of ours."""

    every_rank: bool = False
    """True where every rank of a data-parallel run raised it alike (distributed.shared): rank 0
    alone reports it."""


def check_positive(name: str, value: object, *, integer: bool = False, zero_ok: bool = False):
    """`value` if it is a finite number > 0 (>= 0 with zero_ok; an integer if `integer`),
    else UserError naming `name`. NumPy scalars are welcome; booleans are not numbers here."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value >= 0 if zero_ok else value > 0):
        return value
    what = "an integer" if integer else "a finite number"
    bound = ">= 0" if zero_ok else ">= 1" if integer else "> 0"
    raise UserError(f"{name} must be {what} {bound}, got {value!r}")


def check_choice(name: str, value: object, choices: tuple) -> None:
    """UserError naming `name` and the choices unless `value` is one of them."""
    if value not in choices:
        raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")
