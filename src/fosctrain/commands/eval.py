"""`fosc eval CHECKPOINT_OR_RUN`: robust accuracy under FGSM, PGD, C&W-inf (and optionally
AutoAttack and a transfer attack), with 95% intervals and gradient-masking checks. A model trained
elsewhere comes instead as `--factory MODULE:FUNCTION --weights FILE` (fosctrain.external), with
--dataset, --eps and --out given, since there is no run to take them from.

Defaults come from the run: eps from its config.json, data = a fixed mixed-class subset of --n
examples of its dataset's test split (data.fixed_subset: the files are class-sorted). Results
go to --out (default RUN/eval/) as eval.json and eval.csv. An earlier evaluation is never
overwritten silently: if eval.json or eval.csv exists there, the next free name eval-2,
eval-3, ... is used, unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from fosctrain.autoattack import ALIASES, STEPS, VERSIONS
from fosctrain.data import fixed_subset, load_dataset
from fosctrain.device import select_device
from fosctrain.errors import UserError, check_positive
from fosctrain.evaluate import (
    ATTACK_NAMES,
    CW_STEPS,
    L2_ATTACKS,
    LINF_ATTACKS,
    PGD_STEPS,
    evaluate,
    format_table,
    known_stages,
    write_report,
)
from fosctrain.external import META_KEYS, load_external_model
from fosctrain.rundir import (
    LoadedModel,
    checkpoint_name,
    load_model,
    read_config,
    resolve_checkpoint,
)

REQUIRED_CONFIG = ("model",)
RESUME_DIR = ".resume"  # AutoAttack's progress, per batch, until eval.json is written
# measured on fosc train's default DAT model, seed 0, all 1,000 test digits (97% clean, 78%
# robust), one torch thread, a load average of ~5 on 2 cores: docs/RESULTS.md, "Evaluation cost"
COST_NOTE = (
    "Measured per 100 digits of a robust MNIST CNN, one CPU thread on a loaded 2-core machine: "
    "PGD-20 1.5 s, C&W-inf 2.2 s, APGD-CE 7 s, APGD-T 55 s; the standard suite adds FAB-T 77 s "
    "and Square 111 s on what APGD leaves."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--eps",
        type=float,
        nargs="+",
        help="budgets (default: the run's eps; needed with --factory)",
    )
    parser.add_argument(
        "--attacks",
        nargs="+",
        metavar="ATTACK",
        help=f"attacks to run, from {' '.join(LINF_ATTACKS)}, or none "
        f"(default: {' '.join(ATTACK_NAMES)}; L2 runs: pgd)",
    )
    parser.add_argument(
        "--pgd-steps", type=int, default=PGD_STEPS, help=f"PGD steps (default {PGD_STEPS})"
    )
    parser.add_argument(
        "--cw-steps", type=int, default=CW_STEPS, help=f"C&W-inf steps (default {CW_STEPS})"
    )
    parser.add_argument("--restarts", type=int, default=1, help="PGD random restarts")
    parser.add_argument("--alpha", type=float, help="PGD/C&W step size (default 2.5 * eps / steps)")
    parser.add_argument("--n", type=int, default=1000, help="test examples (default 1000)")
    parser.add_argument("--source", help="checkpoint or run to craft a transfer attack on")
    parser.add_argument(
        "--autoattack",
        nargs="?",
        const="standard",
        default="apgd",
        choices=(*VERSIONS, *ALIASES, "none"),
        help="the AutoAttack-strength attack, run on the same examples as the others: apgd "
        "(default; APGD-CE + APGD-T, 100 steps each, 9 target classes), standard (the flag "
        "alone: Croce & Hein's whole suite, + FAB-T and Square), apgd-ce (APGD-CE alone) or "
        f"none. {COST_NOTE}",
    )
    parser.add_argument(
        "--apgd-steps", type=int, default=STEPS, help=f"APGD / FAB iterations (default {STEPS})"
    )
    parser.add_argument(
        "--apgd-targets",
        type=int,
        help="apgd: APGD-T's target classes, the most likely first (default: all, 9 on MNIST); "
        "3 left the accuracy of all 9 on validation at a third of APGD-T's cost",
    )
    parser.add_argument(
        "--after",
        metavar="EVAL_JSON",
        help="take APGD-CE's and APGD-T's per-example results from this earlier eval.json of "
        "the same model, seed and batch size (its first --n examples) instead of running "
        "them again: a standard AutoAttack after an apgd evaluation",
    )
    parser.add_argument(
        "--no-checks",
        action="store_true",
        help="skip the gradient-masking checks that run attacks of their own (Square against "
        "the standard AutoAttack's gradient attacks is still checked: it costs nothing)",
    )
    parser.add_argument("--out", help="output directory (default: RUN/eval; needed with --factory)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier eval.json in --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the verbs that load a trained model and its test data."""
    parser.add_argument(
        "target",
        metavar="CHECKPOINT_OR_RUN",
        nargs="?",
        help="run directory or checkpoint (or, for a model trained elsewhere, --factory and "
        "--weights)",
    )
    parser.add_argument(
        "--which",
        type=checkpoint_name,
        default="best",
        help="checkpoint of a run directory: best (default), last, or budget-N (kept at N "
        "gradient evaluations by --budget-every); not used for a --factory model",
    )
    parser.add_argument(
        "--factory",
        metavar="MODULE:FUNCTION",
        help="a model trained elsewhere: a Python function, called with no arguments, that "
        "returns the nn.Module (e.g. mymodels:make_net; the current directory is importable); "
        "needs --weights, --dataset, --eps and --out",
    )
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="the --factory model's weights, loaded strictly: a safetensors state dict or a "
        "fosctrain checkpoint (a .pt/.pth state dict only with --allow-pickle)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept a .pt/.pth --weights file, read with torch.load(weights_only=True); "
        "unpickling can run code, so pass this only for files you trust (or convert them to "
        "safetensors)",
    )
    parser.add_argument(
        "--dataset", help="dataset name (default: the run's; needed with --factory)"
    )
    parser.add_argument("--data-dir", help="dataset directory (default: the run's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random starts")
    parser.add_argument("--batch-size", type=int, default=500, help="attack batch size")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def load_target(target: str, which: str, device: torch.device) -> tuple[LoadedModel, Path]:
    """The model of a run directory or checkpoint file, and its run directory."""
    run_dir, ckpt = resolve_checkpoint(target, which)
    config = read_config(run_dir)
    if not isinstance(config, dict):
        raise UserError(f"{run_dir / 'config.json'}: expected a JSON object")
    missing = [k for k in REQUIRED_CONFIG if k not in config]
    if missing:
        raise UserError(f"{run_dir / 'config.json'}: missing key(s) {', '.join(missing)}")
    return load_model(ckpt, which=which, config=config, device=device), run_dir


