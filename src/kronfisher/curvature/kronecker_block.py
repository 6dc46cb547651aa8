"""The Kronecker-sum block of dense and convolutional layers: Σ_k A_k ⊗ G_k per layer.

The numerics are :class:`~kronfisher.curvature.KroneckerEstimator`'s (the five methods,
solver fallbacks, power-of-two scaling) and :class:`~kronfisher.linalg.KroneckerSum`'s
(damping schemes, factorisations); this block adds what the preconditioner needs around
them: the LAPACK-failure policy, singular-damping retries, checks, packing and casting.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..layers import LayerStatistics
from ..linalg import KroneckerSum
from .block import BlockCost
from .estimator import CurvatureSolveError, SolverFallback
from .factorized_terms import FactorizedTermsBlock
from .methods import method_rank

__all__ = ["KroneckerBlock"]



class KroneckerBlock(FactorizedTermsBlock):
    """A layer's curvature as a :class:`~kronfisher.linalg.KroneckerSum` (every method).

    The statistics' pairing picks the pair mask: one position or a conv grid (location
    pairs within the method's ``conv_radius``; KFAC uses KFC).
    """

    curvature_type: ClassVar[type] = KroneckerSum
    kind_name: ClassVar[str] = "KroneckerSum"

    @property
    def n_terms(self) -> int:
        """The number of Kronecker terms the method keeps."""
        est = self.options.estimator
        return method_rank(est.method, est.rank)

    # --------------------------------------------------------------- update
    def mask(self, stats: LayerStatistics) -> Tensor | None:
        """The (T × T) position-pair mask of these statistics (None: all pairs or T = 1).

        Raises:
            ValueError: "shared" positions (their pairing is the dense block's).
        """
        if stats.pairing.kind == "shared":
            raise ValueError(f"layer {self.name!r}: {type(self).__name__} does not handle"
                             " positions that share the weight (a dense layer's block does)")
        return self.options.estimator.pair_mask(stats.pairing.grid, stats.a)

    def estimate(self, stats: LayerStatistics, previous: Any) -> KroneckerSum | None:
        """This batch's estimate, or None to keep the previous curvature.

        A LAPACK failure of the solver never escapes: the estimator tries the other
        solvers; if all fail the layer keeps its previous curvature, or, with none yet,
        gets KFAC's factors (padded with zero terms). Each case is reported to the log.
        """
        return self.estimate_masked(stats, self.mask(stats), previous)

    def estimate_masked(self, stats: LayerStatistics, mask: Tensor | None, previous: Any
                        ) -> KroneckerSum | None:
        """:meth:`estimate` with the position pairs kept given as a (T × T) ``mask``."""
        est, log, sync = self.options.estimator, self.options.log, self.options.sync
        old = self.typed(previous)
        try:
            new = (est.estimate_masked(stats.a, stats.g, mask, old) if sync is None
                   else sync.estimate(self.name, est, stats.a, stats.g, mask, old))
        except CurvatureSolveError as e:
            if old is not None:
                log.report(self.name, "curvature_kept", f"layer {self.name!r}: {e}; this"
                           " curvature batch is dropped and the layer keeps its previous"
                           " curvature", stacklevel=7)
                return None
            log.report(self.name, "curvature_kept", f"layer {self.name!r}: {e}; no previous"
                       " curvature, so the layer uses KFAC's factors for this batch",
                       stacklevel=7)
            return (est.kfac_fallback(stats.a, stats.g) if sync is None
                    else sync.kfac_fallback(self.name, est, stats.a, stats.g))
        fallback = new.info.get("fallback")
        if isinstance(fallback, SolverFallback):
            log.report(self.name, "solver_fallback", f"layer {self.name!r}: the {est.method}"
                       f" solver failed ({'; '.join(fallback.failed)}); used the"
                       f" {fallback.used!r} solver instead", stacklevel=7)
        return new

    def average(self, old: Any, new: Any, decay: float) -> KroneckerSum:
        """Termwise running average (see :meth:`KroneckerEstimator.average`)."""
        return self.options.estimator.average(self.typed(old), self.typed(new), decay)

    # -------------------------------------------------------------- state
    def unpack(self, packed: Any, where: str, dtype: torch.dtype, device: torch.device
               ) -> KroneckerSum:
        """Saved (A, G) pairs checked for kind, number of terms, shapes, finiteness; cast."""
        pairs = isinstance(packed, list | tuple) and all(
            isinstance(t, list | tuple) and len(t) == 2
            and all(isinstance(x, Tensor) and x.dtype.is_floating_point and x.ndim == 2
                    for x in t) for t in packed)
        if not pairs or not packed:
            raise ValueError(f"{where} is not a list of (A, G) floating-point matrix pairs"
                             f" (got {type(packed).__name__}; a state of ExactNG?)")
        rank = self.options.estimator.rank
        if len(packed) != self.n_terms:
            what = f" (rank={rank})" if rank is not None else ""
            raise ValueError(f"{where} has {len(packed)} Kronecker term(s), this"
                             f" method{what} keeps {self.n_terms}")
        d_g, d_a = self.shape
        for A, G in packed:
            if tuple(A.shape) != (d_a, d_a) or tuple(G.shape) != (d_g, d_g):
                raise ValueError(
                    f"{where} has factors A {tuple(A.shape)}, G {tuple(G.shape)}; this model's"
                    f" layer needs A ({d_a}, {d_a}), G ({d_g}, {d_g}) (same layer names but"
                    " other widths?)")
        out = KroneckerSum([(A.to(device, dtype), G.to(device, dtype)) for A, G in packed])
        if not self.finite(out):
            raise ValueError(f"{where} has NaN or Inf entries (saved from a diverged run?)")
        return out

    def placement(self, curvature: Any) -> tuple[torch.dtype, torch.device]:
        """(dtype, device) of the first factor."""
        A = self.typed(curvature).terms[0][0]
        return A.dtype, A.device

    def cast(self, curvature: Any, dtype: torch.dtype, device: torch.device) -> KroneckerSum:
        """Every factor cast (the sum itself if it already is there); ``info`` kept."""
        c = self.typed(curvature)
        if self.placement(c) == (dtype, device):
            return c
        out = KroneckerSum([(A.to(device, dtype), G.to(device, dtype)) for A, G in c.terms])
        out.info = dict(c.info)
        return out

    def cost(self, n_tokens: int) -> BlockCost:
        """KFAC: two Gram products; the SVD methods: ~10 R(F) products per term more.

        Factorisation: an eigendecomposition (≈ d³) of both factors per term; a solve:
        two (one term) or four (two terms) matrix products per term.
        """
        d_g, d_a = self.shape
        k = self.n_terms
        gram = n_tokens * (d_a * d_a + d_g * d_g)
        svd = 0 if self.options.method == "kfac" else 10 * k * gram
        return BlockCost(update=gram + svd, factorize=k * (d_a**3 + d_g**3),
                         precondition=2 * k * d_g * d_a * (d_a + d_g),
                         memory=k * (d_a * d_a + d_g * d_g))
