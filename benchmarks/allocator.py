"""What keeping freed memory (fosctrain.allocator) saves on an evaluation-sized batch.

Side by side, in fresh child processes on one torch thread, in interleaved rounds: the same
input-gradient passes of mnist-cnn (the attacks' inner loop) on a batch of 500 digits, with
glibc's default malloc thresholds and with fosctrain.allocator.keep_freed_memory(). Prints the
median seconds and kernel (sys) seconds of each, and their ratio.

    python benchmarks/allocator.py [--rounds 3] [--passes 40] [--batch 500]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, resource, sys, time, torch
from fosctrain.allocator import keep_freed_memory
from fosctrain.models import create_model
torch.set_num_threads(1)
keep = sys.argv[1] == "1"
if keep:
    keep_freed_memory()
batch, passes = int(sys.argv[2]), int(sys.argv[3])
model = create_model("mnist-cnn").eval()
for p in model.parameters():
    p.requires_grad_(False)
x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
y = torch.arange(batch) % 10
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(passes):
    xi = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(xi), y)
    torch.autograd.grad(loss, xi)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"s": time.perf_counter() - t0, "sys": r1.ru_stime - r0.ru_stime}))
"""


def child(keep: bool, batch: int, passes: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "1" if keep else "0", str(batch), str(passes)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=40)
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args()
    runs = {False: [], True: []}
    for r in range(args.rounds):
        for keep in (r % 2 == 0, r % 2 == 1):  # the order alternates
            runs[keep].append(child(keep, args.batch, args.passes))
    med = {
        k: {m: statistics.median(x[m] for x in v) for m in ("s", "sys")} for k, v in runs.items()
    }
    for keep, label in ((False, "glibc defaults"), (True, "keep_freed_memory")):
        print(f"{label:<18} {med[keep]['s']:7.2f} s  ({med[keep]['sys']:5.2f} s in the kernel)")
    print(
        f"ratio defaults / kept: {med[False]['s'] / med[True]['s']:.2f}x "
        f"({args.passes} input-gradient passes of a batch of {args.batch}, median of "
        f"{args.rounds})"
    )


if __name__ == "__main__":
    main()
