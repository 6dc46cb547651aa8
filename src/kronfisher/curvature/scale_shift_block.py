"""The curvature block of scale-and-shift layers (kind "scale_shift"), for every method.

Every Kronecker preconditioner gives LayerNorm, BatchNorm1d/2d and GroupNorm the same
block: the exact per-feature 2×2 Fisher block of (γ_j, β_j) (``scale_shift="diagonal"``:
its diagonal), averaged, factorised and solved as in
:mod:`kronfisher.curvature.scale_shift`. There is nothing for a Kronecker method to
approximate: F_j is already C small blocks, cheaper than any factorisation. The damping
scheme does not apply: the damped matrix is always F_j + λI (Tikhonov), the same under
every ``damping_scheme``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..layers import LayerStatistics
from ..layers.scale_shift import scale_shift_grads
from .block import BlockCost, CurvatureBlock
from .retrying import factorize_retrying
from .scale_shift import (
    ScaleShiftCurvature,
    ScaleShiftInverse,
    checked_scale_shift_blocks,
    estimate_scale_shift,
)

__all__ = ["ScaleShiftBlock"]


class ScaleShiftBlock(CurvatureBlock):
    """A scale-and-shift layer's curvature: a :class:`ScaleShiftCurvature` (C, k, k).

    Statistics: ``a`` is x̂ and ``g`` the output gradients, both (m, T, C); the gradient
    matrix is [∇γ ∇β] (C, k), k = 2, or 1 without a shift.
    """

    curvature_type: ClassVar[type] = ScaleShiftCurvature
    kind_name: ClassVar[str] = "ScaleShiftCurvature"

    @property
    def mode(self) -> str:
        """The mode, "full" or "diagonal" (the preconditioner's ``scale_shift`` option)."""
        return self.options.scale_shift

    def estimate(self, stats: LayerStatistics, previous: Any) -> ScaleShiftCurvature:
        """F_j of this batch from dγ_bj = Σ_s g x̂, dβ_bj = Σ_s g (``previous`` unused)."""
        self.typed(previous)
        has_shift = self.shape[1] == 2
        J = scale_shift_grads(stats.a, stats.g, has_shift).stacked()
        return estimate_scale_shift(J, self.mode)

    def average(self, old: Any, new: Any, decay: float) -> ScaleShiftCurvature:
        """Entrywise running average of the blocks."""
        return ScaleShiftCurvature.average(self.typed(old), self.typed(new), decay)

    def finite(self, curvature: Any) -> bool:
        """Whether every block entry is finite."""
        c = self.typed(curvature)
        return c is None or c.finite()

    def factorize(self, curvature: Any, damping: float, scheme: str) -> ScaleShiftInverse:
        """(F_j + λI)⁻¹ in closed form (``scheme`` does not apply: always Tikhonov).

        A singular damped block (only possible at a tiny damping) is retried with 10× the
        damping (at least 1e-8), up to three times, reported to the log; the inverse
        records the damping it was built with.

        Raises:
            SingularFactorError: still singular after the retries (naming the layer).
            RuntimeError: no curvature.
        """
        source = self.typed(curvature)
        if source is None:
            raise RuntimeError(f"layer {self.name!r} has no curvature to factorise yet")
        return factorize_retrying(self.name, source.factorize, damping, self.options.log)

    def _inverse(self, inverse: Any) -> ScaleShiftInverse:
        if not isinstance(inverse, ScaleShiftInverse):
            raise RuntimeError(f"layer {self.name!r} has no scale-and-shift factorisation")
        return inverse

    def precondition(self, inverse: Any, G: Tensor) -> Tensor:
        """(F_j + λI)⁻¹ (∇γ_j, ∇β_j) for every feature, in G's dtype."""
        return self._inverse(inverse).solve(G)

    def curvature_product(self, inverse: Any, V: Tensor) -> Tensor:
        """(F_j + λI) (v_γj, v_βj) for every feature, in V's dtype."""
        return self._inverse(inverse).apply(V)

    def pack(self, curvature: Any) -> Tensor | None:
        """The (C, k, k) blocks, cloned."""
        c = self.typed(curvature)
        return None if c is None else c.blocks.clone()

    def unpack(self, packed: Any, where: str, dtype: torch.dtype, device: torch.device
               ) -> ScaleShiftCurvature:
        """Saved blocks checked for type, shape, finiteness, symmetry and mode; cast."""
        return checked_scale_shift_blocks(where, packed, self.shape, self.mode).to(dtype, device)

    def placement(self, curvature: Any) -> tuple[torch.dtype, torch.device]:
        """(dtype, device) of the blocks."""
        b = self.typed(curvature).blocks
        return b.dtype, b.device

    def cast(self, curvature: Any, dtype: torch.dtype, device: torch.device
             ) -> ScaleShiftCurvature:
        """The blocks cast (the curvature itself if it already is there)."""
        return self.typed(curvature).to(dtype, device)

    def cost(self, n_tokens: int) -> BlockCost:
        """Linear in C: 2 products per position for dγ, dβ, k² per example for F_j."""
        c, k = self.shape
        return BlockCost(update=n_tokens * c * (k + k * k), factorize=8 * c,
                         precondition=2 * k * k * c, memory=c * k * k)