def load_given_model(
    args: argparse.Namespace, device: torch.device
) -> tuple[LoadedModel, Path | None]:
    """The model the command line names (CHECKPOINT_OR_RUN, or --factory with --weights) and its
    run directory, None for a --factory model (whose results go to --out, then required)."""
    external = args.factory is not None or args.weights is not None
    if external and args.target is not None:
        raise UserError(f"give CHECKPOINT_OR_RUN ({args.target}) or --factory/--weights, not both")
    if not external:
        if args.target is None:
            raise UserError(
                "give CHECKPOINT_OR_RUN, or a model trained elsewhere as "
                "--factory MODULE:FUNCTION --weights FILE"
            )
        if args.allow_pickle:
            raise UserError("--allow-pickle goes with --factory and --weights")
        return load_target(args.target, args.which, device)
    if args.factory is None or args.weights is None:
        raise UserError("--factory and --weights go together; give both")
    if args.out is None:
        raise UserError("--out is needed with --factory (a model trained elsewhere has no run dir)")
    loaded = load_external_model(
        args.factory, args.weights, allow_pickle=args.allow_pickle, device=device
    )
    return loaded, None


def _origin(config: dict) -> str:
    return "a --factory model" if "factory" in config else "the run's config"


def load_test_examples(config: dict, dataset: str | None, data_dir: str | None, n: int) -> tuple:
    """A fixed mixed-class subset of n examples (all, for n >= its size) of the test split of
    the run's (or the given) dataset: the first n of a class-sorted file would be one class."""
    check_positive("--n", n, integer=True)
    name = dataset or config.get("dataset")
    if not name:
        raise UserError(f"{_origin(config)} names no dataset; give --dataset")
    ds = load_dataset(name, data_dir if data_dir is not None else config.get("data_dir"))
    return fixed_subset(ds.x_test, ds.y_test, n)


