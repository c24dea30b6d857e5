"""The one training loop. A method (fosctrain.methods) builds each training batch and its
loss; this loop shuffles, steps the optimizer, evaluates, logs and checkpoints.

Every random draw of a run comes from one seeded torch.Generator (shuffling, random starts,
augmentation), saved in each checkpoint with the optimizer state, so an interrupted and resumed
run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fosctrain.attacks import PGD
from fosctrain.checkpoint import load_latest_valid, restore, save_checkpoint
from fosctrain.config import Config, validate
from fosctrain.data import Dataset, load_dataset, random_crop_flip
from fosctrain.errors import UserError
from fosctrain.files import atomic_write_json
from fosctrain.fosc import fosc_stats
from fosctrain.logs import TensorBoard, write_metrics
from fosctrain.methods import Dynamic, Method, create_method
from fosctrain.runs import build_model
from fosctrain.schedules import lr_factor

CALIBRATION_SAMPLES = 512
RUN_FILES = ("config.json", "metrics.csv", "metrics.jsonl", "summary.json")


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run saved its state and can be resumed."""


@dataclass
class RunState:
    """Everything besides weights and optimizer that a resumed run needs."""

    epoch: int = 0
    batch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_robust: float = -1.0
    c_max: float | None = None
    grad_evals: int = 0
    attack_grad_evals: int = 0
    elapsed: float = 0.0
    partial: dict[str, float] = field(default_factory=dict)
    fosc_values: list[float] = field(default_factory=list)


@dataclass
class Trainer:
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


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    return device


def prepare_run_dir(run_dir: Path, config: Config, resume: bool, overwrite: bool) -> Config:
    """Create (or check, on resume) the run directory; never overwrite a run silently.

    On resume the stored configuration is used; a differing `config` is an error."""
    if resume:
        stored = _stored_config(run_dir)
        if stored.hash() != config.hash():
            diff = [
                k
                for k, v in config.to_dict().items()
                if stored.to_dict()[k] != v and k not in ("device", "threads")
            ]
            raise UserError(
                f"{run_dir}: cannot resume with a different configuration "
                f"(differs in: {', '.join(diff) or 'runtime options'})"
            )
        return stored
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(
                f"{run_dir} already holds a run; use --resume to continue it, "
                "--overwrite to replace it, or --name for a new one"
            )
        for child in run_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", config.to_dict())
    return config


