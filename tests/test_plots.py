"""Tests of fosctrain.plots: valid PNGs from measurements and run metrics, clear errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from fosctrain.errors import UserError
from fosctrain.measure import MeasureResult, write_measure
from fosctrain.plots import RUN_FIGURES, plot_measure, plot_runs, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRIC_KEYS = (
    "epoch",
    "train_loss",
    "train_acc",
    "test_clean_acc",
    "test_robust_acc",
    "fosc_target",
    "fosc_mean",
    "fosc_median",
    "fosc_p90",
    "steps_mean",
    "grad_evals",
    "lr",
    "time_s",
)


def assert_png(path: Path, min_width: int = 400) -> None:
    """A real PNG file of plausible size: magic bytes, an IHDR with sane dimensions."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= min_width and height >= 200
    assert 5_000 < len(data) < 2_000_000


def fake_measure(steps: int = 20) -> MeasureResult:
    k = list(range(steps + 1))
    return MeasureResult(
        step=k,
        fosc_mean=[2.0 / (1 + i) + 0.05 for i in k],
        fosc_median=[1.8 / (1 + i) + 0.04 for i in k],
        fosc_p10=[0.5 / (1 + i) for i in k],
        fosc_p90=[3.0 / (1 + i) + 0.1 for i in k],
        loss_mean=[0.2 + 0.1 * i for i in k],
        accuracy=[0.95 - 0.03 * i for i in k],
        settings={"eps": 0.3, "alpha": 0.075, "loss": "ce", "norm": "linf", "n": 500},
    )


def metrics_rows(method: str, epochs: int = 6) -> list[dict]:
    rows = []
    for e in range(epochs):
        target = max(0.5 - e * 0.1, 0.0) if method == "dat" else None
        rows.append(
            {
                "epoch": e,
                "train_loss": 2.0 - 0.2 * e,
                "train_acc": 0.5 + 0.05 * e,
                "test_clean_acc": 0.6 + 0.05 * e,
                "test_robust_acc": 0.2 + 0.06 * e if e % 2 == 0 else None,
                "fosc_target": target,
                "fosc_mean": 0.6 / (1 + e),
                "fosc_median": 0.5 / (1 + e),
                "fosc_p90": 1.0 / (1 + e),
                "steps_mean": 5.0 + e,
                "grad_evals": 10000 * (e + 1) * (e + 2),
                "lr": 0.01,
                "time_s": 3.0 * (e + 1),
            }
        )
    return rows


def make_run(root: Path, name: str, method: str, fmt: str = "jsonl") -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": method, "eps": 0.3}))
    rows = metrics_rows(method)
    if fmt == "jsonl":
        text = "\n".join(json.dumps(r) for r in rows) + "\n"
        (run / "metrics.jsonl").write_text(text)
    else:
        lines = [",".join(METRIC_KEYS)]
        lines += [",".join("" if r[k] is None else str(r[k]) for k in METRIC_KEYS) for r in rows]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run


def test_plot_measure_from_result_and_csv(tmp_path):
    result = fake_measure()
    png = plot_measure(result, tmp_path / "a" / "measure.png")
    assert_png(png)
    csv_path = write_measure(result, tmp_path / "b")
    png2 = plot_measure(csv_path, tmp_path / "b" / "measure.png", log_y=True)
    assert_png(png2)
    assert not list(tmp_path.rglob("*.tmp"))


def test_plot_runs_overlays_jsonl_and_csv_runs(tmp_path):
    runs = [make_run(tmp_path, "dat-run", "dat"), make_run(tmp_path, "madry-run", "madry", "csv")]
    paths = plot_runs(runs, tmp_path / "plots")
    assert [p.name for p in paths] == list(RUN_FIGURES)
    for p in paths:
        assert_png(p)


def test_read_metrics_skips_a_cut_last_line(tmp_path):
    run = make_run(tmp_path, "r", "dat")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 6, "train_lo')
    assert len(read_metrics(run)) == 6


def test_read_metrics_rejects_a_bad_middle_line(tmp_path):
    run = make_run(tmp_path, "r", "dat")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = "not json"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:3"):
        read_metrics(run)


def test_run_without_metrics_is_a_user_error_naming_it(tmp_path):
    good = make_run(tmp_path, "good", "dat")
    empty = tmp_path / "no-metrics"
    empty.mkdir()
    with pytest.raises(UserError, match="no-metrics"):
        plot_runs([good, empty], tmp_path / "plots")
    with pytest.raises(UserError, match="not a directory"):
        plot_runs([tmp_path / "missing"], tmp_path / "plots")
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="no epochs"):
        plot_runs([empty], tmp_path / "plots")
