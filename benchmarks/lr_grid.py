"""Pilot learning-rate grid for the first-order baselines under the ``paper`` preset.

    PYTHONPATH=src python benchmarks/lr_grid.py PROBLEM [--iterations N] [--seed S]
        [--grid adam=3e-4,1e-3,3e-3,1e-2 --grid sgd=0.03,0.1,0.3,1] [--threads 1]

Each (optimizer, lr) trains the auto-encoder for N iterations with everything else as the
preset has it, and is scored by the mean per-pixel minibatch loss of its last N/10
iterations (the quantity the authors store). Prints one markdown row per run and the best
lr per optimizer; a run that diverges scores inf. The authors tuned over {1e-1 … 1e-4}
for 200 epochs; this is the short pilot version of that grid, so its choice holds for the
budget it was run with.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from kronfisher.bench.runner import RunConfig, train
from kronfisher.data import load_dataset

DEFAULT_GRID = {"adam": [3e-4, 1e-3, 3e-3, 1e-2], "sgd": [0.03, 0.1, 0.3, 1.0]}


def score(record: dict) -> float:
    """Mean per-pixel minibatch loss of the last tenth of the iterations (inf if diverged)."""
    losses = [r["minibatch_loss_pixel"] for r in record["iterations"]]
    tail = losses[-max(1, len(losses) // 10):]
    value = sum(tail) / len(tail)
    return value if record["status"] == "complete" and math.isfinite(value) else math.inf


def parse_grid(items: list[str] | None) -> dict[str, list[float]]:
    if not items:
        return DEFAULT_GRID
    grid = {}
    for item in items:
        name, _, values = item.partition("=")
        grid[name] = [float(v) for v in values.split(",")]
    return grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("problem", choices=["curves", "mnist", "faces"])
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", action="append", metavar="OPT=LR,LR,...")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_data, test_data = load_dataset(args.problem, "train"), load_dataset(args.problem, "test")
    grid = parse_grid(args.grid)
    print(f"{args.problem}, paper preset, {args.iterations} iterations, seed {args.seed},"
          f" {args.threads} thread(s); score = mean minibatch loss/pixel of the last"
          f" {max(1, args.iterations // 10)} iterations\n")
    print("| optimizer | lr | score | s/step |\n|---|---|---|---|")
    best: dict[str, tuple[float, float]] = {}
    for name, lrs in grid.items():
        for lr in lrs:
            cfg = RunConfig(problem=args.problem, optimizer=name, lr=lr,
                            iterations=args.iterations, seed=args.seed, eval_subset=1000)
            t0 = time.perf_counter()
            try:
                rec = train(cfg, train_data, test_data, progress=False)
            except torch.linalg.LinAlgError as e:  # a peer's own numerical failure
                print(f"| {name} | {lr:g} | failed: {str(e).splitlines()[0][:70]} | — |",
                      flush=True)
                continue
            s = score(rec)
            per_step = (time.perf_counter() - t0) / max(len(rec["iterations"]), 1)
            print(f"| {name} | {lr:g} | {s:.4f} | {per_step:.3f} |", flush=True)
            if s < best.get(name, (math.inf, 0.0))[0]:
                best[name] = (s, lr)
    print()
    for name, (s, lr) in best.items():
        print(f"best {name}: lr {lr:g} (score {s:.4f})")


if __name__ == "__main__":
    main()
