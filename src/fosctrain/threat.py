"""The threat model's facts, stated once: the norms, the pixel box, the budgets and the default
step sizes of training and evaluation attacks."""

from __future__ import annotations

import math
from collections.abc import Sequence

from fosctrain.errors import UserError

NORMS = ("linf", "l2")
BOUNDS = (0.0, 1.0)  # every input lies in the pixel box [0, 1]; attacks clip to it


def check_norm(norm: str) -> str:
    """`norm` if it is one of NORMS; UserError otherwise."""
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    return norm


def train_step_size(eps: float, alpha: float | None = None) -> float:
    """The training attack's step: `alpha` when given, else eps / 4 (the paper's setting)."""
    return eps / 4 if alpha is None else alpha


def eval_step_size(eps: float, steps: int, alpha: float | None = None) -> float:
    """The evaluation attack's step: `alpha` when given, else 2.5 * eps / steps (Madry et al.
    2018: the steps can cross the ball 2.5 times, so a start at a corner still reaches the far
    side)."""
    return 2.5 * eps / steps if alpha is None else alpha


def validate_eps(eps_list: Sequence[float], norm: str = "linf") -> list[float]:
    """Budgets as floats; UserError for an empty list, NaN, <= 0 or (L-inf) > 1."""
    values = list(eps_list)
    if not values:
        raise UserError("give at least one eps")
    out = []
    for eps in values:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
            raise UserError(f"eps must be a finite number, got {eps!r}")
        if eps <= 0 or (norm == "linf" and eps > BOUNDS[1] - BOUNDS[0]):
            limit = "in (0, 1] for L-inf on [0, 1] pixels" if norm == "linf" else "positive"
            raise UserError(f"eps must be {limit}, got {eps!r}")
        out.append(float(eps))
    return out
