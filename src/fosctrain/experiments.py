"""The experiments of `fosc reproduce` as plain data: named configurations (overrides for
fosctrain.config.resolve) run at a scale (data, epochs, evaluation sizes) over seeds.

A configuration's value may be `Of(field, factor)`: factor times that field of the scale's base
configuration, so that one definition serves every scale (T' or a switch epoch as a fraction of
the epochs, a PGD step size as a multiple of eps).

Choices at the `small` scale (mnist5k, 4,000 training digits): 3 seeds, 4 epochs with the
learning-rate drop at epoch 3, the final evaluation on a fixed subset of 500 test digits (FGSM,
PGD-20, C&W-inf, gradient-masking checks), AutoAttack (standard) on 100 of them for seed 0 only
(it costs ~3,500 gradient evaluations per robust example: as much as training). Cost, from
`--dry-run` (gradient evaluations, DAT/FAT at their upper bound): fosc-vs-steps 0.37M,
early-vs-late 2.1M, methods 6.4M, fosc-schedule 4.4M, frontier 13.1M; 26M in all: ~80 min on 2
free cores at the ~0.37 ms per evaluation and core of a default `fosc train` (2.7 min for
Madry's 880k on 2 threads), ~2.5 h at the 0.63-0.82 ms measured on a loaded machine. For a
strict hour, --seeds 2 or fewer frontier points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fosctrain.config import METHODS, PRESETS, Config
from fosctrain.errors import UserError
from fosctrain.methods import DAT


@dataclass(frozen=True)
class Of:
    """A value relative to the scale: `factor` x the base configuration's `field`."""

    field: str
    factor: float


@dataclass(frozen=True)
class Scale:
    """Where and how long an experiment runs: base overrides (and preset), seeds, evaluation."""

    name: str
    description: str
    base: dict[str, Any]
    seeds: int
    eval_n: int  # test examples of the final evaluation (FGSM, PGD-20, C&W-inf)
    autoattack_n: int  # test examples AutoAttack runs on, where the experiment asks for it
    measure_n: int  # test examples of the FOSC-vs-steps measurement
    measure_steps: int
    checks: bool = True  # the evaluation's gradient-masking checks
    autoattack_seeds: int = 1000  # AutoAttack on the seeds below this only (it is costly)
    preset: str | None = None
    budget_every: int = 0  # gradient evaluations between budget checkpoints, where asked for


@dataclass(frozen=True)
class Experiment:
    """Named configurations x seeds, the evaluation they get and the figure they make."""

    name: str
    description: str
    configs: dict[str, dict[str, Any]]
    figure: str  # frontier, fosc-vs-steps, fosc-over-training or bars
    autoattack: bool = False
    autoattack_configs: tuple[str, ...] | None = None  # None: every configuration
    measure: bool = False  # also FOSC against PGD steps on the trained model
    seeds: int | None = None  # fewer seeds than the scale's, where one tells the story
    notes: list[str] = field(default_factory=list)
    budgets: bool = False  # checkpoints every scale.budget_every evaluations, each scored
    seed_major: bool = False  # run seed 0 of every configuration first (decisive pairs early)


SMOKE_BASE = dict(
    dataset="mnist5k",
    train_n=64,
    epochs=1,
    batch_size=32,
    lr_milestones=[1],
    val_n=8,
    final_eval_n=8,
    eval_steps=2,
    steps=3,
)

SCALES: dict[str, Scale] = {
    s.name: s
    for s in (
        Scale(
            "smoke",
            "seconds per experiment: 64 digits, 1 epoch of 2 batches, 3 PGD steps, 8 test digits",
            SMOKE_BASE,
            seeds=1,
            eval_n=8,
            autoattack_n=4,
            measure_n=8,
            measure_steps=5,
            checks=False,
            budget_every=300,
        ),
        Scale(
            "small",
            "embedded mnist5k (3,800 training digits, 200 for validation), 4 epochs, 3 seeds",
            dict(dataset="mnist5k", epochs=4, lr_milestones=[3], val_n=200, final_eval_n=100),
            seeds=3,
            eval_n=500,
            autoattack_n=100,
            measure_n=500,
            measure_steps=40,
            autoattack_seeds=1,
            budget_every=100_000,
        ),
        Scale(
            "default",
            "the defaults of `fosc train` (mnist5k, 20 epochs, Adam, validation slice 500), "
            "3 seeds, evaluation on all 1,000 test digits (FGSM, PGD-20, C&W-inf, APGD-CE + "
            "APGD-T), the standard AutoAttack on the first 500 of them (class-interleaved)",
            dict(dataset="mnist5k"),
            seeds=3,
            eval_n=1000,
            autoattack_n=500,
            measure_n=1000,
            measure_steps=40,
            budget_every=200_000,
        ),
        Scale(
            "medium",
            "full MNIST (59,500 training digits, 500 for validation), 3 epochs, 2 seeds, "
            "evaluation on all 10,000 test digits, AutoAttack on 100 of them for each seed",
            dict(dataset="mnist", epochs=3, lr_milestones=[2], val_n=500, final_eval_n=1000),
            seeds=2,
            eval_n=10000,
            autoattack_n=100,
            measure_n=1000,
            measure_steps=40,
            budget_every=500_000,
        ),
        Scale(
            "full",
            "full MNIST (59,500 training digits, 500 for validation), Madry PGD-10's 4 epochs "
            "(the other methods as many as spend about its gradient evaluations), 3 seeds, "
            "evaluation and the standard AutoAttack on the first 1,000 test digits "
            "(class-interleaved), a checkpoint every 500k gradient evaluations",
            dict(dataset="mnist", epochs=4, lr_milestones=[3], val_n=500, final_eval_n=1000),
            seeds=3,
            eval_n=1000,
            autoattack_n=1000,
            measure_n=1000,
            measure_steps=40,
            budget_every=500_000,
        ),
        Scale(
            "paper",
            "the paper's MNIST settings (preset mnist-paper: 50 epochs, SGD, batch 128)",
            dict(final_eval_n=1000),
            seeds=3,
            eval_n=10000,
            autoattack_n=10000,
            measure_n=1000,
            measure_steps=40,
            preset="mnist-paper",
        ),
        Scale(
            "paper-cifar10",
            "the paper's CIFAR-10 settings (preset cifar10-wrn-paper; needs --data-dir)",
            dict(final_eval_n=1000),
            seeds=3,
            eval_n=10000,
            autoattack_n=10000,
            measure_n=1000,
            measure_steps=40,
            preset="cifar10-wrn-paper",
        ),
    )
}

