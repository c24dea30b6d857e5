"""Projected gradient descent (Madry et al. 2018) in the L-inf and L2 balls, with FOSC
monitoring and optional per-sample stopping (DAT's FOSC threshold, FAT's tau)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor, nn

from fosctrain.attacks.engine import AttackResult, AttackSpec, Observer, Sampler, run_attack
from fosctrain.attacks.engine import random_start as uniform_start
from fosctrain.attacks.registry import register
from fosctrain.attacks.stopping import StoppingRule
from fosctrain.threat import train_step_size


@register("pgd")
@dataclass
class PGD:
    """L-inf PGD. `attack(model, x, y)` returns an AttackResult; alpha defaults to eps / 4.

    Options shared by every attack: eps, alpha, steps, random_start, loss ("ce" or "cw"),
    targeted, stop (a stopping rule), min_steps, fosc_box, fosc_from_start, fosc_relative,
    final_fosc, compact (see attacks.engine.AttackSpec), seed (or a generator passed per call).
    Per call, every attack also takes a start-point sampler `start` and an `observer` of every
    step (see attacks.engine). Each class states its norm and its step-size rule
    (`default_alpha`, in words `alpha_rule`), used when alpha is None.
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
    alpha_rule: ClassVar[str] = "eps/4"

    def default_alpha(self) -> float:
        """The step size when alpha is None: eps / 4 (the paper's training setting)."""
        return train_step_size(self.eps)

    @property
    def step_size(self) -> float:
        return self.default_alpha() if self.alpha is None else self.alpha

    @property
    def spec(self) -> AttackSpec:
        """What the engine runs: every setting this attack shares with AttackSpec (its norm
        included), with the step size resolved."""
        shared = {
            f.name: getattr(self, f.name) for f in fields(AttackSpec) if hasattr(self, f.name)
        }
        return AttackSpec(**{**shared, "alpha": self.step_size})

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
            model, x, y, self.spec, generator=generator, start=start, observer=observer
        )

    def describe(self) -> dict:
        """The attack's settings as plain data (for logs and eval.json)."""
        d = {k: v for k, v in asdict(self).items() if k != "stop"}
        d.update(name=type(self).__name__, norm=self.norm, alpha=self.step_size)
        if self.stop is not None:
            d["stop"] = repr(self.stop)
        return d


@register("pgd-l2")
@dataclass
class PGDL2(PGD):
    """L2 PGD: normalized-gradient steps, projection onto the L2 ball; alpha defaults to eps/4."""

    eps: float = 2.0
    norm: ClassVar[str] = "l2"
