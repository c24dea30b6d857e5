"""Projected gradient descent (Madry et al. 2018) in the L-inf and L2 balls, with FOSC
monitoring and optional per-sample stopping (DAT's FOSC threshold, FAT's tau)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from fosctrain.attacks.engine import AttackResult, Observer, Sampler, run_attack
from fosctrain.attacks.engine import random_start as uniform_start
from fosctrain.attacks.stopping import StoppingRule
from fosctrain.threat import train_step_size


@dataclass
class PGD:
    """L-inf PGD. `attack(model, x, y)` returns an AttackResult; alpha defaults to eps / 4.

    Options shared by every attack: eps, alpha, steps, random_start, loss ("ce" or "cw"),
    targeted, stop (a stopping rule), min_steps, fosc_box, fosc_from_start, fosc_relative,
    final_fosc, compact, seed (or a generator passed per call). Per call, every attack also takes a
    start-point sampler `start` and an `observer` of every step (see attacks.engine).
    """

    eps: float = 0.3
    alpha: float | None = None
    steps: int = 10
    random_start: bool = True
    loss: str = "ce"
    targeted: bool = False
    stop: StoppingRule | None = None
    min_steps: int = 0
    fosc_box: bool = False
    fosc_from_start: bool = False
    fosc_relative: bool = False
    final_fosc: bool = False
    compact: bool = True
    seed: int | None = None
    norm: ClassVar[str] = "linf"

    @property
    def step_size(self) -> float:
        return train_step_size(self.eps, self.alpha)

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        *,
        start: Sampler = uniform_start,  # (the field random_start is the on/off switch)
        observer: Observer | None = None,
    ) -> AttackResult:
        if generator is None and self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed)
        return run_attack(
            model,
            x,
            y,
            eps=self.eps,
            alpha=self.step_size,
            steps=self.steps,
            norm=self.norm,
            loss=self.loss,
            targeted=self.targeted,
            random_init=self.random_start,
            stop=self.stop,
            min_steps=self.min_steps,
            fosc_box=self.fosc_box,
            fosc_from_start=self.fosc_from_start,
            fosc_relative=self.fosc_relative,
            final_fosc=self.final_fosc,
            compact=self.compact,
            generator=generator,
            start=start,
            observer=observer,
        )

    def describe(self) -> dict:
        """The attack's settings as plain data (for logs and eval.json)."""
        d = {k: v for k, v in asdict(self).items() if k != "stop"}
        d.update(name=type(self).__name__, norm=self.norm, alpha=self.step_size)
        if self.stop is not None:
            d["stop"] = repr(self.stop)
        return d


@dataclass
class PGDL2(PGD):
    """L2 PGD: normalized-gradient steps, projection onto the L2 ball; alpha defaults to eps/4."""

    eps: float = 2.0
    norm: ClassVar[str] = "l2"
