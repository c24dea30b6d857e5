"""Tables and figures of a `fosc reproduce` directory: OUT/results.csv (one row per run),
OUT/summary.csv and OUT/summary.md (per configuration: mean, sample std and 95% Student-t
interval over seeds) and the experiment's figures.

The numbers come from each run's summary.json (training) and eval/eval.json (the final report);
`run_numbers` is the one place that knows their layout, and reads them defensively: a key a run
does not have is left empty, never guessed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from scipy import stats

from fosctrain.device import on_cpu, trained_on
from fosctrain.evaluate import PGD_STEPS
from fosctrain.files import atomic_write_text
from fosctrain.reproduce import AUTOATTACK_DIR, EVAL_DIR, MEASURE_DIR, Plan, status

# on the final report's test digits (eval/), every column on the same ones
ACCURACIES = ("clean", "apgd", "worst", "pgd", "cw", "fgsm")
# on the first autoattack_n of them, where the standard AutoAttack ran (eval-autoattack/): the
# other attacks' per-example results restricted to those digits, so the columns share them
AA_ACCURACIES = ("aa_clean", "autoattack", "aa_worst", "aa_apgd", "aa_pgd")
VALIDATION = ("val_clean", "val_pgd")  # the last epoch's, on the validation slice: for choosing
LABELS = {"clean": "clean", "fgsm": "FGSM", "pgd": f"PGD-{PGD_STEPS}", "cw": "C&W-inf",
          "apgd": "APGD-CE+T", "worst": "worst case", "aa_clean": "clean",
          "aa_pgd": f"PGD-{PGD_STEPS}", "aa_apgd": "APGD-CE+T", "autoattack": "AutoAttack",
          "aa_worst": "worst case", "val_clean": "val clean", "val_pgd": "val robust",
          "grad_evals": "grad evals", "train_time_s": "train s",
          "eval_time_s": "eval s"}  # fmt: skip
MAIN_METRICS = (*ACCURACIES, *VALIDATION, "grad_evals", "train_time_s", "eval_time_s")
METRICS = (*MAIN_METRICS, *AA_ACCURACIES)
RUN_COLUMNS = ("config", "seed", "status", *METRICS, "attack_grad_evals", "epochs", "device",
               "run_dir")  # fmt: skip
SUMMARY_STATS = ("mean", "std", "ci_low", "ci_high")

WELCH = ("apgd", "worst", "pgd", "autoattack", "clean")  # tested against the baseline


def t_quantile(df: int) -> float:
    """t_{0.975} with df degrees of freedom."""
    return float(stats.t.ppf(0.975, df))


def mean_interval(values: list[float]) -> dict[str, float]:
    """Mean, sample std (ddof 1) and the 95% t-interval of the mean; NaN where undefined."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    n = len(vals)
    nan = math.nan
    if n == 0:
        return {"n": 0, "mean": nan, "std": nan, "ci_low": nan, "ci_high": nan}
    mean = sum(vals) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": nan, "ci_low": nan, "ci_high": nan}
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


# ---------------------------------------------------------------- reading runs


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _acc(entry: Any) -> float:
    return _number(entry.get("acc") if isinstance(entry, dict) else None)


def _first_result(report: dict) -> dict:
    results = report.get("results") or [{}]
    return results[0] if isinstance(results[0], dict) else {}


def eval_numbers(path: Path) -> dict[str, float]:
    """Accuracies and time of an eval.json (its first eps): clean, every attack (the
    AutoAttack-strength "apgd-ce+t" as "apgd") and the per-example worst case."""
    report = _read_json(path)
    first = _first_result(report)
    attacks = first.get("attacks") if isinstance(first.get("attacks"), dict) else {}
    out = {"clean": _acc(first.get("clean")), **{k: _acc(v) for k, v in attacks.items()}}
    out["apgd"] = out.get("apgd-ce+t", math.nan)
    out["worst"] = _acc(first.get("worst_case"))
    out["time_s"] = report.get("time_s", math.nan)
    return out


def _masks(path: Path) -> dict[str, str]:
    """The per-example correct masks of an eval.json's first eps (as strings of 0/1)."""
    per_example = _first_result(_read_json(path)).get("per_example")
    return per_example if isinstance(per_example, dict) else {}


def _share(bits: str) -> float:
    return bits.count("1") / len(bits) if bits else math.nan


