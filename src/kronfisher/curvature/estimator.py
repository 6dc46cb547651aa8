"""Estimators: a batch of layer statistics → a KroneckerSum, plus the running average."""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import KroneckerSum, spatial_pair_mask
from .methods import METHODS, approximate, method_rank


class KroneckerEstimator:
    """The curvature of one method, with its options (one instance per preconditioner).

    Args:
        method: one of :data:`METHODS`.
        solver, rank, tol, max_iter: passed to :func:`approximate`.
        conv_radius: 0, an int r, or "all": conv location pairs kept (Chebyshev distance
            ≤ r on the output grid). KFAC ignores it (KFC assumes spatial independence).
    """

    def __init__(
        self,
        method: str,
        *,
        solver: str = "auto",
        rank: int | None = None,
        conv_radius: int | str = 0,
        tol: float | None = None,
        max_iter: int | None = None,
    ):
        method_rank(method, rank)  # validates method and rank
        if conv_radius != "all" and not (isinstance(conv_radius, int) and conv_radius >= 0):
            raise ValueError(f"conv_radius must be an int >= 0 or 'all', got {conv_radius!r}")
        self.method, self.solver, self.rank = method, solver, rank
        self.conv_radius, self.tol, self.max_iter = conv_radius, tol, max_iter
        self._masks: dict[tuple, Tensor | None] = {}

    def pair_mask(self, spatial: tuple[int, int], like: Tensor) -> Tensor | None:
        """The (T × T) location-pair mask for this layer's output grid, or None."""
        h, w = spatial
        if h * w == 1 or self.method == "kfac":
            return None
        key = (h, w, like.dtype, like.device)
        if key not in self._masks:
            mask = spatial_pair_mask(h, w, self.conv_radius, device=like.device)
            self._masks[key] = None if mask is None else mask.to(like.dtype)
        return self._masks[key]

    def estimate(
        self, a: Tensor, g: Tensor, spatial: tuple[int, int], previous: KroneckerSum | None
    ) -> KroneckerSum:
        """The approximation of this batch's Fisher block, warm-started from ``previous``."""
        return approximate(
            a, g, self.method, solver=self.solver, rank=self.rank,
            pair_mask=self.pair_mask(spatial, a), init=previous, tol=self.tol,
            max_iter=self.max_iter,
        )

    @staticmethod
    def average(old: KroneckerSum | None, new: KroneckerSum, decay: float) -> KroneckerSum:
        """Termwise exponential moving average: X_k ← decay·X_k + (1 − decay)·X_k,new.

        For KFAC this is the classic running average of A and G. For the SVD-based
        methods each term is normalised (‖A_k‖ = ‖G_k‖, tr(A_k) ≥ 0) so that averaging
        factors is well defined. ``decay = 0`` keeps only ``new``.
        """
        if old is None or decay == 0.0 or len(old) != len(new):
            return new
        w = 1.0 - decay  # one fused kernel per factor: A0 + w (A1 − A0), a new tensor
        terms = [
            (torch.lerp(A0, A1, w), torch.lerp(G0, G1, w))
            for (A0, G0), (A1, G1) in zip(old.terms, new.terms)
        ]
        out = KroneckerSum(terms)
        out.info = dict(new.info)
        return out


__all__ = ["KroneckerEstimator", "METHODS"]
