"""Accuracies with 95% confidence intervals (Wilson score), as every reported number carries."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: sensible also at 0% and 100%,
    where the normal approximation collapses to a zero-width interval."""
    if n <= 0:
        return float("nan"), float("nan")
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo = 0.0 if correct == 0 else max(0.0, center - half)
    hi = 1.0 if correct == n else min(1.0, center + half)
    return lo, hi


@dataclass
class Accuracy:
    """How many of n examples were classified correctly, with a 95% Wilson interval."""

    correct: int
    n: int

    @classmethod
    def of(cls, mask: Tensor) -> Accuracy:
        return cls(int(mask.sum()), int(mask.numel()))

    @property
    def acc(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def to_dict(self) -> dict:
        lo, hi = self.ci
        return {"acc": self.acc, "ci_low": lo, "ci_high": hi, "correct": self.correct, "n": self.n}
