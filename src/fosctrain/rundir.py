"""Run directories and models loaded from them.

A run directory (runs/<name>/ by default) holds config.json (the resolved training
configuration), metrics.csv / metrics.jsonl, summary.json and checkpoints `last`, `best`
(and `last-prev`), each a .safetensors + .json pair (see fosctrain.checkpoint), and .lock,
held by the process that trains it (RunLock).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fosctrain.errors import UserError
from fosctrain.models import create_model, eval_layout
from fosctrain.weights import fit_weights, load_weights

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".pt", ".pth")
LOCK_NAME = ".lock"
BUDGET_PREFIX = "budget-"  # checkpoints kept at fixed gradient-evaluation budgets
BUDGET_LOG = "budgets.csv"  # one row per budget checkpoint: evals, training seconds, epoch


def budget_name(evals: int) -> str:
    """The checkpoint kept at `evals` gradient evaluations (zero-padded: names sort by budget)."""
    return f"{BUDGET_PREFIX}{evals:09d}"


def checkpoint_name(name: str) -> str:
    """A run directory's checkpoint by name (argparse type of --which): best, last, budget-N."""
    budget = name.startswith(BUDGET_PREFIX) and name[len(BUDGET_PREFIX) :].isdigit()
    if name in ("best", "last") or budget:
        return name
    raise UserError(f"--which must be best, last or budget-N, got {name!r}")


class RunLock:
    """An exclusive lock on a run directory for as long as a process trains it.

    An OS lock (flock on RUN/.lock), so a process that dies, even by kill -9, releases it and
    never blocks its own resume; the file holds the holder's pid for the refusal message."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self, create: bool = True) -> None:
        """Take the lock, or raise UserError naming the run and the holder's pid. `create`
        makes the directory; without it a missing directory is nothing to resume."""
        if fcntl is None or self.fd is not None:
            return
        if create:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        elif not self.run_dir.is_dir():
            raise UserError(f"{self.run_dir}: nothing to resume (no such directory)")
        fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"{self.run_dir} is in use by another process (pid {holder}); "
                "wait for it to end or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __del__(self) -> None:
        self.release()


@dataclass
class LoadedModel:
    model: nn.Module
    config: dict
    source: Path


def read_config(run_dir: str | Path) -> dict:
    """The resolved configuration a run was trained with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: no config.json here; is {run_dir} a run directory?")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON config ({e})") from None


def resolve_checkpoint(path: str | Path, which: str = "best") -> tuple[Path, Path]:
    """(run directory, checkpoint path) for a run directory or a checkpoint file inside one."""
    path = Path(path)
    if path.is_dir():
        # best falls back to last (a run without validation), last to last-prev (a crash
        # mid-save); a budget checkpoint is that budget's or none
        fallbacks = () if which.startswith(BUDGET_PREFIX) else ("last", "last-prev")
        for name in (which, *fallbacks):
            candidate = path / f"{name}.safetensors"
            if candidate.is_file():
                return path, candidate
        raise UserError(f"{path}: no checkpoint ({which}.safetensors or last.safetensors) found")
    if not path.exists() and path.with_suffix(".safetensors").exists():
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file or run directory")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise UserError(f"{path}: expected a run directory or a .safetensors/.pt checkpoint")
    return path.parent, path


def build_model(config: dict) -> nn.Module:
    """The (untrained) model a configuration describes."""
    if not isinstance(config.get("model"), str):
        raise UserError("the run's config.json names no model (key 'model')")
    return create_model(
        config["model"], num_classes=config.get("num_classes", 10), **config.get("model_kwargs", {})
    )


def load_model(
    path: str | Path,
    which: str = "best",
    config: dict | None = None,
    device: str | torch.device = "cpu",
    channels_last: bool = True,
) -> LoadedModel:
    """The trained model of a run directory (its `which` checkpoint) or of a checkpoint file
    inside a run directory; `config` overrides the run's config.json (e.g. for a lone file).
    `channels_last`: on CPU, the faster memory layout (models.eval_layout), whatever the run
    trained in; on a GPU, where it was never measured, the default layout regardless."""
    run_dir, ckpt = resolve_checkpoint(path, which)
    config = config if config is not None else read_config(run_dir)
    model = build_model(config)
    fit_weights(model, load_weights(ckpt), ckpt, config["model"])
    return LoadedModel(eval_layout(model.to(device), channels_last), config, ckpt)
