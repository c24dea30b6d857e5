"""Robust accuracy of a model under a suite of attacks, with confidence intervals and
gradient-masking sanity checks.

(About 600 lines: every attack's run, the worst case and the checks' extra runs share one
context and read as one story; the rules, intervals, FOSC math and report live elsewhere.)

`evaluate` runs, for every eps: a clean pass, FGSM, PGD (with restarts), C&W-inf (PGD on the
C&W margin), optionally AutoAttack (fosctrain.autoattack: the standard suite built from
torchattacks' components, or its labelled "fast" subset) and a black-box transfer attack (PGD
crafted on another model). Every accuracy carries a 95% Wilson score interval. An example
counts as robust in `worst_case` only if it is classified correctly clean and under every
attack run (all restarts, AutoAttack and transfer included): the AND of the per-example
correct masks.

Step sizes: FGSM takes one step of eps (FGSM-RS, on request: one step of 1.25 eps from a
random start); PGD and C&W use alpha = 2.5 * eps / steps (Madry et al. 2018: the steps can
cross the ball 2.5 times, so random starts at a corner still reach the far side) unless an
explicit `alpha` is given. Every attack's settings (alpha and the rule that gave it included)
are stored with its result and printed next to its accuracy.

FOSC: for the first PGD restart, FOSC is measured exactly at the random start and at the final
points (one input-gradient pass each, as final_fosc=True would), box-aware by default because
evaluation points are clipped to [0, 1] and the paper's closed form stays large at clipped
pixels even when PGD has converged. Besides FOSC itself the report gives relative FOSC, FOSC
over the range of the linearized loss over the threat set (in [0, 1]; about 0.5 at a random
point, 0 at a stationary one). Raw FOSC scales with the gradient norm, which grows as PGD
climbs the loss: on a naturally trained MNIST CNN the final mean FOSC of PGD-20 is twice its
start value although PGD reaches 0% accuracy, while its relative FOSC falls from 0.5 to 0.15.

Sanity checks (on by default; fosctrain.masking states each rule and its threshold): FGSM
against PGD, a stronger PGD, PGD at a large budget, the transfer attack against PGD, PGD's
FOSC at the end against the start, and zero input gradients at the start. Each adds a
warning with its numbers to `report.warnings`. Where the standard AutoAttack runs, Square's
gain over its gradient attacks is checked too, from the suite's own results (no extra attack,
so even with checks off).

The other pieces live in rooms named after them: fosctrain.intervals (Wilson intervals),
fosctrain.fosc (FOSC and relative FOSC of a point) and fosctrain.report (EvalReport,
eval.json / eval.csv, the table), re-exported here where users import them.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fosctrain import autoattack as aa
from fosctrain import masking
from fosctrain.allocator import keep_freed_memory
from fosctrain.attacks import PGD, AttackResult, attack_mode, create_attack
from fosctrain.device import model_device
from fosctrain.errors import UserError, check_positive
from fosctrain.fosc import box_exact, fosc_stats, point_fosc
from fosctrain.intervals import Accuracy, wilson_interval
from fosctrain.masking import CHECK_N, large_eps
from fosctrain.report import EpsResult, EvalReport, bits_mask, format_table, write_report
from fosctrain.threat import BOUNDS, check_norm, eval_step_size, validate_eps

ATTACK_NAMES = ("fgsm", "pgd", "cw")
LINF_ATTACKS = ("fgsm", "fgsm-rs", "pgd", "cw")
L2_ATTACKS = ("pgd",)
PGD_STEPS, CW_STEPS = 20, 30  # the evaluation's budgets (PGD-20, C&W-30): fosc eval's defaults
__all__ = [  # the suite, and what users import from here whose homes are named above
    "ATTACK_NAMES",
    "CW_STEPS",
    "L2_ATTACKS",
    "LINF_ATTACKS",
    "PGD_STEPS",
    "Accuracy",
    "EvalReport",
    "evaluate",
    "format_table",
    "large_eps",
    "point_fosc",
    "validate_eps",
    "wilson_interval",
    "write_report",
]


@dataclass
class _Config:
    """The options of one evaluate() call, passed around together."""

    attacks: tuple[str, ...]
    pgd_steps: int
    pgd_restarts: int
    cw_steps: int
    alpha: float | None
    batch_size: int
    norm: str
    seed: int
    fosc_box: bool
    check_n: int


# ---------------------------------------------------------------- validation


def _validate(cfg: _Config, n: int) -> None:
    check_norm(cfg.norm)
    allowed = LINF_ATTACKS if cfg.norm == "linf" else L2_ATTACKS
    for name in cfg.attacks:
        if name not in allowed:
            raise UserError(f"unknown attack {name!r} for norm {cfg.norm}; choose from {allowed}")
    if len(set(cfg.attacks)) != len(cfg.attacks):
        raise UserError(f"attacks listed twice: {list(cfg.attacks)}")
    for what, value in (
        ("pgd_steps", cfg.pgd_steps),
        ("pgd_restarts", cfg.pgd_restarts),
        ("cw_steps", cfg.cw_steps),
        ("batch_size", cfg.batch_size),
        ("check_n", cfg.check_n),
    ):
        check_positive(what, value, integer=True)
    if cfg.alpha is not None:
        check_positive("alpha", cfg.alpha)
    if n == 0:
        raise UserError("no examples to evaluate")


def _check_data(x: Tensor, y: Tensor) -> None:
    if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise UserError(
            f"expected x as N x ... and y as N labels, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if x.numel() and (float(x.min()) < BOUNDS[0] or float(x.max()) > BOUNDS[1]):
        raise UserError("inputs must lie in [0, 1] (attacks clip to that box)")


# ---------------------------------------------------------------- building blocks


def _generator(seed: int, *keys: object) -> torch.Generator:
    """A generator seeded from the run seed and a stable name of what it is used for."""
    tag = "/".join(str(k) for k in (seed, *keys)).encode()
    return torch.Generator().manual_seed(zlib.crc32(tag))


def _spans(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-example correctness of the model's prediction (no autograd), on the CPU."""
    dev = model_device(model)
    with torch.no_grad():
        return (model(x.to(dev)).argmax(1) == y.to(dev)).cpu()


