"""`fosc measure CHECKPOINT_OR_RUN`: FOSC, attack loss and accuracy at every PGD step on test
examples (the paper's convergence analysis).

Defaults come from the run: eps and norm from its config.json, data = a fixed mixed-class
subset of --n examples of its test split; alpha defaults to eps / 4 (the paper's setting).
Writes measure.csv and measure.png into --out (default RUN/measure/); an earlier measurement
there is never overwritten silently (the next free name measure-2, ... is used) unless --overwrite.
A model trained elsewhere comes as `--factory MODULE:FUNCTION --weights FILE`, with --dataset,
--eps and --out given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fosctrain.commands.eval import (
    add_model_arguments,
    default_eps,
    free_stem,
    load_given_model,
    load_test_examples,
)
from fosctrain.device import select_device
from fosctrain.errors import UserError
from fosctrain.measure import format_measure, measure_convergence, write_measure
from fosctrain.plots import plot_measure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=40, help="PGD steps (default 40)")
    parser.add_argument(
        "--eps", type=float, help="budget (default: the run's eps; needed with --factory)"
    )
    parser.add_argument("--alpha", type=float, help="step size (default eps / 4)")
    parser.add_argument(
        "--no-random-start", action="store_true", help="start PGD at the clean examples"
    )
    parser.add_argument("--loss", choices=("ce", "cw"), default="ce", help="attack loss")
    parser.add_argument("--n", type=int, default=500, help="test examples (default 500)")
    parser.add_argument(
        "--fosc-box", action="store_true", help="box-aware FOSC instead of the paper's form"
    )
    parser.add_argument("--log-y", action="store_true", help="logarithmic FOSC axis")
    parser.add_argument(
        "--out", help="output directory (default: RUN/measure; needed with --factory)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier measure.csv in --out"
    )


def run(args: argparse.Namespace) -> int:
    device = select_device(args.device)
    loaded, run_dir = load_given_model(args, device)
    config = loaded.config
    eps = default_eps(config, None if args.eps is None else [args.eps])
    if len(eps) != 1:
        raise UserError("the run's config has several eps; give one with --eps")
    x, y = load_test_examples(config, args.dataset, args.data_dir, args.n)
    result = measure_convergence(
        loaded.model,
        x,
        y,
        eps=eps[0],
        alpha=args.alpha,
        steps=args.steps,
        random_start=not args.no_random_start,
        loss=args.loss,
        norm=config.get("norm", "linf"),
        seed=args.seed,
        batch_size=args.batch_size,
        fosc_box=args.fosc_box,
    )
    out_dir = Path(args.out) if args.out else run_dir / "measure"
    stem = free_stem(out_dir, "measure", (".csv", ".png"), args.overwrite)
    csv_path = write_measure(result, out_dir, stem)
    png_path = plot_measure(result, out_dir / f"{stem}.png", log_y=args.log_y)
    print(format_measure(result))
    print(f"wrote {csv_path}, {png_path}")
    return 0
