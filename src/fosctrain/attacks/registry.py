"""The attacks by name, in one registry: `@register("pgd")` above a class makes it buildable
by that name, and `create_attack` builds any of them with the same options (the fields of
fosctrain.attacks.PGD), in either threat model:

    create_attack("pgd", norm="l2", eps=2.0, steps=20)   # -> PGDL2

A form of an attack for another norm is registered as NAME-NORM (pgd-l2); `norm` picks it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fosctrain.errors import UserError
from fosctrain.threat import check_norm

if TYPE_CHECKING:
    from fosctrain.attacks.pgd import PGD

ATTACKS: dict[str, type[PGD]] = {}


def register(name: str) -> Callable[[type[PGD]], type[PGD]]:
    """Decorator: make an attack class constructible by `name` (create_attack, `fosc attack`)."""

    def add(cls: type[PGD]) -> type[PGD]:
        if name in ATTACKS:
            raise ValueError(f"attack name {name!r} is already registered")
        ATTACKS[name] = cls
        return cls

    return add


def _form(name: str, norm: str) -> type[PGD] | None:
    """The class of attack `name` for `norm`: its own, or its NAME-NORM form; None if neither."""
    for key in (name, f"{name}-{norm}"):
        cls = ATTACKS.get(key)
        if cls is not None and cls.norm == norm:
            return cls
    return None


def attack_class(name: str, norm: str | None = None) -> type[PGD]:
    """The class registered as `name` or, with `norm`, its form for that threat model;
    UserError naming the choices where there is none."""
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    if norm is None:
        return ATTACKS[name]
    cls = _form(name, check_norm(norm))
    if cls is None:
        choices = sorted(n for n in ATTACKS if _form(n, norm) is not None)
        raise UserError(f"attack {name!r} has no {norm} form; for {norm} choose one of {choices}")
    return cls


def create_attack(name: str, norm: str | None = None, **options: Any) -> PGD:
    """The attack registered as `name` (for `norm` when given, else the name's own), built with
    `options`, the same for every attack: eps, alpha, steps, random_start, loss, targeted, stop,
    min_steps, fosc_box, fosc_from_start, fosc_relative, final_fosc, compact, seed. Without
    alpha, the step size is the class's own rule (its default_alpha)."""
    return attack_class(name, norm)(**options)
