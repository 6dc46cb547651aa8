"""What an adapter hands to a curvature block: a layer's (a, g) and how positions pair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

__all__ = ["Pairing", "LayerStatistics", "PAIRINGS"]

PAIRINGS = ("single", "grid", "shared")
"""single: one position per example (T = 1: a Linear layer on (batch, features));
grid: T = h·w output locations of a convolution, paired by their distance on the grid;
shared: T positions that share the weight (a Linear layer on (batch, …, features)),
paired as the block's weight-sharing mode says."""


@dataclass(frozen=True)
class Pairing:
    """Which positions of one example pair in the layer's Fisher block.

    Attributes:
        kind: one of :data:`PAIRINGS`.
        grid: the (height, width) output grid for "grid"; (1, T) for "shared"; (1, 1)
            for "single".
    """

    kind: Literal["single", "grid", "shared"] = "single"
    grid: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        if self.kind not in PAIRINGS:
            raise ValueError(f"pairing kind must be one of {PAIRINGS}, got {self.kind!r}")
        if self.kind == "single" and self.grid != (1, 1):
            raise ValueError(f"a single-position pairing has grid (1, 1), got {self.grid}")

    @property
    def positions(self) -> int:
        """T: positions per example."""
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class LayerStatistics:
    """One layer's curvature batch.

    Attributes:
        a: (m, T, d_a) layer inputs (bias coordinate 1 appended when the layer has a bias).
            An embedding's are its token ids instead, (m, T) int64 (the one-hot inputs
            in index form, :mod:`kronfisher.layers.embedding`).
        g: (m, T, d_g) output gradients gᵢ = ∂ℓᵢ/∂s (scaled per ``collect()``'s contract).
        pairing: how the T positions of an example pair.
    """

    a: Tensor
    g: Tensor
    pairing: Pairing = Pairing()

    @property
    def m(self) -> int:
        """The number of examples."""
        return int(self.a.shape[0])
