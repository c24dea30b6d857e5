"""`fosc train`: options generated from fosctrain.config.Config, resolved as
defaults < --preset < --config FILE < options given, then fosctrain.train.train."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from fosctrain import distributed
from fosctrain.config import FIELDS, PRESET_DIFFERENCES, PRESETS, Config, resolve
from fosctrain.errors import UserError, check_positive
from fosctrain.methods import METHODS
from fosctrain.train import Interrupted, train
from fosctrain.trainer import stored_config


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _c_max(text: str) -> float | str:
    return "auto" if text == "auto" else float(text)


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _field_type(f: dataclasses.Field):
    default = Config().__dict__[f.name]
    kind = {"int": int, "float": float, "str": str}
    ann = str(f.type)
    base = next((k for name, k in kind.items() if ann.startswith(name)), str)
    return _optional(base) if "None" in ann else base if default is not None else str


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help=f"paper settings by name; {PRESET_DIFFERENCES}"
    )
    p.add_argument("--config", metavar="FILE", help="TOML file of options ([train] table or top)")
    p.add_argument("--name", help="run name (default: METHOD-DATASET-TIMESTAMP)")
    p.add_argument("--runs-dir", default="runs", help="where run directories go (default runs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--print-config", action="store_true", help="show the resolved config, exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument(
        "--checkpoint-every", type=int, default=0, metavar="N", help="also save every N batches"
    )
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel on N processes of this machine (as torchrun --nproc-per-node N)",
    )
    p.add_argument(
        "--master-port", type=int, metavar="PORT", help="--nproc: rendezvous port (default: free)"
    )
    g = p.add_argument_group("training options (see --print-config for the values in use)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if f.name == "lr_milestones":
            g.add_argument(flag, type=int, nargs="*", default=argparse.SUPPRESS, help=helptext)
        elif f.name == "model_kwargs":
            g.add_argument(flag, type=_json_dict, default=argparse.SUPPRESS, help="JSON object")
        elif f.name == "c_max":
            g.add_argument(flag, type=_c_max, default=argparse.SUPPRESS, help=helptext)
        elif f.type == "bool" or isinstance(Config().__dict__[f.name], bool):
            g.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=helptext,
            )
        else:
            g.add_argument(flag, type=_field_type(f), default=argparse.SUPPRESS, help=helptext)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The training options given on the command line."""
    return {k: v for k, v in vars(args).items() if k in FIELDS}


def run_dir_for(args: argparse.Namespace, config: Config) -> Path:
    """--resume DIR, or runs/NAME; a default name never collides with an existing run."""
    if args.resume:
        return Path(args.resume)
    if args.name:
        return Path(args.runs_dir) / args.name
    stem = f"{config.method}-{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = Path(args.runs_dir) / stem, 1
    while path.exists():
        i += 1
        path = Path(args.runs_dir) / f"{stem}-{i}"
    return path


def resume_config(args: argparse.Namespace) -> Config:
    """On --resume the run's own config, with any options given checked against it later."""

    stored = stored_config(Path(args.resume))
    given = overrides(args)
    return dataclasses.replace(stored, **given) if given else stored


def to_flags(values: dict[str, Any]) -> list[str]:
    """Command-line flags that parse back to `values` (training options by field name)."""
    flags: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif isinstance(value, dict):
            flags.append(f"{flag}={json.dumps(value)}")
        else:
            flags.append(f"{flag}={'none' if value is None else value}")
    return flags


def worker_argv(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The `fosc train` arguments of each process that --nproc launches: the options given,
    with the run directory fixed (a default name holds the time) and no --nproc."""
    argv = ["train"]
    if args.resume:
        argv += ["--resume", str(run_dir)]
    else:
        argv += ["--runs-dir", str(run_dir.parent), "--name", run_dir.name]
        argv += ["--preset", args.preset] if args.preset else []
        argv += ["--config", args.config] if args.config else []
    argv += ["--overwrite"] if args.overwrite else []
    argv += ["--no-progress"] if args.no_progress else []
    argv += ["--tensorboard"] if args.tensorboard else []
    argv += [f"--checkpoint-every={args.checkpoint_every}"]
    return argv + to_flags(overrides(args))


def run(args: argparse.Namespace) -> int:

    if args.resume and (args.preset or args.config):
        raise UserError("--resume takes the run's own configuration; drop --preset/--config")
    check_positive("--checkpoint-every", args.checkpoint_every, integer=True, zero_ok=True)
    config = (
        resume_config(args) if args.resume else resolve(args.preset, args.config, overrides(args))
    )
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
    run_dir = run_dir_for(args, config)
    if args.nproc != 1 or args.master_port is not None:
        if distributed.under_launcher():
            raise UserError("--nproc and --master-port launch processes; under torchrun drop them")
        return distributed.launch(args.nproc, worker_argv(args, run_dir), args.master_port)
    main = distributed.env_rank() == 0
    try:
        summary = train(
            config,
            run_dir,
            resume=bool(args.resume),
            overwrite=args.overwrite,
            progress=not args.no_progress,
            checkpoint_every=args.checkpoint_every,
            tensorboard=args.tensorboard,
        )
    except Interrupted as e:  # every rank stopped at the same batch; rank 0 reports it
        if not main:
            return 0
        print(f"fosc: {e}; resume with: fosc train --resume {run_dir}", file=sys.stderr)
        return 130
    except UserError as e:
        if main or not distributed.is_shared(e):
            raise
        return 0  # rank 0 raised it too, says why and fails the run (distributed.shared)
    if main:
        print(report(summary))
    return 0


def seconds(summary: dict[str, Any]) -> str:
    """Where the run's wall-clock went: training, the per-epoch validation, the test report."""
    val, test = summary.get("val_time_s", 0.0), summary["test"].get("time_s", 0.0)
    return f"{summary['time_s']:.0f} training, {val:.0f} validation, {test:.0f} test report"


def report(summary: dict[str, Any]) -> str:
    """The lines `fosc train` ends with: the final model on the test split (evaluated once;
    the AutoAttack-strength accuracy first, PGD beside it, every attack on the same digits),
    and the epoch the validation slice chose as `best`; each number names its split."""
    test, val, best = summary["test"], summary["validation"], summary["best"]
    name = test["attack"].split(" ")[0]
    on_test = f"on the {test['n']} test examples"
    lines = [f"run:                  {summary['run_dir']}"]
    if "strong_acc" in test:
        lines.append(
            f"robust accuracy:      {100 * test['strong_acc']:.1f}% {on_test} "
            f"({test['strong_attack']})"
        )
    lines += [
        f"clean accuracy:       {100 * test['clean_acc']:.1f}% {on_test}",
        f"{name + ' accuracy:':<22}{100 * test['robust_acc']:.1f}% {on_test} ({test['attack']}: "
        "the paper's metric, weaker)",
    ]
    if best is not None:
        val_name = val["attack"].split(" ")[0]
        lines.append(
            f"best (validation):    epoch {best['epoch']}, {val_name} accuracy "
            f"{100 * best['val_robust_acc']:.1f}% on the {val['split']}"
        )
    else:
        lines.append(f"best (validation):    {val['split']}")
    lines.append(
        f"gradient evaluations: {summary['grad_evals']:,} "
        f"({summary['attack_grad_evals']:,} in attacks), {summary['time_s']:.0f} s of training"
    )
    lines.append(f"seconds:              {seconds(summary)}")
    return "\n".join(lines + METHODS[summary["method"]].report_lines(summary))
