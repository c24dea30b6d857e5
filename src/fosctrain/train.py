"""The one training loop. A method (fosctrain.methods) builds each training batch and its
loss; this loop shuffles, steps the optimizer, evaluates, logs and checkpoints.

Every random draw of a run comes from one seeded torch.Generator (shuffling, random starts,
augmentation), saved in each checkpoint with the optimizer state, so an interrupted and resumed
run ends with the same weights as an uninterrupted one.

Under torchrun (or `fosc train --nproc N`) the same loop trains data-parallel: every rank holds
the same generator, takes its shard of each global batch and trains a DistributedDataParallel
wrapper of the model; the plumbing is in fosctrain.distributed, the rules in docs/DISTRIBUTED.md.
Rank 0 alone writes the run directory, and holds its lock (fosctrain.runs.RunLock) for the
whole run, so a second process on the same run refuses to start.

Numbers and splits: a fixed, stratified validation slice of `val_n` training examples (never
trained on) is evaluated after each epoch and picks `best`; the test set is evaluated once, at
the end (summary.json "test"). Every reported accuracy says which split and which PGD gave it.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fosctrain import distributed, progress
from fosctrain.attacks import Sampler, random_start
from fosctrain.checkpoint import load_latest_valid, restore, save_checkpoint
from fosctrain.config import Config, validate
from fosctrain.data import (
    Dataset,
    fixed_subset,
    hold_out_validation,
    load_dataset,
    random_crop_flip,
)
from fosctrain.device import select_device
from fosctrain.distributed import SUM_KEYS, Dist
from fosctrain.errors import UserError
from fosctrain.files import atomic_write_json
from fosctrain.fosc import fosc_stats
from fosctrain.logs import TensorBoard, write_metrics
from fosctrain.methods import Dynamic, Method, create_method, pgd_class
from fosctrain.runs import LOCK_NAME, RunLock, build_model
from fosctrain.schedules import lr_factor

CALIBRATION_SAMPLES = 512


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
    dist: Dist = field(default_factory=Dist)
    train_model: nn.Module | None = None  # what the training step runs: DDP and/or compiled
    scaler: torch.amp.GradScaler | None = None  # --amp fp16
    lock: RunLock | None = None  # held (on rank 0) from build_trainer to the end of fit

    @property
    def step_model(self) -> nn.Module:
        """The model of the training forward; attacks and evaluation use `model` itself."""
        return self.model if self.train_model is None else self.train_model

    def autocast(self) -> contextlib.AbstractContextManager:
        """--amp: autocast for the training forward and the attacks' forwards."""
        if self.config.amp is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def prepare_run_dir(run_dir: Path, config: Config, resume: bool, overwrite: bool) -> Config:
    """Create (or check, on resume) the run directory; never overwrite a run silently.

    On resume the stored configuration is used; a differing `config` is an error."""
    if resume:
        stored = _stored_config(run_dir)
        for debris in [*run_dir.glob(".*.tmp"), *run_dir.glob(".*.link")]:
            debris.unlink(missing_ok=True)  # left by a write that a crash cut short
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


