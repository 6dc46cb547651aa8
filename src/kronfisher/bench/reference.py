"""The authors' stored training curves, for side-by-side comparison per iteration.

``authors_minibatch_loss.csv`` (next to this file) holds numbers taken from the runs the
authors published with their code: for every 10th iteration up to 3,000 (every 50th after)
the per-pixel minibatch training loss averaged over iterations i − 10 … i + 10, and the
wall time of iteration i on their GPU.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["AuthorsPoint", "authors_curve", "authors_at", "window_mean", "AUTHORS_CSV"]

AUTHORS_CSV = Path(__file__).with_name("authors_minibatch_loss.csv")


@dataclass(frozen=True)
class AuthorsPoint:
    iteration: int
    loss_pixel: float  # mean over iterations i-10..i+10
    wall_time: float  # seconds, their GPU


@lru_cache(maxsize=1)
def _table() -> dict[tuple[str, str], list[AuthorsPoint]]:
    with open(AUTHORS_CSV) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    out: dict[tuple[str, str], list[AuthorsPoint]] = {}
    for r in rows:
        for key in r:
            if key.startswith("loss_"):
                opt = key.removeprefix("loss_")
                out.setdefault((r["problem"], opt), []).append(AuthorsPoint(
                    int(r["iteration"]), float(r[key]), float(r[f"time_{opt}"])))
    return out


def authors_curve(problem: str, optimizer: str) -> list[AuthorsPoint] | None:
    """The stored curve of ``optimizer`` on ``problem`` (None if the authors ran none;
    ``identity_<m>`` controls and SOAP/Shampoo have none). A variant label
    ``"<optimizer>+<note>"`` (e.g. "kpsvd+kfac_trace") uses the optimizer's curve."""
    return _table().get((problem, optimizer.split("+")[0]))


def authors_at(problem: str, optimizer: str, iteration: int) -> AuthorsPoint | None:
    """The stored point nearest to ``iteration`` (None without a curve, or if the nearest
    point is more than 25 iterations away)."""
    curve = authors_curve(problem, optimizer)
    if not curve:
        return None
    best = min(curve, key=lambda p: abs(p.iteration - iteration))
    return best if abs(best.iteration - iteration) <= 25 else None


def window_mean(losses: list[float], iteration: int, half: int = 10) -> float | None:
    """Mean of ``losses`` (index 0 = iteration 1) over iterations iteration ± half, clipped
    to the run; None if the iteration was not reached."""
    if iteration < 1 or iteration > len(losses):
        return None
    lo, hi = max(0, iteration - 1 - half), min(len(losses), iteration + half)
    return sum(losses[lo:hi]) / (hi - lo)


CHECKPOINTS = (100, 500, 1000, 3000)
CONTROL_MATCH = 0.05  # a method "matches" its identity control within 5 % at every checkpoint


def plateau_exit(losses: list[float], plateau: float, fraction: float = 0.9) -> int | None:
    """First iteration whose ±10-iteration mean is ≤ fraction·plateau (None: never).

    ``plateau``: the per-pixel loss of the best constant output (the mean image), where a
    network with dead ReLU layers sits (:func:`kronfisher.bench.problems.constant_loss`).
    """
    for i in range(1, len(losses) + 1):
        m = window_mean(losses, i)
        if m is not None and m <= fraction * plateau:
            return i
    return None


def authors_plateau_exit(problem: str, optimizer: str, plateau: float,
                         fraction: float = 0.9) -> int | None:
    """:func:`plateau_exit` on the authors' stored curve (10-iteration resolution)."""
    for p in authors_curve(problem, optimizer) or []:
        if p.loss_pixel <= fraction * plateau:
            return p.iteration
    return None


def authors_plateau(problem: str) -> float | None:
    """The plateau of the authors' own data where it differs from ours: CURVES (their
    generator's images), the median of their SGD curve over iterations 100–1000, where it
    sits on the plateau. None (use our data's) for MNIST (the same images)."""
    if problem != "curves":
        return None
    vals = sorted(p.loss_pixel for p in authors_curve(problem, "sgd")
                  if 100 <= p.iteration <= 1000)
    return vals[len(vals) // 2]


def iteration_table(problem: str, losses: dict[str, list[float]],
                    plateau: float | None = None) -> str:
    """Markdown: our ±10-iteration mean minibatch loss next to the authors' at
    ``CHECKPOINTS``, the ratio ours/theirs, the plateau exits (theirs measured against
    :func:`authors_plateau` where their data differ), and which methods match their
    identity control."""
    their_plateau = authors_plateau(problem) or plateau
    lines = ["| optimizer | " + " | ".join(f"it {c}: ours / authors (ratio)" for c in CHECKPOINTS)
             + " | leaves plateau at: ours / authors |", "|---" * (len(CHECKPOINTS) + 2) + "|"]
    for name, ls in losses.items():
        cells = []
        for c in CHECKPOINTS:
            ours = window_mean(ls, c)
            ref = authors_at(problem, name, c)
            if ours is None:
                cells.append("—")
            elif ref is None:
                cells.append(f"{ours:.4f} / —")
            else:
                cells.append(f"{ours:.4f} / {ref.loss_pixel:.4f} ({ours / ref.loss_pixel:.2f})")
        if plateau is None:
            exits = "—"
        else:
            ours_exit = plateau_exit(ls, plateau)
            ref_exit = authors_plateau_exit(problem, name, their_plateau)
            ref_text = ref_exit or ("never" if authors_curve(problem, name) else "—")
            exits = f"{ours_exit or 'never'} / {ref_text}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {exits} |")
    notes = []
    for name, ls in losses.items():
        control = losses.get(f"identity_{name}")
        if control is None:
            continue
        diffs = [abs(window_mean(ls, c) / window_mean(control, c) - 1) for c in CHECKPOINTS
                 if window_mean(ls, c) is not None and window_mean(control, c) is not None]
        if diffs and max(diffs) <= CONTROL_MATCH:
            notes.append(f"**{name} matches its identity control** (within"
                         f" {100 * max(diffs):.1f} % at every checkpoint): its curvature does"
                         " not change the training curve here.")
        elif diffs:
            notes.append(f"{name} differs from its identity control by up to"
                         f" {100 * max(diffs):.0f} % at the checkpoints.")
    text = "\n".join(lines) + "\n"
    if plateau is not None:
        text += (f"\nPlateau: {plateau:.4f}/pixel (the best constant output on our training"
                 " data); 'leaves' = first iteration whose ±10-iteration mean is ≤ 0.9× that"
                 + (f" (the authors' runs: 0.9× their plateau {their_plateau:.4f}, the median"
                    " of their SGD curve over iterations 100–1000)" if their_plateau != plateau
                    else "") + ".\n")
    return text + ("\n" + "\n".join(notes) + "\n" if notes else "")
