"""Projected gradient descent (Madry et al. 2018) in the L-inf and L2 balls, with FOSC
monitoring and optional per-sample stopping (DAT's FOSC threshold, FAT's tau)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from torch import Tensor, nn

from fosctrain.attacks.engine import AttackResult, AttackSpec, Observer, Sampler, run_attack
from fosctrain.attacks.engine import random_start as uniform_start
from fosctrain.attacks.registry import register
from fosctrain.threat import BOUNDS, train_step_size


@register("pgd")
@dataclass
class PGD(AttackSpec):
    """L-inf PGD. `attack(model, x, y)` returns an AttackResult; alpha defaults to eps / 4.

    Options shared by every attack (the fields of AttackSpec, see attacks.engine): eps, alpha,
    steps, random_start, loss ("ce" or "cw"), targeted, stop (a stopping rule), min_steps,
    fosc_box, fosc_from_start, fosc_relative, final_fosc, compact; and seed (or a generator
    passed per call). Per call, every attack also takes a start-point sampler `start` and an
    `observer` of every step (see attacks.engine). Each class states its norm and its step-size
    rule (`default_alpha`, in words `alpha_rule`), used when alpha is None.
    """

    eps: float = 0.3
    alpha: float | None = None
    steps: int = 10
    norm: str = field(default="linf", init=False, repr=False)
    bounds: tuple[float, float] = field(default=BOUNDS, init=False, repr=False)
    eval_mode: bool = field(default=True, init=False, repr=False)
    seed: int | None = None
    alpha_rule: ClassVar[str] = "eps/4"

    def default_alpha(self) -> float:
        """eps / 4, the paper's training setting."""
        return train_step_size(self.eps)

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
        return run_attack(model, x, y, self, generator=generator, start=start, observer=observer)

    def describe(self) -> dict:
        """The attack's settings as plain data (for logs and eval.json)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name != "stop"}
        d.update(name=type(self).__name__, norm=self.norm, alpha=self.step_size)
        if self.stop is not None:
            d["stop"] = repr(self.stop)
        return d


@register("pgd-l2")
@dataclass
class PGDL2(PGD):
    """L2 PGD: normalized-gradient steps, projection onto the L2 ball; alpha defaults to eps/4."""

    eps: float = 2.0
    norm: str = field(default="l2", init=False, repr=False)
