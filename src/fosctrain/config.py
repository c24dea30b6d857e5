"""Training configuration: one dataclass of plain data, named presets, TOML files, validation.

Resolution order: defaults < preset < TOML file < command-line options. Every value is
checked by `validate`, which raises UserError with one clear line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fosctrain.data import AUGMENTATIONS, DATASET_NAMES, DATASETS
from fosctrain.errors import UserError, check_positive
from fosctrain.errors import check_choice as _choice
from fosctrain.fosc import box_exact
from fosctrain.methods import METHODS as METHOD_CLASSES
from fosctrain.models import list_models
from fosctrain.threat import NORMS, eval_step_size, train_step_size, validate_eps
from fosctrain.validation import check_test_attack, check_val_attack

# the training methods' names, in the order fosctrain.methods registers a class under each
METHODS = tuple(METHOD_CLASSES)
VAL_N = 500  # chosen by measurement on mnist5k: see the val_n help and README


@dataclass
class Config:
    """Everything a training run depends on (the config hash covers all but `run` fields)."""

    method: str = field(default="dat", metadata={"help": f"training method: {', '.join(METHODS)}"})
    dataset: str = field(default="mnist5k", metadata={"help": "mnist5k (embedded), mnist, cifar10"})
    data_dir: str | None = field(default=None, metadata={"help": "directory of MNIST/CIFAR files"})
    model: str = field(default="mnist-cnn", metadata={"help": "model registry name"})
    model_kwargs: dict = field(default_factory=dict, metadata={"help": "extra model options"})
    num_classes: int = 10
    train_n: int = field(default=0, metadata={"help": "train on a fixed subset of N (0: all)"})
    epochs: int = field(default=20, metadata={"help": "training epochs T"})
    batch_size: int = 64
    optimizer: str = field(default="adam", metadata={"help": "sgd or adam"})
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_on: str = field(
        default="all",
        metadata={
            "help": "weights that --weight-decay applies to: all, kernels (conv and linear "
            "weights, as Keras' kernel L2), hidden-linear (the linear layers before the head)"
        },
    )
    lr_decay: float = field(
        default=0.0,
        metadata={"help": "per-iteration decay lr / (1 + lr_decay * iteration) (Keras' SGD decay)"},
    )
    lr_schedule: str = field(default="multistep", metadata={"help": "multistep, cosine, constant"})
    lr_milestones: list = field(
        default_factory=lambda: [16], metadata={"help": "epochs where lr *= lr_gamma"}
    )
    lr_gamma: float = 0.1
    augment: bool = field(default=False, metadata={"help": "random shifts and flips (CIFAR)"})
    augment_style: str = field(
        default="crop-flip",
        metadata={
            "help": "crop-flip (4-pixel shifts, flips) or keras (rotations of up to 10 degrees, "
            "shifts of up to 20 percent, flips, nearest fill: the official code's)"
        },
    )
    eps: float = field(default=0.3, metadata={"help": "L-inf (or L2) radius of the threat set"})
    alpha: float | None = field(
        default=None,
        metadata={"help": "PGD step size (default eps/4; dat: eps/2 with its 5 steps)"},
    )
    steps: int = field(
        default=10, metadata={"help": "PGD steps K for training examples (default 10; dat: 5)"}
    )
    inner_optimizer: str = field(
        default="pgd",
        metadata={
            "help": "the training attack's optimizer: pgd (fixed steps) or apgd (APGD's "
            "momentum and its own step schedule, 2 eps halved at its checkpoints, so --alpha "
            "is unused; FOSC monitored every step; K steps evaluate K + 1 points)"
        },
    )
    late_steps: int | None = field(
        default=None, metadata={"help": "madry: PGD steps from epoch --late-from on"}
    )
    late_from: float | None = field(
        default=None, metadata={"help": "madry: epoch (0-based) where --late-steps start"}
    )
    norm: str = field(default="linf", metadata={"help": "linf or l2"})
    random_start: bool = True
    fosc_box: bool = field(default=False, metadata={"help": "exact box-aware FOSC"})
    c_max: float | str = field(
        default="auto", metadata={"help": "DAT: FOSC target at epoch 0, or auto"}
    )
    c_max_quantile: float = field(
        default=0.5,
        metadata={
            "help": "DAT --c-max auto: the quantile of the measured FOSC that becomes c_max; "
            "--c-mode quantile: the batch quantile q at epoch 0"
        },
    )
    c_max_calibration: str = field(
        default="initial",
        metadata={
            "help": "DAT --c-max auto: initial (step-1 FOSC on the initial model, fresh "
            "BatchNorm statistics) or first-batches (the FOSC at the rule's first check over "
            "the first --calibration-batches training batches, trained as full PGD-K)"
        },
    )
    calibration_batches: int = field(
        default=10,
        metadata={"help": "DAT --c-max-calibration first-batches: batches it measures"},
    )
    c_schedule: str = field(
        default="linear",
        metadata={"help": "DAT: decay of the target over T': linear (paper) or cosine"},
    )
    c_mode: str = field(
        default="c_max",
        metadata={
            "help": "DAT target: c_max (c_t = c_max x decay) or quantile (c_t = the q_t-quantile "
            "of each batch's FOSC at the first check, q_t = c_max_quantile x decay; c_max unused; "
            "dat's default unless --c-max or --c-max-calibration is given)"
        },
    )
    fosc_relative: bool = field(
        default=False,
        metadata={
            "help": "DAT: stop on the scale-free relative FOSC, c / (eps ||g||_1) (L2: "
            "||g||_2; --fosc-box: the box's half range) in [0, 2], instead of FOSC itself"
        },
    )
    dat_min_steps: int = field(
        default=0,
        metadata={"help": "DAT: steps every sample takes before the rule may stop it"},
    )
    t_prime: int | None = field(
        default=None, metadata={"help": "DAT/CAT/FAT: epochs T' the schedule takes (default 5T/6)"}
    )
    schedule_unit: str = field(default="epoch", metadata={"help": "epoch or iteration"})
    fosc_from_random_start: bool = field(
        default=False, metadata={"help": "official-code quirk: FOSC around the random start"}
    )
    loss_weighting: bool = field(
        default=False, metadata={"help": "official-code quirk: weight loss by its own CE"}
    )
    first_step_always: bool = field(
        default=False, metadata={"help": "official-code quirk: FOSC check only after step 1"}
    )
    fat_tau: int = field(default=0, metadata={"help": "FAT: tau at epoch 0"})
    fat_tau_max: int = field(default=3, metadata={"help": "FAT: tau reached at epoch T'"})
    trades_beta: float = 6.0
    fast_alpha: float | None = field(default=None, metadata={"help": "Fast-AT step (1.25 eps)"})
    val_n: int = field(
        default=VAL_N,
        metadata={
            "help": "training examples held out (fixed, stratified) for per-epoch validation "
            "and `best` (0: none, then no `best`); 500 (one eighth of mnist5k's 4,000 digits) "
            "gives robust accuracy near 80 percent a standard error of 1.8 points (200: 2.8, "
            "1,000: 1.3), "
            "and its PGD costs about the training passes of the examples it holds out"
        },
    )
    final_eval_n: int = field(
        default=1000,
        metadata={
            "help": "test examples of the final evaluation, the first N of the class-interleaved "
            "test split, every attack on the same ones (0: all; mnist5k has 1,000)"
        },
    )
    eval_steps: int = field(
        default=20, metadata={"help": "PGD steps of the validation and final test"}
    )
    eval_alpha: float | None = field(
        default=None,
        metadata={"help": "PGD step of validation and test (default 2.5 eps / eval_steps)"},
    )
    val_attack: str = field(
        default="apgd-ce-10",
        metadata={
            "help": "validation attack (picks best): apgd-ce-K (APGD-CE of K steps; default "
            "10, chosen by how it ranks 20 models like APGD-CE + APGD-T on the test set, at "
            "half PGD-20's cost) or pgd (eval_steps steps, the paper's; before issue 18)"
        },
    )
    test_attack: str = field(
        default="apgd",
        metadata={
            "help": "the final test's AutoAttack-strength attack beside PGD, on the same "
            "examples: apgd (APGD-CE + APGD-T), apgd-ce, none"
        },
    )
    test_targets: int = field(
        default=3,
        metadata={
            "help": "target classes of the final test's APGD-T, the most likely first (3 by "
            "measurement: on the validation slice of two DAT runs APGD-T with 3 targets left the "
            "same accuracy as with all 9 at a third of the cost; AutoAttack runs 9)"
        },
    )
    eval_every: int = 1
    budget_every: int = field(
        default=0,
        metadata={
            "help": "keep a checkpoint budget-N each time training has spent another multiple "
            "of this many gradient evaluations, its training seconds in budgets.csv (time to "
            "robustness; 0: none)"
        },
    )
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    skip_nonfinite: bool = field(
        default=False, metadata={"help": "skip a batch with NaN/inf loss instead of stopping"}
    )
    amp: str | None = field(default=None, metadata={"help": "autocast dtype: bf16 or fp16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    channels_last: bool = field(
        default=False,
        metadata={
            "help": "train in the channels-last memory layout: ~1.6x faster on CPU, but "
            "BatchNorm's training kernel is ~30x less precise in it (benchmarks/"
            "channels_last.py); evaluation and validation use it regardless (eval mode, "
            "equally precise)"
        },
    )
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm under DDP"})

    @property
    def step_size(self) -> float:
        return train_step_size(self.eps, self.alpha)

    @property
    def eval_step_size(self) -> float:
        """The step of the reporting PGD: eval_alpha, or 2.5 eps / eval_steps."""
        return eval_step_size(self.eps, self.eval_steps, self.eval_alpha)

    def eval_attack(self) -> str:
        """The reporting attack in words, stated next to every number it produced."""
        rule = "--eval-alpha" if self.eval_alpha is not None else f"2.5 eps/{self.eval_steps}"
        norm = " L2" if self.norm == "l2" else ""
        return (
            f"PGD-{self.eval_steps}{norm} (eps {self.eps:g}, step {self.eval_step_size:.4g} = "
            f"{rule}, random start)"
        )

    @property
    def schedule_epochs(self) -> int:
        """T': the epochs over which DAT's c_t, CAT's steps and FAT's tau move."""
        if self.t_prime is not None:
            return self.t_prime
        return max(1, round(self.epochs * 5 / 6))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What is trained: every option except where and how fast it runs, and except options
        added later while they hold the value that trains as before they existed (so earlier
        runs keep their identity: resume and --reuse still find them)."""
        return {
            k: v
            for k, v in self.to_dict().items()
            if k not in RUNTIME_FIELDS and not (k in NEUTRAL and NEUTRAL[k] == v)
        }

    def hash(self) -> str:
        return config_hash(self.identity())

    @classmethod
    def stored(cls, values: dict[str, Any]) -> Config:
        """A run's recorded configuration (config.json); options added after it was written
        take their neutral value, the one it trained with, so its hash is the one recorded."""
        return cls(**{**NEUTRAL, **values})


