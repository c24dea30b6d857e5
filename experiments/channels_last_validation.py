"""The main job's run trained in both memory layouts, scored on validation (APGD-CE-10 on the
500 digits of the validation slice): the last epoch and the best one, per seed.

The runs (records in docs/channels-last-main-job/): seed 0 is `fosc train` with every default
on a quiet machine in each layout (2 threads); seeds 1 and 2 are

    fosc train --seed S --threads 1 --channels-last|--no-channels-last --test-attack none \
        --final-eval-n 100 --no-progress

    python experiments/channels_last_validation.py [RUNS_DIR]
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

RUNS = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/channels-last-main-job")


def validation(layout: str) -> tuple[list[float], list[float]]:
    """Last-epoch and best-epoch validation accuracy (%) of every finished seed."""
    last, best = [], []
    for seed in (0, 1, 2):
        path = RUNS / f"{layout}-s{seed}" / "metrics.csv"
        rows = list(csv.DictReader(path.open())) if path.exists() else []
        if len(rows) < 20:
            continue
        accs = [100 * float(r["val_robust_acc"]) for r in rows]
        last.append(accs[-1])
        best.append(max(accs))
    return last, best


def main() -> None:
    for layout in ("no-channels-last", "channels-last"):
        last, best = validation(layout)
        spread = f" sd {statistics.stdev(last):.1f}" if len(last) > 1 else ""
        print(
            f"{layout:<17} last {[round(a, 1) for a in last]} mean {statistics.mean(last):.1f}"
            f"{spread} | best {[round(a, 1) for a in best]} mean {statistics.mean(best):.1f}"
        )


if __name__ == "__main__":
    main()
