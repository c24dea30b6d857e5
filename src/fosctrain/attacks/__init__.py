"""Attacks with per-sample FOSC monitoring: one class each, called as attack(model, x, y), and
built by name with create_attack (fosctrain.attacks.registry)."""

from __future__ import annotations

from fosctrain.attacks.apgd import APGD, APGDL2
from fosctrain.attacks.cw import CWInf
from fosctrain.attacks.engine import (
    AttackResult,
    AttackSpec,
    Observer,
    Sampler,
    attack_mode,
    random_start,
    run_attack,
)
from fosctrain.attacks.fgsm import FGSM, FGSM_RS_ALPHA, FGSMRS
from fosctrain.attacks.pgd import PGD, PGDL2
from fosctrain.attacks.registry import ATTACKS, attack_class, create_attack, register
from fosctrain.attacks.stopping import (
    BatchQuantile,
    FoscThreshold,
    MisclassifiedTau,
    StoppingRule,
)

__all__ = [
    "APGD",
    "APGDL2",
    "ATTACKS",
    "AttackResult",
    "AttackSpec",
    "BatchQuantile",
    "CWInf",
    "FGSM",
    "FGSMRS",
    "FGSM_RS_ALPHA",
    "FoscThreshold",
    "MisclassifiedTau",
    "Observer",
    "PGD",
    "PGDL2",
    "Sampler",
    "StoppingRule",
    "attack_class",
    "attack_mode",
    "create_attack",
    "random_start",
    "register",
    "run_attack",
]
