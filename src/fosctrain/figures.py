"""Figures of a `fosc reproduce` directory (PNG, Agg, atomic writes via fosctrain.plots):

    frontier            robust accuracy (APGD-CE+T, and PGD-20 on the same digits) against
                        gradient evaluations
    fosc-vs-steps       FOSC (mean, p10-p90) against PGD steps, one line per configuration
    fosc-over-training  FOSC of the training examples per epoch (madry vs dat), and bars
    bars                accuracy per configuration (clean, APGD-CE+T, PGD-20)
    time-to-robustness  APGD-CE+T of the budget checkpoints against training seconds and
                        against gradient evaluations (fosctrain.budgets): the mean over
                        seeds and their range; and bars

Error bars are 95% t-intervals over seeds (none with one seed); the time-to-robustness
bands are the range of the seeds.
"""

from __future__ import annotations

import math
from pathlib import Path

from fosctrain.aggregate import ACCURACIES, LABELS, measure_paths
from fosctrain.budgets import collect_budgets, curve
from fosctrain.errors import UserError
from fosctrain.measure import MeasureResult
from fosctrain.plots import add_legend, new_figure, read_metrics, save_figure, style_axes
from fosctrain.reproduce import Plan, status


def _half(entry: dict, metric: str) -> float:
    lo, hi = entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"]
    return 0.0 if math.isnan(lo) else (hi - lo) / 2


def plot_frontier(summary: list[dict], path: Path) -> Path:
    fig = new_figure(8, 5.5)
    ax = fig.subplots()
    for i, (metric, marker) in enumerate((("apgd", "o"), ("pgd", "s"))):  # same digits
        pts = [e for e in summary if not math.isnan(e[f"{metric}_mean"])]
        if not pts:
            continue
        ax.errorbar(
            [e["grad_evals_mean"] for e in pts],
            [100 * e[f"{metric}_mean"] for e in pts],
            xerr=[_half(e, "grad_evals") for e in pts],
            yerr=[100 * _half(e, metric) for e in pts],
            fmt=marker,
            color=f"C{i}",
            capsize=3,
            label=LABELS[metric],
        )
        if metric == "apgd":
            for e in pts:
                ax.annotate(
                    e["config"],
                    (e["grad_evals_mean"], 100 * e["apgd_mean"]),
                    fontsize="x-small",
                    xytext=(4, 4),
                    textcoords="offset points",
                )
    ax.set_xscale("log")
    style_axes(ax, "Robustness against training compute", "gradient evaluations", "accuracy (%)")
    add_legend(ax)
    return save_figure(fig, path)


def plot_bars(summary: list[dict], path: Path, metrics=("clean", "apgd", "pgd")) -> Path:
    fig = new_figure(max(6, 1.2 * len(summary) + 2), 5)
    ax = fig.subplots()
    width = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(summary))]
        ys = [100 * e[f"{metric}_mean"] for e in summary]
        err = [100 * _half(e, metric) for e in summary]
        ax.bar(xs, ys, width, yerr=err, capsize=2, color=f"C{j}", label=LABELS[metric])
    ax.set_xticks(range(len(summary)), [e["config"] for e in summary], rotation=30, ha="right")
    style_axes(ax, "Accuracy per configuration (95% t-intervals over seeds)", "", "accuracy (%)")
    add_legend(ax)
    return save_figure(fig, path)


def _mean_rows(results: list[MeasureResult], key: str) -> list[float]:
    columns = [getattr(r, key) for r in results]
    length = min(len(c) for c in columns)
    return [sum(c[i] for c in columns) / len(columns) for i in range(length)]


def plot_fosc_vs_steps(plan: Plan, path: Path) -> Path:
    fig = new_figure(8, 5)
    ax = fig.subplots()
    for i, name in enumerate(plan.experiment.configs):
        results = [MeasureResult.from_csv(p) for p in measure_paths(plan, name)]
        if not results:
            continue
        steps = list(range(len(_mean_rows(results, "fosc_mean"))))
        lo, hi = _mean_rows(results, "fosc_p10"), _mean_rows(results, "fosc_p90")
        ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.2)
        ax.plot(steps, _mean_rows(results, "fosc_mean"), color=f"C{i}", lw=2, label=f"{name} mean")
        ax.plot(steps, _mean_rows(results, "fosc_median"), color=f"C{i}", ls=":", label="median")
    style_axes(ax, "FOSC of PGD examples on test data (band: p10-p90)", "PGD step", "FOSC")
    add_legend(ax)
    return save_figure(fig, path)


