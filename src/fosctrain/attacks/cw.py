"""C&W-inf (as in Madry et al. and the DAT paper): L-inf PGD on the Carlini-Wagner margin
loss max_{j != y} z_j - z_y instead of cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

from fosctrain.attacks.pgd import PGD
from fosctrain.attacks.registry import register


@register("cw")
@dataclass
class CWInf(PGD):
    steps: int = 30
    loss: str = "cw"
