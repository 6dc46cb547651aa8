"""The embedding block: Σ_k diag(a_k) ⊗ G_k per ``nn.Embedding``, for every method.

The numerics are :func:`~kronfisher.curvature.embedding.approximate_embedding`'s and
:class:`~kronfisher.linalg.diagonal_kronecker.DiagonalKroneckerSum`'s; the singular-damping
retries are the Kronecker block's (:func:`factorize_retrying`: the factorisations share
its interface). Statistics are token ids, packing is (V-vector, d × d) pairs, storage
O(V + d²) per term.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..layers import LayerAdapter, LayerStatistics
from ..layers.embedding import EmbeddingAdapter
from ..linalg.diagonal_kronecker import DiagonalKroneckerSum
from .block import BlockCost, BlockOptions
from .embedding import approximate_embedding, average_embedding, check_embedding_sharing
from .estimator import LINALG_ERRORS
from .factorized_terms import FactorizedTermsBlock
from .methods import method_rank

__all__ = ["EmbeddingBlock"]


class EmbeddingBlock(FactorizedTermsBlock):
    """An embedding's curvature as a :class:`DiagonalKroneckerSum` (weight sharing "expand").

    Raises:
        TypeError: at construction, an adapter that is not an :class:`EmbeddingAdapter`
            (the block reads its vocabulary size and padding index).
        ValueError: at construction, ``weight_sharing`` "reduce" or "exact" (with the
            reason, :data:`~kronfisher.curvature.embedding.SHARING`).
    """

    curvature_type: ClassVar[type] = DiagonalKroneckerSum
    kind_name: ClassVar[str] = "DiagonalKroneckerSum"

    def __init__(self, name: str, adapter: LayerAdapter, options: BlockOptions) -> None:
        if not isinstance(adapter, EmbeddingAdapter):
            raise TypeError(f"layer {name!r}: EmbeddingBlock needs an EmbeddingAdapter, got"
                            f" {type(adapter).__name__}")
        check_embedding_sharing(options.weight_sharing)
        super().__init__(name, adapter, options)
        self.embedding = adapter

    def estimate(self, stats: LayerStatistics, previous: Any) -> DiagonalKroneckerSum | None:
        """This batch's estimate, or None to keep the previous curvature.

        A batch of padding tokens only has no statistics: it is dropped (reported). A
        LAPACK failure of the configured solver is retried with power iteration (products
        only); if that fails too the layer keeps its previous curvature, or with none yet
        gets KFAC's factors padded with zero terms (reported).
        """
        est, log, emb = self.options.estimator, self.options.log, self.embedding
        old = self.typed(previous)
        if emb.padding_idx is not None and bool((stats.a == emb.padding_idx).all()):
            log.report(self.name, "only_padding", f"layer {self.name!r}: the curvature batch"
                       " holds padding tokens only; it is dropped for this layer",
                       stacklevel=6)
            return None

        def run(method: str, solver: str) -> DiagonalKroneckerSum:
            return approximate_embedding(
                stats.a, stats.g, emb.vocab_size, method, solver=solver,
                rank=est.rank if method == "kpsvd" else None, init=old, tol=est.tol,
                max_iter=est.max_iter, padding_idx=emb.padding_idx)

        try:
            return run(est.method, est.solver)
        except LINALG_ERRORS as e:
            if est.method == "kfac":  # closed form: nothing to fall back to
                raise
            first = str(e)
        try:
            new = run(est.method, "power")
            log.report(self.name, "solver_fallback", f"layer {self.name!r}: the {est.method}"
                       f" solver failed ({first}); used the 'power' solver instead",
                       stacklevel=6)
            return new
        except LINALG_ERRORS as e:
            failed = f"{first}; power: {e}"
        if old is not None:
            log.report(self.name, "curvature_kept", f"layer {self.name!r}: every solver failed"
                       f" ({failed}); this curvature batch is dropped and the layer keeps"
                       " its previous curvature", stacklevel=6)
            return None
        log.report(self.name, "curvature_kept", f"layer {self.name!r}: every solver failed"
                   f" ({failed}); no previous curvature, so the layer uses KFAC's factors"
                   " for this batch", stacklevel=6)
        a, G = run("kfac", "auto").terms[0]
        pad = [(torch.zeros_like(a), torch.zeros_like(G))] * (self.n_terms - 1)
        return DiagonalKroneckerSum([(a, G), *pad])

    @property
    def n_terms(self) -> int:
        """The number of terms the method keeps."""
        est = self.options.estimator
        return method_rank(est.method, est.rank)

    def average(self, old: Any, new: Any, decay: float) -> DiagonalKroneckerSum:
        """Termwise running average (:func:`average_embedding`)."""
        return average_embedding(self.typed(old), self.typed(new), decay)

    def placement(self, curvature: Any) -> tuple[torch.dtype, torch.device]:
        """(dtype, device) of the first G factor."""
        G = self.typed(curvature).terms[0][1]
        return G.dtype, G.device

    def unpack(self, packed: Any, where: str, dtype: torch.dtype, device: torch.device
               ) -> DiagonalKroneckerSum:
        """Saved (a, G) pairs checked for kind, number of terms, shapes, finiteness; cast."""
        pairs = isinstance(packed, list | tuple) and all(
            isinstance(t, list | tuple) and len(t) == 2
            and all(isinstance(x, Tensor) and x.dtype.is_floating_point for x in t)
            and t[0].ndim == 1 and t[1].ndim == 2 for t in packed)
        if not pairs or not packed:
            raise ValueError(f"{where} is not a list of (a vector, G matrix) pairs of an"
                             f" embedding (got {type(packed).__name__}; a state of another"
                             " layer kind?)")
        if len(packed) != self.n_terms:
            raise ValueError(f"{where} has {len(packed)} term(s), this method keeps"
                             f" {self.n_terms}")
        d, V = self.shape
        for a, G in packed:
            if tuple(a.shape) != (V,) or tuple(G.shape) != (d, d):
                raise ValueError(f"{where} has a {tuple(a.shape)}, G {tuple(G.shape)}; this"
                                 f" embedding needs a ({V},), G ({d}, {d})")
        out = DiagonalKroneckerSum([(a.to(device, dtype), G.to(device, dtype))
                                    for a, G in packed])
        if not self.finite(out):
            raise ValueError(f"{where} has NaN or Inf entries (saved from a diverged run?)")
        return out

    def cast(self, curvature: Any, dtype: torch.dtype, device: torch.device
             ) -> DiagonalKroneckerSum:
        """Every factor cast (the sum itself if it already is there); ``info`` kept."""
        c = self.typed(curvature)
        if self.placement(c) == (dtype, device):
            return c
        out = DiagonalKroneckerSum([(a.to(device, dtype), G.to(device, dtype))
                                    for a, G in c.terms])
        out.info = dict(c.info)
        return out

    def cost(self, n_tokens: int) -> BlockCost:
        """N d² per statistic product (≈ 10 per SVD term); eigh of G; two d² V products.

        Memory: a V-vector and a d × d matrix per term.
        """
        d, V = self.shape
        k = self.n_terms
        gram = n_tokens * d * d
        svd = 0 if self.options.method == "kfac" else 10 * k * gram
        return BlockCost(update=gram + svd, factorize=k * d**3, precondition=2 * d * d * V,
                         memory=k * (V + d * d))
