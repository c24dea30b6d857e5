"""Training methods. Each says how it builds its training batch (which attack, which stopping
rule, which schedule) and which loss it trains on; `fosc train` and a user's own loop use the
same objects.

    Natural  "natural"  clean examples
    Madry    "madry"    PGD-K, no stopping rule (Madry et al. 2018)
    CAT      "cat"      PGD whose step count grows 0 -> K over T' (curriculum AT, Cai et al. 2018)
    DAT      "dat"      PGD-K that stops each sample once its FOSC <= c_t (Wang et al. 2019, Alg. 1)
    FAT      "fat"      PGD-K that stops a sample tau steps after it is misclassified (Zhang 2020)
    TRADES   "trades"   CE(clean) + beta * KL(clean || adversarial), KL maximized by PGD (2019)
    FastAT   "fast"     FGSM from a random start with step 1.25 eps (Wong et al. 2020)

In a user's loop (the drop-in API; README "Drop-in: your own loop"):

    dat = DAT(eps=0.3, c_max=0.5, t_prime=40)   # options: fosctrain.config.Config's fields
    loss, info = dat.loss(model, x, y, epoch)   # info: FOSC statistics, steps, grad evals
    opt.zero_grad(); loss.backward(); opt.step()

The training loop meets every method through the same hooks, with no-op defaults here:
`step` (the batch and its per-sample losses), `calibrate` (once, on the initial model),
`state` / `load_state` (saved in each checkpoint), `extra_metrics` (metrics columns),
`note` (a line for the log after a step) and `fosc_target`. With `norm = "l2"` every attack
is its L2 form (PGDL2: normalized-gradient steps, projection onto the L2 ball, L2 FOSC), so
DAT's threshold and `--c-max auto` work on the L2 FOSC.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fosctrain.attacks import (
    FGSM_RS_ALPHA,
    PGD,
    AttackResult,
    BatchQuantile,
    FoscThreshold,
    MisclassifiedTau,
    Sampler,
    create_attack,
)
from fosctrain.attacks.engine import attack_mode, random_start
from fosctrain.config import Config, method_defaults, validate
from fosctrain.errors import UserError
from fosctrain.fosc import fosc_stats
from fosctrain.losses import cross_entropy, kl_from_clean
from fosctrain.schedules import curriculum_steps, decay, fat_tau, fosc_target

METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Decorator: make a method constructible by name (Config.method, `fosc train --method`)."""

    def add(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method name {name!r} is already registered")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


@dataclass(frozen=True)
class Info:
    """What one training step did, for a user's loop: the FOSC of the training batch (mean,
    median, 90th percentile; NaN for a clean batch), the mean PGD steps per example, the
    gradient evaluations (attack steps plus training passes, counted per example) and the
    FOSC target c_t (NaN for methods without one)."""

    fosc_mean: float
    fosc_median: float
    fosc_p90: float
    steps_mean: float
    grad_evals: int
    attack_grad_evals: int
    fosc_target: float


@dataclass
class Step:
    """One training step's batch: the attack's result (None: trained on the clean batch) and
    the per-sample losses and logits of the training forward on it."""

    losses: Tensor
    logits: Tensor
    result: AttackResult | None
    train_evals: int
    fosc_target: float

    def info(self) -> Info:
        r = self.result
        stats = fosc_stats(r.fosc if r is not None else torch.empty(0))
        attack_evals = 0 if r is None else int(r.grad_evals)
        return Info(
            fosc_mean=stats["mean"],
            fosc_median=stats["median"],
            fosc_p90=stats["p90"],
            steps_mean=0.0 if r is None else r.steps.double().mean().item(),
            grad_evals=attack_evals + self.train_evals,
            attack_grad_evals=attack_evals,
            fosc_target=self.fosc_target,
        )


def method_config(name: str, config: Config | None, options: dict[str, Any]) -> Config:
    """The validated Config of method `name`: `config` (default: Config's defaults and the
    method's own, as `fosc train` has them) with `options`, keyword by keyword; Config's fields
    are the one source of every option."""
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(
            f"unknown option(s) {', '.join(unknown)} for {name}; options are the fields of "
            "fosctrain.config.Config (eps, alpha, steps, norm, c_max, t_prime, ...)"
        )
    if config is None:
        config = method_defaults(Config(**{"method": name, **options}), set(options))
    else:
        config = dataclasses.replace(config, **options)
    if config.method != name:
        raise UserError(f"a {name} method cannot be built from a {config.method!r} config")
    validate(config)
    return config


class Method:
    """What every method shares: the training step and the loop's hooks, all no-ops here.
    A subclass changes one piece (its attack, its loss, its state); the base trains on clean
    examples."""

    name = ""
    passes = 1  # training forward/backward passes per example

    def __init__(self, config: Config | None = None, /, **options: Any) -> None:
        self.config = method_config(self.name, config, options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ------------------------------------------------------------------ the training step

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        epoch: float,
        *,
        generator: torch.Generator | None = None,
        start: Sampler = random_start,
    ) -> tuple[Tensor, Info]:
        """The drop-in API: the mean training loss on the batch this method builds from
        (x, y) at training time `epoch` (fractional within an epoch for per-iteration
        schedules), and what the step did. Random starts come from `generator` (default: the
        global RNG); the model is attacked in eval mode, then trained in train mode."""
        step = self.step(model, x, y, epoch, generator, start)
        return step.losses.float().mean(), step.info()

    def step(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        t: float,
        generator: torch.Generator | None = None,
        start: Sampler = random_start,
        train_model: nn.Module | None = None,
    ) -> Step:
        """The training batch at training time t and the training forward on it, through
        `train_model` (default: model; the loop passes its DDP or compiled wrapper)."""
        result = self.make_batch(model, x, y, t, generator, start)
        x_adv = x if result is None else result.x_adv
        train_model = model if train_model is None else train_model
        train_model.train()
        losses, logits = self.training_loss(train_model, x, x_adv, y, math.floor(t))
        return Step(losses, logits, result, self.passes * len(y), self.fosc_target(t))

    def attack(self, t: float) -> PGD | None:
        """The attack that makes the training batch at training time t (None: clean batch)."""
        return None

    def pgd(self, **overrides: Any) -> PGD:
        """The configured PGD (eps, step size, steps, random start, norm), with `overrides`."""
        c = self.config
        options = dict(
            eps=c.eps,
            alpha=c.step_size,
            steps=c.steps,
            random_start=c.random_start,
            fosc_box=c.fosc_box,
        )
        return create_attack("pgd", norm=c.norm, **{**options, **overrides})

    def make_batch(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        t: float,
        generator: torch.Generator | None = None,
        start: Sampler = random_start,
    ) -> AttackResult | None:
        """The attack's result on (x, y) (None: train on x), random starts from `start`."""
        attack = self.attack(t)
        return None if attack is None else attack(model, x, y, generator=generator, start=start)

    def training_loss(
        self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, epoch: int
    ) -> tuple[Tensor, Tensor]:
        """Per-sample training losses (the step averages them) and the logits on x_adv."""
        logits = model(x_adv)
        return cross_entropy(logits, y), logits

    # ------------------------------------------------------------------ the loop's hooks

    def fosc_target(self, t: float) -> float:
        """The FOSC the training batch is driven to at time t (NaN: no FOSC target)."""
        return math.nan

    def calibrate(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None
    ) -> str | None:
        """Fit the method to the initial model on a sample (x, y) of the training data; the
        loop calls it once before training. Returns a line for the log, or None."""
        return None

    def state(self) -> dict[str, Any]:
        """What a resumed run needs besides the configuration (JSON-serializable)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state` returned."""

    def extra_metrics(self) -> dict[str, Any]:
        """Columns this method adds to each metrics row and to summary.json."""
        return {}

    def note(self) -> str | None:
        """A line for the log that the last step left (None: nothing to say)."""
        return None


@register("natural")
class Natural(Method):
    """Standard training on clean examples (the base class's batch)."""


@register("madry")
class Madry(Method):
    """PGD-K adversarial training; with `late_steps` set, PGD takes that many steps from
    epoch `late_from` on (the early-vs-late study of `fosc reproduce`)."""

    def attack(self, t: float) -> PGD:
        c = self.config
        if c.late_steps is not None and t >= c.late_from:
            return self.pgd(steps=c.late_steps)
        return self.pgd()


@register("cat")
class CAT(Method):
    """Curriculum AT: k(t) PGD steps, growing from 0 (clean) to K over T'."""

    def attack(self, t: float) -> PGD | None:
        k = curriculum_steps(t, self.config.steps, self.config.schedule_epochs)
        return None if k == 0 else self.pgd(steps=k)


@register("dat")
class DAT(Method):
    """Dynamic AT: PGD-K whose samples stop once their FOSC <= c_t, c_t falling from c_max to
    0 over T' (linearly, as Algorithm 1, or with c_schedule "cosine"). The rule is first checked
    at step `min_steps` and compares FOSC or, with fosc_relative, the relative FOSC; with
    c_mode "quantile" the target is each batch's own FOSC quantile (c_max unused).

    c_max "auto" is measured as c_max_calibration says (`calibrate`): "initial" on the initial
    model, by the training loop before training and in a user's loop on the first batch;
    "first-batches" on the first calibration_batches training batches, trained as full PGD-K
    while their FOSC at the rule's first check is recorded (the same in both loops)."""

    def __init__(self, config: Config | None = None, /, **options: Any) -> None:
        super().__init__(config, **options)
        self.c_max = None if self.config.c_max == "auto" else float(self.config.c_max)
        self.measured: list[float] = []  # first-batches: the FOSC values seen so far
        self.batches_measured = 0
        self._note: str | None = None

    @property
    def min_steps(self) -> int:
        """The step of the rule's first check: dat_min_steps, at least 1 with first_step_always."""
        return max(self.config.dat_min_steps, int(self.config.first_step_always))

    @property
    def quantile_mode(self) -> bool:
        return self.config.c_mode == "quantile"

    @property
    def measuring(self) -> bool:
        """Whether the batches are still calibrating c_max (first-batches, not yet done)."""
        return self.c_max is None and not self.quantile_mode

    def fosc_target(self, t: float) -> float:
        if self.quantile_mode or self.c_max is None:
            return math.nan  # each batch has its own target, or none yet
        c = self.config
        return fosc_target(t, self.c_max, c.schedule_epochs, c.c_schedule)

    def target_quantile(self, t: float) -> float:
        """c_mode "quantile": q_t, the batch quantile of FOSC that is the target at time t."""
        c = self.config
        return c.c_max_quantile * decay(t, c.schedule_epochs, c.c_schedule)

    def attack(self, t: float) -> PGD:
        """PGD-K measuring FOSC as the rule reads it (centre, scale, first check), with the
        rule; while first-batches calibrates, with none (full PGD-K)."""
        c = self.config
        if self.quantile_mode:
            stop = BatchQuantile(self.target_quantile(t))
        else:
            stop = None if self.c_max is None else FoscThreshold(self.fosc_target(t))
        return self.pgd(
            stop=stop,
            min_steps=self.min_steps,
            fosc_from_start=c.fosc_from_random_start,
            fosc_relative=c.fosc_relative,
        )

    def make_batch(self, model, x, y, t, generator=None, start=random_start):
        if self.measuring and self.config.c_max_calibration == "initial":
            self.calibrate(model, x, y, generator)  # a user's loop: measured on the first batch
        measuring = self.measuring
        result = super().make_batch(model, x, y, t, generator, start)
        if measuring:
            self.measure(result.fosc_trace[self.min_steps])
        return result

    def calibrate(self, model, x, y, generator) -> str | None:
        """--c-max auto, c_max_calibration "initial": the c_max_quantile of the FOSC after one
        PGD step on the initial model as it is (eval mode, so BatchNorm's fresh statistics).

        At c_0 = c_max that fraction of the samples stops after its first step, the weakest
        examples DAT starts from; the decay to 0 then moves every sample to full PGD-K by T'.
        Caution (issue 13): fresh BatchNorm makes this FOSC far smaller than the one the rule
        meets in epoch 1 once the statistics warm up; "first-batches" measures that one. It
        calibrates during training (`measure`), so here it only says so."""
        if not self.measuring:
            return None
        c = self.config
        if c.c_max_calibration == "first-batches":
            if self.batches_measured:
                return None
            return (
                f"c_max auto: measuring on the first {c.calibration_batches} training batches, "
                f"trained as full PGD-{c.steps}"
            )
        pgd = self.pgd(steps=2, fosc_relative=c.fosc_relative)
        trace = pgd(model, x, y, generator=generator).fosc_trace[1]
        self.c_max = float(torch.quantile(trace.double(), c.c_max_quantile))
        return (
            f"c_max auto = {self.c_max:.4g} "
            f"(the {c.c_max_quantile:g}-quantile of step-1 {self._kind()} on {len(y)} "
            "training examples)"
        )

    def measure(self, values: Tensor) -> None:
        """first-batches: record a batch's FOSC at the rule's first check; after the last
        batch, c_max is their c_max_quantile, and `note` has the line that says so."""
        c = self.config
        self.measured += values.tolist()
        self.batches_measured += 1
        if self.batches_measured < c.calibration_batches:
            return
        measured = torch.tensor(self.measured, dtype=torch.float64)
        self.c_max = float(torch.quantile(measured, c.c_max_quantile))
        stopped = (measured <= self.c_max).double().mean().item()
        where = "start point" if self.min_steps == 0 else f"step {self.min_steps}"
        self._note = (
            f"c_max auto = {self.c_max:.4g} (the {c.c_max_quantile:g}-quantile of "
            f"{self._kind()} at the rule's first check, the {where}, on the first "
            f"{self.batches_measured} training batches ({len(measured)} examples); {stopped:.0%} "
            "of them would have stopped there)"
        )
        self.measured = []

    def _kind(self) -> str:
        return "relative FOSC" if self.config.fosc_relative else "FOSC"

    def note(self) -> str | None:
        line, self._note = self._note, None
        return line

    def training_loss(self, model, x, x_adv, y, epoch):
        values, logits = super().training_loss(model, x, x_adv, y, epoch)
        if self.config.loss_weighting and epoch > 0:
            values = values * values.detach()
        return values, logits

    def state(self) -> dict[str, Any]:
        if self.measuring and self.batches_measured:
            return {"c_max": None, "measured": self.measured, "batches": self.batches_measured}
        return {"c_max": self.c_max}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("c_max") is not None:
            self.c_max = float(state["c_max"])
        self.measured = list(state.get("measured", []))
        self.batches_measured = int(state.get("batches", 0))

    def extra_metrics(self) -> dict[str, Any]:
        return {"c_max": self.c_max}


@register("fat")
class FAT(Method):
    """Friendly AT: PGD-K whose samples stop tau(t) steps after they are misclassified."""

    def attack(self, t: float) -> PGD:
        c = self.config
        tau = fat_tau(t, c.fat_tau, c.fat_tau_max, c.schedule_epochs)
        return self.pgd(stop=MisclassifiedTau(tau))


@register("trades")
class TRADES(Method):
    """TRADES: CE on clean examples plus beta times KL(clean || adversarial), whose adversarial
    examples maximize that KL with PGD; two training passes per example."""

    passes = 2

    def attack(self, t: float) -> PGD:
        return self.pgd(loss="kl")

    def make_batch(self, model, x, y, t, generator=None, start=random_start):
        with attack_mode(model), torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        return self.attack(t)(model, x, p_clean, generator=generator, start=start)

    def training_loss(self, model, x, x_adv, y, epoch):
        clean, adv = model(x), model(x_adv)
        kl = kl_from_clean(adv, F.softmax(clean, dim=1))
        return cross_entropy(clean, y) + self.config.trades_beta * kl, adv


@register("fast")
class FastAT(Method):
    """Fast AT: one step (signed, or normalized for L2) of 1.25 eps from a random start."""

    def attack(self, t: float) -> PGD:
        c = self.config
        alpha = FGSM_RS_ALPHA * c.eps if c.fast_alpha is None else c.fast_alpha
        return self.pgd(alpha=alpha, steps=1, random_start=True)


def create_method(config: Config) -> Method:
    """The method `config.method` names, built from `config` (validated)."""
    if config.method not in METHODS:
        raise UserError(f"unknown method {config.method!r}; choose one of {sorted(METHODS)}")
    return METHODS[config.method](config)