def config_hash(config: dict) -> str:
    """Short stable id of a configuration: sha256 of its canonical (key-sorted) JSON, first 16
    hex characters. Run directories and checkpoints record it; resume compares it."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# how and where a run trains, and what it keeps on the way: never what it learns
RUNTIME_FIELDS = frozenset(
    {"device", "threads", "eval_every", "compile", "budget_every", "channels_last"}
)
# options added after runs were published, at the value that trains as before they existed
NEUTRAL: dict[str, Any] = {
    "weight_decay_on": "all",
    "lr_decay": 0.0,
    "augment_style": "crop-flip",
    "val_attack": "pgd",
    "test_attack": "none",
    "test_targets": 9,
    "inner_optimizer": "pgd",
}
WEIGHT_DECAY_ON = ("all", "kernels", "hidden-linear")
INNER_OPTIMIZERS = ("pgd", "apgd")  # attack registry names of the training attack

# The paper's settings, each a complete literal: nothing below edits a preset after the fact.
_CIFAR10_PAPER: dict[str, Any] = dict(
    method="dat",
    dataset="cifar10",
    model="cifar-cnn8",
    epochs=120,
    batch_size=128,
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    lr_decay=1e-4,  # Keras SGD(decay=1e-4): lr / (1 + 1e-4 iteration), not weight decay
    weight_decay=0.02,  # Keras l2(0.01) on the 256-unit layer: gradient 0.02 w
    weight_decay_on="hidden-linear",
    lr_milestones=[59, 99],  # the official loop drops when (ep + 1) == 60, 100: 0-based 59, 99
    eps=0.031,
    alpha=0.031 / 4,
    steps=10,
    c_max=0.5,
    t_prime=100,
    augment=True,
    augment_style="keras",  # rotations of 10 degrees, shifts of 20 percent, flips
)
PRESETS: dict[str, dict[str, Any]] = {
    "mnist-paper": dict(
        method="dat",
        dataset="mnist",
        optimizer="sgd",
        c_max=0.5,
        model="mnist-cnn",
        epochs=50,
        batch_size=128,
        lr=0.01,
        lr_milestones=[20, 40],
        eps=0.3,
        alpha=0.075,
        steps=10,
        t_prime=40,
    ),
    "cifar10-cnn-paper": _CIFAR10_PAPER,
    "cifar10-wrn-paper": {
        **_CIFAR10_PAPER,
        "model": "wrn-34-10",
        "weight_decay": 4e-3,  # Keras l2(2e-3) on every kernel: gradient 4e-3 w
        "weight_decay_on": "kernels",
    },
}

PRESET_DIFFERENCES = (
    "the CIFAR-10 presets follow the official code's optimiser (SGD 0.01, momentum 0.9, Keras' "
    "per-iteration decay lr / (1 + 1e-4 iteration), drops from 0-based epochs 59 and 99), "
    "regularisation (l2(2e-3) on every WRN kernel, l2(0.01) on the CNN's 256-unit layer) and "
    "augmentation (rotations of 10 degrees, shifts of 20 percent, flips); they differ in "
    "initialisation and BatchNorm (PyTorch's He init, momentum 0.1 and epsilon 1e-5; Keras "
    "defaults to Glorot-uniform, 0.99 and 1e-3)"
)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def apply(config: Config, overrides: dict[str, Any], source: str) -> Config:
    """A copy of config with overrides applied; unknown keys name their source."""
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise UserError(f"{source}: unknown option(s) {', '.join(unknown)}")
    return dataclasses.replace(config, **overrides)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Options from a TOML file (keys as in Config, dashes or underscores)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read config file ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    data = data.get("train", data)
    return {k.replace("-", "_"): v for k, v in data.items()}


def method_defaults(config: Config, given: set[str] | frozenset[str]) -> Config:
    """`config` with what its method sets for itself (the class's `defaults` hook, in
    fosctrain.methods) where `given`, the options a preset, a file or the caller set, does not.
    An unknown method sets nothing; `validate` names it."""
    method = METHOD_CLASSES.get(config.method)
    if method is None:
        return config
    return dataclasses.replace(config, **method.defaults(config, given))


def resolve(
    preset: str | None = None, toml_path: str | None = None, overrides: dict | None = None
) -> Config:
    """Defaults < method defaults < preset < TOML < overrides, validated."""
    config, given = Config(), set()
    layers = []
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        layers.append((PRESETS[preset], f"preset {preset}"))
    if toml_path is not None:
        layers.append((load_toml(toml_path), str(toml_path)))
    layers.append((overrides or {}, "command line"))
    for values, source in layers:
        config = apply(config, values, source)
        given |= set(values)
    config = method_defaults(config, given)
    validate(config)
    return config


def method_config(name: str, config: Config | None, options: dict[str, Any]) -> Config:
    """The validated Config of method `name` built in a user's loop (`DAT(eps=0.1)`): `config`
    (default: Config's defaults and the method's own, as `resolve` has them) with `options`,
    keyword by keyword; Config's fields are the one source of every option."""
    unknown = sorted(set(options) - set(FIELDS))
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


