"""What the blocks whose curvature is a sum of factorised Kronecker terms share.

:class:`~kronfisher.curvature.kronecker_block.KroneckerBlock` (dense A factors) and
:class:`~kronfisher.curvature.embedding_block.EmbeddingBlock` (diagonal A factors) keep a
curvature with ``.terms`` of (A, G) pairs and a ``factorize(damping, scheme)`` giving a
:class:`~kronfisher.linalg.KroneckerFactorization`; the finite check, the factorisation with
its singular-damping retries, the solve, the product and the packing are the same for both.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..linalg import KroneckerFactorization, all_finite
from .block import CurvatureBlock
from .retrying import factorize_retrying

__all__ = ["FactorizedTermsBlock"]


class FactorizedTermsBlock(CurvatureBlock):
    """A block over a sum of (A, G) terms with a Kronecker factorisation (see module)."""

    def finite(self, curvature: Any) -> bool:
        """Whether every factor of every term is finite."""
        c = self.typed(curvature)
        return c is None or all(all_finite(A) and all_finite(G) for A, G in c.terms)

    def factorize(self, curvature: Any, damping: float, scheme: str) -> KroneckerFactorization:
        """``curvature.factorize(damping, scheme)``, retried on a singular damped matrix.

        A singular damped matrix is retried with 10× the damping (at least 1e-8), up to
        three times; the factorisation records the damping it was actually built with.
        Retries and clamped two-term eigenvalues are reported to the log.

        Raises:
            SingularFactorError: still singular after the retries (naming the layer).
            RuntimeError: no curvature.
        """
        source = self.typed(curvature)
        if source is None:
            raise RuntimeError(f"layer {self.name!r} has no curvature to factorise yet")
        return factorize_retrying(
            self.name, lambda lam: source.factorize(lam, scheme, warn=False), damping,
            self.options.log)

    def _factorization(self, inverse: Any) -> KroneckerFactorization:
        if not isinstance(inverse, KroneckerFactorization):
            raise RuntimeError(f"layer {self.name!r} has no Kronecker factorisation")
        return inverse

    def precondition(self, inverse: Any, G: Tensor) -> Tensor:
        """The factorisation's solve, in G's dtype."""
        return self._factorization(inverse).solve(G).to(G.dtype)

    def curvature_product(self, inverse: Any, V: Tensor) -> Tensor:
        """The factorisation's apply (the damped matrix the solve inverts), in V's dtype."""
        return self._factorization(inverse).apply(V).to(V.dtype)

    def pack(self, curvature: Any) -> list[tuple[Tensor, Tensor]] | None:
        """The terms as a list of cloned (A, G) pairs."""
        c = self.typed(curvature)
        return None if c is None else [(A.clone(), G.clone()) for A, G in c.terms]
