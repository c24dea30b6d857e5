"""FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps from the clean point;
FGSM-RS (Wong et al. 2020, the Fast-AT attack): one step of alpha = 1.25 eps from a uniform
random start in the eps ball, projected back onto the ball."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fosctrain.attacks.pgd import PGD
from fosctrain.attacks.registry import register
from fosctrain.errors import UserError

FGSM_RS_ALPHA = 1.25


@register("fgsm")
@dataclass
class FGSM(PGD):
    """One step of size eps (or alpha) from the clean point; more steps would be BIM/PGD."""

    steps: int = 1
    random_start: bool = False
    alpha_rule: ClassVar[str] = "eps"

    def __post_init__(self) -> None:
        if self.steps != 1:
            raise UserError(
                f"{type(self).__name__} takes exactly one step, got steps={self.steps!r} "
                "(for more steps use pgd)"
            )

    def default_alpha(self) -> float:
        return self.eps


@register("fgsm-rs")
@dataclass
class FGSMRS(FGSM):
    """FGSM with a random start: alpha defaults to 1.25 eps."""

    random_start: bool = True
    alpha_rule: ClassVar[str] = f"{FGSM_RS_ALPHA:g} eps"

    def default_alpha(self) -> float:
        return FGSM_RS_ALPHA * self.eps
