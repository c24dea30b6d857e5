"""Does a lower FOSC mean a stronger attack on these models? For every run of a `fosc reproduce`
directory with an eval/eval.json, the FOSC (box-aware, as `fosc eval` measures it) at PGD-20's
and at APGD-CE's final points on the same digits (those both attacked), beside the two attacks'
accuracies on all the digits; a markdown table on stdout.

    python experiments/fosc_beside_apgd.py REPRODUCE_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    print(
        "| run | digits both attacked | PGD-20 FOSC mean / median | APGD-CE FOSC mean / median "
        "| PGD-20 acc | APGD-CE acc | APGD-CE lower FOSC and lower accuracy |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    agree = total = 0
    for path in sorted(out.glob("runs/*/eval/eval.json")):
        r = json.loads(path.read_text())["results"][0]
        f, a = r["fosc"], r["attacks"]
        if "apgd_ce_mean" not in f:
            continue
        pgd, apgd = a["pgd"]["acc"], a["apgd-ce+t/apgd-ce"]["acc"]
        both = f["apgd_ce_mean"] < f["pgd_same_mean"] and apgd < pgd
        agree, total = agree + both, total + 1
        print(
            f"| {path.parent.parent.name} | {f['apgd_ce_n']} | {f['pgd_same_mean']:.3f} / "
            f"{f['pgd_same_median']:.3f} | {f['apgd_ce_mean']:.3f} / {f['apgd_ce_median']:.3f} "
            f"| {100 * pgd:.1f} | {100 * apgd:.1f} | {'yes' if both else 'no'} |"
        )
    print(f"\n{agree} of {total} runs: APGD-CE ends at a lower mean FOSC and a lower accuracy.")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
