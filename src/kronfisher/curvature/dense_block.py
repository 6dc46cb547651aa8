"""The dense layer's Kronecker block with weight sharing (positions that share the weight).

A Linear layer on inputs (B, …, d_in), or one called several times in one forward, has T
positions s per example b, with a_bs (bias 1 appended) and g_bs = ∂ℓ_b/∂s_bs. The
block's ``weight_sharing`` mode says which matrix each method approximates:

- "expand": (1/B) Σ_b Σ_s (a_bs a_bsᵀ) ⊗ (g_bs g_bsᵀ) — the positions as independent
  tokens, normalised by the examples (the flat, diagonal pairing);
- "reduce": (1/B) Σ_b (ā_b ā_bᵀ) ⊗ (ĝ_b ĝ_bᵀ), ā_b = mean_s a_bs, ĝ_b = Σ_s g_bs;
- "exact": (1/B) Σ_b vec(Σ_s g_bs a_bsᵀ) vec(Σ_s g_bs a_bsᵀ)ᵀ, the exact block (all
  pairs (s, s') of an example, the conv machinery with no mask).

KFAC (and KFAC-corrected's first term) is A ⊗ G with A = (1/(B·T)) Σ a aᵀ, G = (1/B)
Σ g gᵀ for "expand" and "exact" (KFAC assumes independent positions; it has no closed
form for the exact block), and A = (1/B) Σ ā āᵀ, G = (1/B) Σ ĝ ĝᵀ for "reduce". A single
position (a 2-D input) takes exactly the plain Kronecker block's path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..layers import LayerStatistics, Pairing
from ..linalg import KroneckerSum
from .kronecker_block import KroneckerBlock

__all__ = ["DenseKroneckerBlock"]


class DenseKroneckerBlock(KroneckerBlock):
    """:class:`KroneckerBlock` of a dense layer, with the weight-sharing modes above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._eyes: dict[tuple, Tensor] = {}

    def _diagonal(self, like: Tensor) -> Tensor:
        """The identity pair mask of T = like.shape[1] positions (cached)."""
        key = (like.shape[1], like.dtype, like.device)
        if key not in self._eyes:
            self._eyes[key] = torch.eye(like.shape[1], dtype=like.dtype, device=like.device)
        return self._eyes[key]

    def estimate(self, stats: LayerStatistics, previous: Any) -> KroneckerSum | None:
        """This batch's estimate of the mode's matrix (see the module docstring)."""
        if stats.pairing.kind != "shared" or stats.pairing.positions == 1:
            if stats.pairing.kind == "shared":  # one shared position is one position
                stats = LayerStatistics(stats.a, stats.g, Pairing())
            return self.estimate_masked(stats, self.mask(stats), previous)
        mode = self.options.weight_sharing
        if mode == "reduce":
            reduced = LayerStatistics(stats.a.mean(1, keepdim=True),
                                      stats.g.sum(1, keepdim=True), Pairing())
            return self.estimate_masked(reduced, None, previous)
        mask = self._diagonal(stats.a) if mode == "expand" else None
        new = self.estimate_masked(stats, mask, previous)
        if new is None or self.options.method not in ("kfac", "kfac_corrected"):
            return new
        # the statistics give KFC's split (A/m, G/(m·T)); a dense layer's KFAC is A/(m·T),
        # G/m (the same Kronecker product, damped differently)
        T = stats.pairing.positions
        (A, G), rest = new.terms[0], new.terms[1:]
        out = KroneckerSum([(A / T, G * T), *rest])
        out.info = dict(new.info)
        return out
