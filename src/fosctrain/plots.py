"""Figures as PNG: FOSC against PGD steps, and accuracy, training-example FOSC and compute
against epochs for one or more runs. Rendered by matplotlib's Agg canvas without pyplot: no
display needed, no global backend switch, no figures left open.

Every figure is rendered into memory and written with an atomic rename, so a reader never sees
a half-written PNG.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

from fosctrain.errors import UserError
from fosctrain.files import atomic_write_bytes
from fosctrain.logs import read_metrics
from fosctrain.measure import MeasureResult

DPI = 120
RUN_FIGURES = ("accuracy.png", "fosc.png", "grad_evals.png")


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure whose layout is recomputed at draw time."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render `fig` to PNG bytes in memory (Agg) and write them atomically."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------- FOSC vs PGD step


def plot_measure(
    result_or_csv: MeasureResult | str | Path, path: str | Path, log_y: bool = False
) -> Path:
    """FOSC against PGD step (median, p10-p90 band, mean) beside loss and accuracy."""
    result = (
        result_or_csv
        if isinstance(result_or_csv, MeasureResult)
        else MeasureResult.from_csv(result_or_csv)
    )
    fig = new_figure(11, 4.2)
    ax_f, ax_l = fig.subplots(1, 2)
    steps = result.step
    ax_f.fill_between(
        steps, result.fosc_p10, result.fosc_p90, alpha=0.25, color="C0", label="p10-p90"
    )
    ax_f.plot(steps, result.fosc_median, color="C0", lw=2, label="median")
    ax_f.plot(steps, result.fosc_mean, color="C1", lw=1.2, ls="--", label="mean")
    if log_y:
        _log_axis(ax_f, result.fosc_p10 + result.fosc_median + result.fosc_p90)
    form = {True: " (box-aware)", False: " (paper form)"}.get(result.settings.get("fosc_box"), "")
    style_axes(ax_f, f"FOSC during PGD{form}", "PGD step", "FOSC (lower = better converged)")
    ax_f.legend()
    ax_l.plot(steps, result.loss_mean, color="C3", lw=2)
    style_axes(ax_l, "Attack loss and accuracy", "PGD step", "mean attack loss")
    ax_a = ax_l.twinx()
    ax_a.plot(steps, [100 * a for a in result.accuracy], color="C2", lw=2)
    ax_a.set_ylabel("accuracy (%)")
    ax_a.set_ylim(-2, 102)
    _color_axis(ax_l, "C3", "left")
    _color_axis(ax_a, "C2", "right")
    fig.suptitle(_measure_title(result.settings))
    return save_figure(fig, path)


def _color_axis(ax, color: str, side: str) -> None:
    """Colour an axis label and ticks like its line, instead of a legend over the data."""
    ax.yaxis.label.set_color(color)
    ax.tick_params(axis="y", colors=color)
    ax.spines[side].set_color(color)


def _log_axis(ax, values: list[float]) -> None:
    """Logarithmic y axis with 1-2-5 ticks; symlog (linear near 0) when some values are 0."""
    positive = [v for v in values if v > 0]
    if not positive:
        return
    if len(positive) == len(values):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:
        ax.set_yscale("symlog", linthresh=min(positive))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _measure_title(settings: dict) -> str:
    keys = ("eps", "alpha", "loss", "norm", "n")
    parts = [
        f"{k}={settings[k]:.4g}" if isinstance(settings.get(k), float) else f"{k}={settings[k]}"
        for k in keys
        if k in settings
    ]
    if settings.get("random_start") is False:
        parts.append("no random start")
    return "PGD convergence" + (" (" + ", ".join(parts) + ")" if parts else "")


def style_axes(ax, title: str, xlabel: str, ylabel: str) -> None:
    """The house style of every axes: title, axis labels, a light grid."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


# ---------------------------------------------------------------- runs against epochs


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) for the rows where `key` holds a finite number."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            epoch = row.get("epoch", i)
            xs.append(float(epoch) if isinstance(epoch, (int, float)) else float(i))
            ys.append(float(v))
    return xs, ys


def _run_label(run: Path) -> str:
    """The run's directory name and its training method (from config.json, if readable)."""
    try:
        method = json.loads((run / "config.json").read_text(encoding="utf-8")).get("method")
    except (OSError, ValueError, AttributeError):
        method = None
    name = run.resolve().name
    return f"{name} ({method})" if method else name


