"""The race of issue 15: per iteration and at equal wall time, over several seeds.

    PYTHONPATH=src python benchmarks/race_report.py DIR [DIR ...] [--reference adam@0.003]
        [--checkpoints 100,500,1000,3000] [--times-of 1000,3000]

Each DIR is one seed's ``kronfisher compare`` folder (``runs/<name>.iterations.csv``; a
kfac-jax peer run written by ``peer_kfac_jax.py`` into the same folder is read the same
way). For each run: the ±10-iteration mean per-pixel minibatch loss at the checkpoints
(one value per seed); at equal wall time: its loss when the reference optimizer (tuned
Adam) had run 1,000 and 3,000 iterations, in the same folder (runs side by side under the
same load only); and the iterations it needs to reach the reference's 3,000-iteration
loss (first iteration whose ±10-iteration mean is at or below it).
"""

from __future__ import annotations

import argparse
import bisect
import csv
from pathlib import Path

from kronfisher.bench.reference import window_mean


def load(dir_: Path) -> dict[str, tuple[list[float], list[float]]]:
    """name → (wall times, per-pixel minibatch losses) for every run in ``dir_/runs``."""
    out = {}
    for path in sorted((dir_ / "runs").glob("*.iterations.csv")):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        out[path.name.removesuffix(".iterations.csv")] = (
            [float(r["wall_time"]) for r in rows], [float(r["minibatch_loss_pixel"]) for r in rows])
    return out


BUDGET_ROUNDING = 0.01
"""Seconds: ``--time-budget`` is written with two decimals, so a run stopped by a budget of
round(T, 2) may end up to 0.005 s before T; it counts as having reached T."""


def at_time(wall: list[float], losses: list[float], t: float) -> float | None:
    """The ±10-iteration mean loss at the iteration reached after ``t`` seconds."""
    if not wall or wall[-1] < t - BUDGET_ROUNDING:
        return None
    return window_mean(losses, min(bisect.bisect_left(wall, t) + 1, len(losses)))


def reach(losses: list[float], target: float) -> int | None:
    """First iteration whose ±10-iteration mean is ≤ ``target`` (None: never)."""
    for it in range(1, len(losses) + 1):
        m = window_mean(losses, it)
        if m is not None and m <= target:
            return it
    return None


def fmt(v: float | None, spec: str = ".4f") -> str:
    """A table cell: the number, or "—" when missing."""
    return "—" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--reference", default="adam@0.003")
    ap.add_argument("--checkpoints", default="100,500,1000,3000")
    ap.add_argument("--times-of", default="1000,3000")
    args = ap.parse_args()
    cps = [int(c) for c in args.checkpoints.split(",")]
    ref_its = [int(c) for c in args.times_of.split(",")]
    seeds = [load(d) for d in args.dirs]
    names = sorted({n for s in seeds for n in s})
    print("Per iteration (±10-iteration mean per-pixel minibatch loss; one value per seed):\n")
    print("| run | " + " | ".join(f"it {c}" for c in cps) + " | s/it |")
    print("|---" * (len(cps) + 2) + "|")
    for n in names:
        cells = [" / ".join(fmt(window_mean(s[n][1], c)) if n in s else "—" for s in seeds)
                 for c in cps]
        per = [s[n][0][-1] / len(s[n][0]) for s in seeds if n in s and s[n][0]]
        print(f"| {n} | " + " | ".join(cells) + f" | {fmt(sum(per) / len(per), '.3f')} |")
    print(f"\nAt equal wall time: loss when {args.reference} had run "
          + " and ".join(str(i) for i in ref_its) + " iterations (same folder), and the"
          f" iterations to reach {args.reference}'s loss at iteration {ref_its[-1]}:\n")
    print("| run | " + " | ".join(f"at {args.reference}'s it {i}" for i in ref_its)
          + f" | iterations to {args.reference}'s it-{ref_its[-1]} loss |")
    print("|---" * (len(ref_its) + 2) + "|")
    for n in names:
        cells = []
        for i in ref_its:
            vals = []
            for s in seeds:
                ref = s.get(args.reference)
                if n not in s or ref is None or len(ref[0]) < i:
                    vals.append("—")
                    continue
                vals.append(fmt(at_time(*s[n], ref[0][i - 1])))
            cells.append(" / ".join(vals))
        its = []
        for s in seeds:
            ref = s.get(args.reference)
            target = window_mean(ref[1], ref_its[-1]) if ref else None
            its.append("—" if n not in s or target is None
                       else fmt(reach(s[n][1], target), "d"))
        print(f"| {n} | " + " | ".join(cells) + f" | {' / '.join(its)} |")


if __name__ == "__main__":
    main()
