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
`step` (the batch and its per-sample losses, with the line for the log that `after_batch` may
leave), `calibrate` (once, on the initial model), `state` / `load_state` (saved in each
checkpoint), `extra_metrics` (metrics columns) and `fosc_target`. The configuration and the run
meet the classes before any object exists: `defaults` (what a method sets where nothing else
does), `validate` and `check_world` (its options, and what they need of the processes; every
method checks its own on every config, as one Config holds them all) and `report_lines` (its
lines in `fosc train`'s report). With `norm = "l2"` every attack is its L2 form (PGDL2:
normalized-gradient steps, projection onto the L2 ball, L2 FOSC), so DAT's threshold and
`--c-max auto` work on the L2 FOSC.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    StoppingRule,
    create_attack,
)
from fosctrain.attacks.engine import attack_mode, random_start
from fosctrain.errors import UserError, check_choice, check_positive
from fosctrain.fosc import fosc_stats
from fosctrain.losses import cross_entropy, kl_from_clean
from fosctrain.schedules import DECAY_SHAPES, curriculum_steps, decay, fat_tau, fosc_target

if TYPE_CHECKING:  # fosctrain.config reads the registry below, so it comes to us at call time
    from fosctrain.config import Config
    from fosctrain.distributed import Dist

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
    gradient evaluations (attack steps plus training passes, counted per example), the
    FOSC target c_t (NaN for methods without one) and a line for the log the step left (None:
    nothing to say; DAT says when its first-batches calibration has measured c_max)."""

    fosc_mean: float
    fosc_median: float
    fosc_p90: float
    steps_mean: float
    grad_evals: int
    attack_grad_evals: int
    fosc_target: float
    note: str | None = None


@dataclass
class Step:
    """One training step's batch: the attack's result (None: trained on the clean batch), the
    per-sample losses and logits of the training forward on it, and a line for the log."""

    losses: Tensor
    logits: Tensor
    result: AttackResult | None
    train_evals: int
    fosc_target: float
    note: str | None = None

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
            note=self.note,
        )


class Method:
    """What every method shares: the training step and the loop's hooks, all no-ops here.
    A subclass changes one piece (its attack, its loss, its state); the base trains on clean
    examples."""

    name = ""
    passes = 1  # training forward/backward passes per example

    def __init__(self, config: Config | None = None, /, **options: Any) -> None:
        from fosctrain.config import method_config  # config imports this module

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
        note = self.after_batch(result)
        x_adv = x if result is None else result.x_adv
        train_model = model if train_model is None else train_model
        train_model.train()
        losses, logits = self.training_loss(train_model, x, x_adv, y, math.floor(t))
        return Step(losses, logits, result, self.passes * len(y), self.fosc_target(t), note)

    def attack(self, t: float) -> PGD | None:
        """The attack that makes the training batch at training time t (None: clean batch)."""
        return None

    def pgd(self, **overrides: Any) -> PGD:
        """The configured training attack (inner optimizer, eps, step size, steps, random
        start, norm), with `overrides`: PGD, or APGD, whose step size is its own schedule
        (2 eps, halved at its checkpoints: --alpha and a preset's alpha are PGD's)."""
        c = self.config
        options = dict(
            eps=c.eps,
            alpha=None if c.inner_optimizer == "apgd" else c.step_size,
            steps=c.steps,
            random_start=c.random_start,
            fosc_box=c.fosc_box,
        )
        return create_attack(c.inner_optimizer, norm=c.norm, **{**options, **overrides})

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

    def after_batch(self, result: AttackResult | None) -> str | None:
        """Learn from the batch just made (before training on it); returns a line for the log,
        or None."""
        return None

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

    # ------------------------------------------------- the configuration's and the run's hooks

    @classmethod
    def defaults(cls, config: Config, given: set[str] | frozenset[str]) -> dict[str, Any]:
        """The options this method sets for itself (a config of this method, before it is
        validated) where `given`, the options a preset, a file or the caller set, does not."""
        return {}

    @classmethod
    def validate(cls, config: Config) -> None:
        """Raise UserError (one line) for a value of this method's own options that cannot
        work. Called on every config whichever method it names: the options are Config's."""

    @classmethod
    def check_world(cls, config: Config, dist: Dist) -> None:
        """Raise UserError where this method's options cannot run in the processes of `dist`
        (fosctrain.distributed.Dist); called, like `validate`, whichever method runs."""

    @classmethod
    def report_lines(cls, summary: dict[str, Any]) -> list[str]:
        """This method's lines at the end of `fosc train`'s report, from its summary.json."""
        return []


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

    @classmethod
    def validate(cls, c: Config) -> None:
        """late_steps and late_from: both or neither, in range, and for madry only."""
        if (c.late_steps is None) != (c.late_from is None):
            raise UserError("late_steps and late_from go together: give both or neither")
        if c.late_steps is not None:
            check_positive("late_steps", c.late_steps, integer=True)
            check_positive("late_from", c.late_from, zero_ok=True)
            if c.method != cls.name:
                raise UserError(f"late_steps applies to method {cls.name} only, not {c.method}")