def _stored_config(run_dir: Path) -> Config:
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: nothing to resume (no config.json)")
    try:
        stored = Config(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: not a valid run configuration ({e})") from None
    validate(stored)
    return stored


def create_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def fixed_subset(x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The same n examples for every run and epoch (a fixed shuffle: files are class-sorted)."""
    if n <= 0 or n >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))[:n]
    return x[idx], y[idx]


def test_metrics(model: nn.Module, x: Tensor, y: Tensor, config: Config, seed: int) -> dict:
    """Clean accuracy and PGD accuracy (eval_steps steps of 2.5 eps / steps, random start)."""
    if len(y) == 0:
        return {"test_clean_acc": math.nan, "test_robust_acc": math.nan}
    pgd = PGD(eps=config.eps, alpha=2.5 * config.eps / config.eval_steps, steps=config.eval_steps)
    gen = torch.Generator().manual_seed(seed)
    clean = robust = 0
    was_training = model.training
    model.eval()
    for i in range(0, len(y), 500):
        xb, yb = x[i : i + 500], y[i : i + 500]
        with torch.no_grad():
            clean += (model(xb).argmax(1) == yb).sum().item()
        x_adv = pgd(model, xb, yb, generator=gen).x_adv
        with torch.no_grad():
            robust += (model(x_adv).argmax(1) == yb).sum().item()
    model.train(was_training)
    return {"test_clean_acc": clean / len(y), "test_robust_acc": robust / len(y)}


def build_trainer(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_every: int = 0,
    tensorboard: bool = False,
) -> Trainer:
    """Everything a run needs, fresh or restored from its last valid checkpoint."""
    run_dir = Path(run_dir)
    validate(config)
    config = prepare_run_dir(run_dir, config, resume, overwrite)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = select_device(config.device)
    data = load_dataset(config.dataset, config.data_dir)
    data.x_train, data.y_train = fixed_subset(data.x_train, data.y_train, config.train_n)
    torch.manual_seed(config.seed)
    model = build_model(config.to_dict()).to(device)
    optimizer = create_optimizer(config, model)
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
        progress=progress,
        checkpoint_every=checkpoint_every,
    )
    if resume:
        _restore(trainer)
    if tensorboard:
        trainer.tensorboard = TensorBoard(run_dir / "tensorboard")
    return trainer


def _restore(tr: Trainer) -> None:
    ckpt, warnings = load_latest_valid(tr.run_dir, "last", expected_config_hash=tr.config.hash())
    for w in warnings:
        tqdm.write(f"fosc: warning: {w}", file=sys.stderr)
    restore(ckpt, tr.model, tr.optimizer)
    saved = ckpt.state()
    tr.state = RunState(**json.loads(saved["run"]))
    tr.generator.set_state(saved["rng"])
    tr.epoch_start_rng = saved["epoch_rng"]
    torch.set_rng_state(saved["torch_rng"])
    if isinstance(tr.method, Dynamic) and tr.state.c_max is not None:
        tr.method.c_max = tr.state.c_max


def save(tr: Trainer, name: str = "last", keep_previous: bool = True) -> None:
    state = {
        "run": json.dumps(tr.state.__dict__),
        "rng": tr.generator.get_state(),
        "epoch_rng": tr.epoch_start_rng,
        "torch_rng": torch.get_rng_state(),
    }
    save_checkpoint(
        tr.run_dir,
        name,
        model=tr.model,
        optimizer=tr.optimizer,
        state=state,
        config_hash=tr.config.hash(),
        keep_previous=keep_previous,
    )


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


def train_batch(tr: Trainer, x: Tensor, y: Tensor, t: float, epoch: int) -> dict[str, Any]:
    """One optimizer step on the batch the method builds from (x, y); returns its statistics."""
    result = tr.method.make_batch(tr.model, x, y, t, tr.generator)
    x_adv = x if result is None else result.x_adv
    tr.model.train()
    losses, logits = tr.method.loss(tr.model, x, x_adv, y, epoch)
    loss = losses.mean()
    if not torch.isfinite(loss):
        if tr.config.skip_nonfinite:
            return {"skipped": 1}
        raise TrainingError(
            f"non-finite training loss ({loss.item()}) at epoch {epoch + 1}; the last good "
            f"checkpoint in {tr.run_dir} is kept (lower --lr, or --skip-nonfinite)"
        )
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tr.optimizer.step()
    stats = {
        "loss_sum": losses.detach().sum().item(),
        "correct": (logits.detach().argmax(1) == y).sum().item(),
        "n": len(y),
        "train_evals": tr.method.passes * len(y),
    }
    if result is not None:
        stats["attack_evals"] = result.grad_evals
        stats["steps_sum"] = result.steps.sum().item()
        stats["fosc"] = result.fosc.tolist()
    return stats


SUM_KEYS = ("loss_sum", "correct", "n", "train_evals", "attack_evals", "steps_sum", "skipped")


def _epoch_order(tr: Trainer) -> Tensor:
    """This epoch's shuffle; when resuming mid-epoch, redrawn from the epoch's starting RNG."""
    n = len(tr.data.y_train)
    if tr.state.batch == 0:
        tr.epoch_start_rng = tr.generator.get_state()
        return torch.randperm(n, generator=tr.generator)
    current = tr.generator.get_state()
    tr.generator.set_state(tr.epoch_start_rng)
    order = torch.randperm(n, generator=tr.generator)
    tr.generator.set_state(current)
    return order


def run_epoch(tr: Trainer, epoch: int) -> None:
    """Train one epoch (or what is left of it), accumulating statistics in tr.state.partial."""
    cfg, st = tr.config, tr.state
    order = _epoch_order(tr)
    bs = cfg.batch_size
    n_batches = math.ceil(len(order) / bs)
    lr = cfg.lr * lr_factor(epoch, cfg.lr_schedule, cfg.epochs, cfg.lr_milestones, cfg.lr_gamma)
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    start = time.perf_counter()
    bar = tqdm(
        range(st.batch, n_batches),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        initial=st.batch,
        total=n_batches,
        disable=not tr.progress,
        leave=False,
        dynamic_ncols=True,
    )
    for b in bar:
        idx = order[b * bs : (b + 1) * bs]
        x, y = tr.data.x_train[idx], tr.data.y_train[idx]
        if cfg.augment:
            x = random_crop_flip(x, tr.generator)
        t = epoch + b / n_batches if cfg.schedule_unit == "iteration" else float(epoch)
        stats = train_batch(tr, x.to(tr.device), y.to(tr.device), t, epoch)
        for k in SUM_KEYS:
            st.partial[k] = st.partial.get(k, 0) + stats.get(k, 0)
        st.fosc_values += stats.get("fosc", [])
        st.batch = b + 1
        st.partial["time"] = st.partial.get("time", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        bar.set_postfix(_postfix(st.partial), refresh=False)
        if tr.stop_requested:
            save(tr)
            raise Interrupted(f"stopped at epoch {epoch + 1}, batch {b + 1}; state saved")
        if tr.checkpoint_every and st.batch % tr.checkpoint_every == 0 and st.batch < n_batches:
            save(tr)
    bar.close()


def _postfix(p: dict[str, float]) -> dict[str, str]:
    n = max(p.get("n", 0), 1)
    return {
        "loss": f"{p.get('loss_sum', 0) / n:.3f}",
        "acc": f"{p.get('correct', 0) / n:.3f}",
        "steps": f"{p.get('steps_sum', 0) / n:.2f}",
    }


def epoch_row(tr: Trainer, epoch: int) -> dict[str, Any]:
    """The metrics row of a finished epoch (test metrics every eval_every epochs)."""
    cfg, st, p = tr.config, tr.state, tr.state.partial
    n = max(p.get("n", 0), 1)
    st.attack_grad_evals += int(p.get("attack_evals", 0))
    st.grad_evals += int(p.get("attack_evals", 0) + p.get("train_evals", 0))
    st.elapsed += p.get("time", 0.0)
    fosc = fosc_stats(torch.tensor(st.fosc_values, dtype=torch.float64))
    attacked = bool(st.fosc_values)
    row = {
        "epoch": epoch + 1,
        "lr": tr.optimizer.param_groups[0]["lr"],
        "train_loss": p.get("loss_sum", math.nan) / n,
        "train_acc": p.get("correct", math.nan) / n,
        "fosc_target": tr.method.fosc_target(float(epoch)),
        "fosc_mean": fosc["mean"],
        "fosc_median": fosc["median"],
        "fosc_p90": fosc["p90"],
        "steps_mean": p.get("steps_sum", 0) / n if attacked else 0.0,
        "attack_grad_evals": st.attack_grad_evals,
        "grad_evals": st.grad_evals,
        "skipped_batches": int(p.get("skipped", 0)),
        "epoch_time_s": p.get("time", 0.0),
        "time_s": st.elapsed,
    }
    if isinstance(tr.method, Dynamic):
        row["c_max"] = tr.method.c_max
    last = epoch + 1 == cfg.epochs
    if (epoch + 1) % cfg.eval_every == 0 or last:
        x, y = fixed_subset(tr.data.x_test, tr.data.y_test, cfg.eval_n)
        row.update(test_metrics(tr.model, x.to(tr.device), y.to(tr.device), cfg, cfg.seed + epoch))
    else:
        row.update(test_clean_acc=math.nan, test_robust_acc=math.nan)
    return row


def finish_epoch(tr: Trainer, row: dict[str, Any]) -> None:
    """Record the epoch: `best` first, then `last`, then the logs written from the history, so
    a crash at any point leaves files a resume makes whole again."""
    st = tr.state
    st.history.append(row)
    st.epoch, st.batch, st.partial, st.fosc_values = row["epoch"], 0, {}, []
    robust = row["test_robust_acc"]
    if not math.isnan(robust) and robust > st.best_robust:
        st.best_robust = robust
        save(tr, "best", keep_previous=False)
    save(tr)
    write_metrics(tr.run_dir, st.history)
    if tr.tensorboard is not None:
        tr.tensorboard.log(row, row["epoch"])


def summarize(tr: Trainer) -> dict[str, Any]:
    """summary.json: final and best metrics, totals."""
    history = tr.state.history
    tested = [r for r in history if not math.isnan(r["test_robust_acc"])]
    best = max(tested, key=lambda r: r["test_robust_acc"]) if tested else None
    summary = {
        "run_dir": str(tr.run_dir),
        "method": tr.config.method,
        "epochs": tr.state.epoch,
        "final": history[-1] if history else None,
        "best": best,
        "grad_evals": tr.state.grad_evals,
        "attack_grad_evals": tr.state.attack_grad_evals,
        "time_s": tr.state.elapsed,
        "eval_n": len(fixed_subset(tr.data.x_test, tr.data.y_test, tr.config.eval_n)[1]),
        "eval_attack": f"PGD-{tr.config.eval_steps} (random start, step 2.5 eps / steps)",
        "config_hash": tr.config.hash(),
    }
    if isinstance(tr.method, Dynamic):
        summary["c_max"] = tr.method.c_max
    atomic_write_json(tr.run_dir / "summary.json", summary)
    return summary


def calibrate(tr: Trainer) -> None:
    """--c-max auto: pick DAT's c_max on the initial model (see Dynamic.calibrate)."""
    if not isinstance(tr.method, Dynamic) or tr.method.c_max is not None:
        return
    n = len(tr.data.y_train)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(tr.config.seed + 2))
    pick = pick[:CALIBRATION_SAMPLES]
    x, y = tr.data.x_train[pick].to(tr.device), tr.data.y_train[pick].to(tr.device)
    gen = torch.Generator().manual_seed(tr.config.seed + 1)
    tr.state.c_max = tr.method.calibrate(tr.model, x, y, gen)
    tqdm.write(
        f"fosc: c_max auto = {tr.state.c_max:.4g} "
        f"(the {tr.config.c_max_quantile:g}-quantile of step-1 FOSC on {len(y)} training examples)",
        file=sys.stderr,
    )


def fit(tr: Trainer) -> dict[str, Any]:
    """Train until the configured epoch count; returns the summary."""
    cfg = tr.config
    tqdm.write(
        f"fosc: {cfg.method} on {cfg.dataset} ({cfg.model}), epoch {tr.state.epoch + 1} of "
        f"{cfg.epochs} -> {tr.run_dir}",
        file=sys.stderr,
    )
    calibrate(tr)
    try:
        with graceful_stop(tr):
            while tr.state.epoch < tr.config.epochs:
                epoch = tr.state.epoch
                run_epoch(tr, epoch)
                finish_epoch(tr, epoch_row(tr, epoch))
    finally:
        if tr.tensorboard is not None:
            tr.tensorboard.close()
    return summarize(tr)


def train(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_every: int = 0,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Train a model as `config` says, recording everything in run_dir; see module docstring."""
    trainer = build_trainer(
        config,
        run_dir,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        checkpoint_every=checkpoint_every,
        tensorboard=tensorboard,
    )
    return fit(trainer)
