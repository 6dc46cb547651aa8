"""Markdown tables from ``kronfisher compare`` folders: per-iteration losses next to the
authors' stored runs, plateau exits, identity controls, and where the time goes.

    PYTHONPATH=src python benchmarks/iteration_report.py PROBLEM DIR [PLATEAU]

PLATEAU: the mean-image loss (default: computed from the cached training split). Also
writes DIR/iterations_vs_authors.png: our ±10-iteration means (solid) and the authors'
stored curves (dashed) against the iteration.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from kronfisher.bench.reference import iteration_table


def load(dir_: Path) -> tuple[dict[str, list[float]], dict[str, dict]]:
    losses, records = {}, {}
    for path in sorted((dir_ / "runs").glob("*.iterations.csv")):
        name = path.name.removesuffix(".iterations.csv")
        with open(path) as f:
            losses[name] = [float(r["minibatch_loss_pixel"]) for r in csv.DictReader(f)]
        rec = dir_ / "runs" / f"{name}.json"
        if rec.exists():
            records[name] = json.loads(rec.read_text())
    return losses, records


def phase_table(records: dict[str, dict]) -> str:
    lines = ["| optimizer | steps | s/step | forward+backward | curvature batch | curvature"
             " | inverse | precondition (solve + KL clip) | optimizer |", "|---" * 9 + "|"]
    for name, r in records.items():
        ph = r["phase_seconds"]
        n = max(ph["steps"], 1)
        total = r["final"]["wall_time"]
        cells = [f"{ph[k] / total * 100:.0f} %" for k in
                 ("forward_backward", "curvature_batch", "curvature", "inverse", "precondition",
                  "optimizer")]
        lines.append(f"| {name} | {ph['steps']} | {total / n:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(problem: str, losses: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kronfisher.bench.reference import authors_curve, window_mean

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, ls) in enumerate(losses.items()):
        its = list(range(10, len(ls) + 1, 10))
        ax.plot(its, [window_mean(ls, c) for c in its], color=f"C{i % 10}", label=name)
        ref = authors_curve(problem, name)
        if ref and "+" not in name:
            n = len(ls)
            pts = [p for p in ref if p.iteration <= max(n, 1000)]
            ax.plot([p.iteration for p in pts], [p.loss_pixel for p in pts],
                    color=f"C{i % 10}", ls="--", alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("per-pixel minibatch loss, ±10-iteration mean (dashed: authors)")
    ax.set_title(f"{problem}: paper preset against the authors' stored runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    problem, dir_ = argv[0], Path(argv[1])
    if len(argv) > 2:
        plateau = float(argv[2])
    else:
        from kronfisher.bench.problems import PAPER_TRAIN_SIZE, PROBLEMS, constant_loss
        from kronfisher.bench.runner import split_train
        from kronfisher.data import load_dataset

        x = split_train(load_dataset(problem, "train"), PAPER_TRAIN_SIZE[problem])
        plateau = constant_loss(x, PROBLEMS[problem].likelihood)
    losses, records = load(dir_)
    print(iteration_table(problem, losses, plateau))
    print(phase_table(records))
    plot(problem, losses, dir_ / "iterations_vs_authors.png")


if __name__ == "__main__":
    main(sys.argv[1:])