@register("cat")
class CAT(Method):
    """Curriculum AT: k(t) PGD steps, growing from 0 (clean) to K over T'."""

    def attack(self, t: float) -> PGD | None:
        k = curriculum_steps(t, self.config.steps, self.config.schedule_epochs)
        return None if k == 0 else self.pgd(steps=k)


class FoscTarget:
    """DAT's target, the FOSC at which a sample stops, and its calibration. c_mode "c_max":
    c_t = c_max x decay(t) (Algorithm 1), c_max given or, with "auto", measured as
    c_max_calibration says: "initial" on the initial model (`fit_initial`), "first-batches" on
    the first calibration_batches training batches (`record`); while it is measured there is
    no rule. c_mode "quantile": each batch's own q_t-quantile of its FOSC at the rule's first
    check, q_t = c_max_quantile x decay(t); nothing to measure (c_max unused)."""

    MODES = ("c_max", "quantile")  # c_mode: c_max x decay, or a batch FOSC quantile
    CALIBRATIONS = ("initial", "first-batches")  # how c_max "auto" is measured

    def __init__(self, config: Config, first_check: int) -> None:
        self.config = config
        self.first_check = first_check  # the step where the rule is first checked
        self.c_max = None if config.c_max == "auto" else float(config.c_max)
        self.measured: list[float] = []  # first-batches: the FOSC values seen so far
        self.batches_measured = 0

    @classmethod
    def check(cls, c: Config) -> None:
        """UserError (one line) for target options that cannot work."""
        if c.c_max != "auto":
            check_positive("c_max", c.c_max, zero_ok=True)
        if not 0 < c.c_max_quantile < 1:
            raise UserError(f"c_max_quantile must be in (0, 1), got {c.c_max_quantile}")
        check_choice("c schedule", c.c_schedule, DECAY_SHAPES)
        check_choice("c mode", c.c_mode, cls.MODES)
        check_choice("c_max calibration", c.c_max_calibration, cls.CALIBRATIONS)
        check_positive("calibration_batches", c.calibration_batches, integer=True)
        if c.fosc_relative and c.c_max != "auto" and c.c_max > 2:
            raise UserError(f"--fosc-relative: c_max is a relative FOSC in [0, 2], got {c.c_max}")

    @property
    def quantile_mode(self) -> bool:
        return self.config.c_mode == "quantile"

    @property
    def to_measure(self) -> str | None:
        """How c_max is still to be measured ("initial", "first-batches"); None: it is not."""
        if self.c_max is not None or self.quantile_mode:
            return None
        return self.config.c_max_calibration

    def value(self, t: float) -> float:
        """c_t (NaN: each batch has its own target, or there is none yet)."""
        if self.quantile_mode or self.c_max is None:
            return math.nan
        c = self.config
        return fosc_target(t, self.c_max, c.schedule_epochs, c.c_schedule)

    def quantile(self, t: float) -> float:
        """c_mode "quantile": q_t, the batch quantile of FOSC that is the target at time t."""
        c = self.config
        return c.c_max_quantile * decay(t, c.schedule_epochs, c.c_schedule)

    def rule(self, t: float) -> StoppingRule | None:
        """The stopping rule at time t (None while c_max is measured: full PGD-K)."""
        if self.quantile_mode:
            return BatchQuantile(self.quantile(t))
        return None if self.c_max is None else FoscThreshold(self.value(t))

    def fit_initial(self, fosc: Tensor) -> str:
        """c_max_calibration "initial": c_max is the c_max_quantile of `fosc`, the step-1 FOSC
        of a sample of the training data on the initial model; returns the line that says so."""
        c = self.config
        self.c_max = float(torch.quantile(fosc.double(), c.c_max_quantile))
        return (
            f"c_max auto = {self.c_max:.4g} "
            f"(the {c.c_max_quantile:g}-quantile of step-1 {self._kind()} on {len(fosc)} "
            "training examples)"
        )

    def first_batches_plan(self) -> str | None:
        """c_max_calibration "first-batches", before its first batch: the line that says what
        it will measure (None otherwise)."""
        c = self.config
        if self.to_measure != "first-batches" or self.batches_measured:
            return None
        return (
            f"c_max auto: measuring on the first {c.calibration_batches} training batches, "
            f"trained as full PGD-{c.steps}"
        )

    def record(self, fosc: Tensor) -> str | None:
        """c_max_calibration "first-batches": record a batch's FOSC at the rule's first check;
        after the last batch c_max is their c_max_quantile, and the line that says so is
        returned (None before)."""
        c = self.config
        self.measured += fosc.tolist()
        self.batches_measured += 1
        if self.batches_measured < c.calibration_batches:
            return None
        measured = torch.tensor(self.measured, dtype=torch.float64)
        self.c_max = float(torch.quantile(measured, c.c_max_quantile))
        stopped = (measured <= self.c_max).double().mean().item()
        where = "start point" if self.first_check == 0 else f"step {self.first_check}"
        self.measured = []
        return (
            f"c_max auto = {self.c_max:.4g} (the {c.c_max_quantile:g}-quantile of "
            f"{self._kind()} at the rule's first check, the {where}, on the first "
            f"{self.batches_measured} training batches ({len(measured)} examples); {stopped:.0%} "
            "of them would have stopped there)"
        )

    def _kind(self) -> str:
        return "relative FOSC" if self.config.fosc_relative else "FOSC"

    def state(self) -> dict[str, Any]:
        if self.to_measure is not None and self.batches_measured:
            return {"c_max": None, "measured": self.measured, "batches": self.batches_measured}
        return {"c_max": self.c_max}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("c_max") is not None:
            self.c_max = float(state["c_max"])
        self.measured = list(state.get("measured", []))
        self.batches_measured = int(state.get("batches", 0))