def autoattack_numbers(run_dir: Path) -> dict[str, float]:
    """The AutoAttack digits' table row: the standard AutoAttack and, from the main report's
    per-example results on the same (first n) digits, clean, PGD-20, APGD-CE+T and the worst
    case over every attack of both reports; NaN where a report lacks per-example results."""
    aa_masks = _masks(run_dir / AUTOATTACK_DIR / "eval.json")
    main = _masks(run_dir / EVAL_DIR / "eval.json")
    out = {k: math.nan for k in AA_ACCURACIES}
    out["autoattack"] = eval_numbers(run_dir / AUTOATTACK_DIR / "eval.json").get(
        "autoattack", math.nan
    )
    n = len(aa_masks.get("autoattack", ""))
    if not n or not main or len(main.get("clean", "")) < n:
        return out
    prefix = {k: v[:n] for k, v in main.items()}
    out.update(
        aa_clean=_share(prefix["clean"]),
        aa_pgd=_share(prefix.get("pgd", "")),
        aa_apgd=_share(prefix.get("apgd-ce+t", "")),
        autoattack=_share(aa_masks["autoattack"]),
    )
    both = [prefix["worst_case"], aa_masks["worst_case"]]
    out["aa_worst"] = _share(
        "".join("1" if all(m[i] == "1" for m in both) else "0" for i in range(n))
    )
    return out


def run_numbers(run_dir: Path) -> dict[str, Any]:
    """The numbers of one run: final-report accuracies, the AutoAttack digits' row, the last
    epoch's validation accuracies, grad evals, wall-clock."""
    summary = _read_json(run_dir / "summary.json")
    main = eval_numbers(run_dir / EVAL_DIR / "eval.json")
    row: dict[str, Any] = {k: main.get(k, math.nan) for k in ACCURACIES}
    row.update({k: math.nan for k in AA_ACCURACIES})
    eval_time = main.get("time_s", math.nan)
    if (run_dir / AUTOATTACK_DIR / "eval.json").is_file():
        row.update(autoattack_numbers(run_dir))
        eval_time += eval_numbers(run_dir / AUTOATTACK_DIR / "eval.json").get("time_s", math.nan)
    row["eval_time_s"] = eval_time
    final = summary.get("final") if isinstance(summary.get("final"), dict) else {}
    row["val_clean"] = _number(final.get("val_clean_acc"))
    row["val_pgd"] = _number(final.get("val_robust_acc"))
    row["grad_evals"] = summary.get("grad_evals", math.nan)
    row["attack_grad_evals"] = summary.get("attack_grad_evals", math.nan)
    # seconds on another kind of device are not this table's seconds
    row["train_time_s"] = summary.get("time_s", math.nan) if on_cpu(summary) else math.nan
    row["device"] = trained_on(summary)
    row["epochs"] = summary.get("epochs", math.nan)
    return row


def collect(plan: Plan) -> list[dict[str, Any]]:
    """One row per planned run; unfinished runs are listed with their status and no numbers."""
    rows = []
    for run in plan.runs:
        state = status(run)
        numbers = run_numbers(run.dir) if state == "finished" else {}
        row = {"config": run.config_name, "seed": run.seed, "status": state}
        row.update({k: numbers.get(k, math.nan) for k in RUN_COLUMNS if k not in row})
        row["run_dir"] = run.dir.relative_to(plan.out).as_posix()  # the same on every machine
        rows.append(row)
    return rows


