"""Training-loop overhead, measured side by side in one run.

(a) one epoch of our `madry` training / one epoch of a minimal hand-written PGD-AT loop on the
    same model, data, batch size and PGD steps (target <= 1.05);
(b) DAT's wall-clock per epoch / madry's, next to the ratio of their gradient evaluations
    (attack + training passes): compaction makes the two agree (target: within 10%).

Run: python benchmarks/train_overhead.py [--n 1024] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
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


def our_epoch(method: str, n: int, steps: int, batch: int, seed: int, **extra) -> tuple[float, int]:
    """One epoch of fosctrain's loop (without the end-of-epoch test and checkpoint)."""
    config = resolve(
        overrides=dict(
            method=method, train_n=n, steps=steps, batch_size=batch, seed=seed, epochs=1, **extra
        )
    )
    with tempfile.TemporaryDirectory() as d:
        tr = train_mod.build_trainer(config, d, progress=False)
        train_mod.calibrate(tr)
        start = time.perf_counter()
        train_mod.run_epoch(tr, 0)
        elapsed = time.perf_counter() - start
    p = tr.state.partial
    return elapsed, int(p["attack_evals"] + p["train_evals"])


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
    runs: dict[str, list[float]] = {"hand": [], "madry": [], "dat": []}
    evals: dict[str, int] = {}
    for _ in range(args.repeats):  # interleaved, medians reported
        t, evals["hand"] = hand_written_epoch(x, y, args.steps, 0.3, args.batch, 0)
        runs["hand"].append(t)
        t, evals["madry"] = our_epoch("madry", **common)
        runs["madry"].append(t)
        t, evals["dat"] = our_epoch("dat", c_max="auto", **common)
        runs["dat"].append(t)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(
        f"mnist-cnn, {args.n} examples, batch {args.batch}, PGD-{args.steps}, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    for k in runs:
        print(f"  {k:6s} epoch {med[k]:7.2f} s   gradient evaluations {evals[k]:>8,}")
    overhead = med["madry"] / med["hand"]
    t_ratio = med["dat"] / med["madry"]
    e_ratio = evals["dat"] / evals["madry"]
    agree = abs(t_ratio / e_ratio - 1)
    print(
        f"(a) madry / hand-written epoch time: {overhead:.3f}  (target <= 1.05) "
        f"{'PASS' if overhead <= 1.05 else 'MISS'}"
    )
    print(
        f"(b) dat / madry: time {t_ratio:.3f}, gradient evaluations {e_ratio:.3f}, "
        f"disagreement {100 * agree:.1f}%  (target <= 10%) {'PASS' if agree <= 0.10 else 'MISS'}"
    )


if __name__ == "__main__":
    main()
