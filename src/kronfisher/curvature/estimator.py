"""Estimators: a batch of layer statistics → a KroneckerSum, plus the running average."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..linalg import SOLVERS, KroneckerSum, as_stats, spatial_pair_mask
from .methods import METHODS, approximate, method_rank

_LOW_PRECISION = (torch.float16, torch.bfloat16)
LINALG_ERRORS = (np.linalg.LinAlgError, torch.linalg.LinAlgError)
"""LAPACK failures a solver may raise on finite statistics ("SVD did not converge")."""
FALLBACK_SOLVERS = ("gram", "power", "lanczos")
"""Tried in this order after the configured solver fails: the exact Gram solver (flat
statistics with at most GRAM_TOKENS tokens; eigh only), then power iteration (products
and norms only, no LAPACK call), then Lanczos."""
GRAM_TOKENS = 4096
"""Largest N = m·T for the Gram fallback (two N × N float64 matrices)."""


class CurvatureSolveError(RuntimeError):
    """Every solver failed with a LAPACK error on one batch of statistics."""


@dataclass(frozen=True)
class SolverFallback:
    """Recorded in ``KroneckerSum.info["fallback"]`` when the configured solver failed.

    Attributes:
        failed: "solver: error" for each solver that raised, in the order tried.
        used: the solver whose result was returned.
    """

    failed: tuple[str, ...]
    used: str


class KroneckerEstimator:
    """The curvature of one method, with its options (one instance per preconditioner).

    Args:
        method: one of :data:`METHODS`.
        solver, rank, tol, max_iter: passed to :func:`approximate`.
        conv_radius: 0, an int r, or "all": conv location pairs kept (Chebyshev distance
            ≤ r on the output grid). KFAC ignores it (KFC assumes spatial independence).

    Raises:
        ValueError: unknown method or solver, rank/max_iter not an integer ≥ 1, tol not a
            number in (0, 1), bad conv_radius — at construction, not at the first step.
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
        # numpy integers and floats are accepted and stored as Python numbers; flags are not
        rank = _plain(rank)
        method_rank(method, rank)  # validates method and rank
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
        tol, max_iter, conv_radius = _plain(tol), _plain(max_iter), _plain(conv_radius)
        if tol is not None and not (
                isinstance(tol, int | float) and not isinstance(tol, bool) and 0 < tol < 1):
            raise ValueError(f"tol must be a relative tolerance in (0, 1) or None, got {tol!r}")
        if max_iter is not None and not (
                isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter >= 1):
            raise ValueError(f"max_iter must be an integer >= 1 or None, got {max_iter!r}")
        if conv_radius != "all" and not (isinstance(conv_radius, int)
                                         and not isinstance(conv_radius, bool)
                                         and conv_radius >= 0):
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
        """:meth:`estimate_masked` with the pair mask of a ``spatial`` = (h, w) output grid."""
        return self.estimate_masked(a, g, self.pair_mask(spatial, a), previous)

    def estimate_masked(
        self, a: Tensor, g: Tensor, mask: Tensor | None, previous: KroneckerSum | None
    ) -> KroneckerSum:
        """The approximation of this batch's Fisher block, warm-started from ``previous``.

        ``mask``: the (T × T) position pairs kept (None: all pairs, or T = 1).

        Scale-safe: float16/bfloat16 statistics are computed in float32 (the result is a
        float32 KroneckerSum), and ``a`` and ``g`` are divided by powers of two near their
        largest magnitudes before any product is formed, the factors multiplied back
        after. Powers of two make this exact in floating point (same result up to
        over/underflow), while the solver's Gram products — fourth powers of the inputs —
        no longer overflow. A result that is itself not representable comes back with
        Inf entries; the preconditioner then skips the update for that layer.
        """
        if a.dtype in _LOW_PRECISION:
            a, g = a.float(), g.float()
        sa, sg = pow2_scale(a), pow2_scale(g)
        split = sa * sg  # the factor by which each normalised SVD term is rescaled
        init = previous
        if previous is not None and split != 1.0:
            init = KroneckerSum([(A / split, G / split) for A, G in previous.terms])
        ks = self._approximate(a / sa if sa != 1.0 else a, g / sg if sg != 1.0 else g,
                               mask, init)
        if sa == 1.0 and sg == 1.0:
            return ks
        # KFAC's factors (and KFAC-corrected's first term) are (1/m) Σ a aᵀ and Σ g gᵀ;
        # the SVD terms are normalised to ‖A_k‖ = ‖G_k‖, so each gets half the scale.
        kfac_first = self.method in ("kfac", "kfac_corrected")
        terms = [
            (A * (sa * sa), G * (sg * sg)) if (k == 0 and kfac_first) else (A * split, G * split)
            for k, (A, G) in enumerate(ks.terms)
        ]
        out = KroneckerSum(terms)
        out.info = dict(ks.info)
        return out

    def _approximate(self, a: Tensor, g: Tensor, mask: Tensor | None,
                     init: KroneckerSum | None) -> KroneckerSum:
        """:func:`approximate` with the configured solver, else the fallbacks in turn.

        Raises:
            CurvatureSolveError: every solver raised a LAPACK error.
        """
        failed: list[str] = []
        for solver in self._solvers(a, g, mask):
            try:
                ks = approximate(a, g, self.method, solver=solver, rank=self.rank,
                                 pair_mask=mask, init=init, tol=self.tol,
                                 max_iter=self.max_iter)
            except LINALG_ERRORS as e:
                if self.method == "kfac":  # closed form: no solver to fall back to
                    raise
                failed.append(f"{solver}: {e}")
                continue
            if failed:
                ks.info["fallback"] = SolverFallback(tuple(failed), solver)
            return ks
        raise CurvatureSolveError("every solver failed: " + "; ".join(failed))

    def _solvers(self, a: Tensor, g: Tensor, mask: Tensor | None):
        """The configured solver, then (lazily) the applicable fallbacks."""
        yield self.solver
        if self.method == "kfac":
            return
        first = "lanczos" if self.solver == "auto" else self.solver
        stats = as_stats(a, g, mask)
        for solver in FALLBACK_SOLVERS:
            if solver == first or (solver == "gram" and not (
                    stats.flat and stats.n_tokens <= GRAM_TOKENS)):
                continue
            yield solver

    def kfac_fallback(self, a: Tensor, g: Tensor) -> KroneckerSum:
        """KFAC's A ⊗ G padded with zero terms to this method's number of terms.

        The last resort when every solver fails and no previous curvature exists: closed
        form (two products), a valid curvature for every method's damping formula.
        """
        if a.dtype in _LOW_PRECISION:
            a, g = a.float(), g.float()
        A, G = approximate(a, g, "kfac").terms[0]
        pad = [(torch.zeros_like(A), torch.zeros_like(G))] * (
            method_rank(self.method, self.rank) - 1)
        out = KroneckerSum([(A, G), *pad])
        out.info = {"method": "kfac", "fallback_for": self.method}
        return out

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


def _plain(v):
    """A numpy (or other registered) integer/real scalar as a Python int/float; else ``v``."""
    if isinstance(v, bool | str) or v is None:
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def pow2_scale(x: Tensor) -> float:
    """2^round(log2 max|x|) as a float (1.0 for all-zero or non-finite x).

    Dividing by it is exact and brings the largest magnitude into [1/√2, √2).
    """
    if not x.numel():
        return 1.0
    lo, hi = torch.aminmax(x)  # one pass, no |x| copy
    m = max(-float(lo), float(hi))
    if not (m > 0.0 and math.isfinite(m)):
        return 1.0
    return math.ldexp(1.0, round(math.log2(m)))


__all__ = ["KroneckerEstimator", "METHODS", "pow2_scale", "CurvatureSolveError",
           "SolverFallback", "LINALG_ERRORS", "FALLBACK_SOLVERS"]
