"""Convergence of PGD measured step by step: FOSC, loss and accuracy at every PGD point (the
paper's convergence analysis, its Figure 1).

One attack-engine call per batch (no stopping rule, final_fosc=True) with an observer that
records what the engine's one input-gradient pass per step yields: FOSC, loss and logits of
that step's point. N steps cost N + 1 gradient evaluations per example (the last one measures
the final point), and the FOSC rows are the engine's `fosc_trace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fosctrain.attacks import create_attack
from fosctrain.attacks.engine import validate
from fosctrain.device import model_device
from fosctrain.errors import UserError, check_positive
from fosctrain.files import atomic_write_text
from fosctrain.fosc import fosc_stats
from fosctrain.threat import check_norm, train_step_size, validate_eps

CSV_COLUMNS = (
    "step",
    "fosc_mean",
    "fosc_median",
    "fosc_p10",
    "fosc_p90",
    "loss_mean",
    "accuracy",
)


@dataclass
class MeasureResult:
    """Per-step statistics: row k describes the point after k PGD steps (row 0: the start)."""

    step: list[int]
    fosc_mean: list[float]
    fosc_median: list[float]
    fosc_p10: list[float]
    fosc_p90: list[float]
    loss_mean: list[float]
    accuracy: list[float]
    settings: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """The table as one dict per step, keys as in CSV_COLUMNS."""
        cols = {c: getattr(self, c) for c in CSV_COLUMNS}
        return [{c: cols[c][i] for c in CSV_COLUMNS} for i in range(len(self.step))]

    def to_dict(self) -> dict:
        return {**{c: list(getattr(self, c)) for c in CSV_COLUMNS}, "settings": self.settings}

    @classmethod
    def from_csv(cls, path: str | Path) -> MeasureResult:
        """Read a measure.csv back (for plotting); UserError if it is not one."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read ({e})") from None
        if not lines or tuple(lines[0].split(",")) != CSV_COLUMNS:
            raise UserError(f"{path}: not a measure.csv (expected header {','.join(CSV_COLUMNS)})")
        cols: dict[str, list] = {c: [] for c in CSV_COLUMNS}
        for lineno, line in enumerate(lines[1:], start=2):
            parts = line.split(",")
            try:
                if len(parts) != len(CSV_COLUMNS):
                    raise ValueError("wrong number of fields")
                cols["step"].append(int(parts[0]))
                for c, v in zip(CSV_COLUMNS[1:], parts[1:], strict=True):
                    cols[c].append(float(v))
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: bad row ({e})") from None
        if not cols["step"]:
            raise UserError(f"{path}: no rows")
        return cls(**cols, settings={"source": str(path)})


def measure_convergence(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 40,
    random_start: bool = True,
    loss: str = "ce",
    norm: str = "linf",
    seed: int = 0,
    batch_size: int = 500,
    fosc_box: bool = False,
) -> MeasureResult:
    """Run `steps` PGD steps on (x, y) and record at every point (start included): FOSC
    mean/median/p10/p90, mean attack loss and accuracy. alpha defaults to eps / 4 (the paper's
    setting); FOSC is the paper's closed form unless `fosc_box`."""
    (eps,) = validate_eps([eps], norm)
    alpha = train_step_size(eps, alpha)
    validate(eps, alpha, steps)
    check_norm(norm)
    check_positive("batch_size", batch_size, integer=True)
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise UserError(f"need matching, non-empty x and y, got {x.shape[0]} and {y.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    dev = model_device(model)
    parts = []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev)
        parts.append(
            _trace_batch(
                model, xb, yb, loss, eps, alpha, steps, random_start, norm, fosc_box, generator
            )
        )
    fos, losses, correct = (torch.cat([p[k] for p in parts], dim=1) for k in range(3))
    settings = {
        "eps": eps,
        "alpha": alpha,
        "steps": steps,
        "random_start": random_start,
        "loss": loss,
        "norm": norm,
        "seed": seed,
        "n": int(x.shape[0]),
        "fosc_box": fosc_box,
        "batch_size": batch_size,
    }
    return _summarize(fos, losses, correct, settings)


def _trace_batch(
    model: nn.Module,
    x0: Tensor,
    y: Tensor,
    loss: str,
    eps: float,
    alpha: float,
    steps: int,
    start: bool,
    norm: str,
    fosc_box: bool,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """FOSC, loss and correctness (each steps+1 x B) at every PGD point of one batch."""
    fos, losses, correct = [], [], []

    def record(step: int, idx: Tensor, logits: Tensor, values: Tensor, f: Tensor) -> None:
        fos.append(f.cpu())
        losses.append(values.cpu())
        correct.append((logits.argmax(1) == y[idx]).cpu())

    attack = create_attack(
        "pgd",
        norm=norm,
        eps=eps,
        alpha=alpha,
        steps=steps,
        random_start=start,
        loss=loss,
        fosc_box=fosc_box,
        final_fosc=True,
    )
    attack(model, x0, y, generator=generator, observer=record)
    return torch.stack(fos), torch.stack(losses), torch.stack(correct)


def _summarize(fos: Tensor, losses: Tensor, correct: Tensor, settings: dict) -> MeasureResult:
    stats = [fosc_stats(row) for row in fos]
    return MeasureResult(
        step=list(range(fos.shape[0])),
        fosc_mean=[s["mean"] for s in stats],
        fosc_median=[s["median"] for s in stats],
        fosc_p10=[s["p10"] for s in stats],
        fosc_p90=[s["p90"] for s in stats],
        loss_mean=losses.double().mean(1).tolist(),
        accuracy=correct.double().mean(1).tolist(),
        settings=settings,
    )


def measure_csv(result: MeasureResult) -> str:
    """The CSV text of a result: header CSV_COLUMNS, one row per step."""
    lines = [",".join(CSV_COLUMNS)]
    for row in result.rows():
        lines.append(
            ",".join(str(row["step"]) if c == "step" else f"{row[c]:.8g}" for c in CSV_COLUMNS)
        )
    return "\n".join(lines) + "\n"


def write_measure(result: MeasureResult, out_dir: str | Path, stem: str = "measure") -> Path:
    """Write STEM.csv into out_dir atomically; returns its path."""
    path = Path(out_dir) / f"{stem}.csv"
    atomic_write_text(path, measure_csv(result))
    return path


def format_measure(result: MeasureResult, every: int | None = None) -> str:
    """A short table: every `every`-th step (about ten rows by default) and the last."""
    n = len(result.step)
    every = every or max(1, (n - 1) // 10)
    keep = sorted({*range(0, n, every), n - 1})
    header = (
        f"{'step':>5} {'FOSC mean':>11} {'median':>11} {'p10':>11} {'p90':>11} "
        f"{'loss':>9} {'acc':>7}"
    )
    lines = [header, "-" * len(header)]
    rows = result.rows()
    for i in keep:
        r = rows[i]
        lines.append(
            f"{r['step']:>5} {r['fosc_mean']:>11.4g} {r['fosc_median']:>11.4g} "
            f"{r['fosc_p10']:>11.4g} {r['fosc_p90']:>11.4g} {r['loss_mean']:>9.4f} "
            f"{r['accuracy']:>7.2%}"
        )
    return "\n".join(lines)