def plot_fosc_over_training(plan: Plan, path: Path, configs=("madry", "dat")) -> Path:
    fig = new_figure(8, 5)
    ax = fig.subplots()
    for i, name in enumerate(configs):
        for run in plan.runs:
            if run.config_name != name or status(run) != "finished":
                continue
            try:
                rows = read_metrics(run.dir)
            except UserError:
                continue
            epochs = [r["epoch"] for r in rows]
            label = name if run.seed == 0 else None
            ax.plot(epochs, [r["fosc_mean"] for r in rows], color=f"C{i}", marker=".", label=label)
            if name == "dat":
                targets = [r["fosc_target"] for r in rows]
                ax.plot(epochs, targets, color=f"C{i}", ls="--", lw=1, label=label and "DAT target")
    style_axes(ax, "Mean FOSC of the training examples", "epoch", "FOSC")
    add_legend(ax)
    return save_figure(fig, path)


AXES = (("cpu_s", "training CPU seconds (one thread)"), ("grad_evals", "gradient evaluations"))


def plot_time_to_robustness(summary: list[dict], rows: list[dict], path: Path) -> Path:
    """APGD-CE+T of the budget checkpoints against training CPU seconds and against gradient
    evaluations, one curve per configuration: the mean over seeds, and a band from the lowest
    to the highest seed at each checkpoint (the legend says how many seeds). The range, not a
    t-interval: with 3 seeds a 95% t-interval is wider than the whole axis."""
    fig = new_figure(12, 5.5)
    axes = fig.subplots(1, 2)
    for ax, (x, label) in zip(axes, AXES, strict=True):
        for i, name in enumerate(dict.fromkeys(e["config"] for e in summary)):
            points = sorted(curve(summary, name), key=lambda e: e[f"{x}_mean"])
            seeds = max(e["seeds"] for e in points)
            xs, ys = [e[f"{x}_mean"] for e in points], [100 * e["apgd_mean"] for e in points]
            tag = f"{name} ({seeds} seeds, band: their range)" if seeds > 1 else f"{name} (1 seed)"
            ax.plot(xs, ys, marker="o", color=f"C{i}", label=tag)
            if seeds > 1:
                accs = [[100 * r["apgd"] for r in rows
                         if r["config"] == name and r["checkpoint"] == e["checkpoint"]]
                        for e in points]  # fmt: skip
                ax.fill_between(xs, [min(a) for a in accs], [max(a) for a in accs],
                                color=f"C{i}", alpha=0.15)  # fmt: skip
        style_axes(ax, f"Robust accuracy against {label}", label, "APGD-CE+T accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()  # one legend, below: off the curves
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize="small")
    return save_figure(fig, path)


def write_figures(plan: Plan, summary: list[dict], budgets: list[dict] | None = None) -> list[Path]:
    """The experiment's figures into OUT; none while no run has finished, but the curves of
    the budget checkpoints scored so far."""
    out, kind = plan.out, plan.experiment.figure
    curves = []
    if kind == "time-to-robustness" and budgets:  # scored checkpoints, finished runs or not
        rows = collect_budgets(plan)
        curves = [plot_time_to_robustness(budgets, rows, out / "time_to_robustness.png")]
    if not any(e["seeds"] for e in summary):
        return curves
    if kind == "time-to-robustness":
        return [*curves, plot_bars(summary, out / "bars.png")]
    if kind == "frontier":
        return [plot_frontier(summary, out / "frontier.png"), plot_bars(summary, out / "bars.png")]
    if kind == "fosc-vs-steps":
        return [plot_fosc_vs_steps(plan, out / "fosc_vs_steps.png")]
    if kind == "fosc-over-training":
        shown = tuple(m for m in ACCURACIES if any(not math.isnan(e[f"{m}_mean"]) for e in summary))
        return [
            plot_fosc_over_training(plan, out / "fosc_over_training.png"),
            plot_bars(summary, out / "bars.png", shown),
        ]
    return [plot_bars(summary, out / "bars.png")]
