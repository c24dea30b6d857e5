"""Should `fosc train`'s default train on full MNIST instead of mnist5k, for the same minutes?

Two candidates, each seed trained with the CLI:

    fosc train --runs-dir OUT --name 5k-sS --seed S --no-progress                (today's)
    fosc train --runs-dir OUT --name full-sS --seed S --no-progress \\
        --dataset mnist --epochs 1 --schedule-unit iteration                     (one epoch)

One epoch of full MNIST (59,500 digits) is ~85% of the main job's 20 epochs of 3,500 digits in
training examples, so the full-MNIST candidate gets slightly less training, not more.

They are compared on digits neither trained on and which are not test digits: full MNIST's
validation slice (the 500 training digits every full-MNIST run holds out) less those among
mnist5k's 4,000 training digits (mnist5k is a subset of MNIST's training set). The decision's
yardstick is the main job's AutoAttack-strength attack, APGD-CE + APGD-T (100 steps each, the 3
most likely targets). After the decision, the same attack on the first N test digits of full
MNIST (class-interleaved; neither candidate trained on them) is the report.

    python experiments/main_job_data.py OUT [TEST_N] > table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fosctrain import autoattack as aa
from fosctrain.data import fixed_subset, hold_out_validation, load_dataset, load_mnist5k
from fosctrain.rundir import load_model

SEED, TARGETS, VAL_N = 0, 3, 500


def _keys(x: torch.Tensor) -> list[bytes]:
    """Each image as the bytes of its 8-bit pixels (equal digits give equal keys)."""
    return [r.tobytes() for r in (x * 255).round().to(torch.uint8).flatten(1).numpy()]


def common_validation() -> tuple[torch.Tensor, torch.Tensor]:
    """Full MNIST's validation slice less the digits mnist5k's runs trained on."""
    full = hold_out_validation(load_dataset("mnist"), VAL_N)
    seen = set(_keys(load_mnist5k().x_train))
    keep = torch.tensor([k not in seen for k in _keys(full.x_val)])
    return full.x_val[keep], full.y_val[keep]


def strong_accuracy(model, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """APGD-CE + APGD-T (3 targets) robust accuracy, as `fosc train` reports it."""
    suite = aa.build_suite(model, "apgd", eps, "linf", 10, SEED, aa.STEPS, TARGETS)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    stages = aa.run_suite(model, suite, x, y, clean, 500)
    return list(stages.values())[-1].robust.double().mean().item()


def main(out: Path, test_n: int) -> None:
    torch.set_num_threads(1)
    xv, yv = common_validation()
    data = load_dataset("mnist")
    xt, yt = fixed_subset(data.x_test, data.y_test, test_n)
    print(f"validation: {len(yv)} digits of full MNIST's validation slice that mnist5k's runs")
    print(f"never trained on; report: the first {test_n} test digits of full MNIST\n")
    print("| run | CPU s | training s (wall) | of which validation | test report s | "
          f"val APGD-CE+T ({len(yv)}) | test APGD-CE+T ({test_n}) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in sorted(p for p in (out / "runs").iterdir() if (p / "summary.json").is_file()):
        summary = json.loads((run / "summary.json").read_text())
        model = load_model(run, "last").model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        eps = json.loads((run / "config.json").read_text())["eps"]
        val = strong_accuracy(model, xv, yv, eps)
        test = strong_accuracy(model, xt, yt, eps)
        times = [summary.get(k, float("nan")) for k in ("cpu_s", "time_s", "val_time_s")]
        report = summary.get("test", {}).get("time_s", float("nan"))
        print(f"| {run.name} | {times[0]:.0f} | {times[1]:.0f} | {times[2]:.0f} | {report:.0f} "
              f"| {100 * val:.1f} | {100 * test:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 500)
