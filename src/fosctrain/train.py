"""The one training loop. A method (fosctrain.methods) builds each training batch and its
loss; this loop shuffles, steps the optimizer, evaluates and logs, the same way for every
method. The run around it (directory, lock, resume, checkpoints, signals, summary) is
fosctrain.trainer's.

    fit:          calibrate the method, then per epoch run_epoch and finish_epoch, then summarize
    run_epoch:    shuffle, then train_batch on each batch (checkpointing on request)
    train_batch:  method.step, then the optimizer step; each concern (autocast, the
                  data-parallel loss scale, the non-finite check, GradScaler, buffer
                  averaging) is a named helper below

Under torchrun (or `fosc train --nproc N`) the same loop trains data-parallel: every rank holds
the same generator, takes its shard of each global batch and trains a DistributedDataParallel
wrapper of the model; the plumbing is in fosctrain.distributed, the rules in docs/DISTRIBUTED.md.

Numbers and splits: a fixed, stratified validation slice of `val_n` training examples (never
trained on) is evaluated after each epoch and picks `best`; the test set is evaluated once, at
the end (summary.json "test"). Every reported accuracy says which split and which attack gave
it; the attacks are fosctrain.validation's (val_attack, test_attack).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fosctrain import distributed, progress
from fosctrain.attacks import Sampler, random_start
from fosctrain.checkpoint import save_checkpoint
from fosctrain.config import Config
from fosctrain.data import AUGMENTATIONS, fixed_subset
from fosctrain.device import select_device
from fosctrain.distributed import SUM_KEYS
from fosctrain.errors import UserError
from fosctrain.fosc import fosc_stats
from fosctrain.logs import write_csv, write_metrics
from fosctrain.methods import Step
from fosctrain.rundir import BUDGET_LOG, budget_name
from fosctrain.schedules import lr_factor
from fosctrain.trainer import (
    Interrupted,
    Trainer,
    build_trainer,
    graceful_stop,
    save,
    write_summary,
)
from fosctrain.validation import final_accuracy, require_backend, val_accuracy

CALIBRATION_SAMPLES = 512


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


# --------------------------------------------------------------------------- one batch


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
    with autocast(tr):
        step = tr.method.step(tr.model, x, y, t, tr.generator, start, tr.step_model)
    if step.note is not None and tr.dist.is_main:
        progress.line(f"fosc: {step.note}")
    loss = scaled_for_shards(tr, step.losses.float().mean(), len(y), global_n)
    if not finite_on_every_rank(tr, loss):
        return skip_or_stop(tr, step, loss, epoch)
    tr.optimizer.zero_grad(set_to_none=True)
    backward_and_step(tr, loss)
    average_buffers(tr)
    return batch_stats(step, y)


def autocast(tr: Trainer) -> contextlib.AbstractContextManager:
    """--amp: autocast for the training forward and the attacks' forwards."""
    if tr.config.amp is None:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if tr.config.amp == "bf16" else torch.float16
    return torch.autocast(tr.device.type, dtype=dtype)


def scaled_for_shards(tr: Trainer, loss: Tensor, n: int, global_n: int | None) -> Tensor:
    """Data-parallel with uneven shards, the loss scaled so that DDP's average of the ranks'
    gradients is the gradient of the global batch's mean loss."""
    scale = 1.0 if global_n is None else tr.dist.loss_scale(n, global_n)
    return loss if scale == 1 else loss * scale


def finite_on_every_rank(tr: Trainer, loss: Tensor) -> bool:
    """Whether the loss is finite on every rank, so that every rank skips a batch, or none."""
    return tr.dist.all_true(bool(torch.isfinite(loss)))


def skip_or_stop(tr: Trainer, step: Step, loss: Tensor, epoch: int) -> dict[str, Any]:
    """A non-finite loss: --skip-nonfinite skips the batch (its attack's cost counted all the
    same); otherwise training stops, the last good checkpoint kept."""
    if tr.config.skip_nonfinite:
        return {"skipped": 1, "attack_evals": 0 if step.result is None else step.result.grad_evals}
    raise distributed.shared(
        TrainingError(
            f"non-finite training loss ({loss.item()}) at epoch {epoch + 1}; the last good "
            f"checkpoint in {tr.run_dir} is kept (lower --lr, or --skip-nonfinite)"
        )
    )


def backward_and_step(tr: Trainer, loss: Tensor) -> None:
    """loss.backward() and the optimizer step; with --amp fp16 through the GradScaler."""
    if tr.scaler is None:
        loss.backward()
        tr.optimizer.step()
    else:
        tr.scaler.scale(loss).backward()
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()


def average_buffers(tr: Trainer) -> None:
    """Data-parallel without --sync-bn: the ranks' BatchNorm statistics averaged, so that
    every rank holds the same model."""
    if not tr.config.sync_bn:
        tr.dist.average_buffers(tr.model)


