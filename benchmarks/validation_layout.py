"""What the channels-last evaluation copy (fosctrain.models.eval_copy) saves on `fosc train`'s
per-epoch validation, measured as the trainer runs it: fosctrain.validation.val_accuracy on a
trained run's model and 500 training digits, on the torch threads of the main job (2), in
wall-clock, interleaved with training steps in the default layout (as between epochs), the
default layout and channels-last alternating in each round. (The training steps move the
model's BatchNorm statistics, so it is timed, not scored.)

    python benchmarks/validation_layout.py RUN [--rounds 3] [--threads 2]

RUN: a run directory of the main job (`fosc train` with its defaults writes one).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from fosctrain import models, validation
from fosctrain.config import resolve
from fosctrain.data import load_dataset
from fosctrain.rundir import load_model


def default_layout_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.run, which="last", channels_last=False).model
    config = resolve(overrides={})
    data = load_dataset("mnist5k")
    x, y = data.x_train[:500], data.y_train[:500]
    xb, yb = data.x_train[:64], data.y_train[:64]
    opt = torch.optim.Adam(model.parameters(), 1e-6)

    def train_steps(k: int = 20) -> None:
        model.train()
        for _ in range(k):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

    copies = {"default": default_layout_copy, "channels-last": models.eval_copy}
    seconds: dict[str, list[float]] = {name: [] for name in copies}
    for _ in range(args.rounds + 1):  # the first round warms oneDNN's kernels up, not counted
        for name, make_copy in copies.items():
            validation.eval_copy = make_copy
            train_steps()
            start = time.perf_counter()
            validation.val_accuracy(model, x, y, config, seed=0)
            seconds[name].append(time.perf_counter() - start)
            print(f"{name:<14} {seconds[name][-1]:6.2f} s")
    a, b = (statistics.median(seconds[n][1:]) for n in copies)
    print(f"median of {args.rounds}, {args.threads} threads: default {a:.2f} s, "
          f"channels-last {b:.2f} s, ratio {b / a:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