def _as_percent(runs: list[tuple[str, list[dict]]], keys: tuple[str, ...]) -> bool:
    """True when the accuracies are fractions (all <= 1), so they are shown as percent."""
    values = [v for _, rows in runs for k in keys for v in _series(rows, k)[1]]
    return bool(values) and max(values) <= 1.0


ACCURACY_COLUMNS = ("val_clean_acc", "val_robust_acc")
OLD_ACCURACY_COLUMNS = ("test_clean_acc", "test_robust_acc")  # runs before the validation slice


def _accuracy_columns(rows: list[dict]) -> tuple[str, str]:
    """The per-epoch accuracy columns of a run: validation, or an older run's test subset."""
    if any(_series(rows, k)[0] for k in ACCURACY_COLUMNS):
        return ACCURACY_COLUMNS
    return (
        OLD_ACCURACY_COLUMNS
        if any(OLD_ACCURACY_COLUMNS[1] in r for r in rows)
        else ACCURACY_COLUMNS
    )


def _plot_accuracy(runs: list[tuple[str, list[dict]]], path: Path) -> Path:
    fig = new_figure(8, 5)
    ax = fig.subplots()
    keys = ACCURACY_COLUMNS + OLD_ACCURACY_COLUMNS
    scale = 100.0 if _as_percent(runs, keys) else 1.0
    for i, (label, rows) in enumerate(runs):
        clean, robust = _accuracy_columns(rows)
        for key, ls, what in ((clean, "-", "clean"), (robust, "--", "robust")):
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(
                    xs,
                    [scale * v for v in ys],
                    ls=ls,
                    color=f"C{i}",
                    marker=".",
                    label=f"{label}: {what}",
                )
    style_axes(
        ax,
        "Validation accuracy (solid: clean, dashed: robust)",
        "epoch",
        "accuracy (%)" if scale == 100.0 else "accuracy",
    )
    add_legend(ax)
    return save_figure(fig, path)


def _plot_fosc(runs: list[tuple[str, list[dict]]], path: Path) -> Path:
    fig = new_figure(8, 5)
    ax = fig.subplots()
    for i, (label, rows) in enumerate(runs):
        for key, ls, what in (
            ("fosc_mean", "-", "mean"),
            ("fosc_median", ":", "median"),
            ("fosc_target", "--", "DAT target"),
        ):
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(
                    xs,
                    ys,
                    ls=ls,
                    color=f"C{i}",
                    lw=1.2 if key == "fosc_target" else 1.8,
                    label=f"{label}: {what}",
                )
    style_axes(ax, "FOSC of the training examples (dashed: DAT target)", "epoch", "FOSC")
    add_legend(ax)
    return save_figure(fig, path)


def _plot_grad_evals(runs: list[tuple[str, list[dict]]], path: Path) -> Path:
    fig = new_figure(8, 5)
    ax = fig.subplots()
    for i, (label, rows) in enumerate(runs):
        xs, ys = _series(rows, "grad_evals")
        if xs:
            ax.plot(xs, ys, color=f"C{i}", marker=".", label=label)
    style_axes(
        ax, "Cumulative gradient evaluations (attack cost)", "epoch", "input-gradient evaluations"
    )
    ax.yaxis.set_major_formatter(EngFormatter())
    add_legend(ax)
    return save_figure(fig, path)


def add_legend(ax) -> None:
    """A legend, or a note in the middle of an empty plot (better than a blank figure)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    else:
        ax.text(
            0.5,
            0.5,
            "no data in these runs' metrics",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """accuracy.png, fosc.png and grad_evals.png for the runs overlaid, one colour per run."""
    if not run_dirs:
        raise UserError("give at least one run directory")
    runs = []
    for run_dir in run_dirs:
        run = Path(run_dir)
        if not run.is_dir():
            raise UserError(f"{run}: not a directory")
        runs.append((_run_label(run), read_metrics(run)))
    out = Path(out_dir)
    return [
        _plot_accuracy(runs, out / RUN_FIGURES[0]),
        _plot_fosc(runs, out / RUN_FIGURES[1]),
        _plot_grad_evals(runs, out / RUN_FIGURES[2]),
    ]
