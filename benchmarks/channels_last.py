"""What the channels-last memory layout (Config.channels_last, fosctrain.models.set_layout)
saves on CPU, side by side in one process on one torch thread, in interleaved rounds.

Three workloads of each model, in the default layout and in channels-last:
- attack: an input-gradient pass with frozen weights on a batch of 500 (evaluation's attacks),
- train-attack: an input-gradient pass on a training batch of 64 (DAT's and PGD-AT's inner loop),
- train: a training step on 64 (forward, backward to the weights, Adam).
Prints CPU milliseconds per example (median over rounds) and the ratio channels-last / default
(below 1: channels-last is faster); with --threads N > 1, wall-clock milliseconds instead (CPU
time would add the threads up), which is what `fosc train` on 2 cores waits for. Then, with
--run, both layouts train `fosc train`'s default run for --epochs epochs on one thread (no
validation, no report) and print their training CPU seconds and ratio.

    python benchmarks/channels_last.py [--rounds 5] [--models mnist-cnn cifar-cnn8] [--run]
                                       [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fosctrain.models import create_model, set_layout

SHAPES = {"mnist-cnn": (1, 28, 28), "cifar-cnn8": (3, 32, 32)}


def workloads(name: str, channels_last: bool) -> dict[str, tuple[Callable[[], None], int]]:
    """Each workload as (one call, examples per call), on a fresh model in the layout."""
    torch.manual_seed(0)
    model = set_layout(create_model(name), channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    frozen = set_layout(create_model(name), channels_last).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    big = torch.rand(500, *SHAPES[name], generator=gen)
    small = torch.rand(64, *SHAPES[name], generator=gen)
    y_big, y_small = torch.arange(500) % 10, torch.arange(64) % 10

    def input_grad(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(nn.functional.cross_entropy(m(xi), y), xi)

    def train_step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(small), y_small).backward()
        opt.step()

    def train_attack() -> None:
        model.eval()
        input_grad(model, small, y_small)
        model.train()

    return {
        "attack": (lambda: input_grad(frozen, big, y_big), 500),
        "train-attack": (train_attack, 64),
        "train": (train_step, 64),
    }


def ms_per_example(call: Callable[[], None], n: int, reps: int, clock=time.process_time) -> float:
    call()  # warm-up: oneDNN picks and caches its kernels on the first call
    start = clock()
    for _ in range(reps):
        call()
    return (clock() - start) / reps / n * 1e3


def compare_passes(name: str, rounds: int, clock=time.process_time) -> None:
    reps = 10 if name == "mnist-cnn" else 3
    layouts = {False: workloads(name, False), True: workloads(name, True)}
    for work in layouts[False]:
        ms: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for cl in (False, True):
                call, n = layouts[cl][work]
                ms[cl].append(ms_per_example(call, n, reps, clock))
        a, b = statistics.median(ms[False]), statistics.median(ms[True])
        print(f"{name:<11} {work:<13} {a:9.3f} {b:13.3f} {b / a:7.2f}")


def compare_runs(epochs: int) -> None:
    """Training CPU seconds of the main job's run in both layouts (validation and report off)."""
    from fosctrain.config import resolve
    from fosctrain.train import train

    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cl in (False, True):
            config = resolve(
                overrides=dict(
                    epochs=epochs, lr_milestones=[epochs], threads=1, channels_last=cl,
                    eval_every=epochs + 1, final_eval_n=10, test_attack="none",
                )
            )  # fmt: skip
            summary = train(config, Path(tmp) / str(cl), progress=False)
            seconds[cl] = summary["cpu_s"]  # training only: validation and the report apart
            print(f"fosc train, {epochs} epochs, channels_last={cl}: {seconds[cl]:.1f} CPU s "
                  f"of training, {summary['grad_evals']:,} gradient evaluations")  # fmt: skip
    print(f"ratio channels-last / default: {seconds[True] / seconds[False]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=["mnist-cnn"], choices=sorted(SHAPES))
    ap.add_argument("--run", action="store_true", help="also train the main job's run")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the passes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock, unit = (time.process_time, "CPU") if args.threads == 1 else (time.perf_counter, "wall")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {unit} ms per example, "
          f"median of {args.rounds}")  # fmt: skip
    print(f"{'model':<11} {'workload':<13} {'default':>9} {'channels-last':>13} {'ratio':>7}")
    for name in args.models:
        compare_passes(name, args.rounds, clock)
    if args.run:
        torch.set_num_threads(1)
        compare_runs(args.epochs)


if __name__ == "__main__":
    main()