def _alpha_rule(attack: PGD, cfg: _Config) -> str:
    """How the attack's step size was chosen, printed next to its accuracy."""
    if attack.alpha is None:
        return attack.alpha_rule  # FGSM's and FGSM-RS's own
    return "given" if cfg.alpha is not None else "2.5 eps/steps"


def _make_attack(
    name: str, eps: float, cfg: _Config, steps: int | None = None, alpha: float | None = None
) -> PGD:
    """The attack `name` at budget eps with the evaluation's step sizes: FGSM and FGSM-RS one
    step of their own size; PGD and C&W `steps` (default: cfg's) of `alpha` (default: cfg.alpha,
    else 2.5 eps / steps), with box-exact FOSC where cfg.fosc_box and the norm allow it."""
    if name in ("fgsm", "fgsm-rs"):
        return create_attack(name, norm=cfg.norm, eps=eps)
    steps = steps or (cfg.cw_steps if name == "cw" else cfg.pgd_steps)
    alpha = eval_step_size(eps, steps, cfg.alpha) if alpha is None else alpha
    box = box_exact(cfg.norm, cfg.fosc_box, downgrade=True)
    return create_attack(name, norm=cfg.norm, eps=eps, alpha=alpha, steps=steps, fosc_box=box)


@dataclass
class _AttackOutcome:
    """Per-example correctness at the attack's points, the attack's gradient evaluations and,
    when probed, FOSC and relative FOSC at its start and final points."""

    correct: Tensor
    probes: dict[str, Tensor] = field(default_factory=dict)
    grad_evals: int = 0