WEAK_STEPS, STRONG_STEPS = 2, 10  # early-vs-late: PGD steps of eps/4 (high / low FOSC)
HALF = Of("epochs", 0.5)


def _madry_k(k: int) -> dict[str, Any]:
    """Madry PGD-K with step 2.5 eps / K (eps / 4 at K = 10, the paper's setting)."""
    return dict(method="madry", steps=k, alpha=Of("eps", 2.5 / k))


def _dat(c_max: float | str, t_prime: float = 5 / 6, **options: Any) -> dict[str, Any]:
    """DAT on the paper's PGD-10 of eps/4 unless `options` name steps (not `fosc train`'s
    default PGD-5, so these configurations keep their meaning)."""
    return {
        "method": "dat",
        "steps": 10,
        "c_max": c_max,
        "t_prime": Of("epochs", t_prime),
        **options,
    }


# `fosc train`'s DAT (fosctrain.methods.DAT.defaults): PGD-5 of eps/2, batch-quantile target
DAT_DEFAULTS = _dat(
    "auto",
    steps=DAT.DEFAULT_STEPS,
    alpha=Of("eps", DAT.DEFAULT_STEP_OF_EPS),
    c_mode=DAT.DEFAULT_C_MODE,
)
# the methods experiment's madry and dat are spelled as the frontier's madry-k10 and
# dat-k5-quantile, so that `fosc reproduce methods --reuse FRONTIER_DIR` trains each once
METHOD_CONFIGS = {"madry": _madry_k(10), "dat": DAT_DEFAULTS}

