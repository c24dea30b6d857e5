"""Machine-readable run logs: metrics.csv and metrics.jsonl (one row per epoch), rewritten
atomically from the run's history, the one reader of them, and optional TensorBoard scalars."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from fosctrain.errors import UserError
from fosctrain.files import atomic_write_text


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.csv and metrics.jsonl from the full history (so they always match the checkpoint
    they were written with, even after a crash and resume)."""
    write_csv(run_dir / "metrics.csv", history)
    lines = [json.dumps(_json_safe(row)) for row in history]
    atomic_write_text(run_dir / "metrics.jsonl", "".join(line + "\n" for line in lines))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as CSV (atomically), the columns in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def read_metrics(run_dir: str | Path) -> list[dict]:
    """A run's per-epoch rows from metrics.jsonl (preferred) or metrics.csv.

    A last line cut short (a run still writing) is skipped; any other bad line is an error.
    """
    run = Path(run_dir)
    jsonl, csv_path = run / "metrics.jsonl", run / "metrics.csv"
    if jsonl.is_file():
        rows = _read_jsonl(jsonl)
    elif csv_path.is_file():
        rows = _read_csv(csv_path)
    else:
        raise UserError(f"{run}: no metrics.jsonl or metrics.csv; is it a training run directory?")
    if not rows:
        raise UserError(f"{run}: its metrics file has no epochs yet")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}:{i + 1}: not a JSON line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i + 1}: expected a JSON object per line")
        rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            raw = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    return [{k: _number(v) for k, v in row.items() if k is not None} for row in raw]


def _number(value: object) -> object:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf become null: strict JSON readers reject them."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


class TensorBoard:
    """Scalars to TensorBoard when it is installed (--tensorboard); a clear error otherwise."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "--tensorboard needs the tensorboard package: pip install 'fosctrain[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(str(log_dir))

    def log(self, row: dict[str, Any], step: int) -> None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "epoch":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