def _probe(
    model: nn.Module,
    attack: PGD,
    x0: Tensor,
    y: Tensor,
    res: AttackResult,
    fosc_box: bool,
) -> dict[str, Tensor]:
    """FOSC and relative FOSC at the attack's (random) start and at its final points."""
    out = {}
    for where, point in (("start", res.x_start), ("final", res.x_adv)):
        c, rel = point_fosc(
            model, x0, point, y, attack.eps, norm=attack.norm, fosc_box=fosc_box, loss=attack.loss
        )
        out[f"fosc_{where}"], out[f"rel_{where}"] = c.cpu(), rel.cpu()
    return out


def _run(
    model: nn.Module,
    attack: PGD,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    generator: torch.Generator,
    bar: tqdm,
    craft_on: nn.Module | None = None,
    probe_box: bool | None = None,
) -> _AttackOutcome:
    """Attack every batch (crafted on `craft_on`, default the model itself) and record the
    model's correctness at the adversarial points; with `probe_box` set (True: box-aware),
    also FOSC at the start and final points (two extra gradient passes)."""
    source = craft_on if craft_on is not None else model
    dev = model_device(source)
    correct, probes, evals = [], [], 0
    for span in _spans(x.shape[0], batch_size):
        xb, yb = x[span].to(dev), y[span].to(dev)
        res = attack(source, xb, yb, generator=generator)
        evals += res.grad_evals
        correct.append(_correct(model, res.x_adv, yb))
        if probe_box is not None:
            probes.append(_probe(source, attack, xb, yb, res, probe_box))
        bar.update(1)
    merged = {k: torch.cat([p[k] for p in probes]) for k in probes[0]} if probes else {}
    return _AttackOutcome(torch.cat(correct), merged, evals)


def _run_restarts(
    model: nn.Module,
    attack: PGD,
    x: Tensor,
    y: Tensor,
    cfg: _Config,
    restarts: int,
    bar: tqdm,
    *keys: object,
    probe: bool = False,
) -> tuple[Tensor, _AttackOutcome]:
    """Run `restarts` independent random starts; an example survives only if it survives all.
    Returns the AND mask and the first restart's outcome (probed for FOSC if `probe`)."""
    mask, first, evals = None, None, 0
    for r in range(restarts):
        gen = _generator(cfg.seed, *keys, r)
        box = cfg.fosc_box if probe and r == 0 else None
        out = _run(model, attack, x, y, cfg.batch_size, gen, bar, probe_box=box)
        evals += out.grad_evals
        if first is None:
            first = out
        mask = out.correct if mask is None else mask & out.correct
    first.grad_evals = evals
    return mask, first


def _fosc_summary(probes: dict[str, Tensor]) -> dict[str, float]:
    """FOSC statistics at PGD's final points, and the start values they are compared with."""
    stats = fosc_stats(probes["fosc_final"])
    rel_start, rel_final = (fosc_stats(probes[k])["mean"] for k in ("rel_start", "rel_final"))
    start = fosc_stats(probes["fosc_start"])["mean"]
    stats.update(
        first_step_mean=start,
        ratio=stats["mean"] / start if start > 0 else float("nan"),
        relative_mean=rel_final,
        relative_first_mean=rel_start,
        relative_ratio=rel_final / rel_start if rel_start > 0 else float("nan"),
        zero_grad_frac=torch.isnan(probes["rel_start"]).double().mean().item(),
    )
    return stats


# ---------------------------------------------------------------- one eps


@dataclass
class _EpsContext:
    model: nn.Module
    x: Tensor
    y: Tensor
    clean: Tensor
    cfg: _Config
    bar: tqdm
    source_model: nn.Module | None
    autoattack: str | None
    checks: bool
    apgd_steps: int = aa.STEPS
    resume: Path | None = None
    known: dict[str, Tensor] | None = None
    apgd_targets: int | None = None


