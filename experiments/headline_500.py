"""The headline on one digit set that every run of a `fosc reproduce` directory has: the first
N test digits (default 500), from each run's eval/eval.json (restricted to its first N digits)
or eval-ref/eval.json (`fosc eval RUN --which last --n 500 --attacks pgd --no-checks --out
RUN/eval-ref`). Per configuration, over its seeds: clean, APGD-CE + APGD-T, the worst case of
PGD-20 and APGD-CE + APGD-T per digit, PGD-20 (mean ± std [95% t-interval]), the training's
gradient evaluations, and Welch's p against a baseline configuration; a markdown table.

    python experiments/headline_500.py REPRODUCE_DIR [N] [BASELINE] CONFIG-SEEDS...
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from fosctrain.aggregate import mean_interval, welch_p
from fosctrain.report import bits_mask

COLUMNS = (("clean", "clean"), ("apgd", "APGD-CE+T"), ("worst", "worst case"), ("pgd", "PGD-20"))


def run_row(run: Path, n: int) -> dict[str, float] | None:
    for sub in ("eval", "eval-ref"):
        path = run / sub / "eval.json"
        if path.is_file():
            masks = json.loads(path.read_text())["results"][0]["per_example"]
            break
    else:
        return None
    if len(masks["clean"]) < n or "apgd-ce+t" not in masks or "pgd" not in masks:
        return None
    m = {k: bits_mask(masks[k][:n]) for k in ("clean", "apgd-ce+t", "pgd")}
    summary = json.loads((run / "summary.json").read_text())
    return {
        "clean": m["clean"].double().mean().item(),
        "apgd": m["apgd-ce+t"].double().mean().item(),
        "worst": (m["apgd-ce+t"] & m["pgd"]).double().mean().item(),
        "pgd": m["pgd"].double().mean().item(),
        "grad_evals": summary["grad_evals"],
    }


def cell(values: list[float]) -> str:
    s = mean_interval(values)
    if s["n"] == 0:
        return "–"
    if s["n"] == 1:
        return f"{100 * s['mean']:.1f}"
    return (
        f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} "
        f"[{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]"
    )


def main(out: Path, n: int, baseline: str, configs: list[str]) -> None:
    rows = {}
    for spec in configs:
        name, seeds = spec.rsplit(":", 1) if ":" in spec else (spec, "3")
        found = [run_row(out / "runs" / f"{name}-s{s}", n) for s in range(int(seeds))]
        rows[name] = [r for r in found if r is not None]
    base = rows.get(baseline, [])
    heads = [label for _, label in COLUMNS]
    title = f"p vs {baseline} (APGD-CE+T)"
    print(f"| configuration | seeds | {' | '.join(heads)} | grad evals | {title} |")
    print("|---|---:|" + "---:|" * (len(heads) + 2))
    for name, found in rows.items():
        cells = [cell([r[k] for r in found]) for k, _ in COLUMNS]
        evals = sum(r["grad_evals"] for r in found) / len(found) if found else math.nan
        p = welch_p([r["apgd"] for r in found], [r["apgd"] for r in base])
        p_text = "–" if name == baseline or math.isnan(p) else f"{p:.3g}"
        evals_text = "–" if math.isnan(evals) else f"{evals:,.0f}"
        print(f"| {name} | {len(found)} | {' | '.join(cells)} | {evals_text} | {p_text} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
