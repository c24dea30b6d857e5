"""`fosc reproduce EXPERIMENT --scale SCALE`: run an experiment's configurations x seeds
(resumably, --jobs at a time), then write OUT/results.csv, summary.csv, summary.md and figures.

--print-commands prints the unfinished runs as `fosc train ... && fosc eval ...` lines for a
cluster's scheduler instead; --collect only aggregates what is finished; --dry-run prints the
plan and a time estimate (fosctrain.estimate); --reuse DIR copies in the identical runs another
experiment's directory holds.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from fosctrain.aggregate import write_tables
from fosctrain.budgets import write_budget_tables
from fosctrain.commands.train import to_flags
from fosctrain.errors import UserError
from fosctrain.estimate import describe_plan
from fosctrain.evaluate import CW_STEPS, PGD_STEPS
from fosctrain.experiments import EXPERIMENTS, SCALES
from fosctrain.figures import write_figures
from fosctrain.reproduce import (
    AUTOATTACK_DIR,
    BUDGET_DIR,
    BUDGET_SCORES,
    BUDGET_TARGETS,
    EVAL_DIR,
    EVAL_SEED,
    MEASURE_DIR,
    Plan,
    Run,
    claim_out,
    make_plan,
    reuse_runs,
    run_plan,
)
from fosctrain.rundir import BUDGET_PREFIX

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
    budgets = write_budget_tables(plan, summary) if plan.experiment.budgets else None
    figures = write_figures(plan, summary, budgets)
    print((plan.out / "summary.md").read_text(), end="")
    done = sum(r["status"] == "finished" for r in rows)
    print(f"{done} of {len(rows)} runs finished; wrote results.csv, summary.csv, summary.md"
          + "".join(f", {f.name}" for f in figures) + f" in {plan.out}")  # fmt: skip
    for name, error in failures.items():
        print(f"fosc: run {name} failed: {error}", file=sys.stderr)
    return 1 if failures else 0


def _baseline(given: str | None, plan) -> str | None:
    """--baseline, checked against the experiment's configurations; by default madry-k10."""

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


# ---------------------------------------------------------------- command lines


def train_argv(plan: Plan, run: Run) -> list[str]:
    """`fosc train` arguments that train `run` into its directory (or resume it where it
    stopped), one torch thread; none for a trained run."""
    if (run.dir / "summary.json").is_file():
        return []
    if (run.dir / "config.json").is_file():
        return ["fosc", "train", "--resume", str(run.dir), "--no-progress"]
    argv = ["fosc", "train", "--runs-dir", str(run.dir.parent), "--name", run.dir.name]
    argv += ["--preset", plan.scale.preset] if plan.scale.preset else []
    return argv + ["--no-progress", *to_flags({**run.overrides, "threads": 1})]


def eval_argv(run: Run, n: int, autoattack: bool, checks: bool, out: str) -> list[str]:
    """`fosc eval` arguments that write what evaluate_run writes."""
    argv = ["fosc", "eval", str(run.dir), "--which", "last", "--n", str(n)]
    argv += ["--seed", str(EVAL_SEED), "--pgd-steps", str(PGD_STEPS), "--cw-steps", str(CW_STEPS)]
    after = str(run.dir / EVAL_DIR / "eval.json")
    argv += (
        ["--attacks", "none", "--autoattack", "standard", "--after", after] if autoattack else []
    )
    argv += [] if checks else ["--no-checks"]
    return argv + ["--out", str(run.dir / out), "--overwrite", "--no-progress"]


def budget_lines(run: Run, n: int) -> str:
    """A shell loop that scores each budget checkpoint and the last one as score_budgets does
    (the next `fosc reproduce` finds the scores and writes scores.csv)."""
    argv = ["fosc", "eval", str(run.dir), "--which", "NAME", "--n", str(n), "--seed",
            str(EVAL_SEED), "--attacks", "pgd", "--apgd-targets", str(BUDGET_TARGETS),
            "--no-checks", "--out", f"{run.dir / BUDGET_DIR}/NAME", "--overwrite",
            "--no-progress"]  # fmt: skip
    listing = f"cd {shlex.quote(str(run.dir))} && ls {BUDGET_PREFIX}*.safetensors 2>/dev/null"
    names = f"$({listing} | sed 's/.safetensors$//') last"
    command = shlex.join(argv).replace("NAME", '"$w"')
    return f"for w in {names}; do {command} || exit 1; done"


def measure_argv(run: Run, n: int, steps: int) -> list[str]:
    return ["fosc", "measure", str(run.dir), "--which", "last", "--n", str(n),
            "--steps", str(steps), "--seed", str(EVAL_SEED), "--out", str(run.dir / MEASURE_DIR),
            "--overwrite"]  # fmt: skip


def commands(plan: Plan) -> list[str]:
    """One line per unfinished run: the train, eval (AutoAttack, measure) commands it still
    needs, joined by &&."""
    lines = []
    for run in plan.runs:
        spec, have = run.spec, {p for p in run.spec.outputs() if (run.dir / p).is_file()}
        steps = [train_argv(plan, run)]
        if f"{EVAL_DIR}/eval.json" not in have:
            steps.append(eval_argv(run, spec.n, False, spec.checks, EVAL_DIR))
        if spec.budgets and BUDGET_SCORES not in have:
            steps.append(budget_lines(run, spec.n))
        if spec.autoattack_n and f"{AUTOATTACK_DIR}/eval.json" not in have:
            steps.append(eval_argv(run, spec.autoattack_n, True, False, AUTOATTACK_DIR))
        if spec.measure_n and f"{MEASURE_DIR}/measure.csv" not in have:
            steps.append(measure_argv(run, spec.measure_n, spec.measure_steps))
        if any(steps):
            parts = [s if isinstance(s, str) else shlex.join(s) for s in steps if s]
            lines.append(" && ".join(f"({p})" if p.startswith("for ") else p for p in parts))
    return lines