def default_eps(config: dict, given: list[float] | None) -> list[float]:
    if given:
        return list(given)
    eps = config.get("eps")
    if eps is None:
        raise UserError(f"{_origin(config)} has no eps; give --eps")
    return list(eps) if isinstance(eps, list) else [eps]


def free_stem(out_dir: Path, stem: str, suffixes: tuple[str, ...], overwrite: bool) -> str:
    """`stem`, or with --overwrite off and a file of that name present, the first free
    `stem-2`, `stem-3`, ... so that earlier results are never replaced silently."""
    if overwrite:
        return stem
    candidate, k = stem, 1
    while any((out_dir / f"{candidate}{s}").exists() for s in suffixes):
        k += 1
        candidate = f"{stem}-{k}"
    return candidate


def _source_model(source: str | None, which: str, device: torch.device) -> nn.Module | None:
    return None if source is None else load_target(source, which, device)[0].model


def run(args: argparse.Namespace) -> int:
    device = select_device(args.device)
    loaded, run_dir = load_given_model(args, device)
    config = loaded.config
    norm = config.get("norm", "linf")
    attacks = args.attacks or (ATTACK_NAMES if norm == "linf" else L2_ATTACKS)
    attacks = () if list(attacks) == ["none"] else attacks
    x, y = load_test_examples(config, args.dataset, args.data_dir, args.n)
    source = _source_model(args.source, args.which, device)
    out_dir = Path(args.out) if args.out else run_dir / "eval"
    report = evaluate(
        loaded.model,
        x,
        y,
        eps_list=default_eps(config, args.eps),
        attacks=attacks,
        pgd_steps=args.pgd_steps,
        pgd_restarts=args.restarts,
        cw_steps=args.cw_steps,
        alpha=args.alpha,
        batch_size=args.batch_size,
        norm=norm,
        seed=args.seed,
        autoattack=args.autoattack,
        apgd_steps=args.apgd_steps,
        apgd_targets=args.apgd_targets,
        source_model=source,
        checks=not args.no_checks,
        progress=not args.no_progress,
        resume=out_dir / RESUME_DIR,
        known=_known(args.after, len(y)),
    )
    report.meta = _meta(args, loaded, _labels(x, y))
    stem = free_stem(out_dir, "eval", (".json", ".csv"), args.overwrite)
    paths = write_report(report, out_dir, stem)
    shutil.rmtree(out_dir / RESUME_DIR, ignore_errors=True)  # the results are safe now
    print(format_table(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _known(after: str | None, n: int) -> dict[str, Tensor] | None:
    """--after: the APGD components' robust masks on the first n examples of an eval.json."""
    if after is None:
        return None
    try:
        report = json.loads(Path(after).read_text())
        known = known_stages(report, n)
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise UserError(f"--after {after}: not a readable eval.json ({e})") from None
    if not known:
        raise UserError(f"--after {after}: it holds no APGD-CE / APGD-T per-example results")
    if any(len(mask) < n for mask in known.values()):
        raise UserError(f"--after {after}: it covers fewer than the {n} examples asked for")
    return known


def _labels(x: Tensor, y: Tensor) -> dict:
    return {"n": int(x.shape[0]), "input_shape": list(x.shape[1:])}


def _meta(args: argparse.Namespace, loaded: LoadedModel, data: dict) -> dict:
    """Where the numbers come from: checkpoint, data, source model, command line."""
    config = loaded.config
    return {
        "checkpoint": str(loaded.source),
        "model": config.get("model"),
        "method": config.get("method"),
        "dataset": args.dataset or config.get("dataset"),
        "split": "test",
        "data": data,
        "source": args.source,
        **{k: config[k] for k in META_KEYS if k in config},
    }
