"""Copy a `fosc reproduce` directory's records, without its weights, into the repository.

    python experiments/sync_records.py /work/exp/ttr-full docs/time-to-robustness-full \
        --figure time_to_robustness.png docs/img/time-to-robustness-full.png

Records are every .json, .csv and .md file (the manifest, the tables, each run's config,
summary, metrics, budget log and evaluation reports), not the checkpoints (.safetensors and
their .json sidecars: best, last, budget-N, and their -prev copies) and nothing under a hidden
directory (an evaluation's .resume state). A new machine starts again from them with
`fosc reproduce ... --reuse DEST`: finished runs are copied back, the others trained again
(fosctrain.reproduce.completable).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

RECORDS = {".json", ".csv", ".md"}
CHECKPOINT = re.compile(r"^(best|last|budget-\d+)(-prev)?\.json$")


def records(out: Path) -> list[Path]:
    """The record files under `out`, relative to it."""
    found = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        hidden = any(part.startswith(".") for part in rel.parts)
        if (
            path.is_file()
            and path.suffix in RECORDS
            and not hidden
            and not CHECKPOINT.match(rel.name)
        ):
            found.append(rel)
    return found


def sync(out: Path, dest: Path) -> int:
    """Copy the records of `out` into `dest` (same layout); returns how many files."""
    files = records(out)
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / rel, dest / rel)
    return len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the reproduce directory")
    parser.add_argument("dest", type=Path, help="where its records go")
    parser.add_argument("--figure", nargs=2, metavar=("NAME", "TO"), help="also copy a figure")
    args = parser.parse_args()
    if not (args.out / "experiment.json").is_file():
        print(f"sync_records: {args.out} is not a fosc reproduce directory (no experiment.json)",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    print(f"{sync(args.out, args.dest)} record files -> {args.dest}")
    if args.figure:
        shutil.copy2(args.out / args.figure[0], args.figure[1])


if __name__ == "__main__":
    main()
