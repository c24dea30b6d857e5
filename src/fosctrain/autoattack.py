"""AutoAttack (Croce & Hein 2020) built from torchattacks' components with the original
settings, run as AutoAttack runs them: each component attacks only the examples that are
still robust after the previous ones.

torchattacks' own `AutoAttack(version="standard")` leaves APGD and FAB at their default 10
steps; the standard suite of the paper (and RobustBench) is APGD-CE (100 steps, 1 restart),
APGD-T (100 steps, 9 target classes), FAB-T (100 steps, 9 target classes) and Square (5,000
queries). `apgd` runs APGD-CE and APGD-T only (the AutoAttack-strength default of every
evaluation; `fast` is its old name) and is labelled "apgd-ce+t" wherever it is reported, so it
is never mistaken for the standard suite; `apgd-ce` runs APGD-CE alone.

Costs are counted, not estimated: the model is wrapped in a counter of the examples that pass
through it with the input gradient on (gradient evaluations) and without (forward passes, as
Square's queries). A suite run on many digits can resume: `run_suite(..., state=PATH)` saves
every component's progress after each batch and a rerun with the same key continues from the
last finished batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fosctrain.device import model_device
from fosctrain.errors import UserError
from fosctrain.files import atomic_write_json
from fosctrain.report import bits_mask, mask_bits

STEPS = 100
SQUARE_QUERIES = 5000
VERSIONS = ("standard", "apgd", "apgd-ce")
ALIASES = {"fast": "apgd"}  # the name `apgd` had before it became the default
COMPONENTS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "apgd": ("apgd-ce", "apgd-t"),
    "apgd-ce": ("apgd-ce",),
}
LABELS = {"standard": "autoattack", "apgd": "apgd-ce+t", "apgd-ce": "apgd-ce"}
MIN_CLASSES = {"standard": 4, "apgd": 4, "apgd-ce": 2}  # APGD-T's targeted DLR needs 4
HINT = (
    "AutoAttack needs torchattacks: pip install --no-deps torchattacks (its torchvision "
    "dependency is not needed and breaks beside a pinned torch; see README)"
)


@dataclass
class Stage:
    """Per-example robustness after a component (and all before it), its seconds and its
    cost: gradient evaluations and gradient-free forward passes, per example counted."""

    robust: Tensor
    seconds: float
    grad_evals: int = 0
    forwards: int = 0
    probe: Tensor | None = None  # run_suite's `probe` at the component's final points


@dataclass
class Component:
    """One attack of the suite: its name, the torchattacks object and its settings."""

    name: str
    attack: Callable[[Tensor, Tensor], Tensor]
    settings: dict
    counter: Counted | None = None


class Counted(nn.Module):
    """The model, counting the examples it sees with the input gradient on (gradient
    evaluations: a backward pass follows) and off (forward passes).

    Its `training` flag is the wrapped model's: torchattacks reads the flag before an attack
    and restores it after, and a wrapper with a flag of its own (nn.Module's default, True)
    would leave the model in training mode, BatchNorm on batch statistics, after every call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.grad_evals = 0
        self.forwards = 0

    @property
    def training(self) -> bool:  # type: ignore[override]
        model = self.__dict__.get("_modules", {}).get("model")
        return bool(model.training) if model is not None else False

    @training.setter
    def training(self, mode: bool) -> None:
        """Module.train() sets the wrapped model's flag through children(); nothing to keep."""

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            self.grad_evals += x.shape[0]
        else:
            self.forwards += x.shape[0]
        return self.model(x)


def version_of(autoattack: bool | str | None) -> str | None:
    """None (no AutoAttack), "standard", "apgd" (old name "fast") or "apgd-ce"; True means
    "standard", "none" means None."""
    if autoattack is None or autoattack is False or autoattack == "none":
        return None
    if autoattack is True:
        return "standard"
    autoattack = ALIASES.get(autoattack, autoattack)
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


def check_classes(n_classes: int, version: str = "standard") -> None:
    need = MIN_CLASSES[version]
    if n_classes < need:
        raise UserError(
            f"{LABELS[version]} needs at least {need} classes (APGD-T's targeted DLR loss "
            f"does); this model has {n_classes}"
        )


def build_suite(
    model: nn.Module,
    version: str,
    eps: float,
    norm: str,
    n_classes: int,
    seed: int,
    steps: int = STEPS,
    targets: int | None = None,
) -> list[Component]:
    """The components of `version` at budget eps, with Croce & Hein's settings (`steps`: the
    APGD and FAB iterations, 100 in the standard suite; `targets`: APGD-T's target classes,
    all n_classes - 1 in the standard suite, the most likely first), each on its own counting
    wrapper."""
    ta = require_torchattacks()
    version = version_of(version)
    check_classes(n_classes, version)
    ta_norm = {"linf": "Linf", "l2": "L2"}[norm]
    common = dict(eps=eps, norm=ta_norm, seed=seed, n_restarts=1)
    fab_targets = n_classes - 1
    targets = fab_targets if targets is None else targets
    makers = {
        "apgd-ce": lambda m: ta.APGD(m, steps=steps, loss="ce", **common),
        "apgd-t": lambda m: ta.APGDT(m, steps=steps, n_classes=targets + 1, **common),
        "fab-t": lambda m: ta.FAB(
            m, steps=steps, multi_targeted=True, n_classes=n_classes, **common
        ),
        "square": lambda m: ta.Square(m, n_queries=SQUARE_QUERIES, **common),
    }
    described = {
        "apgd-ce": dict(name="APGD-CE", steps=steps, loss="ce", alpha="adaptive (APGD)"),
        "apgd-t": dict(
            name="APGD-T",
            steps=steps,
            loss="dlr-targeted",
            target_classes=targets,
            alpha="adaptive (APGD)",
        ),
        "fab-t": dict(
            name="FAB-T", steps=steps, target_classes=fab_targets, alpha="FAB projection"
        ),
        "square": dict(name="Square", queries=SQUARE_QUERIES, alpha="random squares (p_init 0.8)"),
    }
    base = dict(eps=eps, norm=norm, seed=seed, restarts=1, library="torchattacks", suite=version)
    suite = []
    for name in COMPONENTS[version]:
        counter = Counted(model)
        settings = {**described[name], **base}
        suite.append(Component(name, makers[name](counter), settings, counter))
    return suite


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


@dataclass
class Progress:
    """Where a suite run stands: the finished components' stages, the component under way,
    the first example it has not attacked yet and its robust mask, seconds and counts so far.
    `key` names the work (model, data, suite, seed); a saved state only resumes the same key."""

    key: str
    done: dict[str, Stage] = field(default_factory=dict)
    current: str | None = None
    next_start: int = 0
    robust: Tensor | None = None
    seconds: float = 0.0
    grad_evals: int = 0
    forwards: int = 0
    probe: Tensor | None = None

    def to_dict(self) -> dict:
        def stage(s: Stage) -> dict:
            return {
                "robust": mask_bits(s.robust),
                "seconds": s.seconds,
                "grad_evals": s.grad_evals,
                "forwards": s.forwards,
                "probe": _floats(s.probe),
            }

        return {
            "key": self.key,
            "done": {k: stage(v) for k, v in self.done.items()},
            "current": self.current,
            "next_start": self.next_start,
            "robust": None if self.robust is None else mask_bits(self.robust),
            "seconds": self.seconds,
            "grad_evals": self.grad_evals,
            "forwards": self.forwards,
            "probe": _floats(self.probe),
        }

    @classmethod
    def load(cls, path: Path, key: str) -> Progress:
        """The state saved at `path` for `key`, or a fresh one (no file, another key, or a file
        that cannot be read: the work then starts from zero, nothing else is lost)."""
        try:
            d = json.loads(path.read_text())
            if d.get("key") != key:
                return cls(key)
            done = {
                k: Stage(
                    bits_mask(v["robust"]),
                    v["seconds"],
                    v["grad_evals"],
                    v["forwards"],
                    _unfloats(v["probe"]),
                )
                for k, v in d["done"].items()
            }
            robust = None if d["robust"] is None else bits_mask(d["robust"])
            return cls(
                key,
                done,
                d["current"],
                int(d["next_start"]),
                robust,
                float(d["seconds"]),
                int(d["grad_evals"]),
                int(d["forwards"]),
                _unfloats(d["probe"]),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return cls(key)


def _floats(values: Tensor | None) -> list[float] | None:
    return None if values is None else values.tolist()


def _unfloats(values: list[float] | None) -> Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.float64)


Probe = Callable[[str, Tensor, Tensor, Tensor], Tensor | None]


def run_suite(
    model: nn.Module,
    components: list[Component],
    x: Tensor,
    y: Tensor,
    robust: Tensor,
    batch_size: int,
    on_batch: Callable[[str], None] = lambda name: None,
    state: tuple[Path, str] | None = None,
    probe: Probe | None = None,
    known: dict[str, Tensor] | None = None,
) -> dict[str, Stage]:
    """Cumulative per-example robustness after each component, starting from `robust` (the
    clean-correct mask): a component attacks only the examples still robust, batch by batch
    (`on_batch(name)` after every batch, for progress). With `state` = (path, key), progress
    is saved atomically after every batch and a run with the same key resumes from the last
    finished batch (the file is left for the caller to remove once its results are safe).
    `probe(name, x0, x_adv, y)`, where it returns per-example values (FOSC, say), is recorded
    at every attacked example's final point (NaN elsewhere) as Stage.probe. `known` gives
    components already run on these examples with the same settings (their cumulative robust
    masks, from an earlier evaluation): they are not run again (0 seconds, 0 evaluations).

    torchattacks reseeds the global RNGs (torch.manual_seed in APGD); their state is restored
    afterwards, so that a run validating with APGD trains as one that does not."""
    with torch.random.fork_rng(devices=_cuda_devices()):
        return _run_suite(model, components, x, y, robust, batch_size, on_batch, state, probe,
                          known)  # fmt: skip


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _run_suite(model, components, x, y, robust, batch_size, on_batch, state, probe, known):
    path, key = state if state is not None else (None, "")
    prog = Progress.load(path, key) if path is not None else Progress(key)
    run = _ComponentRun(model, x, y, batch_size, on_batch, path, prog, probe)
    out = {name: Stage(mask.clone(), 0.0) for name, mask in (known or {}).items()}
    out.update(prog.done)
    robust = robust.clone()
    for comp in components:
        if comp.name not in out:
            out[comp.name] = run.component(comp, robust)
        robust = out[comp.name].robust.clone()
    return out


@dataclass
class _ComponentRun:
    """One suite run's shared context; `component` attacks the still-robust examples with one
    component, resuming where `prog` says it stopped and saving progress after every batch."""

    model: nn.Module
    x: Tensor
    y: Tensor
    batch_size: int
    on_batch: Callable[[str], None]
    path: Path | None
    prog: Progress
    probe: Probe | None

    def component(self, comp: Component, robust: Tensor) -> Stage:
        prog, n = self.prog, self.x.shape[0]
        resuming = prog.current == comp.name and prog.robust is not None
        begin, spent = 0, (0.0, 0, 0)
        probed: Tensor | None = None
        if resuming:
            begin, robust, probed = prog.next_start, prog.robust.clone(), prog.probe
            spent = (prog.seconds, prog.grad_evals, prog.forwards)
        counts = (comp.counter.grad_evals, comp.counter.forwards) if comp.counter else (0, 0)
        started = time.perf_counter()
        device = model_device(self.model)
        for start in range(begin, n, self.batch_size):
            idx = start + robust[start : start + self.batch_size].nonzero().squeeze(1)
            if idx.numel():
                xb, yb = self.x[idx].to(device), self.y[idx].to(device)
                x_adv = comp.attack(xb, yb)
                values = self.probe(comp.name, xb, x_adv, yb) if self.probe else None
                if values is not None:
                    if probed is None:
                        probed = torch.full((n,), float("nan"), dtype=torch.float64)
                    probed[idx] = values.detach().double().cpu()
                with torch.no_grad():
                    robust[idx] = (self.model(x_adv).argmax(1) == yb).cpu()
            stage = self._stage(comp, robust, probed, spent, counts, started)
            self._save(comp.name, start + self.batch_size, stage)
            self.on_batch(comp.name)
        stage = self._stage(comp, robust, probed, spent, counts, started)
        prog.done[comp.name] = stage
        self._save(None, 0, None)
        return stage

    @staticmethod
    def _stage(
        comp: Component,
        robust: Tensor,
        probed: Tensor | None,
        spent: tuple[float, int, int],
        counts: tuple[int, int],
        started: float,
    ) -> Stage:
        """The component's stage so far: what earlier sessions spent plus this one's."""
        g = comp.counter.grad_evals - counts[0] if comp.counter else 0
        f = comp.counter.forwards - counts[1] if comp.counter else 0
        seconds = spent[0] + time.perf_counter() - started
        return Stage(robust.clone(), seconds, spent[1] + g, spent[2] + f, probed)

    def _save(self, current: str | None, next_start: int, stage: Stage | None) -> None:
        """Record where the run stands (in `prog`, and in the state file if there is one)."""
        prog = self.prog
        prog.current, prog.next_start = current, next_start
        prog.robust = stage.robust if stage else None
        prog.probe = stage.probe if stage else None
        prog.seconds = stage.seconds if stage else 0.0
        prog.grad_evals = stage.grad_evals if stage else 0
        prog.forwards = stage.forwards if stage else 0
        if self.path is not None:
            atomic_write_json(self.path, prog.to_dict())
