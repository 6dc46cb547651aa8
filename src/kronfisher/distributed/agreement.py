"""One small collective per step in which the ranks agree on what this step does.

Each rank contributes a fixed-size float64 row: its status (ok / skipping / raised), whether
it saw a non-finite gradient, and per registered layer whether it has a curvature batch,
its examples, its output grid and the power-of-two scales of its statistics. From the
all-gathered rows every rank derives the same :class:`Agreement`: the step is skipped on
every rank if any rank skips or raised (the messages are then all-gathered too), a layer is
folded in only if every rank has a finite batch for it with the same output grid, and the
global example counts and scales let the strategies reproduce the single-process result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..curvature.estimator import pow2_scale
from ..layers import LayerStatistics
from .comm import Communicator

__all__ = ["Agreement", "LayerAgreement", "CollectiveSkip", "agree", "OK", "SKIP", "ERROR"]

OK, SKIP, ERROR = 0, 1, 2
_PER_LAYER = 6  # present, m, h, w, log2 sa, log2 sg


class CollectiveSkip(Exception):
    """Another rank skips this step or raised: every rank skips it (message says who/why)."""


@dataclass(frozen=True)
class LayerAgreement:
    """One layer's curvature batch over all ranks.

    Attributes:
        counts: examples per rank, in rank order.
        spatial: the statistics' position grid (the same on every rank).
        scales: (sa, sg), the powers of two of the whole batch's statistics.
    """

    counts: list[int]
    spatial: tuple[int, int]
    scales: tuple[float, float]

    @property
    def m(self) -> int:
        """Examples over all ranks."""
        return sum(self.counts)


@dataclass
class Agreement:
    """What every rank decided together for one step.

    Attributes:
        nonfinite_ranks: ranks that saw a non-finite gradient.
        layers: the layers every rank folds in, with their :class:`LayerAgreement`.
        dropped: layer name → why it is left out of this step's curvature on every rank.
    """

    nonfinite_ranks: list[int] = field(default_factory=list)
    layers: dict[str, LayerAgreement] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


def _row(status: int, nonfinite: bool, names: list[str],
         batch: dict[str, LayerStatistics]) -> Tensor:
    row = torch.zeros(2 + _PER_LAYER * len(names), dtype=torch.float64)
    row[0], row[1] = status, float(nonfinite)
    for i, n in enumerate(names):
        if n not in batch:
            continue
        stats = batch[n]
        a, g, (h, w) = stats.a, stats.g, stats.pairing.grid
        sa, sg = pow2_scale(a) if a.dtype.is_floating_point else 1.0, pow2_scale(g)
        row[2 + _PER_LAYER * i:2 + _PER_LAYER * (i + 1)] = torch.tensor(
            [1.0, a.shape[0], h, w, math.log2(sa), math.log2(sg)], dtype=torch.float64)
    return row


def agree(comm: Communicator, status: int, message: str, nonfinite: bool, names: list[str],
          batch: dict[str, LayerStatistics]) -> Agreement:
    """All-gather every rank's row and decide (the same on every rank).

    Args:
        comm: the communicator.
        status: this rank's OK, SKIP or ERROR.
        message: why, when not OK.
        nonfinite: this rank saw a NaN/Inf gradient.
        names: the registered layers, in the same order on every rank.
        batch: this rank's finite curvature batch, by layer name.

    Raises:
        CollectiveSkip: some rank is not OK (on every rank, with every rank's message).
    """
    rows = torch.stack(comm.all_gather(_row(status, nonfinite, names, batch), "agreement"))
    bad = [r for r in range(comm.world) if int(rows[r, 0]) != OK]
    if bad:
        texts = comm.all_gather_text(message if status != OK else "", "agreement")
        why = "; ".join(f"rank {r}: {texts[r]}" for r in bad)
        raise CollectiveSkip(f"skipped on every rank because {why}")
    out = Agreement(nonfinite_ranks=[r for r in range(comm.world) if rows[r, 1] != 0])
    for i, n in enumerate(names):
        block = rows[:, 2 + _PER_LAYER * i:2 + _PER_LAYER * (i + 1)]
        present = [r for r in range(comm.world) if block[r, 0] != 0]
        if not present:
            continue
        if len(present) < comm.world:
            out.dropped[n] = (f"only rank(s) {present} have a finite curvature batch for it"
                              " (no batch, or non-finite statistics, elsewhere)")
            continue
        grids = {(int(block[r, 2]), int(block[r, 3])) for r in present}
        if len(grids) > 1:
            out.dropped[n] = f"the ranks recorded different output sizes {sorted(grids)}"
            continue
        out.layers[n] = LayerAgreement(
            counts=[int(block[r, 1]) for r in range(comm.world)], spatial=grids.pop(),
            scales=(2.0 ** float(block[:, 4].max()), 2.0 ** float(block[:, 5].max())))
    return out
