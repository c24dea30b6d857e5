"""Training-loop overhead, measured side by side in one run.

(a) one epoch of our `madry` training / one epoch of a minimal hand-written PGD-AT loop on the
    same model, data, batch size and PGD steps (target <= 1.05);
(b) DAT's wall-clock per epoch / madry's, next to the ratio of their gradient evaluations
    (attack + training passes), and the same two ratios for the attacks alone (the time spent
    building the training batches / the attacks' evaluations): compaction makes each pair
    agree (target: within 5%). The epoch pair also differs by what a training pass costs
    against an attack evaluation (both count as one evaluation per row), printed as well.

Variants run in interleaved rounds (the order rotates), medians reported; wall-clock and
process CPU time side by side (CPU time is the steadier one on a busy machine, with
--threads 1 only: with more threads it also counts OpenMP spin-waiting).

Run: python benchmarks/train_overhead.py [--n 1024] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from fosctrain import train as train_mod
from fosctrain.config import resolve
from fosctrain.data import fixed_subset, load_mnist5k
from fosctrain.models import create_model


def hand_written_epoch(x, y, steps: int, eps: float, batch: int, seed: int) -> tuple[float, int]:
    """The textbook PGD-AT epoch: eval-mode PGD with random start, then one SGD step."""
    torch.manual_seed(seed)
    model = create_model("mnist-cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    alpha = eps / 4
    start = time.perf_counter()
    order = torch.randperm(len(y), generator=gen)
    evals = 0
    for i in range(0, len(y), batch):
        xb, yb = x[order[i : i + batch]], y[order[i : i + batch]]
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        xa = (xb + (torch.rand(xb.shape, generator=gen) * 2 - 1) * eps).clamp(0, 1)
        for _ in range(steps):
            xa.requires_grad_(True)
            loss = F.cross_entropy(model(xa), yb, reduction="sum")
            (g,) = torch.autograd.grad(loss, xa)
            xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), xb - eps), xb + eps).clamp(
                0, 1
            )
        evals += steps * len(yb)
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(xa), yb).backward()
        opt.step()
        evals += len(yb)
    return time.perf_counter() - start, evals


class Timed:
    """Wraps a method's make_batch and sums the wall-clock and CPU time it takes."""

    def __init__(self, fn) -> None:
        self.fn, self.wall, self.cpu = fn, 0.0, 0.0

    def __call__(self, *args, **kwargs):
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.wall += time.perf_counter() - t0
            self.cpu += time.process_time() - c0


def our_epoch(method: str, n: int, steps: int, batch: int, seed: int, **extra) -> dict[str, float]:
    """One epoch of fosctrain's loop (without the end-of-epoch test and checkpoint): its wall
    and CPU time, the part spent in the attacks, and the evaluations of each."""
    config = resolve(
        overrides=dict(
            method=method, train_n=n, steps=steps, batch_size=batch, seed=seed, epochs=1, **extra
        )
    )
    with tempfile.TemporaryDirectory() as d:
        tr = train_mod.build_trainer(config, d, progress=False)
        train_mod.calibrate(tr)
        timed = Timed(tr.method.make_batch)
        tr.method.make_batch = timed  # an instance attribute of this benchmark's own trainer
        c0, t0 = time.process_time(), time.perf_counter()
        train_mod.run_epoch(tr, 0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    p = tr.state.partial
    return {
        "wall": wall,
        "cpu": cpu,
        "attack_wall": timed.wall,
        "attack_cpu": timed.cpu,
        "evals": int(p["attack_evals"] + p["train_evals"]),
        "attack_evals": int(p["attack_evals"]),
        "train_evals": int(p["train_evals"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="training examples per epoch")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist5k()
    x, y = fixed_subset(data.x_train, data.y_train, args.n)
    common = dict(n=args.n, steps=args.steps, batch=args.batch, seed=0)

    def hand() -> dict[str, float]:
        c0 = time.process_time()
        wall, evals = hand_written_epoch(x, y, args.steps, 0.3, args.batch, 0)
        return {"wall": wall, "cpu": time.process_time() - c0, "evals": evals}

    variants = {
        "hand": hand,
        "madry": lambda: our_epoch("madry", **common),
        "dat": lambda: our_epoch("dat", c_max="auto", **common),
    }
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.repeats):  # interleaved, the order rotating; medians reported
        for k in names[r % 3 :] + names[: r % 3]:
            runs[k].append(variants[k]())
    load_after = os.getloadavg()[0]

    def med(k: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[k])

    print(
        f"mnist-cnn, {args.n} examples, batch {args.batch}, PGD-{args.steps}, "
        f"{args.threads} threads, median of {args.repeats} interleaved rounds; "
        f"load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores"
    )
    for k in runs:
        print(
            f"  {k:6s} epoch {med(k, 'wall'):7.2f} s wall {med(k, 'cpu'):7.2f} s cpu   "
            f"gradient evaluations {runs[k][0]['evals']:>8,}"
        )
    for clock in ("wall", "cpu"):
        overhead = med("madry", clock) / med("hand", clock)
        print(
            f"(a) {clock:4s} madry / hand-written epoch time: {overhead:.3f}  (target <= 1.05) "
            f"{'PASS' if overhead <= 1.05 else 'MISS'}"
        )
    print(f"(b) dat / madry{'':22s}time   evaluations   time/evaluations")
    m, d = runs["madry"][0], runs["dat"][0]
    shares = {
        "epoch": ("", d["evals"] / m["evals"]),
        "attacks only": ("attack_", d["attack_evals"] / m["attack_evals"]),
    }
    for label, (prefix, e_ratio) in shares.items():
        for clock in ("wall", "cpu"):
            t_ratio = med("dat", prefix + clock) / med("madry", prefix + clock)
            gap = t_ratio / e_ratio - 1
            print(
                f"    {label:12s} {clock:4s}{'':13s}{t_ratio:6.3f} {e_ratio:13.3f} {1 + gap:18.3f}"
                f"  (target within 5%) {'PASS' if abs(gap) <= 0.05 else 'MISS'}"
            )
    for clock in ("wall", "cpu"):
        attack_row = med("madry", "attack_" + clock) / m["attack_evals"]
        train_row = (med("madry", clock) - med("madry", "attack_" + clock)) / m["train_evals"]
        print(
            f"    madry's training pass + loop per row / attack evaluation per row ({clock}): "
            f"{train_row / attack_row:.2f} (the rest of the epoch's gap)"
        )


if __name__ == "__main__":
    main()