@register("dat")
class DAT(Method):
    """Dynamic AT: PGD-K whose samples stop once their FOSC <= c_t, c_t falling from c_max to
    0 over T' (linearly, as Algorithm 1, or with c_schedule "cosine"). The rule is first checked
    at step `min_steps` and compares FOSC or, with fosc_relative, the relative FOSC; with
    c_mode "quantile" the target is each batch's own FOSC quantile (c_max unused). The target
    and its c_max calibration are a FoscTarget (`target`).

    c_max "auto" is measured as c_max_calibration says (`calibrate`): "initial" on the initial
    model, by the training loop before training and in a user's loop on the first batch;
    "first-batches" on the first calibration_batches training batches, trained as full PGD-K
    while their FOSC at the rule's first check is recorded (the same in both loops)."""

    # `fosc train`'s DAT where nothing sets its attack or target (issue 13), chosen by
    # validation robust accuracy on the default-scale frontier (docs/RESULTS.md): PGD-5 of step
    # 2.5 eps / 5 = eps / 2 instead of the fields' PGD-10 of eps / 4 (the paper's, which presets
    # and --steps 10 keep), and the batch-quantile target unless an absolute target is asked for
    # (--c-max, --c-max-calibration). There it was 80.4% robust on validation (Madry PGD-10:
    # 79.3%) at 46% of Madry PGD-10's gradient evaluations.
    DEFAULT_STEPS = 5
    DEFAULT_STEP_OF_EPS = 0.5
    DEFAULT_C_MODE = "quantile"
    ABSOLUTE_TARGET_OPTIONS = frozenset({"c_mode", "c_max", "c_max_calibration"})

    def __init__(self, config: Config | None = None, /, **options: Any) -> None:
        super().__init__(config, **options)
        self.target = FoscTarget(self.config, self.min_steps)

    @property
    def c_max(self) -> float | None:
        """c_max: given, measured, or None (auto, not yet measured)."""
        return self.target.c_max

    @property
    def min_steps(self) -> int:
        """The step of the rule's first check: dat_min_steps, at least 1 with first_step_always."""
        return max(self.config.dat_min_steps, int(self.config.first_step_always))

    def fosc_target(self, t: float) -> float:
        return self.target.value(t)

    def attack(self, t: float) -> PGD:
        """PGD-K measuring FOSC as the rule reads it (centre, scale, first check), with the
        rule; while first-batches calibrates, with none (full PGD-K)."""
        c = self.config
        stop = self.target.rule(t)
        return self.pgd(
            stop=stop,
            min_steps=self.min_steps,
            fosc_from_start=c.fosc_from_random_start,
            fosc_relative=c.fosc_relative,
        )

    def make_batch(self, model, x, y, t, generator=None, start=random_start):
        if self.target.to_measure == "initial":
            self.calibrate(model, x, y, generator)  # a user's loop: measured on the first batch
        return super().make_batch(model, x, y, t, generator, start)

    def after_batch(self, result: AttackResult | None) -> str | None:
        """first-batches: the batch (full PGD-K) is measured at the rule's first check."""
        if self.target.to_measure != "first-batches":
            return None
        return self.target.record(result.fosc_trace[self.min_steps])

    def calibrate(self, model, x, y, generator) -> str | None:
        """--c-max auto, c_max_calibration "initial": the c_max_quantile of the FOSC after one
        PGD step on the initial model as it is (eval mode, so BatchNorm's fresh statistics).

        At c_0 = c_max that fraction of the samples stops after its first step, the weakest
        examples DAT starts from; the decay to 0 then moves every sample to full PGD-K by T'.
        Caution (issue 13): fresh BatchNorm makes this FOSC far smaller than the one the rule
        meets in epoch 1 once the statistics warm up; "first-batches" measures that one. It
        calibrates during training (`after_batch`), so here it only says so."""
        if self.target.to_measure != "initial":
            return self.target.first_batches_plan()
        c = self.config
        pgd = self.pgd(steps=2, fosc_relative=c.fosc_relative, final_fosc=False)
        trace = pgd(model, x, y, generator=generator).fosc_trace[1]
        return self.target.fit_initial(trace)

    def training_loss(self, model, x, x_adv, y, epoch):
        values, logits = super().training_loss(model, x, x_adv, y, epoch)
        if self.config.loss_weighting and epoch > 0:
            values = values * values.detach()
        return values, logits

    def state(self) -> dict[str, Any]:
        return self.target.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.target.load_state(state)

    def extra_metrics(self) -> dict[str, Any]:
        return {"c_max": self.c_max}

    @classmethod
    def defaults(cls, config: Config, given: set[str] | frozenset[str]) -> dict[str, Any]:
        """PGD-5 of step eps / 2 (a given --steps keeps the fields' step rule, eps / 4; a given
        --alpha keeps that step with 5 steps; APGD keeps its own first step, 2 eps) and the
        batch-quantile target."""
        changes: dict[str, Any] = {}
        if "steps" not in given:
            changes["steps"] = cls.DEFAULT_STEPS
            if "alpha" not in given and config.inner_optimizer == "pgd":
                changes["alpha"] = cls.DEFAULT_STEP_OF_EPS * config.eps
        if not given & cls.ABSOLUTE_TARGET_OPTIONS:
            changes["c_mode"] = cls.DEFAULT_C_MODE
        return changes

    @classmethod
    def validate(cls, c: Config) -> None:
        """The target's options (FoscTarget.check) and the rule's first check (issue 13)."""
        FoscTarget.check(c)
        check_positive("dat_min_steps", c.dat_min_steps, integer=True, zero_ok=True)
        if c.dat_min_steps >= c.steps:
            raise UserError(
                f"dat_min_steps must be below steps ({c.steps}), got {c.dat_min_steps}: "
                "the rule would never be checked"
            )

    @classmethod
    def check_world(cls, config: Config, dist: Dist) -> None:
        """first-batches measures c_max in one process: each would measure its own shard."""
        if dist.enabled and config.c_max_calibration == "first-batches":
            raise UserError(
                "--c-max-calibration first-batches runs in one process only (each process "
                "would measure its own shard); use initial, or give --c-max"
            )

    @classmethod
    def report_lines(cls, summary: dict[str, Any]) -> list[str]:
        c_max = summary.get("c_max")
        return [] if c_max is None else [f"DAT c_max:            {c_max:.4g}"]


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


