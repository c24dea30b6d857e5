"""The report of an evaluation: its data (EvalReport, one EpsResult per budget) and its
forms: eval.json (everything), eval.csv (one row per eps x attack, with 95% intervals) and a
readable table that states every attack's steps and step size next to its accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fosctrain.files import atomic_write_json, atomic_write_text
from fosctrain.intervals import Accuracy

CSV_COLUMNS = ("eps", "attack", "acc", "ci_low", "ci_high", "correct", "n")


@dataclass
class EpsResult:
    """Everything measured at one budget eps."""

    eps: float
    clean: Accuracy
    attacks: dict[str, Accuracy]
    worst_case: Accuracy
    fosc: dict[str, float]
    settings: dict[str, dict]
    checks: dict[str, float]
    time_s: dict[str, float]
    grad_evals: dict[str, int] = field(default_factory=dict)
    per_example: dict[str, Tensor] = field(default_factory=dict)  # correct masks, same examples

    def rows(self) -> list[tuple[str, Accuracy]]:
        """(name, accuracy) for the clean pass, every attack and the worst case."""
        return [("clean", self.clean), *self.attacks.items(), ("worst_case", self.worst_case)]

    def to_dict(self) -> dict:
        return {
            "eps": self.eps,
            "clean": self.clean.to_dict(),
            "attacks": {k: v.to_dict() for k, v in self.attacks.items()},
            "worst_case": self.worst_case.to_dict(),
            "fosc": self.fosc,
            "settings": self.settings,
            "checks": self.checks,
            "time_s": self.time_s,
            "grad_evals": self.grad_evals,
            "per_example": {k: mask_bits(v) for k, v in self.per_example.items()},
        }


def mask_bits(mask: Tensor) -> str:
    """A per-example correct mask as a string of 0s and 1s, in the examples' order."""
    return "".join("1" if v else "0" for v in mask.tolist())


def bits_mask(bits: str) -> Tensor:
    """The mask back from mask_bits' string."""
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)


@dataclass
class EvalReport:
    """The result of `evaluate`: per-eps results, global settings, check numbers, warnings."""

    n: int
    norm: str
    seed: int
    results: list[EpsResult]
    settings: dict
    checks: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    time_s: float = 0.0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "norm": self.norm,
            "seed": self.seed,
            "settings": self.settings,
            "results": [r.to_dict() for r in self.results],
            "checks": self.checks,
            "warnings": list(self.warnings),
            "time_s": self.time_s,
            "meta": self.meta,
        }


def csv_rows(report: EvalReport) -> list[dict]:
    """One row per eps x (clean, attack..., worst_case)."""
    rows = []
    for r in report.results:
        for name, acc in r.rows():
            rows.append({"eps": r.eps, "attack": name, **acc.to_dict()})
    return rows


def _csv_text(report: EvalReport) -> str:
    lines = [",".join(CSV_COLUMNS)]
    for row in csv_rows(report):
        lines.append(",".join(_csv_value(row[c]) for c in CSV_COLUMNS))
    return "\n".join(lines) + "\n"


def _csv_value(v: object) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_report(report: EvalReport, out_dir: str | Path, stem: str = "eval") -> list[Path]:
    """Write STEM.json (everything) and STEM.csv (one row per eps x attack) atomically."""
    out = Path(out_dir)
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    atomic_write_json(json_path, report.to_dict())
    atomic_write_text(csv_path, _csv_text(report))
    return [json_path, csv_path]


ATTACK_TITLES = {
    "FGSM": "FGSM",
    "FGSMRS": "FGSM-RS",
    "PGD": "PGD",
    "PGDL2": "PGD-L2",
    "CWInf": "CW-inf",
}


def attack_note(settings: dict) -> str:
    """The attack's steps and step size in a few words, e.g.
    "PGD-20 (alpha 0.0375 = 2.5 eps/steps)", printed next to its accuracy."""
    if not settings:
        return ""
    if "components" in settings:
        parts = " + ".join(c["name"] for c in settings["components"])
        return f"{settings['label']} ({settings['version']}): {parts}"
    if "queries" in settings:
        return f"{settings['name']}, {settings['queries']} queries ({settings['alpha']})"
    if isinstance(settings.get("alpha"), str):
        targets = settings.get("target_classes")
        extra = f", {targets} target classes" if targets else ""
        return (
            f"{settings['name']}, {settings['steps']} steps{extra} (step size {settings['alpha']})"
        )
    title = ATTACK_TITLES.get(settings.get("name"), settings.get("name", "?"))
    steps, restarts = settings.get("steps", 1), settings.get("restarts", 1)
    text = title if steps == 1 else f"{title}-{steps}"
    if restarts > 1:
        text += f" x{restarts}"
    if settings.get("random_start") and steps == 1:
        text += ", random start"
    if settings.get("crafted_on"):
        text += f" crafted on the {settings['crafted_on'].replace('_', ' ')}"
    rule = settings.get("alpha_rule", "")
    how = ", given" if rule == "given" else f" = {rule}" if rule else ""
    return f"{text} (alpha {settings['alpha']:.4g}{how})"


def format_table(report: EvalReport) -> str:
    """A readable table: accuracy [95% CI] per eps and attack with the attack's steps and step
    size, then FOSC and the warnings."""
    lines = [f"{report.n} examples, norm {report.norm}, seed {report.seed}, {report.time_s:.1f} s"]
    width = max([12, *(len(name) + 2 for r in report.results for name, _ in r.rows())])
    header = (
        f"{'eps':>8}  {'attack':<{width}}{'accuracy':>9}  {'95% CI':<17} {'seconds':>8} "
        f"{'grad evals':>11}  settings"
    )
    lines += [header, "-" * len(header)]
    for r in report.results:
        for name, acc in r.rows():
            lo, hi = acc.ci
            note = attack_note(r.settings.get(name, {}))
            seconds = f"{r.time_s[name]:8.1f}" if name in r.time_s else f"{'':8}"
            evals = f"{r.grad_evals[name]:11,}" if name in r.grad_evals else f"{'':11}"
            lines.append(
                f"{r.eps:>8.4g}  {name:<{width}}{acc.acc:>8.2%}  [{lo:6.2%}, {hi:6.2%}] "
                f"{seconds} {evals}  {note}"
            )
        if "mean" in r.fosc:
            f = r.fosc
            lines.append(
                f"{'':>8}  PGD final FOSC: mean {f['mean']:.4g}, median "
                f"{f['median']:.4g}, p90 {f['p90']:.4g} (start: mean "
                f"{f['first_step_mean']:.4g}); relative {f['relative_mean']:.3f} "
                f"(start: {f['relative_first_mean']:.3f})"
            )
        if r.fosc.get("apgd_ce_n"):
            f = r.fosc
            pgd = f" (PGD's: mean {f['pgd_same_mean']:.4g})" if "pgd_same_mean" in f else ""
            lines.append(
                f"{'':>8}  APGD-CE final FOSC on the {f['apgd_ce_n']} examples both attacked: "
                f"mean {f['apgd_ce_mean']:.4g}, median {f['apgd_ce_median']:.4g}{pgd}"
            )
    if report.checks:
        c = report.checks
        lines.append(
            f"large-eps check: eps {c['large_eps']:g}, PGD accuracy "
            f"{c['large_eps_acc']:.1%} on {c['large_eps_n']} examples"
        )
    if report.warnings:
        lines.append(f"WARNINGS ({len(report.warnings)}):")
        lines += [f"  - {w}" for w in report.warnings]
    elif report.settings.get("checks"):
        lines.append("sanity checks: no sign of gradient masking")
    return "\n".join(lines)
