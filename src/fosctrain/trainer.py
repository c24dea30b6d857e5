"""The Trainer: a training run's life around the loop (fosctrain.train): its directory, lock,
state, signals and summary.

A run starts in `build_trainer`: rank 0 takes the run's lock (fosctrain.rundir.RunLock) and
prepares its directory (never overwriting a run silently; on resume, only with the run's own
configuration), every rank builds the same data, model, optimizer and method, and a resumed
run restores its last valid checkpoint. Every random draw of a run comes from one seeded
torch.Generator (shuffling, random starts, augmentation), saved in each checkpoint (`save`)
with the optimizer state, the loop's RunState and the method's own state (Method.state), so
an interrupted and resumed run ends with the same weights as an uninterrupted one.
SIGINT/SIGTERM only set a flag (`graceful_stop`); the loop saves at the next batch boundary.
The run ends with summary.json (`write_summary`).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fosctrain import progress
from fosctrain.checkpoint import load_latest_valid, restore, save_checkpoint
from fosctrain.config import RUNTIME_FIELDS, Config, validate
from fosctrain.data import Dataset, fixed_subset, hold_out_validation, load_dataset
from fosctrain.device import describe, select_device
from fosctrain.distributed import Dist
from fosctrain.errors import UserError
from fosctrain.files import atomic_write_json
from fosctrain.logs import TensorBoard
from fosctrain.methods import METHODS, Method, create_method
from fosctrain.models import set_layout
from fosctrain.rundir import LOCK_NAME, RunLock, build_model
from fosctrain.validation import final_words, val_words


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run saved its state and can be resumed."""


@dataclass
class RunState:
    """Everything besides weights, optimizer and method state that a resumed run needs."""

    epoch: int = 0
    batch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_robust: float = -1.0
    grad_evals: int = 0
    attack_grad_evals: int = 0
    elapsed: float = 0.0
    cpu_elapsed: float = 0.0  # this process's CPU seconds of training (rank 0's)
    partial: dict[str, float] = field(default_factory=dict)
    fosc_values: list[float] = field(default_factory=list)
    budgets: list[dict[str, Any]] = field(default_factory=list)  # budget checkpoints kept


@dataclass
class Trainer:
    """A run in progress: what the loop trains, with what, and where it records it."""

    config: Config
    run_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    method: Method
    data: Dataset
    device: torch.device
    generator: torch.Generator
    state: RunState
    progress: bool = True
    checkpoint_every: int = 0
    tensorboard: TensorBoard | None = None
    stop_requested: bool = False
    epoch_start_rng: Tensor | None = None
    dist: Dist = field(default_factory=Dist)
    train_model: nn.Module | None = None  # what the training step runs: DDP and/or compiled
    scaler: torch.amp.GradScaler | None = None  # --amp fp16
    lock: RunLock | None = None  # held (on rank 0) from build_trainer to the end of fit

    @property
    def step_model(self) -> nn.Module:
        """The model of the training forward; attacks and evaluation use `model` itself."""
        return self.model if self.train_model is None else self.train_model


def prepare_run_dir(run_dir: Path, config: Config, resume: bool, overwrite: bool) -> Config:
    """Create (or check, on resume) the run directory; never overwrite a run silently.

    On resume the stored configuration is used; a differing `config` is an error."""
    if resume:
        stored = stored_config(run_dir)
        for debris in [*run_dir.glob(".*.tmp"), *run_dir.glob(".*.link")]:
            debris.unlink(missing_ok=True)  # left by a write that a crash cut short
        if stored.hash() != config.hash():
            diff = [
                k
                for k, v in config.to_dict().items()
                if stored.to_dict()[k] != v and k not in RUNTIME_FIELDS
            ]
            raise UserError(
                f"{run_dir}: cannot resume with a different configuration "
                f"(differs in: {', '.join(diff) or 'runtime options'})"
            )
        return stored
    contents = [c for c in run_dir.iterdir() if c.name != LOCK_NAME] if run_dir.exists() else []
    if contents:
        if not overwrite:
            raise UserError(
                f"{run_dir} already holds a run; use --resume to continue it, "
                "--overwrite to replace it, or --name for a new one"
            )
        for child in contents:
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", config.to_dict())
    return config


