"""Which APGD-T budget does `fosc train`'s closing report need? On the validation slice (500
digits, never the test set) of trained runs: APGD-CE (100 steps), then APGD-T with the 1, 3 or
9 most likely target classes on what APGD-CE leaves; accuracy, seconds and gradient
evaluations of each, one torch thread, one JSON line per run.

    python experiments/measure_targets.py OUT.json RUN_DIR ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fosctrain import autoattack as aa
from fosctrain.data import hold_out_validation, load_dataset
from fosctrain.rundir import load_model

TARGETS = (1, 3, 9)


def measure(run: str) -> dict:
    loaded = load_model(run, which="last")
    model, config = loaded.model.eval(), loaded.config
    for p in model.parameters():
        p.requires_grad_(False)
    data = hold_out_validation(load_dataset(config["dataset"]), config["val_n"])
    x, y = data.x_val, data.y_val
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    eps = config["eps"]
    ce = aa.build_suite(model, "apgd-ce", eps, "linf", 10, 0)
    stage = aa.run_suite(model, ce, x, y, clean, len(y))["apgd-ce"]
    row = {"run": run, "n": len(y), "clean": clean.double().mean().item()}
    row.update(apgd_ce=stage.robust.double().mean().item(), apgd_ce_s=stage.seconds)
    for k in TARGETS:
        apgd_t = aa.build_suite(model, "apgd", eps, "linf", 10, 0, targets=k)[1]
        after = aa.run_suite(model, [apgd_t], x, y, stage.robust, len(y))["apgd-t"]
        row[f"apgd_t{k}"] = after.robust.double().mean().item()
        row[f"apgd_t{k}_s"] = after.seconds
        row[f"apgd_t{k}_evals"] = after.grad_evals
    return row


def main(out: Path, runs: list[str]) -> None:
    torch.set_num_threads(1)
    rows = []
    for run in runs:
        rows.append(measure(run))
        print(json.dumps(rows[-1]), flush=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
