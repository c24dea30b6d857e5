"""`fosc plot RUN [RUN ...]`: accuracy, training-example FOSC and gradient evaluations per
epoch, the runs overlaid. Writes accuracy.png, fosc.png and grad_evals.png into --out
(default: RUN/plots for one run, ./plots for several), replacing earlier figures there
(they are derived from the metrics and can always be redrawn)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fosctrain.plots import plot_runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="training run directories")
    parser.add_argument("--out", help="output directory (default: RUN/plots, or ./plots)")


def run(args: argparse.Namespace) -> int:
    if args.out:
        out = Path(args.out)
    else:
        out = Path(args.runs[0]) / "plots" if len(args.runs) == 1 else Path("plots")
    for path in plot_runs(args.runs, out):
        print(path)
    return 0
