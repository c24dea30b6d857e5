"""The attack engine: projected first-order steps with per-sample FOSC monitoring, stopping
rules and active-set compaction.

Each step evaluates the input gradient once for every still-running sample, computes their
FOSC from that same gradient (monitoring costs no extra pass), asks the stopping rule who stops,
and moves the rest. With `compact=True` stopped samples leave the batch, so early stopping
saves real compute; the model runs in eval mode, so a sample's result does not depend on which
others share its batch.

How a sample moves between evaluations is the spec's `optimizer`: PGD's fixed projected step
(`FixedSteps`) or APGD's momentum and step-size schedule (fosctrain.attacks.apgd); the loop,
its FOSC monitoring, stopping and compaction are the same for both.

Two explicit hooks serve the callers that need more than the result: a start-point sampler
(data-parallel training draws the global batch's starts and keeps its shard's) and a per-step
observer (measure records loss, accuracy and FOSC at every step). The result carries the start
point (x_start), so nobody needs to replay the engine's random draws.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from fosctrain.attacks.stopping import StoppingRule
from fosctrain.errors import UserError, check_positive
from fosctrain.fosc import box_exact, fosc, relative_fosc
from fosctrain.losses import input_gradient, objective
from fosctrain.threat import BOUNDS, check_norm


@dataclass
class AttackSpec:
    """What one run of the engine does. Every attack class (fosctrain.attacks.pgd) is one, with
    its defaults, its norm and its step-size rule, and passes itself to the engine.

    eps, alpha, steps: the budget, the step size and the number of projected steps (alpha None:
    the attack class's rule, `default_alpha`), in the `norm` ball ("linf" or "l2") intersected
    with the pixel box `bounds`. loss: the attack objective's name (fosctrain.losses),
    maximized, or with `targeted` minimized towards the labels given. random_start: start from
    a point the sampler draws (else from x0). stop: the stopping rule, consulted from step
    `min_steps` on (the official DAT code always takes the first step: min_steps=1). fosc_box:
    the exact box-aware FOSC (L-inf only, see fosctrain.fosc.box_exact). fosc_from_start: FOSC
    around the random start, the official code's quirk, instead of around x0. fosc_relative:
    every FOSC the engine reports (to the rule, the observer, the trace and the result) is
    fosctrain.fosc.relative_fosc. final_fosc: one more gradient pass evaluates the last step's
    points (their FOSC; under APGD also a candidate for the best point it returns). compact:
    stopped samples leave the batch (the cost falls, the result does not change). eval_mode:
    attack the model in eval mode (its mode is restored afterwards).
    """

    eps: float
    alpha: float | None
    steps: int
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
    norm: str = "linf"
    bounds: tuple[float, float] = BOUNDS
    eval_mode: bool = True

    def default_alpha(self) -> float:
        """The step size when alpha is None: each attack class states its rule."""
        raise UserError("give alpha: a plain AttackSpec has no step-size rule")

    @property
    def step_size(self) -> float:
        return self.default_alpha() if self.alpha is None else self.alpha

    def optimizer(self, eps: float, alpha: float, steps: int, x0: Tensor) -> Optimizer:
        """How the samples of x0 move between evaluations (the budget validated): PGD's fixed
        projected step."""
        return FixedSteps(eps, alpha, self.norm, self.bounds)


@dataclass
class AttackResult:
    """What an attack returns.

    fosc: each sample's FOSC at the last point whose gradient was evaluated; that is the
    returned point for samples stopped by the rule and for all samples when the attack ran with
    final_fosc=True, otherwise (samples that used every step) the point one step before. Under
    an optimizer that returns another evaluated point (APGD: the best), that point's FOSC.
    fosc_trace: steps x batch, FOSC at each evaluated point, NaN once a sample stopped.
    steps: projected steps each sample took. grad_evals: rows pushed through a forward and
    input-gradient backward pass (the attack's real cost; see _pad_rows for the few extra).
    x_start: the point the attack started from (the projected random start, or x0).
    """

    x_adv: Tensor
    fosc: Tensor
    fosc_trace: Tensor
    steps: Tensor
    stopped: Tensor
    grad_evals: int
    x_start: Tensor


@contextlib.contextmanager
def attack_mode(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Eval mode and frozen parameters for the attack, restored exactly afterwards (also on
    error); frozen parameters also spare autograd the work of their gradients."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def validate(eps: float, alpha: float, steps: int) -> tuple[float, float, int]:
    """The budget as (float, float, int), or one clear line for a value that makes no sense.
    NumPy scalars are welcome; booleans are not numbers here."""

    check_positive("eps", eps)
    check_positive("step size", alpha)
    check_positive("steps", steps, integer=True)
    return float(eps), float(alpha), int(steps)


def random_start(x0: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """A uniform point of the L-inf ball, or a uniformly random direction and radius in the L2
    ball, drawn on the CPU from `generator` so that results do not depend on the device."""
    shape = x0.shape
    if norm == "linf":
        noise = torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1
        delta = noise * eps
    else:
        direction = torch.randn(shape, generator=generator, dtype=torch.float32)
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        radius = torch.rand((shape[0],), generator=generator, dtype=torch.float32) * eps
        delta = direction * radius.view(-1, *([1] * (len(shape) - 1)))
    return x0 + delta.to(device=x0.device, dtype=x0.dtype)


def project(x: Tensor, x0: Tensor, eps: float, norm: str, bounds: tuple[float, float]) -> Tensor:
    """Project onto the threat ball around x0, then into the pixel box."""
    delta = x - x0
    if norm == "linf":
        delta = torch.clamp(delta, -eps, eps)
    else:
        length = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = torch.clamp(eps / length, max=1.0)
        delta = delta * factor.view(-1, *([1] * (x.dim() - 1)))
    return torch.clamp(x0 + delta, bounds[0], bounds[1])


def ascent_step(x: Tensor, grad: Tensor, alpha: float | Tensor, norm: str) -> Tensor:
    """Steepest ascent of size alpha (a number, or one per sample shaped to broadcast): the
    gradient's sign (L-inf) or its direction (L2)."""
    if norm == "linf":
        return x + alpha * grad.sign()
    length = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return x + alpha * grad / length.view(-1, *([1] * (x.dim() - 1)))


class Optimizer(Protocol):
    """How the engine moves the running samples (batch indices `active`, ascending) between
    evaluations. `observe` sees each evaluation (objective values, gradient, FOSC at the
    current points xs) and may move samples to other evaluated points, returning the points,
    gradients and FOSC the stopping rule and the next step use; `step` takes the step after
    evaluation k; `result` gives the points (and their FOSC) returned for the samples that
    used every step."""

    def observe(
        self, k: int, active: Tensor, xs: Tensor, values: Tensor, grad: Tensor, f: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def step(self, k: int, active: Tensor, xs: Tensor, grad: Tensor, x0s: Tensor) -> Tensor: ...

    def result(self, active: Tensor, xs: Tensor, f: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass
class FixedSteps:
    """PGD: a step of alpha along the gradient's sign (L-inf) or direction (L2), projected;
    the last point is returned."""

    eps: float
    alpha: float
    norm: str
    bounds: tuple[float, float]

    def observe(self, k, active, xs, values, grad, f):
        return xs, grad, f

    def step(self, k, active, xs, grad, x0s):
        moved = ascent_step(xs, grad, self.alpha, self.norm)
        return project(moved, x0s, self.eps, self.norm, self.bounds)

    def result(self, active, xs, f):
        return xs, f


MIN_ROWS = 16


def _pad_rows(rows: Tensor, n: int) -> Tensor:
    """Pad a compacted batch (points, labels or indices) to at least min(MIN_ROWS, n) rows,
    repeating its first row.

    CPU BLAS and oneDNN switch to other kernels for batches of a few rows (measured here: fewer
    than 12), whose rounding differs; padding keeps every sample's gradient bit-identical to
    the one it gets in the full batch, so compaction changes the cost and never the result.
    """
    short = min(MIN_ROWS, n) - rows.shape[0]
    if short <= 0:
        return rows
    return torch.cat([rows, rows[:1].expand(short, *rows.shape[1:])])


Sampler = Callable[[Tensor, float, str, "torch.Generator | None"], Tensor]
"""A start-point sampler: (x0, eps, norm, generator) -> points; the engine projects them onto
the threat set. `random_start` (uniform in the ball) is the default."""

Observer = Callable[[int, Tensor, Tensor, Tensor, Tensor], None]
"""Sees every evaluated point: observer(step, idx, logits, loss, fosc), for the samples still
running at `step` (batch indices idx, ascending): their logits, per-sample attack objective and
FOSC at their current point (step = steps for the final evaluation of final_fosc=True). The
tensors are the engine's own: read them, do not modify them."""


def run_attack(
    model: nn.Module,
    x0: Tensor,
    y: Tensor,
    spec: AttackSpec,
    *,
    generator: torch.Generator | None = None,
    start: Sampler = random_start,
    observer: Observer | None = None,
) -> AttackResult:
    """Run `spec.steps` projected ascent steps from x0 or, with `spec.random_start`, from the
    point the `start` sampler draws from `generator` (projected onto the threat set).

    The loop is Algorithm 1's inner loop: the active set (samples still running) is evaluated
    once per step; the stopping rule, consulted from step `min_steps` on, sees each evaluated
    point (its FOSC and logits) and moves some of it to the stopped set, which keeps those
    points; the optimizer sees the rest (APGD may move them back to their best points) and
    they take a step. `y` holds the target labels when `spec.targeted`. `observer` sees every
    evaluation.
    """
    eps, alpha, steps = validate(spec.eps, spec.step_size, spec.steps)
    norm, bounds = check_norm(spec.norm), spec.bounds
    fbounds = bounds if box_exact(norm, spec.fosc_box) else None
    f_obj = objective(spec.loss, spec.targeted)
    # the loop's settings as locals, read at every step
    stop, min_steps, targeted = spec.stop, spec.min_steps, spec.targeted
    compact, final_fosc = spec.compact, spec.final_fosc
    x0 = x0.detach()
    n = x0.shape[0]
    device = x0.device
    x_start = x0
    if spec.random_start:
        x_start = project(start(x0, eps, norm, generator), x0, eps, norm, bounds)
    center = x_start if spec.fosc_from_start else x0
    measure = relative_fosc if spec.fosc_relative else fosc
    x = x_start.clone()  # every sample's point; written when it leaves the active set
    trace = torch.full((steps + int(final_fosc), n), float("nan"), device=device)
    last_fosc = torch.full((n,), float("nan"), device=device)
    steps_taken = torch.zeros(n, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    grad_evals = 0
    if stop is not None:
        stop.reset(n, device)

    # The active set: batch indices and, row for row, their points, clean inputs, labels and
    # FOSC centres, gathered once and shrunk only when someone stops.
    active = torch.arange(n, device=device)
    xs, x0s, ys, cs = x_start, x0, y, center

    def evaluate(k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gradient, logits, objective values and FOSC of the active set at its points."""
        nonlocal grad_evals
        m = active.numel()
        if m == n:
            inputs, labels = xs, ys
        elif compact:
            inputs, labels = _pad_rows(xs, n), _pad_rows(ys, n)
        else:  # the whole batch, stopped samples at their final points
            x[active] = xs
            inputs, labels = x, y
        grad, logits, values = input_gradient(model, inputs, labels, f_obj)
        grad_evals += inputs.shape[0]
        if m < n and not compact:
            grad, logits, values = grad[active], logits[active], values[active]
        elif m < inputs.shape[0]:
            grad, logits, values = grad[:m], logits[:m], values[:m]
        f = measure(xs, cs, grad, eps, norm, fbounds)
        trace[k, active] = f
        if observer is not None:
            observer(k, active, logits, values, f)
        return grad, logits, values, f

    opt = spec.optimizer(eps, alpha, steps, x0)
    with attack_mode(model, spec.eval_mode):
        for k in range(steps):
            grad, logits, values, f = evaluate(k)
            if stop is not None and k >= min_steps:
                halt = stop(k, active, f, logits, ys, targeted)
                if bool(halt.any()):
                    done = active[halt]
                    x[done], last_fosc[done] = xs[halt], f[halt]
                    steps_taken[done], stopped[done] = k, True
                    go = (~halt).nonzero().squeeze(1)
                    active, xs, x0s, ys, cs = active[go], xs[go], x0s[go], ys[go], cs[go]
                    grad, values, f = grad[go], values[go], f[go]
                    if active.numel() == 0:
                        break
            xs, grad, f = opt.observe(k, active, xs, values, grad, f)
            xs = opt.step(k, active, xs, grad, x0s)
        else:
            steps_taken[active] = steps
            if final_fosc:
                grad, _, values, f = evaluate(steps)
                xs, _, f = opt.observe(steps, active, xs, values, grad, f)
            xs, f = opt.result(active, xs, f)
        x[active], last_fosc[active] = xs, f
    return AttackResult(x.detach(), last_fosc, trace, steps_taken, stopped, grad_evals, x_start)