def validate(c: Config) -> None:
    """Raise UserError (one line) for any value that cannot work."""

    _choice("method", c.method, METHODS)
    _choice("dataset", c.dataset, tuple(DATASET_NAMES))
    _choice("model", c.model, tuple(list_models()))
    _choice("optimizer", c.optimizer, ("sgd", "adam"))
    _choice("lr schedule", c.lr_schedule, ("multistep", "cosine", "constant"))
    _choice("norm", c.norm, NORMS)
    _choice("schedule unit", c.schedule_unit, ("epoch", "iteration"))
    _choice("amp dtype", c.amp, (None, "bf16", "fp16"))
    _choice("weight_decay_on", c.weight_decay_on, WEIGHT_DECAY_ON)
    _choice("augment style", c.augment_style, tuple(AUGMENTATIONS))
    _choice("inner optimizer", c.inner_optimizer, INNER_OPTIMIZERS)
    for name in ("epochs", "batch_size", "steps", "eval_steps", "eval_every", "num_classes"):
        check_positive(name, getattr(c, name), integer=True)
    for name in ("lr", "eps", "lr_gamma"):
        check_positive(name, getattr(c, name))
    for name in ("momentum", "weight_decay", "lr_decay", "trades_beta"):
        check_positive(name, getattr(c, name), zero_ok=True)
    check_positive("val_n", c.val_n, integer=True, zero_ok=True)
    check_positive("train_n", c.train_n, integer=True, zero_ok=True)
    check_positive("final_eval_n", c.final_eval_n, integer=True, zero_ok=True)
    check_positive("seed", c.seed, integer=True, zero_ok=True)
    check_positive("budget_every", c.budget_every, integer=True, zero_ok=True)
    for name in ("fat_tau", "fat_tau_max"):
        check_positive(name, getattr(c, name), integer=True, zero_ok=True)
    validate_eps([c.eps], c.norm)
    check_val_attack(c.val_attack)
    check_positive("test_targets", c.test_targets, integer=True)
    check_test_attack(c.test_attack, c.test_targets, c.num_classes)
    box_exact(c.norm, c.fosc_box)  # raises for --fosc-box with --norm l2
    for name in ("alpha", "fast_alpha", "eval_alpha", "t_prime", "threads"):
        if getattr(c, name) is not None:
            check_positive(name, getattr(c, name), integer=name in ("t_prime", "threads"))
    if not isinstance(c.lr_milestones, list) or not all(
        isinstance(m, int) and m > 0 for m in c.lr_milestones
    ):
        raise UserError(f"lr_milestones must be a list of positive epochs, got {c.lr_milestones!r}")
    if not isinstance(c.model_kwargs, dict):
        raise UserError(f"model_kwargs must be a table/dict, got {c.model_kwargs!r}")
    for method in METHOD_CLASSES.values():  # each checks its own options, whichever method runs
        method.validate(c)
    if DATASETS[c.dataset].needs_data_dir and c.data_dir is None:
        raise UserError(f"dataset {c.dataset} needs --data-dir (nothing is downloaded)")
