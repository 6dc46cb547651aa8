"""Losses at equal training time, from a ``kronfisher compare`` folder.

    PYTHONPATH=src python benchmarks/equal_time.py DIR [--seconds 60,120,300]

For each run in DIR/runs and each time T: the iteration the run had reached after T
seconds of training (its ``iterations.csv`` wall time) and its ±10-iteration mean
per-pixel minibatch loss there. A run that stopped before T shows "—". The times are
those of the machine the runs were made on (see the folder's summary for threads), so
only runs made side by side under the same load compare.
"""

from __future__ import annotations

import argparse
import bisect
import csv
from pathlib import Path

from kronfisher.bench.reference import window_mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--seconds", default="60,120,300")
    args = ap.parse_args()
    times = [float(t) for t in args.seconds.split(",")]
    print("| optimizer | s/step | " + " | ".join(f"at {t:g} s: iteration, loss" for t in times)
          + " |\n" + "|---" * (len(times) + 2) + "|")
    for path in sorted((args.dir / "runs").glob("*.iterations.csv")):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        wall = [float(r["wall_time"]) for r in rows]
        losses = [float(r["minibatch_loss_pixel"]) for r in rows]
        cells = []
        for t in times:
            if not wall or wall[-1] < t:
                cells.append("—")
                continue
            it = bisect.bisect_left(wall, t) + 1
            cells.append(f"{it}, {window_mean(losses, it):.4f}")
        per = wall[-1] / len(wall) if wall else float("nan")
        name = path.name.removesuffix(".iterations.csv")
        print(f"| {name} | {per:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
