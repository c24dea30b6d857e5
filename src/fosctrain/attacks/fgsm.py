"""FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps; with random_start
and alpha = 1.25 eps it is the Fast-AT attack (Wong et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass

from fosctrain.attacks.pgd import PGD


@dataclass
class FGSM(PGD):
    steps: int = 1
    random_start: bool = False

    @property
    def step_size(self) -> float:
        return self.eps if self.alpha is None else self.alpha