def welch_p(values: list[float], baseline: list[float]) -> float:
    """Welch's two-sided t-test p-value of two samples of per-seed accuracies (NaN with fewer
    than 2 finite values in either, or none of them varying)."""
    a = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    b = [v for v in baseline if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(a) < 2 or len(b) < 2 or (len(set(a)) == 1 and len(set(b)) == 1):
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def summarize(plan: Plan, rows: list[dict], baseline: str | None = None) -> list[dict[str, Any]]:
    """Per planned configuration (in the experiment's order; only those of --configs when it
    was given): seeds finished, each metric's stats and, with a `baseline` configuration,
    Welch's p-value of each WELCH metric against the baseline's seeds."""
    out, planned = [], {run.config_name for run in plan.runs}
    finished = [r for r in rows if r["status"] == "finished"]
    base = [r for r in finished if r["config"] == baseline]
    for name in (n for n in plan.experiment.configs if n in planned):
        mine = [r for r in finished if r["config"] == name]
        entry: dict[str, Any] = {"config": name, "seeds": len(mine)}
        for metric in METRICS:
            st = mean_interval([r[metric] for r in mine])
            entry.update({f"{metric}_{s}": st[s] for s in SUMMARY_STATS})
        for metric in WELCH if baseline else ():
            p = welch_p([r[metric] for r in mine], [r[metric] for r in base])
            entry[f"{metric}_p"] = math.nan if name == baseline else p
        out.append(entry)
    return out


# ---------------------------------------------------------------- tables


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def csv_text(rows: list[dict], columns: list[str] | tuple[str, ...]) -> str:
    lines = [",".join(columns)]
    lines += [",".join(_cell(r.get(c, "")) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def summary_columns(baseline: str | None = None) -> list[str]:
    welch = [f"{m}_p" for m in WELCH] if baseline else []
    return ["config", "seeds", *(f"{m}_{s}" for m in METRICS for s in SUMMARY_STATS), *welch]


def _md_value(entry: dict, metric: str) -> str:
    mean, std = entry[f"{metric}_mean"], entry[f"{metric}_std"]
    lo, hi = entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"]
    if math.isnan(mean):
        return "–"
    if metric in ACCURACIES or metric in VALIDATION or metric in AA_ACCURACIES:
        text = f"{100 * mean:.1f}"
        if not math.isnan(std):
            text += f" ± {100 * std:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
        return text
    return f"{mean:,.0f}" if metric == "grad_evals" else f"{mean:.0f}"


def _md_table(summary: list[dict], metrics: tuple[str, ...], measured: bool = False) -> list[str]:
    """Rows of every configuration (with `measured`: of those with any of `metrics`), columns
    of the metrics any configuration has."""
    shown = [m for m in metrics if any(not math.isnan(e[f"{m}_mean"]) for e in summary)]
    has = [e for e in summary if any(not math.isnan(e[f"{m}_mean"]) for m in shown)]
    rows = has if measured else summary
    lines = [
        "| configuration | seeds | " + " | ".join(LABELS[m] for m in shown) + " |",
        "|---|---:|" + "---:|" * len(shown),
    ]
    for e in rows:
        cells = [e["config"], str(e["seeds"]), *(_md_value(e, m) for m in shown)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _welch_table(summary: list[dict], baseline: str) -> list[str]:
    """Welch's p-values against the baseline, for the metrics that have any."""
    shown = [m for m in WELCH if any(not math.isnan(e[f"{m}_p"]) for e in summary)]
    lines = [
        f"Welch's t-test against {baseline} (two-sided p of the per-seed accuracies):",
        "",
        "| configuration | " + " | ".join(LABELS[m] for m in shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    for e in summary:
        if e["config"] != baseline and any(not math.isnan(e[f"{m}_p"]) for m in shown):
            cells = ["–" if math.isnan(e[f"{m}_p"]) else f"{e[f'{m}_p']:.3g}" for m in shown]
            lines.append(f"| {e['config']} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(plan: Plan, summary: list[dict], baseline: str | None = None) -> str:
    """Markdown tables, one per digit set: accuracy % as mean ± std [95% t-interval] over
    seeds."""
    exp, scale, spec = plan.experiment, plan.scale, plan.spec
    lines = [
        f"# {exp.name} at scale {scale.name}",
        "",
        f"{exp.description}. Scale: {scale.description}. Last checkpoint; accuracy in % as "
        "mean ± sample std [95% t-interval] over seeds; worst case: per digit, over every "
        "attack of the table; val: the last epoch's accuracy on the validation slice of the "
        "training data (what to choose by); grad evals and seconds are means.",
        "",
        f"## On the first {spec.n} test digits (class-interleaved; every column on them)",
        "",
        *_md_table(summary, MAIN_METRICS),
    ]
    if spec.autoattack_n and any(not math.isnan(e["autoattack_mean"]) for e in summary):
        n = min(spec.autoattack_n, spec.n)
        lines += [
            "",
            f"## On the first {n} test digits, with the standard AutoAttack (every column on them)",
            "",
            *_md_table(summary, AA_ACCURACIES, measured=True),
        ]
    if baseline and any(e["config"] == baseline and e["seeds"] > 1 for e in summary):
        lines += ["", *_welch_table(summary, baseline)]
    return "\n".join(lines) + "\n"


def write_tables(plan: Plan, baseline: str | None = None) -> tuple[list[dict], list[dict]]:
    """results.csv, summary.csv and summary.md into OUT (with a `baseline` configuration, Welch
    tests against it); returns (rows, summary)."""
    rows = collect(plan)
    summary = summarize(plan, rows, baseline)
    atomic_write_text(plan.out / "results.csv", csv_text(rows, RUN_COLUMNS))
    atomic_write_text(plan.out / "summary.csv", csv_text(summary, summary_columns(baseline)))
    atomic_write_text(plan.out / "summary.md", summary_markdown(plan, summary, baseline))
    return rows, summary


def measure_paths(plan: Plan, config_name: str) -> list[Path]:
    return [
        r.dir / MEASURE_DIR / "measure.csv"
        for r in plan.runs
        if r.config_name == config_name and status(r) == "finished"
    ]