def pgd_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: Config,
    seed: int,
    dist: Dist | None = None,
    split: str = "validation",
) -> dict[str, float]:
    """Clean accuracy and PGD accuracy on (x, y), the `split` it names ("validation" or
    "test"): the reporting attack, config.eval_attack() (eval_steps steps of eval_alpha, by
    default 2.5 eps / eval_steps, random start, in the training norm).

    Data-parallel, each rank evaluates its shard of every chunk of 500 (with the random starts
    a single process would draw) and the counts are summed: the same numbers, world-size times
    faster."""
    if len(y) == 0:
        return {"clean_acc": math.nan, "robust_acc": math.nan}
    dist = dist or Dist()
    pgd = pgd_class(config.norm)(
        eps=config.eps, alpha=config.eval_step_size, steps=config.eval_steps
    )
    gen = torch.Generator().manual_seed(seed)
    clean = robust = 0
    was_training = model.training
    model.eval()
    for i in range(0, len(y), 500):
        lo, hi = dist.shard(len(y[i : i + 500]))
        xb, yb = x[i + lo : i + hi], y[i + lo : i + hi]
        with torch.no_grad():
            clean += (model(xb).argmax(1) == yb).sum().item()
        sampler = dist.random_starts(lo, hi, len(y[i : i + 500]))
        x_adv = pgd(model, xb, yb, generator=gen, start=sampler).x_adv
        with torch.no_grad():
            robust += (model(x_adv).argmax(1) == yb).sum().item()
    model.train(was_training)
    clean, robust = dist.sum([clean, robust])
    return {"clean_acc": clean / len(y), "robust_acc": robust / len(y)}


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
    dist.on_main(_check_world, config, dist, len(data.y_train))
    _check_model_fits(config, data)  # before the run directory: a misfit leaves nothing behind
    if not resume:
        dist.on_main(lock.acquire)  # before --overwrite deletes anything
        config = dist.on_main(prepare_run_dir, run_dir, config, resume, overwrite)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = dist.device if dist.enabled else select_device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(config.to_dict()).to(device)
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
        _restore(trainer)
    return trainer


def load_data(config: Config) -> Dataset:
    """The run's data: the validation slice (val_n, stratified, fixed) held out of the
    training set first, then the train_n subset of what is left."""
    data = hold_out_validation(load_dataset(config.dataset, config.data_dir), config.val_n)
    data.x_train, data.y_train = fixed_subset(data.x_train, data.y_train, config.train_n)
    return data


def _check_world(config: Config, dist: Dist, n_train: int) -> None:
    """What the processes and their devices must allow (one line each)."""
    if config.sync_bn and dist.enabled and dist.device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on CPU)")
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


def _restore(tr: Trainer) -> None:
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
    tr.state = RunState(**json.loads(saved["run"]))
    tr.generator.set_state(saved["rng"])
    tr.epoch_start_rng = saved["epoch_rng"]
    torch.set_rng_state(saved["torch_rng"])
    if isinstance(tr.method, Dynamic) and tr.state.c_max is not None:
        tr.method.c_max = tr.state.c_max


