"""The step time a run would need to tie the reference optimizer at equal wall time.

    PYTHONPATH=src python benchmarks/step_budget.py REF.iterations.csv RUN.iterations.csv ...
        [--times-of 1000,3000]

REF is the reference optimizer's iteration file (tuned Adam), each RUN another optimizer's
on the same problem, seed and batches (``iteration,wall_time,minibatch_loss_pixel``; a
kfac-jax peer file reads the same). For each n in ``--times-of``: T_n, the reference's wall
time at iteration n, and L_n its ±10-iteration mean loss there; for each run, N, the first
iteration whose ±10-iteration mean is ≤ L_n, and the step time T_n / N it would need to be
level with the reference at T_n. Next to it, the run's own steady step time (the mean over
its iterations after the 100th, which leaves out a jit compilation and warm-up) and their
ratio: how many times cheaper its step would have to be. Per-iteration curves do not
depend on the machine's load; the step times do (say how they were measured).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from kronfisher.bench.reference import window_mean

WARMUP = 100


def load(path: Path) -> tuple[list[float], list[float]]:
    """(wall times, per-pixel minibatch losses) of one iteration file."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return ([float(r["wall_time"]) for r in rows],
            [float(r["minibatch_loss_pixel"]) for r in rows])


def first_at_or_below(losses: list[float], target: float) -> int | None:
    """The first iteration (from 1) whose ±10-iteration mean is ≤ ``target``."""
    for i in range(1, len(losses) + 1):
        if window_mean(losses, i) <= target:
            return i
    return None


def steady_step_time(wall: list[float]) -> float | None:
    """Mean seconds per iteration after the first :data:`WARMUP` iterations."""
    if len(wall) <= WARMUP + 1:
        return None
    return (wall[-1] - wall[WARMUP - 1]) / (len(wall) - WARMUP)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--times-of", default="1000,3000")
    args = ap.parse_args()
    ref_wall, ref_loss = load(args.reference)
    runs = {p.name.removesuffix(".iterations.csv"): load(p) for p in args.runs}
    for n in (int(s) for s in args.times_of.split(",")):
        if n > len(ref_wall):
            print(f"(the reference has {len(ref_wall)} iterations, not {n})")
            continue
        t_n, l_n = ref_wall[n - 1], window_mean(ref_loss, n)
        print(f"\n{args.reference.name.removesuffix('.iterations.csv')} at iteration {n}:"
              f" T = {t_n:.1f} s, loss {l_n:.4f}")
        print("| run | iterations to that loss | step time needed (s) | steady step time (s)"
              " | × cheaper needed |")
        print("|---|---|---|---|---|")
        for name, (wall, losses) in runs.items():
            it = first_at_or_below(losses, l_n)
            steady = steady_step_time(wall)
            steady_s = "—" if steady is None else f"{steady:.3f}"
            if it is None:
                print(f"| {name} | not within its {len(losses)} | < {t_n / len(losses):.4f}"
                      f" | {steady_s} | > {steady / (t_n / len(losses)):.1f} |"
                      if steady else f"| {name} | not within its {len(losses)} | — | — | — |")
                continue
            need = t_n / it
            ratio = "—" if steady is None else f"{steady / need:.2f}"
            print(f"| {name} | {it} | {need:.4f} | {steady_s} | {ratio} |")


if __name__ == "__main__":
    main()