@dataclass
class _Tally:
    """What one eps collects: accuracies, per-example masks, settings, seconds and gradient
    evaluations per attack, and the worst case (per example: robust under every attack)."""

    worst: Tensor
    accs: dict[str, Accuracy] = field(default_factory=dict)
    settings: dict[str, dict] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    evals: dict[str, int] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)

    def add(self, name: str, mask: Tensor, settings: dict, started: float, evals: int) -> None:
        self.record(name, mask, settings, time.perf_counter() - started, evals)

    def record(self, name: str, mask: Tensor, settings: dict, seconds: float, evals: int) -> None:
        self.timing[name] = seconds
        self.evals[name] = evals
        self.settings[name] = settings
        self.accs[name] = Accuracy.of(mask)
        self.masks[name] = mask.clone()
        self.worst &= mask


def _white_box(
    ctx: _EpsContext, tally: _Tally, index: int, eps: float, name: str
) -> tuple[Tensor, _AttackOutcome]:
    """One white-box attack (PGD: with its restarts, the first probed for FOSC)."""
    ctx.bar.set_description(f"eps={eps:g} {name}")
    attack = _make_attack(name, eps, ctx.cfg)
    restarts = ctx.cfg.pgd_restarts if name == "pgd" else 1
    started = time.perf_counter()
    mask, out = _run_restarts(
        ctx.model,
        attack,
        ctx.x,
        ctx.y,
        ctx.cfg,
        restarts,
        ctx.bar,
        index,
        name,
        probe=name == "pgd",
    )
    settings = {
        **attack.describe(),
        "restarts": restarts,
        "alpha_rule": _alpha_rule(attack, ctx.cfg),
    }
    tally.add(name, mask, settings, started, out.grad_evals)
    return mask, out


def _autoattack(ctx: _EpsContext, tally: _Tally, index: int, eps: float) -> dict[str, Tensor]:
    """The AutoAttack suite: every component's cumulative accuracy ("LABEL/COMPONENT", each on
    the examples the previous ones left robust) and the final one ("LABEL"). Resumable from
    its last finished batch where ctx.resume names a directory. Returns APGD-CE's per-example
    FOSC at its final points (NaN where it did not attack), keyed "apgd-ce"."""
    version, cfg = ctx.autoattack, ctx.cfg
    label = aa.LABELS[version]
    n_classes = _n_classes(ctx.model, ctx.x)
    suite = aa.build_suite(
        ctx.model, version, eps, cfg.norm, n_classes, cfg.seed, ctx.apgd_steps, ctx.apgd_targets
    )

    def on_batch(name: str) -> None:
        ctx.bar.set_description(f"eps={eps:g} {label} {name}")
        ctx.bar.update(1)

    def probe(name: str, x0: Tensor, x_adv: Tensor, y: Tensor) -> Tensor | None:
        if name != "apgd-ce":
            return None
        return point_fosc(ctx.model, x0, x_adv, y, eps, norm=cfg.norm, fosc_box=cfg.fosc_box)[0]

    state = None
    if ctx.resume is not None:
        key = _work_key(ctx, version, eps)
        state = (ctx.resume / f"{label}-eps{index}.json", key)
    ctx.bar.set_description(f"eps={eps:g} {label} {suite[0].name}")
    stages = aa.run_suite(
        ctx.model, suite, ctx.x, ctx.y, ctx.clean, cfg.batch_size, on_batch, state, probe, ctx.known
    )
    for comp in suite:
        stage, settings = stages[comp.name], {**comp.settings, "cumulative": True}
        if comp.name in (ctx.known or {}):
            settings["reused"] = "robust masks of an earlier run of this component"
        cost = stage.grad_evals
        tally.record(f"{label}/{comp.name}", stage.robust, settings, stage.seconds, cost)
        if stage.forwards:
            tally.settings[f"{label}/{comp.name}"]["forward_passes"] = stage.forwards
    settings = aa.suite_settings(version, suite, eps, cfg.norm, cfg.seed)
    total = sum(stage.seconds for stage in stages.values())
    evals = sum(stage.grad_evals for stage in stages.values())
    tally.record(label, stages[suite[-1].name].robust, settings, total, evals)
    probed = stages["apgd-ce"].probe
    return {} if probed is None else {"apgd-ce": probed}