def batch_stats(step: Step, y: Tensor) -> dict[str, Any]:
    """The batch's statistics that the epoch sums (distributed.SUM_KEYS) and its FOSC values."""
    stats = {
        "loss_sum": step.losses.detach().sum().item(),
        "correct": (step.logits.detach().argmax(1) == y).sum().item(),
        "n": len(y),
        "train_evals": step.train_evals,
    }
    if step.result is not None:
        stats["attack_evals"] = step.result.grad_evals
        stats["steps_sum"] = step.result.steps.sum().item()
        stats["stopped_sum"] = step.result.stopped.sum().item()
        stats["fosc"] = step.result.fosc.tolist()
    return stats


# --------------------------------------------------------------------------- one epoch


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
    order = _epoch_order(tr)
    n_batches = math.ceil(len(order) / tr.config.batch_size)
    bar = _progress_bar(tr, epoch, n_batches)
    clock = _now()
    for b in bar:
        set_lr(tr, epoch, epoch * n_batches + b)
        x, y, t, (lo, hi, n) = batch_shard(tr, order, epoch, b, n_batches)
        stats = train_batch(tr, x, y, t, epoch, n, tr.dist.random_starts(lo, hi, n))
        stats, stop = tr.dist.reduce_batch(stats, lo, hi, n, tr.stop_requested)
        clock = record_batch(tr, b, stats, clock)
        if keep_budgets(tr, epoch, b):
            clock = _now()  # the checkpoint's write is not training time
        bar.set_postfix(_postfix(tr.state.partial), refresh=False)
        if stop:
            save(tr)
            raise Interrupted(f"stopped at epoch {epoch + 1}, batch {b + 1}; state saved")
        if tr.checkpoint_every and (b + 1) % tr.checkpoint_every == 0 and b + 1 < n_batches:
            save(tr)
    bar.close()


def set_lr(tr: Trainer, epoch: int, iteration: int) -> None:
    """The learning rate of an iteration: the epoch's schedule, over 1 + lr_decay x iteration
    (Keras' per-iteration SGD decay; a pure function of the two, so resuming needs no state)."""
    cfg = tr.config
    lr = cfg.lr * lr_factor(epoch, cfg.lr_schedule, cfg.epochs, cfg.lr_milestones, cfg.lr_gamma)
    lr /= 1 + cfg.lr_decay * iteration
    for group in tr.optimizer.param_groups:
        group["lr"] = lr


def batch_shard(
    tr: Trainer, order: Tensor, epoch: int, b: int, n_batches: int
) -> tuple[Tensor, Tensor, float, tuple[int, int, int]]:
    """Batch b of the epoch: this rank's rows (x, y) on the device (augmented with --augment),
    the training time t, and (lo, hi, n): the rows' place in the global batch of n."""
    cfg = tr.config
    idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
    x, y = tr.data.x_train[idx], tr.data.y_train[idx]
    if cfg.augment:
        x = AUGMENTATIONS[cfg.augment_style](x, tr.generator)
    t = epoch + b / n_batches if cfg.schedule_unit == "iteration" else float(epoch)
    lo, hi = tr.dist.shard(len(idx))  # this rank's rows of the global batch (all of them)
    return x[lo:hi].to(tr.device), y[lo:hi].to(tr.device), t, (lo, hi, len(idx))


def _now() -> tuple[float, float]:
    """Wall-clock and this process's CPU seconds (the second is what a shared machine's other
    load inflates least)."""
    return time.perf_counter(), time.process_time()


def record_batch(
    tr: Trainer, b: int, stats: dict[str, Any], clock: tuple[float, float]
) -> tuple[float, float]:
    """Add a batch's (all-rank) statistics, wall-clock and CPU seconds to the epoch's; returns
    the new clock."""
    st = tr.state
    for k in SUM_KEYS:
        st.partial[k] = st.partial.get(k, 0) + stats.get(k, 0)
    st.fosc_values += stats.get("fosc", [])
    st.batch = b + 1
    now = _now()
    st.partial["time"] = st.partial.get("time", 0.0) + now[0] - clock[0]
    st.partial["cpu"] = st.partial.get("cpu", 0.0) + now[1] - clock[1]
    return now