@register("dat-trades")
class DATTrades(DAT, TRADES):
    """DAT's stopping rule on TRADES's inner maximization (beyond the paper): PGD on KL(clean
    || adversarial) as TRADES runs it, each sample stopped once the FOSC of that objective
    meets DAT's target, then TRADES's loss. DAT's defaults (PGD-5 of eps/2, the batch-quantile
    target, which needs no scale of its own: the KL objective's FOSC is far smaller than the
    cross-entropy's); an absolute c_max is refused, since its calibration measures the
    cross-entropy's FOSC."""

    def pgd(self, **overrides: Any) -> PGD:
        return super().pgd(**{"loss": "kl", **overrides})

    @classmethod
    def validate(cls, c: Config) -> None:
        super().validate(c)
        if c.method == cls.name and c.c_mode != "quantile":
            raise UserError(
                "dat-trades takes DAT's batch-quantile target only (--c-mode quantile, its "
                "default): an absolute c_max is calibrated on the cross-entropy's FOSC"
            )


@register("fast")
class FastAT(Method):
    """Fast AT: one step (signed, or normalized for L2) of 1.25 eps from a random start."""

    def attack(self, t: float) -> PGD:
        c = self.config
        alpha = FGSM_RS_ALPHA * c.eps if c.fast_alpha is None else c.fast_alpha
        return self.pgd(alpha=alpha, steps=1, random_start=True)

    @classmethod
    def validate(cls, c: Config) -> None:
        """One signed step of its own size: APGD's schedule has nothing to schedule."""
        if c.method == cls.name and c.inner_optimizer != "pgd":
            raise UserError("fast takes one FGSM step: --inner-optimizer apgd does not apply")


def create_method(config: Config) -> Method:
    """The method `config.method` names, built from `config` (validated)."""
    if config.method not in METHODS:
        raise UserError(f"unknown method {config.method!r}; choose one of {sorted(METHODS)}")
    return METHODS[config.method](config)