def known_stages(report: dict, n: int, eps_index: int = 0) -> dict[str, Tensor]:
    """From an eval.json (as a dict), the cumulative robust masks of the APGD components it ran
    at eps number `eps_index`, on its first n examples: what `evaluate(..., known=...)` takes
    so that a standard AutoAttack on those examples does not run APGD-CE and APGD-T again."""
    result = report["results"][eps_index]
    per_example = result.get("per_example", {})
    out = {}
    for label in (aa.LABELS["standard"], aa.LABELS["apgd"]):
        for comp in ("apgd-ce", "apgd-t"):
            bits = per_example.get(f"{label}/{comp}")
            if bits is not None and comp not in out:
                out[comp] = bits_mask(bits[:n])
    return out


def _work_key(ctx: _EpsContext, version: str, eps: float) -> str:
    """What a saved AutoAttack state must match to resume: the model's weights, the digits,
    the suite and every option that changes its result."""
    h = hashlib.sha256()
    for name, tensor in sorted(ctx.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for tensor in (ctx.x, ctx.y, ctx.clean):
        h.update(tensor.contiguous().numpy().tobytes())
    cfg = ctx.cfg
    options = (version, eps, cfg.norm, cfg.seed, cfg.batch_size, ctx.apgd_steps)
    options += () if ctx.apgd_targets is None else (ctx.apgd_targets,)  # earlier .resume dirs
    h.update(repr(options).encode())
    return h.hexdigest()[:32]


def _apgd_fosc(apgd: Tensor, probes: dict[str, Tensor]) -> dict[str, float]:
    """FOSC at APGD-CE's final points beside PGD's on the same examples (those both attacked
    from the first PGD restart's probes): the paper's question, whether the stronger attack
    ends nearer a stationary point."""
    both = ~torch.isnan(apgd)
    if "fosc_final" in probes:
        both &= ~torch.isnan(probes["fosc_final"])
    if not both.any():
        return {}
    out = {
        "apgd_ce_n": int(both.sum()),
        "apgd_ce_mean": apgd[both].mean().item(),
        "apgd_ce_median": apgd[both].median().item(),
    }
    if "fosc_final" in probes:
        pgd = probes["fosc_final"].double()[both]
        out.update(pgd_same_mean=pgd.mean().item(), pgd_same_median=pgd.median().item())
    return out


def _transfer(ctx: _EpsContext, tally: _Tally, index: int, eps: float) -> None:
    """Black-box transfer: PGD crafted on the source model, scored on the model."""
    ctx.bar.set_description(f"eps={eps:g} transfer")
    attack = _make_attack("pgd", eps, ctx.cfg)
    started = time.perf_counter()
    gen = _generator(ctx.cfg.seed, index, "transfer")
    out = _run(
        ctx.model, attack, ctx.x, ctx.y, ctx.cfg.batch_size, gen, ctx.bar, craft_on=ctx.source_model
    )
    settings = {
        **attack.describe(),
        "restarts": 1,
        "alpha_rule": _alpha_rule(attack, ctx.cfg),
        "crafted_on": "source_model",
    }
    tally.add("transfer", out.correct, settings, started, out.grad_evals)


def _evaluate_eps(ctx: _EpsContext, index: int, eps: float) -> tuple[EpsResult, list[str]]:
    """All attacks at one budget, their worst case, FOSC and the per-eps checks."""
    tally = _Tally(ctx.clean.clone())
    fosc: dict[str, float] = {}
    pgd_mask: Tensor | None = None
    probes: dict[str, Tensor] = {}
    for name in ctx.cfg.attacks:
        mask, out = _white_box(ctx, tally, index, eps, name)
        if name == "pgd":
            pgd_mask, fosc, probes = mask, _fosc_summary(out.probes), out.probes
    if ctx.autoattack:
        probed = _autoattack(ctx, tally, index, eps)
        if "apgd-ce" in probed:
            fosc.update(_apgd_fosc(probed["apgd-ce"], probes))
    if ctx.source_model is not None:
        _transfer(ctx, tally, index, eps)
    numbers: dict[str, float] = {}
    warnings: list[str] = []
    if ctx.checks:
        numbers, warnings = _eps_checks(ctx, index, eps, tally.accs, fosc, pgd_mask)
    if ctx.autoattack == "standard":
        free_numbers, free_warnings = _gradient_free_check(eps, tally.accs)
        numbers.update(free_numbers)
        warnings += free_warnings
    result = EpsResult(
        eps,
        Accuracy.of(ctx.clean),
        tally.accs,
        Accuracy.of(tally.worst),
        fosc,
        tally.settings,
        numbers,
        tally.timing,
        tally.evals,
        {"clean": ctx.clean, **tally.masks, "worst_case": tally.worst},
    )
    return result, warnings


# ---------------------------------------------------------------- the checks' runs


def _eps_checks(
    ctx: _EpsContext,
    index: int,
    eps: float,
    accs: dict[str, Accuracy],
    fosc: dict[str, float],
    pgd_mask: Tensor | None,
) -> tuple[dict[str, float], list[str]]:
    """The per-eps gradient-masking checks (fosctrain.masking): numbers and warnings."""
    cfg = ctx.cfg
    numbers: dict[str, float] = {}
    warnings: list[str] = []
    pgd = accs.get("pgd")
    if pgd is not None and "fgsm" in accs:
        warnings += masking.fgsm_warnings(eps, accs["fgsm"].acc, pgd.acc, cfg.pgd_steps)
    if pgd_mask is not None:
        numbers.update(_stronger_pgd(ctx, index, eps, pgd_mask))
        warnings += masking.stronger_warnings(eps, numbers, cfg.pgd_steps, cfg.pgd_restarts)
    if pgd is not None and "transfer" in accs:
        warnings += masking.transfer_warnings(eps, accs["transfer"].acc, pgd.acc)
    if fosc:
        warnings += masking.fosc_warnings(eps, fosc)
    return numbers, warnings


def _gradient_free_check(eps: float, accs: dict[str, Accuracy]) -> tuple[dict, list[str]]:
    """Square's gain over the standard suite's gradient attacks (masking.gradient_free_warnings),
    read from the suite's cumulative results: no attack is run, so it needs no `checks`."""
    label = aa.LABELS["standard"]
    gradient, square = accs[f"{label}/fab-t"].acc, accs[f"{label}/square"].acc
    numbers = {"gradient_attacks_acc": gradient, "gradient_free_acc": square}
    return numbers, masking.gradient_free_warnings(eps, gradient, square)


def _stronger_pgd(ctx: _EpsContext, index: int, eps: float, pgd_mask: Tensor) -> dict:
    """The stronger PGD (masking.stronger) on the first check_n examples; its result is ANDed
    with the main PGD's on the same examples."""
    cfg = ctx.cfg
    m = min(cfg.check_n, ctx.x.shape[0])
    alpha = eval_step_size(eps, cfg.pgd_steps, cfg.alpha)
    steps, restarts, alpha = masking.stronger(cfg.pgd_steps, cfg.pgd_restarts, alpha)
    ctx.bar.set_description(f"eps={eps:g} check: PGD-{steps} x{restarts}")
    attack = _make_attack("pgd", eps, cfg, steps=steps, alpha=alpha)
    strong, _ = _run_restarts(
        ctx.model, attack, ctx.x[:m], ctx.y[:m], cfg, restarts, ctx.bar, index, "check-stronger"
    )
    return {
        "stronger_n": m,
        "stronger_steps": steps,
        "stronger_restarts": restarts,
        "stronger_alpha": attack.step_size,
        "pgd_acc_subset": Accuracy.of(pgd_mask[:m]).acc,
        "stronger_acc_subset": Accuracy.of(pgd_mask[:m] & strong).acc,
    }


def _check_large_eps(ctx: _EpsContext, eps_list: list[float]) -> tuple[dict, list[str]]:
    """PGD accuracy at a budget where any working attack reaches ~0% (masking.large_eps)."""
    cfg = ctx.cfg
    eps = large_eps(eps_list, cfg.norm)
    m = min(cfg.check_n, ctx.x.shape[0])
    ctx.bar.set_description(f"check: eps={eps:g}")
    # the default step even where alpha is given: a given alpha is meant for the evaluated eps
    attack = _make_attack("pgd", eps, cfg, alpha=eval_step_size(eps, cfg.pgd_steps))
    mask, _ = _run_restarts(ctx.model, attack, ctx.x[:m], ctx.y[:m], cfg, 1, ctx.bar, "large")
    numbers = {
        "large_eps": eps,
        "large_eps_n": m,
        "large_eps_acc": Accuracy.of(mask).acc,
        "large_eps_alpha": attack.step_size,
    }
    return numbers, masking.large_eps_warnings(numbers, cfg.pgd_steps)


# ---------------------------------------------------------------- entry point


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps_list: Sequence[float],
    attacks: Sequence[str] = ATTACK_NAMES,
    pgd_steps: int = PGD_STEPS,
    pgd_restarts: int = 1,
    cw_steps: int = CW_STEPS,
    alpha: float | None = None,
    batch_size: int = 500,
    norm: str = "linf",
    seed: int = 0,
    autoattack: bool | str | None = "apgd",
    apgd_steps: int = aa.STEPS,
    apgd_targets: int | None = None,
    source_model: nn.Module | None = None,
    checks: bool = True,
    check_n: int = CHECK_N,
    fosc_box: bool = True,
    progress: bool = True,
    resume: str | Path | None = None,
    known: dict[str, Tensor] | None = None,
) -> EvalReport:
    """Clean and robust accuracy of `model` on (x, y) at every eps of `eps_list`, every attack
    on the same examples, the worst case taken per example.

    `alpha` (absolute) overrides the default step size 2.5 * eps / steps of PGD and C&W.
    `autoattack`: the AutoAttack-strength attack, by default "apgd" (APGD-CE + APGD-T of
    `apgd_steps` steps, APGD-T on `apgd_targets` target classes, the most likely first, by
    default all: reported as "apgd-ce+t"); "standard" (Croce & Hein's whole suite; True
    means this), "apgd-ce" (APGD-CE alone) or None.
    `source_model` adds a black-box transfer attack (PGD crafted on it). The model runs in eval
    mode with frozen parameters; both are restored afterwards. `resume`: a directory where the
    AutoAttack part saves its progress after every batch; an evaluation killed there resumes
    from its last finished batch when called again with the same model, data and options.
    `known`: AutoAttack components already run on these examples with these options (their
    cumulative robust masks, see known_stages), not run again.
    """
    keep_freed_memory()
    attacks = (attacks,) if isinstance(attacks, str) else tuple(attacks)
    cfg = _Config(
        attacks, pgd_steps, pgd_restarts, cw_steps, alpha, batch_size, norm, seed, fosc_box, check_n
    )
    _validate(cfg, int(x.shape[0]))
    autoattack = aa.version_of(autoattack)
    if not attacks and not autoattack and source_model is None:
        raise UserError("no attack to run: give at least one of fgsm, pgd, cw")
    eps_values = validate_eps(eps_list, norm)
    _check_data(x, y)
    x, y = x.detach().cpu(), y.detach().cpu()
    check_positive("apgd_steps", apgd_steps, integer=True)
    if autoattack:
        aa.require_torchattacks()
        n_classes = _n_classes(model, x)
        aa.check_classes(n_classes, autoattack)
        _check_targets(apgd_targets, autoattack, n_classes)
    start = time.perf_counter()
    pgd_checks = checks and "pgd" in attacks
    total = _progress_total(
        cfg, x.shape[0], len(eps_values), autoattack, source_model is not None, pgd_checks
    )
    bar = tqdm(total=total, disable=None if progress else True, unit="batch", leave=False)
    with bar, attack_mode(model), _maybe_attack_mode(source_model):
        clean = torch.cat([_correct(model, x[s], y[s]) for s in _spans(x.shape[0], batch_size)])
        resume_dir = Path(resume) if resume is not None else None
        ctx = _EpsContext(
            model,
            x,
            y,
            clean,
            cfg,
            bar,
            source_model,
            autoattack,
            checks,
            apgd_steps,
            resume_dir,
            known,
            apgd_targets,
        )
        results, warnings = [], []
        for i, eps in enumerate(eps_values):
            result, found = _evaluate_eps(ctx, i, eps)
            results.append(result)
            warnings += found
        global_checks: dict = {}
        if pgd_checks:
            global_checks, found = _check_large_eps(ctx, eps_values)
            warnings += found
    settings = _settings(
        cfg, eps_values, autoattack, source_model is not None, checks, apgd_steps, apgd_targets
    )
    elapsed = time.perf_counter() - start
    return EvalReport(
        int(x.shape[0]), norm, seed, results, settings, global_checks, warnings, elapsed
    )


