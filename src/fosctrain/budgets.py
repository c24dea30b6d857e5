"""Time to robustness: the tables of a `fosc reproduce` experiment whose runs keep checkpoints
at fixed gradient-evaluation budgets (`--budget-every`), each scored by fosctrain.reproduce
(RUN/eval-budgets/scores.csv: one row per budget checkpoint and the last one).

    OUT/budgets.csv           one row per run x checkpoint: evaluations, training seconds,
                              clean, PGD-20, APGD-CE+T and worst-case accuracy
    OUT/budgets-summary.csv   per configuration x checkpoint: mean and 95% t-interval over seeds

and the summary's markdown sections: the curves as a table, every configuration at Madry
PGD-10's training seconds (linear interpolation along its own curve), and the anchor table that
puts the final models beside the published MNIST models.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from fosctrain.aggregate import csv_text, mean_interval
from fosctrain.device import on_cpu, trained_on
from fosctrain.files import atomic_write_text
from fosctrain.reproduce import BUDGET_SCORES, BUDGET_TARGETS, Plan

BUDGET_COLUMNS = ("config", "seed", "device", "checkpoint", "budget", "grad_evals", "time_s",
                  "cpu_s", "epoch", "clean", "pgd", "apgd", "worst", "n")  # fmt: skip
CURVE_METRICS = ("grad_evals", "time_s", "cpu_s", "clean", "pgd", "apgd", "worst")
# the time axis: training CPU seconds of the run's one thread, which other load on a shared
# machine inflates far less than wall-clock (both are in the tables)
TIME = "cpu_s"
REFERENCE = "madry-k10"  # the curve the others are read at, at equal training seconds

# The published MNIST models at eps 0.3 under the standard AutoAttack (Croce & Hein 2020's
# table, all 10,000 test digits), with the training cost of their released settings in
# gradient evaluations (one forward + backward of one example).
PUBLISHED = (
    ("TRADES (Zhang et al. 2019)", 0.9276,
     "SmallCNN; the released script: 100 epochs of batch 128, a 40-step attack on the KL term: "
     "~252M (60,000 x 100 x 42)"),
    ("Madry et al. 2018 (MNIST challenge)", 0.8843,
     "100,000 iterations of batch 50 with PGD-40 of step 0.01: ~205M (5M examples x 41)"),
    ("Fast-AT (Wong et al. 2020)", 0.8288,
     "10 epochs of batch 100, FGSM from a random start (step 0.375): ~1.2M (60,000 x 10 x 2)"),
)  # fmt: skip


def _float(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_scores(path: Path) -> list[dict[str, Any]]:
    """A run's scores.csv: one dict per checkpoint, numbers as floats (empty: NaN)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v if k == "checkpoint" else _float(v) for k, v in r.items()} for r in rows]


def collect_budgets(plan: Plan) -> list[dict[str, Any]]:
    """One row per scored run x checkpoint, in the plan's order (a run whose checkpoints are
    scored counts here before its AutoAttack has finished). A run trained on another kind of
    device than a CPU keeps its evaluations and accuracies but not its seconds (NaN): the time
    axis is one CPU thread's, and its own records keep what it measured."""
    rows = []
    for run in plan.runs:
        if not (run.dir / BUDGET_SCORES).is_file():
            continue
        summary = json.loads((run.dir / "summary.json").read_text())
        device, cpu = trained_on(summary), on_cpu(summary)
        for score in read_scores(run.dir / BUDGET_SCORES):
            if not cpu:
                score.update(time_s=math.nan, cpu_s=math.nan)
            rows.append({"config": run.config_name, "seed": run.seed, "device": device, **score})
    return rows


def summarize_budgets(plan: Plan, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration (the experiment's order) x checkpoint (budgets in order, then the
    last): seeds, and mean / 95% t-interval of each CURVE_METRICS over them."""
    out = []
    for name in plan.experiment.configs:
        mine = [r for r in rows if r["config"] == name]
        checkpoints = sorted({r["checkpoint"] for r in mine}, key=lambda c: (c == "last", c))
        for checkpoint in checkpoints:
            same = [r for r in mine if r["checkpoint"] == checkpoint]
            entry: dict[str, Any] = {"config": name, "checkpoint": checkpoint,
                                     "budget": same[0]["budget"], "seeds": len(same)}  # fmt: skip
            for metric in CURVE_METRICS:
                st = mean_interval([r[metric] for r in same])
                entry.update({f"{metric}_{s}": st[s] for s in ("mean", "ci_low", "ci_high")})
            out.append(entry)
    return out


def summary_columns() -> list[str]:
    stats = [f"{m}_{s}" for m in CURVE_METRICS for s in ("mean", "ci_low", "ci_high")]
    return ["config", "checkpoint", "budget", "seeds", *stats]


def curve(summary: list[dict[str, Any]], config: str) -> list[dict[str, Any]]:
    """A configuration's checkpoints, in order of training CPU seconds."""
    return sorted((e for e in summary if e["config"] == config), key=lambda e: e[f"{TIME}_mean"])


def at_seconds(points: list[dict[str, Any]], seconds: float, metric: str = "apgd") -> float:
    """`metric` (mean over seeds) of a curve at `seconds` of training CPU time, linearly
    interpolated between its checkpoints; NaN outside the seconds it covers."""
    for a, b in zip(points, points[1:], strict=False):
        t0, t1 = a[f"{TIME}_mean"], b[f"{TIME}_mean"]
        if t0 <= seconds <= t1:
            w = 0.0 if t1 == t0 else (seconds - t0) / (t1 - t0)
            return (1 - w) * a[f"{metric}_mean"] + w * b[f"{metric}_mean"]
    if points and points[-1][f"{TIME}_mean"] == seconds:
        return points[-1][f"{metric}_mean"]
    return math.nan


def _pct(entry: dict[str, Any], metric: str) -> str:
    mean, lo, hi = (entry[f"{metric}_{s}"] for s in ("mean", "ci_low", "ci_high"))
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.1f}" + ("" if math.isnan(lo) else f" [{100 * lo:.1f}, {100 * hi:.1f}]")


