"""One markdown table over several seeds of the same comparison.

    PYTHONPATH=src python benchmarks/seed_report.py PROBLEM PLATEAU DIR [DIR ...]
        [--checkpoints 100,300,500,1000,3000]

Each DIR is a ``kronfisher compare`` folder of one seed. Per optimizer: the ±10-iteration
mean minibatch loss at the checkpoints (one value per seed), the authors' stored run at the
same iteration, and where each seed leaves the plateau (first ±10-iteration mean ≤ 0.9×
PLATEAU; the authors' exit against their own plateau).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from kronfisher.bench.reference import (
    authors_at,
    authors_plateau,
    authors_plateau_exit,
    plateau_exit,
    window_mean,
)


def load(dir_: Path) -> dict[str, list[float]]:
    out = {}
    for path in sorted((dir_ / "runs").glob("*.iterations.csv")):
        with open(path) as f:
            out[path.name.removesuffix(".iterations.csv")] = [
                float(r["minibatch_loss_pixel"]) for r in csv.DictReader(f)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("problem")
    ap.add_argument("plateau", type=float)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--checkpoints", default="100,300,500,1000,3000")
    args = ap.parse_args()
    problem, plateau, dirs = args.problem, args.plateau, args.dirs
    runs = [load(d) for d in dirs]
    names = list(dict.fromkeys(n for r in runs for n in r))
    longest = max((len(ls) for r in runs for ls in r.values()), default=0)
    checks = [int(c) for c in args.checkpoints.split(",") if int(c) <= longest]
    their_plateau = authors_plateau(problem) or plateau
    print(f"{problem}: {len(dirs)} seeds ({', '.join(d.name for d in dirs)}); cells: ours per"
          " seed / the authors' stored run\n")
    print("| optimizer | " + " | ".join(f"it {c}" for c in checks)
          + " | leaves plateau: seeds / authors |\n" + "|---" * (len(checks) + 2) + "|")
    for name in names:
        cells = []
        for c in checks:
            ours = [window_mean(r[name], c) if name in r else None for r in runs]
            text = " ".join("—" if v is None else f"{v:.3f}" for v in ours)
            ref = authors_at(problem, name, c)
            cells.append(text + (f" / {ref.loss_pixel:.3f}" if ref else ""))
        exits = [str(plateau_exit(r[name], plateau) or "never") if name in r else "—"
                 for r in runs]
        ref_exit = authors_plateau_exit(problem, name, their_plateau)
        print(f"| {name} | " + " | ".join(cells)
              + f" | {' '.join(exits)} / {ref_exit or '—'} |")


if __name__ == "__main__":
    main()
