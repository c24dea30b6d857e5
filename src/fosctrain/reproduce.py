"""`fosc reproduce`: run one experiment of fosctrain.experiments at a scale, resumably.

Every configuration x seed is a run directory OUT/runs/NAME-sSEED: trained by
fosctrain.train.train, then evaluated on a fixed subset of the test split (the final report)
into RUN/eval/, with AutoAttack into RUN/eval-autoattack/ and FOSC against PGD steps into
RUN/measure/ where the experiment asks for them; an experiment with budgets (time to
robustness) trains with --budget-every and scores every budget checkpoint and the last one into
RUN/eval-budgets/ (score_budgets). The last checkpoint is evaluated: every run
gets the same number of epochs and no choice is made on the test split.

A run with summary.json and every evaluation present is finished and skipped; one with a
config.json resumes where it stopped. `--jobs N` trains N runs at a time in spawned processes,
each on --threads torch threads (default one). `--print-commands` prints the same work as
`fosc train` / `fosc eval` (/ `fosc measure`) command lines for a cluster's scheduler; a later
`fosc reproduce` with the same arguments finds those runs finished and only aggregates
(fosctrain.aggregate).

OUT/experiment.json names the experiment and scale, so that one directory never mixes two.
`--reuse DIR` copies in the runs another experiment's directory at the same scale already holds
with the identical configuration and seed (config hash), so a configuration that two experiments
share (Madry PGD-10 in methods and frontier, say) is trained once.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fosctrain.checkpoint import TENSOR_SUFFIX
from fosctrain.config import Config, resolve
from fosctrain.data import fixed_subset, load_dataset
from fosctrain.errors import UserError
from fosctrain.evaluate import (
    ATTACK_NAMES,
    CW_STEPS,
    PGD_STEPS,
    evaluate,
    known_stages,
    write_report,
)
from fosctrain.experiments import (
    Experiment,
    Scale,
    default_seeds,
    get_experiment,
    get_scale,
    overrides,
)
from fosctrain.files import atomic_write_json
from fosctrain.logs import write_csv
from fosctrain.measure import measure_convergence, write_measure
from fosctrain.rundir import budget_name, load_model
from fosctrain.train import train

MANIFEST = "experiment.json"
EVAL_DIR, AUTOATTACK_DIR, MEASURE_DIR = "eval", "eval-autoattack", "measure"
BUDGET_DIR, BUDGET_SCORES = "eval-budgets", "eval-budgets/scores.csv"
EVAL_SEED = 0
# APGD-T's targets when scoring budget checkpoints: the 3 most likely, as `fosc train`'s final
# report (on validation they left the accuracy of all 9 at a third of the cost)
BUDGET_TARGETS = 3


@dataclass(frozen=True)
class EvalSpec:
    """What each run gets after training (each on a fixed subset of N test examples)."""

    n: int
    checks: bool
    autoattack_n: int  # 0: no AutoAttack
    measure_n: int  # 0: no FOSC-vs-steps measurement
    measure_steps: int
    budgets: bool = False  # score every budget checkpoint (and the last) on the n examples

    def outputs(self) -> list[str]:
        """The files (relative to the run) a finished run holds."""
        files = ["summary.json", f"{EVAL_DIR}/eval.json"]
        files += [f"{AUTOATTACK_DIR}/eval.json"] if self.autoattack_n else []
        files += [BUDGET_SCORES] if self.budgets else []
        return files + ([f"{MEASURE_DIR}/measure.csv"] if self.measure_n else [])


@dataclass(frozen=True)
class Run:
    config_name: str
    seed: int
    overrides: dict[str, Any]
    dir: Path
    spec: EvalSpec

    @property
    def name(self) -> str:
        return f"{self.config_name}-s{self.seed}"


@dataclass(frozen=True)
class Plan:
    experiment: Experiment
    scale: Scale
    out: Path
    runs: list[Run]
    spec: EvalSpec

    def config(self, run: Run, threads: int | None = None) -> Config:
        extra = {} if threads is None else {"threads": threads}
        return resolve(self.scale.preset, None, {**run.overrides, **extra})


def make_plan(
    experiment: str,
    scale: str,
    out: str | Path | None = None,
    seeds: int | None = None,
    data_dir: str | None = None,
    configs: list[str] | None = None,
) -> Plan:
    """Every configuration x seed of `experiment` at `scale` (or only `configs` of them), each
    resolved and validated."""
    exp, sc = get_experiment(experiment), get_scale(scale)
    unknown = sorted(set(configs or ()) - set(exp.configs))
    if unknown:
        raise UserError(
            f"{exp.name} has no configuration {', '.join(unknown)}; it has {', '.join(exp.configs)}"
        )
    n_seeds = default_seeds(exp, sc) if seeds is None else seeds
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise UserError(f"--seeds must be an integer >= 1, got {seeds!r}")
    out = Path(out) if out is not None else Path("reproduce") / f"{exp.name}-{sc.name}"
    extra = {"data_dir": data_dir} if data_dir is not None else {}
    spec = EvalSpec(
        n=sc.eval_n,
        checks=sc.checks,
        autoattack_n=sc.autoattack_n if exp.autoattack else 0,
        measure_n=sc.measure_n if exp.measure else 0,
        measure_steps=sc.measure_steps,
        budgets=exp.budgets,
    )
    no_autoattack = dataclasses.replace(spec, autoattack_n=0)
    runs = []
    pairs = [(c, s) for c in configs or exp.configs for s in range(n_seeds)]
    for config_name, seed in sorted(pairs, key=lambda p: p[1]) if exp.seed_major else pairs:
        # the run's own closing report is skipped: evaluate_run scores it with the full
        # suite (APGD-T on all 9 targets) on the same digits
        values = {**overrides(exp, sc, config_name), **extra, "seed": seed}
        values["test_attack"] = "none"
        if exp.budgets:
            values["budget_every"] = sc.budget_every
        run_dir = out / "runs" / f"{config_name}-s{seed}"
        wanted = exp.autoattack_configs is None or config_name in exp.autoattack_configs
        mine = spec if seed < sc.autoattack_seeds and wanted else no_autoattack
        runs.append(Run(config_name, seed, values, run_dir, mine))
    plan = Plan(exp, sc, out, runs, spec)
    for run in runs:
        plan.config(run)  # a bad combination fails here, before any work
    return plan


def read_manifest(out: Path) -> dict[str, Any]:
    """{"experiment", "scale"} of a reproduce directory (None where its manifest lacks one)."""
    path = out / MANIFEST
    try:
        theirs = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); not a reproduce directory?") from None
    theirs = theirs if isinstance(theirs, dict) else {}
    return {k: theirs.get(k) for k in ("experiment", "scale")}


def claim_out(plan: Plan) -> None:
    """Record experiment and scale in OUT, or refuse an OUT that holds another experiment's."""
    path = plan.out / MANIFEST
    mine = {"experiment": plan.experiment.name, "scale": plan.scale.name}
    if path.is_file():
        found = read_manifest(plan.out)
        if found != mine:
            raise UserError(
                f"{plan.out} holds {found.get('experiment')} at scale {found.get('scale')}, "
                f"not {mine['experiment']} at {mine['scale']}; choose another --out"
            )
        return
    if plan.out.exists() and any(plan.out.iterdir()):
        raise UserError(f"{plan.out} is not empty and holds no {MANIFEST}; choose another --out")
    atomic_write_json(path, mine)