def _check_targets(targets: int | None, autoattack: str, n_classes: int) -> None:
    """APGD-T's target classes: 1 .. n_classes - 1, and only where the suite is apgd (the
    standard suite is Croce & Hein's, with all of them)."""
    if targets is None:
        return
    if autoattack != "apgd":
        raise UserError(f"apgd_targets applies to the apgd suite only, not {autoattack}")
    check_positive("apgd_targets", targets, integer=True)
    if targets > n_classes - 1:
        raise UserError(f"apgd_targets must be at most {n_classes - 1}, got {targets}")


def _progress_total(
    cfg: _Config, n: int, n_eps: int, autoattack: str | None, transfer: bool, pgd_checks: bool
) -> int:
    """Batches the progress bar counts: every attack and restart at every eps, the checks."""
    batches = len(_spans(n, cfg.batch_size))
    check_batches = len(_spans(min(cfg.check_n, n), cfg.batch_size))
    units = sum(cfg.pgd_restarts if a == "pgd" else 1 for a in cfg.attacks)
    units += len(aa.COMPONENTS[autoattack]) if autoattack else 0
    per_eps = (units + int(transfer)) * batches
    if pgd_checks:
        per_eps += (cfg.pgd_restarts + 1) * check_batches
    return n_eps * per_eps + (check_batches if pgd_checks else 0)


