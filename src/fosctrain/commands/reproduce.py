"""`fosc reproduce EXPERIMENT --scale SCALE`: run an experiment's configurations x seeds
(resumably, --jobs at a time), then write OUT/results.csv, summary.csv, summary.md and figures.

--print-commands prints the unfinished runs as `fosc train ... && fosc eval ...` lines for a
cluster's scheduler instead; --collect only aggregates what is finished; --dry-run prints the
plan and a time estimate (fosctrain.estimate); --reuse DIR copies in the identical runs another
experiment's directory holds.
"""

from __future__ import annotations

import argparse
import sys

from fosctrain.experiments import EXPERIMENTS, SCALES

DRY_RUN_DATA_DIR = "DATA_DIR"
DEFAULT_BASELINE = "madry-k10"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help=f"one of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--scale", default="small", help=f"one of: {', '.join(SCALES)} (default small)")
    p.add_argument("--out", help="output directory (default reproduce/EXPERIMENT-SCALE)")
    p.add_argument("--seeds", type=int, help="seeds per configuration (default: the scale's)")
    p.add_argument(
        "--configs", nargs="+", metavar="NAME", help="only these configurations (default: all)"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--data-dir", help="dataset files (cifar10; mnist idx files)")
    p.add_argument(
        "--reuse",
        nargs="+",
        default=[],
        metavar="DIR",
        help="copy in the runs these reproduce directories (same scale) trained with an "
        "identical configuration and seed, instead of training them again",
    )
    p.add_argument(
        "--baseline",
        metavar="NAME",
        help="configuration every other is tested against (Welch's t-test over seeds) in the "
        "summary (default: madry-k10 where the experiment has it; none: no test)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--print-commands", action="store_true", help="print commands, run nothing")
    g.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate")
    g.add_argument("--collect", action="store_true", help="only aggregate the finished runs")


def run(args: argparse.Namespace) -> int:
    from fosctrain.aggregate import write_tables
    from fosctrain.errors import UserError
    from fosctrain.estimate import describe_plan
    from fosctrain.figures import write_figures
    from fosctrain.reproduce import claim_out, commands, make_plan, reuse_runs, run_plan

    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    # a dry run reads no data: a placeholder lets it plan a scale whose dataset needs --data-dir
    data_dir = args.data_dir or (DRY_RUN_DATA_DIR if args.dry_run else None)
    plan = make_plan(args.experiment, args.scale, args.out, args.seeds, data_dir, args.configs)
    if args.dry_run:
        print(describe_plan(plan, args.jobs))
        return 0
    if args.reuse and not args.collect:
        reuse_runs(plan, args.reuse, log=_log)
    if args.print_commands:
        claim_out(plan)
        print("\n".join(commands(plan)))
        return 0
    failures = {} if args.collect else run_plan(plan, args.jobs, args.threads, log=_log)
    claim_out(plan)
    rows, summary = write_tables(plan, _baseline(args.baseline, plan))
    figures = write_figures(plan, summary)
    print((plan.out / "summary.md").read_text(), end="")
    done = sum(r["status"] == "finished" for r in rows)
    print(f"{done} of {len(rows)} runs finished; wrote results.csv, summary.csv, summary.md"
          + "".join(f", {f.name}" for f in figures) + f" in {plan.out}")  # fmt: skip
    for name, error in failures.items():
        print(f"fosc: run {name} failed: {error}", file=sys.stderr)
    return 1 if failures else 0


def _baseline(given: str | None, plan) -> str | None:
    """--baseline, checked against the experiment's configurations; by default madry-k10."""
    from fosctrain.errors import UserError

    names = plan.experiment.configs
    if given is None:
        return DEFAULT_BASELINE if DEFAULT_BASELINE in names else None
    if given == "none":
        return None
    if given not in names:
        raise UserError(f"--baseline {given}: {plan.experiment.name} has no such configuration")
    return given


def _log(message: str) -> None:
    print(f"fosc: {message}", file=sys.stderr, flush=True)