def stored_config(run_dir: Path) -> Config:
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: nothing to resume (no config.json)")
    try:
        stored = Config.stored(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: not a valid run configuration ({e})") from None
    validate(stored)
    return stored


def decayed_weights(model: nn.Module, on: str) -> set[nn.Parameter]:
    """The parameters --weight-decay applies to: all, the conv and linear weights (Keras'
    kernel_regularizer on every layer), or the linear weights before the head (the last
    linear layer), as the official CIFAR CNN's l2 on its 256-unit layer."""
    if on == "all":
        return set(model.parameters())
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if on == "hidden-linear":
        linear = [m for m in layers if isinstance(m, nn.Linear)]
        layers = linear[:-1]
    return {m.weight for m in layers}


def create_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Adam or SGD with --weight-decay on the parameters --weight-decay-on names (one group
    with it, one without: the order of model.parameters() is kept within each)."""
    decayed = decayed_weights(model, config.weight_decay_on)
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p in decayed], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p not in decayed], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def build_trainer(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_every: int = 0,
    tensorboard: bool = False,
    dist: Dist | None = None,
) -> Trainer:
    """Everything a run needs, fresh or restored from its last valid checkpoint.

    `dist` (from fosctrain.distributed.session) makes it one rank of a data-parallel run:
    rank 0 prepares the run directory, every rank builds the same model and state."""
    dist = dist or Dist()
    validate(config)
    run_dir = Path(dist.broadcast(str(run_dir)))  # rank 0's name (a default holds the time)
    lock = RunLock(run_dir)
    try:
        trainer = _build(config, run_dir, lock, resume, overwrite, progress, checkpoint_every, dist)
    except BaseException:
        lock.release()
        raise
    if tensorboard and dist.is_main:
        trainer.tensorboard = TensorBoard(run_dir / "tensorboard")
    return trainer


def _build(
    config: Config,
    run_dir: Path,
    lock: RunLock,
    resume: bool,
    overwrite: bool,
    progress: bool,
    checkpoint_every: int,
    dist: Dist,
) -> Trainer:
    if resume:  # first of all: is no one else on it, and is this the run's own configuration?
        dist.on_main(lock.acquire, create=False)
        config = dist.on_main(prepare_run_dir, run_dir, config, resume, overwrite)
    data = load_data(config)
    dist.on_main(check_world, config, dist, len(data.y_train))
    _check_model_fits(config, data)  # before the run directory: a misfit leaves nothing behind
    if not resume:
        dist.on_main(lock.acquire)  # before --overwrite deletes anything
        config = dist.on_main(prepare_run_dir, run_dir, config, resume, overwrite)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = dist.device if dist.enabled else select_device(config.device)
    torch.manual_seed(config.seed)
    model = set_layout(build_model(config.to_dict()).to(device), config.channels_last)
    if config.sync_bn and dist.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = create_optimizer(config, model)
    train_model = dist.wrap(model) if dist.enabled else None
    if config.compile:
        train_model = torch.compile(train_model or model)
    trainer = Trainer(
        config=config,
        run_dir=run_dir,
        model=model,
        optimizer=optimizer,
        method=create_method(config),
        data=data,
        device=device,
        generator=torch.Generator().manual_seed(config.seed),
        state=RunState(),
        progress=progress and dist.is_main,
        checkpoint_every=checkpoint_every,
        dist=dist,
        train_model=train_model,
        scaler=torch.amp.GradScaler(device.type) if config.amp == "fp16" else None,
        lock=lock,
    )
    if resume:
        restore_run(trainer)
    return trainer


def load_data(config: Config) -> Dataset:
    """The run's data: the validation slice (val_n, stratified, fixed) held out of the
    training set first, then the train_n subset of what is left."""
    data = hold_out_validation(load_dataset(config.dataset, config.data_dir), config.val_n)
    data.x_train, data.y_train = fixed_subset(data.x_train, data.y_train, config.train_n)
    return data


def check_world(config: Config, dist: Dist, n_train: int) -> None:
    """What the processes and their devices must allow (one line each)."""
    if config.sync_bn and dist.enabled and dist.device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on CPU)")
    for method in METHODS.values():  # each checks its own options, whichever method runs
        method.check_world(config, dist)
    last = n_train % config.batch_size
    smallest = min(config.batch_size, last) if last else config.batch_size
    if smallest < dist.world:
        raise UserError(
            f"{dist.world} processes need at least {dist.world} rows in every global batch, but "
            f"a batch has {smallest} (--batch-size {config.batch_size}, {n_train} examples)"
        )


def _check_model_fits(config: Config, data: Dataset) -> None:
    """One line instead of a traceback when the model cannot take the dataset's inputs."""
    if config.num_classes < data.num_classes:
        raise UserError(
            f"num_classes {config.num_classes} is below the {data.num_classes} classes of "
            f"{config.dataset}"
        )
    probe = build_model(config.to_dict()).eval()  # the global RNG is re-seeded afterwards
    try:
        with torch.no_grad():
            probe(data.x_train[:2])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(
            f"model {config.model!r} does not accept {config.dataset} inputs of shape "
            f"{tuple(data.x_train.shape[1:])} ({first})"
        ) from None


def restore_run(tr: Trainer) -> None:
    """Load the run's last valid checkpoint into `tr`: weights, optimizer, scaler, RunState,
    generators and the method's state."""
    names = ("last.safetensors", "last.json", "last-prev.safetensors", "last-prev.json")
    if not any((tr.run_dir / n).exists() for n in names):  # killed before its first save
        if tr.dist.is_main:
            progress.line(f"fosc: {tr.run_dir} has no checkpoint yet: starting from the beginning")
        return
    ckpt, warnings = load_latest_valid(tr.run_dir, "last", expected_config_hash=tr.config.hash())
    for w in warnings if tr.dist.is_main else []:
        progress.line(f"fosc: warning: {w}")
    restore(ckpt, tr.model, tr.optimizer)
    saved = ckpt.state()
    if tr.scaler is not None and "scaler" in saved:
        tr.scaler.load_state_dict(json.loads(saved["scaler"]))
    run = json.loads(saved["run"])
    legacy = {"c_max": run.pop("c_max")} if "c_max" in run else {}  # before Method.state
    tr.state = RunState(**run)
    tr.method.load_state(json.loads(saved["method"]) if "method" in saved else legacy)
    tr.generator.set_state(saved["rng"])
    tr.epoch_start_rng = saved["epoch_rng"]
    torch.set_rng_state(saved["torch_rng"])


def save(tr: Trainer, name: str = "last", keep_previous: bool = True) -> None:
    """Rank 0 writes the checkpoint (of the unwrapped model: no DDP "module." prefixes); the
    other ranks wait for it, so none runs ahead of a checkpoint."""
    if tr.dist.is_main:
        state = {
            "run": json.dumps(tr.state.__dict__),
            "rng": tr.generator.get_state(),
            "epoch_rng": tr.epoch_start_rng,
            "torch_rng": torch.get_rng_state(),
            "method": json.dumps(tr.method.state()),
        }
        if tr.scaler is not None:
            state["scaler"] = json.dumps(tr.scaler.state_dict())
        save_checkpoint(
            tr.run_dir,
            name,
            model=tr.model,
            optimizer=tr.optimizer,
            state=state,
            config_hash=tr.config.hash(),
            keep_previous=keep_previous,
        )
    tr.dist.barrier()


@contextmanager
def graceful_stop(tr: Trainer) -> Iterator[None]:
    """SIGINT/SIGTERM set a flag; the loop saves at the next batch boundary and stops."""

    def request(signum, frame):
        tr.stop_requested = True

    try:
        previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no handlers
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _strong(cfg: Config, test: dict[str, float]) -> dict[str, Any]:
    """The AutoAttack-strength part of the test report, where the run has one."""
    if "strong_acc" not in test:
        return {}
    return {
        "strong_acc": test["strong_acc"],
        "strong_attack": final_words(cfg),
        "worst_acc": test["worst_acc"],
    }


def write_summary(tr: Trainer, test: dict[str, float], n_test: int) -> dict[str, Any]:
    """summary.json: final and best epochs (validation), the one test evaluation (`test`, on
    `n_test` examples), totals and the method's own columns."""
    history = tr.state.history
    validated = [r for r in history if not math.isnan(r["val_robust_acc"])]
    best = max(validated, key=lambda r: r["val_robust_acc"]) if validated else None
    cfg = tr.config
    n_val = len(tr.data.y_val) if tr.data.y_val is not None else 0
    summary = {
        "run_dir": str(tr.run_dir),
        "method": cfg.method,
        "epochs": tr.state.epoch,
        "final": history[-1] if history else None,
        "best": best,
        "grad_evals": tr.state.grad_evals,
        "attack_grad_evals": tr.state.attack_grad_evals,
        "time_s": tr.state.elapsed,
        "cpu_s": tr.state.cpu_elapsed,
        "device": describe(tr.device),
        "val_time_s": sum(r.get("val_time_s", 0.0) for r in history),
        "budgets": tr.state.budgets,
        "validation": {
            "n": n_val,
            "split": f"validation slice of {n_val} training examples (fixed, stratified, not "
            "trained on)"
            if n_val
            else "none (val_n 0): no per-epoch validation and no best checkpoint",
            "metrics": ["val_clean_acc", "val_robust_acc"],
            "best_by": "val_robust_acc" if n_val else None,
            "attack": val_words(cfg),
        },
        "test": {
            "n": n_test,
            "split": f"the first {n_test} test examples (class-interleaved), evaluated once, "
            "on the final model; every attack on the same examples",
            "clean_acc": test["clean_acc"],
            "robust_acc": test["robust_acc"],
            "attack": cfg.eval_attack(),
            "steps": cfg.eval_steps,
            "step_size": cfg.eval_step_size,
            "random_start": True,
            "norm": cfg.norm,
            "time_s": test.get("time_s", math.nan),
            **_strong(cfg, test),
        },
        "config_hash": cfg.hash(),
        **tr.method.extra_metrics(),
    }
    if tr.dist.is_main:
        atomic_write_json(tr.run_dir / "summary.json", summary)
    return summary