def _n_classes(model: nn.Module, x: Tensor) -> int:
    """The model's number of outputs (one forward pass on one example)."""
    with attack_mode(model), torch.no_grad():
        return int(model(x[:1].to(model_device(model))).shape[1])


def _maybe_attack_mode(model: nn.Module | None) -> contextlib.AbstractContextManager:
    return attack_mode(model) if model is not None else contextlib.nullcontext()


def _settings(
    cfg: _Config,
    eps: list[float],
    autoattack: str | None,
    transfer: bool,
    checks: bool,
    apgd_steps: int,
    apgd_targets: int | None = None,
) -> dict:
    """The evaluation's options, for eval.json (per-attack settings live in each result)."""
    return {
        "eps_list": eps,
        "attacks": list(cfg.attacks),
        "pgd_steps": cfg.pgd_steps,
        "pgd_restarts": cfg.pgd_restarts,
        "cw_steps": cfg.cw_steps,
        "alpha": cfg.alpha,
        "alpha_rule": "given"
        if cfg.alpha is not None
        else "2.5 * eps / steps (FGSM: eps, FGSM-RS: 1.25 eps)",
        "autoattack_label": aa.LABELS[autoattack] if autoattack else None,
        "batch_size": cfg.batch_size,
        "norm": cfg.norm,
        "seed": cfg.seed,
        "fosc_box": cfg.fosc_box,
        "autoattack": autoattack,
        "apgd_steps": apgd_steps,
        "apgd_targets": apgd_targets,
        "transfer": transfer,
        "checks": checks,
        "check_n": cfg.check_n,
        "check_margin": masking.CHECK_MARGIN,
        "large_eps_max_acc": masking.LARGE_EPS_MAX_ACC,
        "fosc_ratio_max": masking.FOSC_RATIO_MAX,
        "zero_grad_max": masking.ZERO_GRAD_MAX,
        "confidence": "95% Wilson score interval",
    }