# time to robustness: each method for as many epochs as spend about Madry PGD-10's gradient
# evaluations (11 per example and epoch: 10 attack steps and the training pass): Madry PGD-5
# 6, FAT about 85% of PGD-10's, Fast-AT 2, TRADES about 12 (its PGD-10 on the KL term, the
# training passes on clean and adversarial examples), DAT's default at most 6 and about 46% of
# PGD-10's on mnist5k
EQUAL_BUDGET = {
    "dat": {**DAT_DEFAULTS, "epochs": Of("epochs", 2)},
    "madry-k10": _madry_k(10),
    "madry-k5": {**_madry_k(5), "epochs": Of("epochs", 11 / 6)},
    "fat": dict(method="fat", epochs=Of("epochs", 1.25)),
    "fast": dict(method="fast", epochs=Of("epochs", 5.5)),
    "trades": dict(method="trades"),
    # beyond the paper: DAT's rule on TRADES's inner maximization (at most 7 per example: 5 KL
    # steps and TRADES's two passes), for validation to keep or drop
    "dat-trades": dict(method="dat-trades", epochs=Of("epochs", 2)),
    # beyond the paper: DAT's default with APGD as its inner optimizer (at most 7 per example:
    # 5 steps, the last point's evaluation, the training pass), its first step APGD's 2 eps
    "dat-apgd": {
        **DAT_DEFAULTS,
        "inner_optimizer": "apgd",
        "alpha": None,
        "epochs": Of("epochs", 2),
    },
}

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "fosc-vs-steps",
            "FOSC (mean, quantiles) of PGD examples against PGD steps, on a naturally and an "
            "adversarially (Madry PGD-10) trained model",
            {"natural": dict(method="natural"), "madry": _madry_k(10)},
            figure="fosc-vs-steps",
            measure=True,
            seeds=1,
        ),
        Experiment(
            "early-vs-late",
            "Madry training with weakly converged examples (PGD-2 of eps/4) early and well "
            "converged ones (PGD-10) late, the reverse, and each throughout; the switch is at "
            "half of training (schedule unit iteration, so it works within one epoch too)",
            {
                "weak-then-strong": dict(
                    method="madry", steps=WEAK_STEPS, late_steps=STRONG_STEPS, late_from=HALF
                ),
                "strong-then-weak": dict(
                    method="madry", steps=STRONG_STEPS, late_steps=WEAK_STEPS, late_from=HALF
                ),
                "constant-weak": dict(method="madry", steps=WEAK_STEPS),
                "constant-strong": dict(method="madry", steps=STRONG_STEPS),
            },
            figure="bars",
        ),
        Experiment(
            "methods",
            "natural, madry, cat, dat, fat, trades, fast and dat-trades under one epoch budget",
            {m: METHOD_CONFIGS.get(m, dict(method=m)) for m in METHODS},
            figure="fosc-over-training",
            autoattack=True,
        ),
        Experiment(
            "fosc-schedule",
            "DAT's sensitivity to c_max and T' (as a fraction of the epochs)",
            {
                f"dat-c{c}-t{name}": _dat(c, frac)
                for c in (0.1, 0.5, "auto")
                for name, frac in (("half", 0.5), ("5of6", 5 / 6))
            },
            figure="bars",
        ),
        Experiment(
            "frontier",
            "robust accuracy (PGD-20, AutoAttack) against gradient evaluations: Madry PGD-K, "
            "Fast-AT, FAT, TRADES, CAT and DAT over a c_max grid",
            {
                **{f"madry-k{k}": _madry_k(k) for k in (1, 2, 3, 5, 10)},
                "fast": dict(method="fast"),
                "fat": dict(method="fat"),
                "trades": dict(method="trades"),
                "cat": dict(method="cat"),
                **{f"dat-c{c}": _dat(c) for c in (0.1, 0.3, 0.5, 1.0, "auto")},
                # issue 13's options: calibration where the rule checks, schedule shapes, a
                # floor on the steps, a batch-quantile target, the scale-free target
                "dat-first-batches": _dat("auto", c_max_calibration="first-batches"),
                "dat-cosine": _dat("auto", c_schedule="cosine"),
                "dat-min2": _dat("auto", dat_min_steps=2),
                "dat-quantile": _dat("auto", c_mode="quantile"),
                "dat-relative0.3": _dat(0.3, fosc_relative=True),
                # DAT on Madry PGD-5's attack (step 2.5 eps / 5): the rule on a shorter budget
                "dat-k5": _dat("auto", steps=5, alpha=Of("eps", 0.5)),
                # ... whose target reaches 0 only at the end (T' = T), or is a batch quantile
                "dat-k5-t1": _dat("auto", 1.0, steps=5, alpha=Of("eps", 0.5)),
                "dat-k5-quantile": DAT_DEFAULTS,
            },
            figure="frontier",
            autoattack=True,
            autoattack_configs=("madry-k10", "dat-k5-quantile"),
        ),
        Experiment(
            "time-to-robustness",
            "robust accuracy (APGD-CE + APGD-T with 3 targets, on the evaluation's test digits) "
            "of checkpoints kept at fixed gradient-evaluation budgets, against training seconds "
            "and evaluations: DAT's default, Madry PGD-10 and PGD-5, FAT, Fast-AT, TRADES, "
            "DAT on TRADES's loss and DAT with APGD as its inner optimizer, each trained for "
            "about Madry PGD-10's evaluations; the final models also under the standard "
            "AutoAttack",
            EQUAL_BUDGET,
            figure="time-to-robustness",
            autoattack=True,
            budgets=True,
            seed_major=True,
        ),
    )
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise UserError(f"unknown scale {name!r}; choose one of {', '.join(SCALES)}")
    return SCALES[name]


def overrides(experiment: Experiment, scale: Scale, config_name: str) -> dict[str, Any]:
    """The scale's base overrides with the configuration's on top, `Of` values resolved."""
    preset = PRESETS[scale.preset] if scale.preset else {}
    base = {**Config().to_dict(), **preset, **scale.base}
    spec = experiment.configs[config_name]
    out = dict(scale.base)
    if isinstance(spec.get("epochs"), Of):  # first: the other fractions of epochs follow it
        out.update(scaled_epochs(base, spec["epochs"].factor))
        base = {**base, **out}
    for key, value in spec.items():
        if key == "epochs" and isinstance(value, Of):
            continue
        if isinstance(value, Of):
            value = value.factor * base[value.field]
            if key in ("t_prime", "steps", "late_steps"):
                value = max(1, round(value))
        out[key] = value
    if "late_steps" in spec:
        out["schedule_unit"] = "iteration"
    return out


def scaled_epochs(base: dict[str, Any], factor: float) -> dict[str, Any]:
    """`factor` x the base's epochs, its learning-rate drops moved with them (at the same
    fractions of training)."""
    epochs = max(1, round(factor * base["epochs"]))
    drops = {max(1, round(m * epochs / base["epochs"])) for m in base["lr_milestones"]}
    return {"epochs": epochs, "lr_milestones": sorted(drops)}


def default_seeds(experiment: Experiment, scale: Scale) -> int:
    return min(experiment.seeds or scale.seeds, scale.seeds)
