"""Stopping rules: which still-running samples stop at the current PGD step.

A rule sees only the samples still running (their batch indices `idx`) at the points just
evaluated (their FOSC and logits) and returns a bool mask over them; a stopped sample keeps
that point and costs no more gradient evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


class StoppingRule(Protocol):
    def reset(self, batch_size: int, device: torch.device) -> None: ...

    def __call__(
        self, step: int, idx: Tensor, fosc: Tensor, logits: Tensor, y: Tensor, targeted: bool
    ) -> Tensor: ...


@dataclass
class FoscThreshold:
    """DAT (Algorithm 1): stop a sample once its FOSC is <= threshold (the target c_t)."""

    threshold: float

    def reset(self, batch_size: int, device: torch.device) -> None:
        pass

    def __call__(self, step, idx, fosc, logits, y, targeted) -> Tensor:
        return fosc <= self.threshold


@dataclass
class BatchQuantile:
    """DAT with a batch-relative target (beyond the paper): at the rule's first check, the
    target becomes the q-quantile of the FOSC of every sample in the batch (all still running
    then), and from that step on a sample stops once its FOSC is <= that target. q = 0 means
    target 0 (full PGD, as c_t = 0). The target depends only on the first check's values, so
    compaction cannot change it."""

    q: float
    threshold: float | None = field(default=None, init=False)

    def reset(self, batch_size: int, device: torch.device) -> None:
        self.threshold = None

    def __call__(self, step, idx, fosc, logits, y, targeted) -> Tensor:
        if self.threshold is None:
            q, values = self.q, fosc.double()
            self.threshold = float(torch.quantile(values, q)) if q > 0 and len(values) else 0.0
        return fosc <= self.threshold


@dataclass
class MisclassifiedTau:
    """FAT (Zhang et al. 2020): stop a sample the tau-th time after it is first found
    misclassified (tau = 0: at the first misclassified point), so it stays near the boundary."""

    tau: int
    _budget: Tensor = field(default=None, init=False, repr=False)

    def reset(self, batch_size: int, device: torch.device) -> None:
        self._budget = torch.full((batch_size,), int(self.tau), dtype=torch.long, device=device)

    def __call__(self, step, idx, fosc, logits, y, targeted) -> Tensor:
        pred = logits.argmax(1)
        fooled = pred == y if targeted else pred != y
        budget = self._budget[idx]
        stop = fooled & (budget <= 0)
        self._budget[idx] = budget - (fooled & ~stop).long()
        return stop