def keep_budgets(tr: Trainer, epoch: int, b: int) -> bool:
    """--budget-every E: once the run has spent another multiple of E gradient evaluations,
    keep the model as checkpoint budget-N (N the multiple) with the evaluations, training
    seconds and training CPU seconds actually spent (budgets.csv), for time-to-robustness
    curves. Checked after each batch, so a checkpoint lands within one batch's evaluations
    past its budget. Returns whether it kept one."""
    every, st = tr.config.budget_every, tr.state
    if not every:
        return False
    kept = len(st.budgets)
    p = st.partial
    spent = st.grad_evals + int(p.get("attack_evals", 0) + p.get("train_evals", 0))
    seconds = st.elapsed + p.get("time", 0.0)
    cpu = st.cpu_elapsed + p.get("cpu", 0.0)
    while spent >= every * (len(st.budgets) + 1):
        budget = every * (len(st.budgets) + 1)
        st.budgets.append(
            {
                "budget": budget,
                "grad_evals": spent,
                "time_s": seconds,
                "cpu_s": cpu,
                "epoch": epoch + 1,
                "batch": b + 1,
            }  # fmt: skip
        )
        if tr.dist.is_main:
            save_checkpoint(
                tr.run_dir, budget_name(budget), model=tr.model, config_hash=tr.config.hash(),
                state={"budget": json.dumps(st.budgets[-1])}, keep_previous=False,
            )  # fmt: skip
            write_csv(tr.run_dir / BUDGET_LOG, st.budgets)
    if len(st.budgets) == kept:
        return False
    tr.dist.barrier()
    return True


def _progress_bar(tr: Trainer, epoch: int, n_batches: int):
    """The epoch's bar (a plain iterator of batch indices where no bar is drawn)."""
    return progress.bar(
        range(tr.state.batch, n_batches),
        enabled=tr.progress,
        desc=f"epoch {epoch + 1}/{tr.config.epochs}",
        initial=tr.state.batch,
        total=n_batches,
        leave=False,
        dynamic_ncols=True,
    )


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
    st.cpu_elapsed += p.get("cpu", 0.0)
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
        "stopped_frac": p.get("stopped_sum", 0) / n if attacked else math.nan,
        "attack_grad_evals": st.attack_grad_evals,
        "grad_evals": st.grad_evals,
        "skipped_batches": int(p.get("skipped", 0)),
        "epoch_time_s": p.get("time", 0.0),
        "time_s": st.elapsed,
    }
    row.update(tr.method.extra_metrics())
    last = epoch + 1 == cfg.epochs
    val = {"clean_acc": math.nan, "robust_acc": math.nan}
    clock = time.perf_counter()
    if cfg.val_n and ((epoch + 1) % cfg.eval_every == 0 or last):
        x, y = tr.data.x_val.to(tr.device), tr.data.y_val.to(tr.device)
        val = val_accuracy(tr.model, x, y, cfg, cfg.seed + epoch, tr.dist)
    row.update(val_clean_acc=val["clean_acc"], val_robust_acc=val["robust_acc"])
    row["val_time_s"] = time.perf_counter() - clock  # where the main job's time goes
    return row


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The one line of progress an epoch leaves (always, also where no bar is drawn)."""
    val = (
        f"val clean {row['val_clean_acc']:.3f} robust {row['val_robust_acc']:.3f}"
        if not math.isnan(row["val_robust_acc"])
        else "val -"
    )
    frac = row.get("stopped_frac", math.nan)
    stopped = "" if math.isnan(frac) else f" (stopped early {frac:.0%})"
    return (
        f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} "
        f"steps {row['steps_mean']:.2f}{stopped} | {val} | {row['epoch_time_s']:.1f} s"
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


# --------------------------------------------------------------------------- the whole run


def summarize(tr: Trainer) -> dict[str, Any]:
    """The one test evaluation (final model, final_eval_n test examples: clean, PGD and the
    AutoAttack-strength test_attack on the same ones), into summary.json."""
    cfg = tr.config
    x, y = fixed_subset(tr.data.x_test, tr.data.y_test, cfg.final_eval_n)
    x, y = x.to(tr.device), y.to(tr.device)
    clock = time.perf_counter()
    test = final_accuracy(tr.model, x, y, cfg, cfg.seed, tr.dist)
    return write_summary(tr, {**test, "time_s": time.perf_counter() - clock}, len(y))


def calibrate(tr: Trainer) -> None:
    """Let the method fit itself to the initial model (DAT's --c-max auto) on a fixed sample
    of CALIBRATION_SAMPLES training examples; a resumed method keeps its restored state."""
    n = len(tr.data.y_train)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(tr.config.seed + 2))
    pick = pick[:CALIBRATION_SAMPLES]
    x, y = tr.data.x_train[pick].to(tr.device), tr.data.y_train[pick].to(tr.device)
    gen = torch.Generator().manual_seed(tr.config.seed + 1)
    line = tr.method.calibrate(tr.model, x, y, gen)  # the same on every rank
    if line is not None and tr.dist.is_main:
        progress.line(f"fosc: {line}")


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
    require_backend(config)  # before the run directory exists: nothing to clean up
    with distributed.session(select_device(config.device)) as dist:
        return fit(build_trainer(config, run_dir, dist=dist, **options))
