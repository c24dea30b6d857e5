"""AutoAttack (Croce & Hein 2020) built from torchattacks' components with the original
settings, run as AutoAttack runs them: each component attacks only the examples that are
still robust after the previous ones.

torchattacks' own `AutoAttack(version="standard")` leaves APGD and FAB at their default 10
steps; the standard suite of the paper (and RobustBench) is APGD-CE (100 steps, 1 restart),
APGD-T (100 steps, 9 target classes), FAB-T (100 steps, 9 target classes) and Square (5,000
queries). `fast` runs APGD-CE and APGD-T only and is labelled "autoattack-fast" wherever it is
reported, so it is never mistaken for the standard suite.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fosctrain.device import model_device
from fosctrain.errors import UserError

STEPS = 100
SQUARE_QUERIES = 5000
VERSIONS = ("standard", "fast")
COMPONENTS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "fast": ("apgd-ce", "apgd-t")}
LABELS = {"standard": "autoattack", "fast": "autoattack-fast"}
MIN_CLASSES = 4
HINT = (
    "AutoAttack needs torchattacks: pip install --no-deps torchattacks (its torchvision "
    "dependency is not needed and breaks beside a pinned torch; see README)"
)


@dataclass
class Stage:
    """Per-example robustness after a component (and all before it), and its seconds."""

    robust: Tensor
    seconds: float


@dataclass
class Component:
    """One attack of the suite: its name, the torchattacks object and its settings."""

    name: str
    attack: Callable[[Tensor, Tensor], Tensor]
    settings: dict


def version_of(autoattack: bool | str | None) -> str | None:
    """None (no AutoAttack), "standard" or "fast"; True means "standard"."""
    if autoattack is None or autoattack is False:
        return None
    if autoattack is True:
        return "standard"
    if autoattack not in VERSIONS:
        raise UserError(f"unknown AutoAttack version {autoattack!r}; choose one of {VERSIONS}")
    return autoattack


def require_torchattacks():
    """The torchattacks module, or one clear line on how to install it."""
    try:
        import torchattacks
    except ImportError:
        raise UserError(HINT) from None
    return torchattacks


def check_classes(n_classes: int) -> None:
    if n_classes < MIN_CLASSES:
        raise UserError(
            f"AutoAttack needs at least {MIN_CLASSES} classes (its targeted DLR loss does); "
            f"this model has {n_classes}"
        )


def build_suite(
    model: nn.Module, version: str, eps: float, norm: str, n_classes: int, seed: int
) -> list[Component]:
    """The components of `version` at budget eps, with Croce & Hein's settings."""
    ta = require_torchattacks()
    check_classes(n_classes)
    ta_norm = {"linf": "Linf", "l2": "L2"}[norm]
    common = dict(eps=eps, norm=ta_norm, seed=seed, n_restarts=1)
    targets = n_classes - 1
    makers = {
        "apgd-ce": lambda: ta.APGD(model, steps=STEPS, loss="ce", **common),
        "apgd-t": lambda: ta.APGDT(model, steps=STEPS, n_classes=n_classes, **common),
        "fab-t": lambda: ta.FAB(
            model, steps=STEPS, multi_targeted=True, n_classes=n_classes, **common
        ),
        "square": lambda: ta.Square(model, n_queries=SQUARE_QUERIES, **common),
    }
    described = {
        "apgd-ce": dict(name="APGD-CE", steps=STEPS, loss="ce", alpha="adaptive (APGD)"),
        "apgd-t": dict(
            name="APGD-T",
            steps=STEPS,
            loss="dlr-targeted",
            target_classes=targets,
            alpha="adaptive (APGD)",
        ),
        "fab-t": dict(name="FAB-T", steps=STEPS, target_classes=targets, alpha="FAB projection"),
        "square": dict(name="Square", queries=SQUARE_QUERIES, alpha="random squares (p_init 0.8)"),
    }
    base = dict(eps=eps, norm=norm, seed=seed, restarts=1, library="torchattacks", suite=version)
    return [
        Component(name, makers[name](), {**described[name], **base}) for name in COMPONENTS[version]
    ]


def suite_settings(
    version: str, components: list[Component], eps: float, norm: str, seed: int
) -> dict:
    """The suite's settings as the report stores and prints them."""
    return {
        "name": "AutoAttack",
        "version": version,
        "label": LABELS[version],
        "alpha": "per component",
        "components": [c.settings for c in components],
        "eps": eps,
        "norm": norm,
        "seed": seed,
        "library": "torchattacks (components; suite assembled by fosctrain.autoattack)",
    }


def run_suite(
    model: nn.Module,
    components: list[Component],
    x: Tensor,
    y: Tensor,
    robust: Tensor,
    batch_size: int,
    on_batch: Callable[[str], None] = lambda name: None,
) -> dict[str, Stage]:
    """Cumulative per-example robustness after each component, starting from `robust` (the
    clean-correct mask): a component attacks only the examples still robust, batch by batch
    (`on_batch(name)` after every batch, for progress)."""
    device = model_device(model)
    robust = robust.clone()
    out = {}
    for comp in components:
        started = time.perf_counter()
        for start in range(0, x.shape[0], batch_size):
            idx = start + robust[start : start + batch_size].nonzero().squeeze(1)
            if idx.numel():
                xb, yb = x[idx].to(device), y[idx].to(device)
                x_adv = comp.attack(xb, yb)
                with torch.no_grad():
                    robust[idx] = (model(x_adv).argmax(1) == yb).cpu()
            on_batch(comp.name)
        out[comp.name] = Stage(robust.clone(), time.perf_counter() - started)
    return out