def save(tr: Trainer, name: str = "last", keep_previous: bool = True) -> None:
    """Rank 0 writes the checkpoint (of the unwrapped model: no DDP "module." prefixes); the
    other ranks wait for it, so none runs ahead of a checkpoint."""
    if tr.dist.is_main:
        state = {
            "run": json.dumps(tr.state.__dict__),
            "rng": tr.generator.get_state(),
            "epoch_rng": tr.epoch_start_rng,
            "torch_rng": torch.get_rng_state(),
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


def train_batch(
    tr: Trainer,
    x: Tensor,
    y: Tensor,
    t: float,
    epoch: int,
    global_n: int | None = None,
    start: Sampler = random_start,
) -> dict[str, Any]:
    """One optimizer step on the batch the method builds from (x, y); returns its statistics.

    Data-parallel, (x, y) is this rank's shard of a global batch of `global_n` rows: the
    attack runs on the plain module, the training forward through DDP (tr.step_model)."""
    with tr.autocast():
        result = tr.method.make_batch(tr.model, x, y, t, tr.generator, start)
    x_adv = x if result is None else result.x_adv
    tr.step_model.train()
    with tr.autocast():
        losses, logits = tr.method.loss(tr.step_model, x, x_adv, y, epoch)
    loss = losses.float().mean()
    scale = 1.0 if global_n is None else tr.dist.loss_scale(len(y), global_n)
    if scale != 1:  # uneven shards: DDP's average is then the global-batch mean's gradient
        loss = loss * scale
    if not tr.dist.all_true(bool(torch.isfinite(loss))):  # every rank skips, or none
        if tr.config.skip_nonfinite:  # the attack's cost was spent all the same
            return {"skipped": 1, "attack_evals": 0 if result is None else result.grad_evals}
        raise distributed.shared(
            TrainingError(
                f"non-finite training loss ({loss.item()}) at epoch {epoch + 1}; the last good "
                f"checkpoint in {tr.run_dir} is kept (lower --lr, or --skip-nonfinite)"
            )
        )
    tr.optimizer.zero_grad(set_to_none=True)
    if tr.scaler is None:
        loss.backward()
        tr.optimizer.step()
    else:
        tr.scaler.scale(loss).backward()
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
    if not tr.config.sync_bn:
        tr.dist.average_buffers(tr.model)
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
    bar = progress.bar(
        range(st.batch, n_batches),
        enabled=tr.progress,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        initial=st.batch,
        total=n_batches,
        leave=False,
        dynamic_ncols=True,
    )
    for b in bar:
        idx = order[b * bs : (b + 1) * bs]
        x, y = tr.data.x_train[idx], tr.data.y_train[idx]
        if cfg.augment:
            x = random_crop_flip(x, tr.generator)
        t = epoch + b / n_batches if cfg.schedule_unit == "iteration" else float(epoch)
        lo, hi = tr.dist.shard(len(idx))  # this rank's rows of the global batch (all of them)
        x, y = x[lo:hi].to(tr.device), y[lo:hi].to(tr.device)
        sampler = tr.dist.random_starts(lo, hi, len(idx))
        stats = train_batch(tr, x, y, t, epoch, len(idx), sampler)
        stats, stop = tr.dist.reduce_batch(stats, lo, hi, len(idx), tr.stop_requested)
        for k in SUM_KEYS:
            st.partial[k] = st.partial.get(k, 0) + stats.get(k, 0)
        st.fosc_values += stats.get("fosc", [])
        st.batch = b + 1
        st.partial["time"] = st.partial.get("time", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        bar.set_postfix(_postfix(st.partial), refresh=False)
        if stop:
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
    """The metrics row of a finished epoch (validation metrics every eval_every epochs)."""
    cfg, st, p = tr.config, tr.state, tr.state.partial
    n = max(p.get("n", 0), 1)
    if not p.get("n"):  # every batch skipped: no loss or accuracy to report
        p["loss_sum"] = p["correct"] = math.nan
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
    val = {"clean_acc": math.nan, "robust_acc": math.nan}
    if cfg.val_n and ((epoch + 1) % cfg.eval_every == 0 or last):
        x, y = tr.data.x_val.to(tr.device), tr.data.y_val.to(tr.device)
        val = pgd_accuracy(tr.model, x, y, cfg, cfg.seed + epoch, tr.dist)
    row.update(val_clean_acc=val["clean_acc"], val_robust_acc=val["robust_acc"])
    return row


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The one line of progress an epoch leaves (always, also where no bar is drawn)."""
    val = (
        f"val clean {row['val_clean_acc']:.3f} robust {row['val_robust_acc']:.3f}"
        if not math.isnan(row["val_robust_acc"])
        else "val -"
    )
    return (
        f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} "
        f"steps {row['steps_mean']:.2f} | {val} | {row['epoch_time_s']:.1f} s"
    )


def finish_epoch(tr: Trainer, row: dict[str, Any]) -> None:
    """Record the epoch: `best` first, then `last`, then the logs written from the history, so
    a crash at any point leaves files a resume makes whole again."""
    st = tr.state
    st.history.append(row)
    st.epoch, st.batch, st.partial, st.fosc_values = row["epoch"], 0, {}, []
    robust = row["val_robust_acc"]
    if not math.isnan(robust) and robust > st.best_robust:
        st.best_robust = robust
        save(tr, "best")
    save(tr)
    if tr.dist.is_main:
        write_metrics(tr.run_dir, st.history)
        if tr.progress:
            progress.line(epoch_line(row, tr.config.epochs))
    if tr.tensorboard is not None:
        tr.tensorboard.log(row, row["epoch"])


def summarize(tr: Trainer) -> dict[str, Any]:
    """summary.json: final and best epochs (validation), the one test evaluation, totals."""
    history = tr.state.history
    validated = [r for r in history if not math.isnan(r["val_robust_acc"])]
    best = max(validated, key=lambda r: r["val_robust_acc"]) if validated else None
    cfg = tr.config
    x, y = fixed_subset(tr.data.x_test, tr.data.y_test, cfg.final_eval_n)
    x, y = x.to(tr.device), y.to(tr.device)
    final_test = pgd_accuracy(tr.model, x, y, cfg, cfg.seed, tr.dist, split="test")
    n_val = len(tr.data.y_val) if tr.data.y_val is not None else 0
    summary = {
        "run_dir": str(tr.run_dir),
        "method": tr.config.method,
        "epochs": tr.state.epoch,
        "final": history[-1] if history else None,
        "best": best,
        "grad_evals": tr.state.grad_evals,
        "attack_grad_evals": tr.state.attack_grad_evals,
        "time_s": tr.state.elapsed,
        "validation": {
            "n": n_val,
            "split": f"validation slice of {n_val} training examples (fixed, stratified, not "
            "trained on)"
            if n_val
            else "none (val_n 0): no per-epoch validation and no best checkpoint",
            "metrics": ["val_clean_acc", "val_robust_acc"],
            "best_by": "val_robust_acc" if n_val else None,
            "attack": cfg.eval_attack(),
        },
        "test": {
            "n": len(y),
            "split": f"the {len(y)} test examples, evaluated once, on the final model",
            "clean_acc": final_test["clean_acc"],
            "robust_acc": final_test["robust_acc"],
            "attack": cfg.eval_attack(),
            "steps": cfg.eval_steps,
            "step_size": cfg.eval_step_size,
            "random_start": True,
            "norm": cfg.norm,
        },
        "config_hash": tr.config.hash(),
    }
    if isinstance(tr.method, Dynamic):
        summary["c_max"] = tr.method.c_max
    if tr.dist.is_main:
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
    tr.state.c_max = tr.method.calibrate(tr.model, x, y, gen)  # the same on every rank
    if not tr.dist.is_main:
        return
    progress.line(
        f"fosc: c_max auto = {tr.state.c_max:.4g} "
        f"(the {tr.config.c_max_quantile:g}-quantile of step-1 FOSC on {len(y)} training examples)"
    )


def fit(tr: Trainer) -> dict[str, Any]:
    """Train until the configured epoch count; returns the summary."""
    cfg = tr.config
    if tr.dist.is_main:
        procs = f", {tr.dist.world} processes" if tr.dist.enabled else ""
        progress.line(
            f"fosc: {cfg.method} on {cfg.dataset} ({cfg.model}{procs}), epoch "
            f"{tr.state.epoch + 1} of {cfg.epochs} -> {tr.run_dir}"
        )
    try:
        calibrate(tr)
        with graceful_stop(tr):
            while tr.state.epoch < tr.config.epochs:
                epoch = tr.state.epoch
                run_epoch(tr, epoch)
                finish_epoch(tr, epoch_row(tr, epoch))
        if tr.dist.is_main and tr.state.history:  # a crash may have cut the last write short
            write_metrics(tr.run_dir, tr.state.history)
        return summarize(tr)
    finally:
        if tr.tensorboard is not None:
            tr.tensorboard.close()
        if tr.lock is not None:
            tr.lock.release()


def train(config: Config, run_dir: str | Path, **options: Any) -> dict[str, Any]:
    """Train a model as `config` says, recording everything in run_dir; see module docstring.
    `options` are build_trainer's: resume, overwrite, progress, checkpoint_every, tensorboard.

    Started by torchrun (env WORLD_SIZE > 1), this process is one rank of a data-parallel run.
    """
    with distributed.session(select_device(config.device)) as dist:
        return fit(build_trainer(config, run_dir, dist=dist, **options))
