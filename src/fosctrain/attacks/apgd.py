"""APGD (Croce & Hein 2020) run by the attack engine: momentum and a step size that starts at
2 eps and halves at checkpoints where the objective stopped rising, each halving restarting the
sample from its best point. Because the engine runs it, every evaluated point has its FOSC, and
a stopping rule (DAT's target, FAT's tau) can stop any sample at any step: the FOSC-monitored
inner optimizer of issue 19, and an evaluation attack whose steps are counted like PGD's.

The schedule, the checks and the returned point follow the reference implementation (the
AutoAttack code that torchattacks' APGD copies), which tests/test_apgd.py compares step for
step: K steps cost K + 1 evaluations (the start and every step's point), and a sample that uses
every step returns the point of highest objective it evaluated. A sample stopped by a rule
returns the point where the rule stopped it, as under PGD (the rule sees every evaluated point
before APGD's checkpoint may move a sample back to its best point). The random start is the
engine's (uniform in the ball; the reference starts on the ball's surface): pass `start` for
the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from fosctrain.attacks.engine import ascent_step, project
from fosctrain.attacks.pgd import PGD
from fosctrain.attacks.registry import register

MOMENTUM = 0.75  # weight of the new step; 1 - MOMENTUM of the previous move
RISE_FRACTION = 0.75  # a checkpoint halves the step where fewer steps than this raised the loss
FIRST_CHECK, MIN_WINDOW, WINDOW_DECREASE = 0.22, 0.06, 0.03  # fractions of the steps


def checkpoints(steps: int) -> list[tuple[int, int]]:
    """APGD's checkpoints for `steps` steps: (evaluation index, window length) pairs. The first
    comes after 22% of the steps, each window 3% of the steps shorter than the last, down to
    6% (each at least one step)."""
    window = max(int(FIRST_CHECK * steps), 1)
    shortest = max(int(MIN_WINDOW * steps), 1)
    decrease = max(int(WINDOW_DECREASE * steps), 1)
    out, at = [], 0
    while at + window <= steps:
        at += window
        out.append((at, window))
        window = max(window - decrease, shortest)
    return out


class APGDSteps:
    """APGD's state for the batch x0, kept at full batch size and indexed by the running
    samples' batch indices, so the engine's compaction never has to move it."""

    def __init__(
        self,
        eps: float,
        alpha: float,
        norm: str,
        bounds: tuple[float, float],
        steps: int,
        x0: Tensor,
    ) -> None:
        self.eps, self.norm, self.bounds = eps, norm, bounds
        self.checks = dict(checkpoints(steps))
        n, device = x0.shape[0], x0.device
        self.eta = torch.full((n,), float(alpha), device=device)
        # objective at each evaluation; row 0 stays 0: the reference compares the first step's
        # objective with 0, not with the start's (so a positive objective counts as a rise)
        self.history = torch.zeros(steps + 1, n, device=device)
        self.best_value = torch.full((n,), float("-inf"), device=device)
        self.best_at_check = torch.zeros(n, device=device)
        self.halved_at_check = torch.ones(n, dtype=torch.bool, device=device)
        self.best_x = torch.zeros_like(x0)
        self.best_grad = torch.zeros_like(x0)
        self.best_fosc = torch.full((n,), float("nan"), device=device)
        self.previous = torch.zeros_like(x0)  # each sample's point before its last step

    def observe(self, k, active, xs, values, grad, f):
        """Keep each sample's best point (strictly higher objective); at a checkpoint, halve
        the step where the objective rose in at most 75% of the window's steps, or where the
        step was not halved at the last checkpoint and the best did not improve since, and move
        those samples back to their best point."""
        if k > 0:
            self.history[k, active] = values
        better = values > self.best_value[active]
        rows = active[better]
        self.best_value[rows] = values[better]
        self.best_x[rows], self.best_grad[rows], self.best_fosc[rows] = (
            xs[better],
            grad[better],
            f[better],
        )
        if k not in self.checks:
            return xs, grad, f
        window = self.checks[k]
        h = self.history[k - window : k + 1, active]
        rises = (h[1:] > h[:-1]).sum(0)
        best = self.best_value[active]
        stalled = ~self.halved_at_check[active] & (self.best_at_check[active] >= best)
        halve = (rises <= window * RISE_FRACTION) | stalled
        self.halved_at_check[active] = halve
        self.best_at_check[active] = best
        if bool(halve.any()):
            rows = active[halve]
            self.eta[rows] /= 2
            xs, grad, f = xs.clone(), grad.clone(), f.clone()
            xs[halve], grad[halve], f[halve] = (
                self.best_x[rows],
                self.best_grad[rows],
                self.best_fosc[rows],
            )
        return xs, grad, f

    def step(self, k, active, xs, grad, x0s):
        """z = P(x + eta sign(g)) (L2: the normalized gradient), then
        x' = P(x + a (z - x) + (1 - a)(x - x_prev)), a = 1 at the first step and 0.75 after
        (written in the reference's order of operations)."""
        eta = self.eta[active].view(-1, *([1] * (xs.dim() - 1)))
        a = 1.0 if k == 0 else MOMENTUM
        previous = xs if k == 0 else self.previous[active]
        z = project(ascent_step(xs, grad, eta, self.norm), x0s, self.eps, self.norm, self.bounds)
        moved = xs + (z - xs) * a + (xs - previous) * (1 - a)
        self.previous[active] = xs
        return project(moved, x0s, self.eps, self.norm, self.bounds)

    def result(self, active, xs, f):
        """The best point each sample evaluated, and its FOSC."""
        return self.best_x[active], self.best_fosc[active]


@register("apgd")
@dataclass
class APGD(PGD):
    """L-inf APGD with the engine's FOSC monitoring and stopping rules. alpha is the initial
    step (default 2 eps, the reference's), halved at the checkpoints. final_fosc defaults to
    on: K steps evaluate K + 1 points, the reference's; off, the last step's point is never
    evaluated, so never returned (K evaluations)."""

    steps: int = 10
    final_fosc: bool = True
    alpha_rule: ClassVar[str] = "2 eps, halved at APGD's checkpoints"

    def default_alpha(self) -> float:
        return 2 * self.eps

    def optimizer(self, eps, alpha, steps, x0) -> APGDSteps:
        return APGDSteps(eps, alpha, self.norm, self.bounds, steps, x0)


@register("apgd-l2")
@dataclass
class APGDL2(APGD):
    """L2 APGD: normalized-gradient steps, projection onto the L2 ball."""

    eps: float = 2.0
    norm: str = field(default="l2", init=False, repr=False)
