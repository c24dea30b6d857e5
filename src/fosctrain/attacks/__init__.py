"""Attacks with per-sample FOSC monitoring: one class each, called as attack(model, x, y)."""

from __future__ import annotations

from fosctrain.attacks.cw import CWInf
from fosctrain.attacks.engine import (
    AttackResult,
    Observer,
    Sampler,
    attack_mode,
    random_start,
    run_attack,
)
from fosctrain.attacks.fgsm import FGSM, FGSMRS
from fosctrain.attacks.pgd import PGD, PGDL2
from fosctrain.attacks.stopping import (
    BatchQuantile,
    FoscThreshold,
    MisclassifiedTau,
    StoppingRule,
)
from fosctrain.errors import UserError

ATTACKS: dict[str, type[PGD]] = {
    "fgsm": FGSM,
    "fgsm-rs": FGSMRS,
    "pgd": PGD,
    "pgd-l2": PGDL2,
    "cw": CWInf,
}


def create_attack(name: str, **options) -> PGD:
    """An attack by registry name with its options (eps, alpha, steps, ...)."""
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    return ATTACKS[name](**options)


__all__ = [
    "ATTACKS",
    "AttackResult",
    "BatchQuantile",
    "CWInf",
    "FGSM",
    "FGSMRS",
    "FoscThreshold",
    "MisclassifiedTau",
    "Observer",
    "PGD",
    "PGDL2",
    "Sampler",
    "StoppingRule",
    "attack_mode",
    "create_attack",
    "random_start",
    "run_attack",
]