def curves_markdown(plan: Plan, summary: list[dict[str, Any]]) -> list[str]:
    """The curves as a table, then every configuration at the reference's training seconds."""
    n = plan.spec.n
    lines = [
        f"## Time to robustness (every checkpoint on the first {n} test digits)",
        "",
        f"APGD-CE + APGD-T ({BUDGET_TARGETS} most likely targets, 100 steps each) and PGD-20 "
        "on the same digits; mean [95% t-interval] over seeds; training seconds (wall-clock and "
        "CPU of the run's one thread) exclude the per-epoch validation and checkpoint writes, and "
        "are the means over the seeds trained on a CPU (a GPU-trained seed counts in the rest).",
        "",
        "| configuration | checkpoint | seeds | grad evals | train s | train CPU s | APGD-CE+T "
        "| PGD-20 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in summary:
        lines.append(
            f"| {e['config']} | {e['checkpoint']} | {e['seeds']} | {e['grad_evals_mean']:,.0f} "
            f"| {e['time_s_mean']:.0f} | {e['cpu_s_mean']:.0f} | {_pct(e, 'apgd')} "
            f"| {_pct(e, 'pgd')} |"
        )
    reference = curve(summary, REFERENCE)
    others = [c for c in plan.experiment.configs if c != REFERENCE and curve(summary, c)]
    if reference and others:
        lines += [
            "",
            f"At {REFERENCE}'s checkpoints' training CPU seconds (APGD-CE+T, mean over seeds, "
            "each curve interpolated linearly between its own checkpoints; – outside it):",
            "",
            f"| train CPU s | {REFERENCE} | " + " | ".join(others) + " |",
            "|---:|---:|" + "---:|" * len(others),
        ]
        for point in reference:
            s = point[f"{TIME}_mean"]
            cells = [at_seconds(curve(summary, c), s) for c in others]
            text = ["–" if math.isnan(v) else f"{100 * v:.1f}" for v in cells]
            lines.append(f"| {s:.0f} | {100 * point['apgd_mean']:.1f} | " + " | ".join(text) + " |")
    return lines


def anchor_markdown(plan: Plan, finals: list[dict[str, Any]]) -> list[str]:
    """Each configuration's final model (standard AutoAttack on the AutoAttack digits, training
    cost here) beside the published MNIST models (their numbers, on all 10,000 test digits)."""
    n = min(plan.spec.autoattack_n, plan.spec.n)
    lines = [
        "## Beside the published MNIST models (eps 0.3, standard AutoAttack)",
        "",
        f"Here: the last checkpoint of each run, the first {n} test digits, mean [95% "
        "t-interval] over seeds; training seconds of the seeds trained on a CPU. Published: "
        "Croce & Hein's AutoAttack table on all 10,000 test digits, their numbers, not re-run "
        "here.",
        "",
        "| model | AutoAttack % | seeds | training cost |",
        "|---|---:|---:|---|",
    ]
    for e in finals:
        cost = f"{e['grad_evals_mean']:,.0f} grad evals, {e['train_time_s_mean']:.0f} s here"
        lines.append(f"| {e['config']} (here) | {_pct(e, 'autoattack')} | {e['seeds']} | {cost} |")
    for name, acc, cost in PUBLISHED:
        lines.append(f"| {name} | {100 * acc:.2f} | – | {cost} |")
    return lines


def write_budget_tables(plan: Plan, finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OUT/budgets.csv and OUT/budgets-summary.csv, and the curves' and the anchor table's
    sections appended to OUT/summary.md (written first by fosctrain.aggregate.write_tables,
    whose per-configuration summary is `finals`); returns the budgets' summary."""
    rows = collect_budgets(plan)
    summary = summarize_budgets(plan, rows)
    atomic_write_text(plan.out / "budgets.csv", csv_text(rows, BUDGET_COLUMNS))
    atomic_write_text(plan.out / "budgets-summary.csv", csv_text(summary, summary_columns()))
    finished = [e for e in finals if e["seeds"]]
    sections = curves_markdown(plan, summary) + [""] + anchor_markdown(plan, finished)
    text = (plan.out / "summary.md").read_text()
    atomic_write_text(plan.out / "summary.md", text + "\n" + "\n".join(sections) + "\n")
    return summary