def status(run: Run) -> str:
    """finished (every output present), partial (started) or todo."""
    if all((run.dir / f).is_file() for f in run.spec.outputs()):
        return "finished"
    return "partial" if (run.dir / "config.json").is_file() else "todo"


def _trained_runs(source: Path, scale: str) -> dict[str, list[Path]]:
    """{config hash: run directories} of the trained runs of a reproduce directory at `scale`
    (the hash covers the seed; a kept copy of an older run shares its successor's hash); a
    directory of another scale (other evaluation sizes) is refused."""
    found = read_manifest(source)["scale"]
    if found != scale:
        raise UserError(f"--reuse {source} holds scale {found}, not {scale}")
    runs: dict[str, list[Path]] = {}
    for summary in sorted((source / "runs").glob("*/summary.json")):
        try:
            data = json.loads(summary.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("config_hash"):
            runs.setdefault(data["config_hash"], []).append(summary.parent)
    return runs


def completable(source: Path, spec: EvalSpec) -> bool:
    """Whether a trained run copied from `source` can be finished: it holds every output
    `spec` asks for, or the checkpoints that make what it lacks. Records committed without
    their weights (docs/*/runs) hold neither for a run that was still being evaluated."""
    if all((source / f).is_file() for f in spec.outputs()):
        return True
    needed = {"last"}
    if spec.budgets and not (source / BUDGET_SCORES).is_file():
        names = (e["checkpoint"] for e in budget_checkpoints(source))
        needed |= {c for c in names if not (source / BUDGET_DIR / c / "eval.json").is_file()}
    return all((source / f"{name}{TENSOR_SUFFIX}").is_file() for name in needed)


def reuse_runs(plan: Plan, sources: list[str | Path], log=print) -> int:
    """Copy into `plan` every run it has not started that a source directory (another
    experiment at the same scale, or the committed records of this one) trained with the
    identical configuration and seed; the copy keeps the source's evaluations (same scale,
    same evaluation) and gets what it lacks later. A source run that is not finished and has
    lost its checkpoints is not copied (another source run with the same configuration and
    seed may be): the plan trains it again. Returns the number of runs copied."""
    known: dict[str, list[Path]] = {}
    for source in sources:
        for key, dirs in _trained_runs(Path(source), plan.scale.name).items():
            known.setdefault(key, []).extend(dirs)
    claim_out(plan)
    copied = 0
    for run in plan.runs:
        key = plan.config(run).hash()
        if status(run) != "todo" or key not in known or run.dir.exists():
            continue
        usable = [d for d in known[key] if completable(d, run.spec)]
        if not usable:
            log(f"{run.name}: not reused: {known[key][0]} is not finished and lacks the "
                "checkpoints to finish it; trained here")  # fmt: skip
            continue
        tmp = run.dir.with_name(f".{run.dir.name}.reuse.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(usable[0], tmp, ignore=shutil.ignore_patterns(".lock", ".*.tmp"))
        tmp.rename(run.dir)
        log(f"{run.name}: reused {usable[0]}")
        copied += 1
    return copied


# ---------------------------------------------------------------- one run


def execute(config: Config, run_dir: Path, spec: EvalSpec) -> None:
    """Train (or resume, or skip if trained) one run, then whatever evaluation it lacks."""

    if not (run_dir / "summary.json").is_file():
        started = (run_dir / "config.json").is_file()
        train(config, run_dir, resume=started, overwrite=not started, progress=False)
    if not (run_dir / EVAL_DIR / "eval.json").is_file():
        evaluate_run(run_dir, spec.n, autoattack=False, checks=spec.checks, out=EVAL_DIR)
    if spec.budgets and not (run_dir / BUDGET_SCORES).is_file():
        score_budgets(run_dir, spec.n)
    if spec.autoattack_n and not (run_dir / AUTOATTACK_DIR / "eval.json").is_file():
        n = min(spec.autoattack_n, spec.n)
        evaluate_run(run_dir, n, autoattack=True, checks=False, out=AUTOATTACK_DIR)
    if spec.measure_n and not (run_dir / MEASURE_DIR / "measure.csv").is_file():
        measure_run(run_dir, spec.measure_n, spec.measure_steps)


def _test_split(config: dict, n: int):
    """The n test examples `fosc eval --n` takes (a fixed mixed-class subset)."""

    data = load_dataset(config["dataset"], config.get("data_dir"))
    return fixed_subset(data.x_test, data.y_test, n)


def evaluate_run(run_dir: Path, n: int, *, autoattack: bool, checks: bool, out: str) -> None:
    """The final report of a run's last checkpoint on its first n test examples, written as
    `fosc eval RUN --which last` would (see eval_argv). The one call into evaluate().

    The main report (autoattack False) runs FGSM, PGD-20, C&W-inf and APGD-CE + APGD-T on the
    same examples; the AutoAttack report runs the standard suite on the first n of them,
    taking APGD-CE's and APGD-T's results from the main report instead of running them again
    (`fosc eval --after`), then FAB-T and Square on what they leave."""

    known = None
    if autoattack:
        main = json.loads((run_dir / EVAL_DIR / "eval.json").read_text())
        known = known_stages(main, n)
    evaluate_checkpoint(
        run_dir,
        "last",
        n,
        run_dir / out,
        attacks=() if autoattack else ATTACK_NAMES,
        autoattack="standard" if autoattack else "apgd",
        checks=checks,
        known=known,
    )


def evaluate_checkpoint(
    run_dir: Path, which: str, n: int, out: Path, **options: Any
) -> dict[str, Any]:
    """evaluate() on checkpoint `which` of a run, its first n test examples, at the run's eps
    with the reproduce seed and budgets (`options`: evaluate's attacks, autoattack, ...),
    resumable, written to out/eval.json and eval.csv; returns the report as JSON."""
    loaded = load_model(run_dir, which=which)
    x, y = _test_split(loaded.config, n)
    options = dict(pgd_steps=PGD_STEPS, cw_steps=CW_STEPS, **options)
    report = evaluate(
        loaded.model,
        x,
        y,
        eps_list=[loaded.config["eps"]],
        norm=loaded.config.get("norm", "linf"),
        seed=EVAL_SEED,
        progress=False,
        resume=out / ".resume",
        **options,
    )
    report.meta = {"checkpoint": str(loaded.source), "split": "test", "n": int(x.shape[0])}
    write_report(report, out, "eval")
    shutil.rmtree(out / ".resume", ignore_errors=True)
    return report.to_dict()


def budget_checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    """A trained run's budget checkpoints and its last one: name, budget, gradient evaluations,
    training wall-clock and CPU seconds, and epoch of each (from summary.json)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [{"checkpoint": budget_name(b["budget"]), **b} for b in summary.get("budgets", [])]
    last = {"budget": None, **{k: summary.get(k) for k in ("grad_evals", "time_s", "cpu_s")}}
    return [*rows, {"checkpoint": "last", **last, "epoch": summary["epochs"], "batch": None}]


def score_budgets(run_dir: Path, n: int) -> None:
    """Every budget checkpoint and the last one under PGD-20 and APGD-CE + APGD-T (the
    BUDGET_TARGETS most likely targets) on the first n test examples (as `fosc eval RUN
    --which NAME --attacks pgd --apgd-targets 3 --no-checks`), each into eval-budgets/NAME/
    (a killed scoring resumes with the checkpoint it was on); then eval-budgets/scores.csv,
    one row per checkpoint."""
    rows: list[dict[str, Any]] = []
    for entry in budget_checkpoints(run_dir):
        out = run_dir / BUDGET_DIR / entry["checkpoint"]
        path = out / "eval.json"
        same = [r for r in rows if r["grad_evals"] == entry["grad_evals"]]
        if same:  # the last checkpoint is the last budget's (training ended on that batch)
            rows.append({**same[0], **entry})
            continue
        if path.is_file():
            report = json.loads(path.read_text())
        else:
            report = evaluate_checkpoint(
                run_dir, entry["checkpoint"], n, out, attacks=("pgd",), autoattack="apgd",
                apgd_targets=BUDGET_TARGETS, checks=False,
            )  # fmt: skip
        rows.append({**entry, **budget_score(report)})
    write_csv(run_dir / BUDGET_SCORES, rows)


def budget_score(report: dict[str, Any]) -> dict[str, Any]:
    """Clean, PGD-20, APGD-CE+T and worst-case accuracy (and n) of a budget's eval.json."""
    first = report["results"][0]
    return {
        "n": report["n"],
        "clean": first["clean"]["acc"],
        "pgd": first["attacks"]["pgd"]["acc"],
        "apgd": first["attacks"]["apgd-ce+t"]["acc"],
        "worst": first["worst_case"]["acc"],
    }


def measure_run(run_dir: Path, n: int, steps: int) -> None:
    """FOSC against PGD steps on n test examples (as `fosc measure RUN`)."""

    loaded = load_model(run_dir, which="last")
    x, y = _test_split(loaded.config, n)
    result = measure_convergence(
        loaded.model,
        x,
        y,
        eps=loaded.config["eps"],
        steps=steps,
        norm=loaded.config.get("norm", "linf"),
        seed=EVAL_SEED,
    )
    write_measure(result, run_dir / MEASURE_DIR)


_JOB_DONE = threading.Event()  # set when a worker's job has returned (saved state included)


def watch_parent(parent_pid: int, interval: float = 2.0, grace: float = 60.0) -> None:
    """Worker initializer: SIGTERM this worker once its parent (the runner) is gone, so a killed
    `fosc reproduce` leaves no orphan training on (a run saves its state on SIGTERM and resumes
    with the next `fosc reproduce`); then, once the job has returned or after `grace` seconds,
    end the process: no runner will ever hand it another job."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)
        _JOB_DONE.wait(grace)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def _job(config: Config, run_dir: Path, spec: EvalSpec) -> None:
    """One run in a worker process, on config.threads torch threads (training and evaluation)."""
    torch.set_num_threads(config.threads or 1)
    try:
        execute(config, run_dir, spec)
    finally:
        _JOB_DONE.set()


# ---------------------------------------------------------------- all runs


def run_plan(plan: Plan, jobs: int = 1, threads: int = 1, log=print) -> dict[str, str]:
    """Run every unfinished run, `jobs` at a time on `threads` torch threads each; returns
    {run name: error} for failures. A UserError (bad data, a non-finite loss) fails its run
    only; the others go on."""
    for name, value in (("--jobs", jobs), ("--threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    claim_out(plan)
    todo = [r for r in plan.runs if status(r) != "finished"]
    log(
        f"{plan.experiment.name} at {plan.scale.name}: {len(plan.runs) - len(todo)} of "
        f"{len(plan.runs)} runs finished, {len(todo)} to run -> {plan.out}"
    )
    failures: dict[str, str] = {}
    if jobs == 1:
        before = torch.get_num_threads()
        try:
            for i, run in enumerate(todo, 1):
                log(f"[{i}/{len(todo)}] {run.name}")
                try:
                    _job(plan.config(run, threads), run.dir, run.spec)
                except UserError as e:
                    failures[run.name] = str(e)
        finally:
            torch.set_num_threads(before)
        return failures
    context = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=watch_parent, initargs=(os.getpid(),)
    )
    with pool:
        futures = {
            pool.submit(_job, plan.config(run, threads), run.dir, run.spec): run for run in todo
        }
        for i, future in enumerate(cf.as_completed(futures), 1):
            run = futures[future]
            try:
                future.result()
                log(f"[{i}/{len(todo)}] {run.name} done")
            except UserError as e:
                failures[run.name] = str(e)
    return failures
