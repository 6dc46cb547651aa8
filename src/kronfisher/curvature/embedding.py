"""The five Kronecker approximations of an embedding's Fisher block, diagonal on the A side.

An ``nn.Embedding(V, d)`` is ``nn.Linear(V, d, bias=False)`` on one-hot inputs with
Θ = weightᵀ (d × V). Its token positions share the table, and the block approximated is
the weight-sharing "expand" one, F = (1/m) Σ_{i,s} (e_t e_tᵀ) ⊗ (g gᵀ) (issue 16,
:mod:`~kronfisher.linalg.token_stats`). Every method returns a
:class:`~kronfisher.linalg.diagonal_kronecker.DiagonalKroneckerSum`:

| method           | result                                                         |
|------------------|----------------------------------------------------------------|
| "kfac"           | diag(counts)/N ⊗ (1/m) Σ g gᵀ (N positions)                     |
| "kpsvd"          | best rank-k (k = ``rank``, default 1)                          |
| "deflation"      | best rank-2 (``solver="power"``: power iteration + deflation)  |
| "lanczos"        | best rank-2 (``solver="lanczos"``: Golub–Kahan–Lanczos)         |
| "kfac_corrected" | KFAC + best rank-1 of F − KFAC                                 |

"Best" is over all Kronecker sums, not only diagonal ones: R(F) has nonzero rows only on
the diagonal of A, so its singular vectors are diagonal A's.

Weight-sharing modes other than "expand" are refused for embeddings (:data:`SHARING`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg.diagonal_kronecker import DiagonalKroneckerSum
from ..linalg.token_nearest import nearest_diagonal_kronecker
from ..linalg.token_stats import as_token_stats
from .methods import method_rank

__all__ = ["approximate_embedding", "average_embedding", "check_embedding_sharing",
           "SHARING"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

SHARING = {
    "expand": None,
    "reduce": "the per-sequence mean of one-hot inputs is not one-hot: its A factor would be a"
              " dense V × V matrix, which an embedding never forms",
    "exact": "the exact block pairs different tokens of one sequence (e_t e_t'ᵀ off the"
             " diagonal): its A factors are dense V × V matrices; ExactNG gives the exact"
             " block of a small embedding",
}
"""Weight-sharing modes for embeddings: None where supported, else why not."""


def check_embedding_sharing(mode: str) -> None:
    """Raise ValueError for a weight-sharing mode embeddings do not support, with the reason."""
    if mode not in SHARING:
        raise ValueError(f"unknown weight_sharing {mode!r}; choose from {tuple(SHARING)}")
    why = SHARING[mode]
    if why is not None:
        raise ValueError(f"weight_sharing={mode!r} is not supported for nn.Embedding: {why};"
                         " use weight_sharing='expand' (the default)")


def approximate_embedding(
    tokens: Tensor,
    g: Tensor,
    vocab_size: int,
    method: str,
    *,
    solver: str = "auto",
    rank: int | None = None,
    init: DiagonalKroneckerSum | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    padding_idx: int | None = None,
) -> DiagonalKroneckerSum:
    """Diagonal-A Kronecker approximation of one embedding's Fisher block ("expand").

    Args:
        tokens: (m,) or (m, T) integer token ids (m examples, T positions each).
        g: (m, d) or (m, T, d) output gradients g = ∂ℓᵢ/∂(output at that position).
        vocab_size: V.
        method: one of :data:`~kronfisher.curvature.METHODS` (see the module table).
        solver: "auto" (Lanczos), "lanczos", "power" (the paper's algorithm) or "gram"
            (exact: one eigh of the u × u Gram matrix of the u tokens present); ignored by
            "kfac".
        rank: number of terms for "kpsvd" (default 1).
        init: the previous approximation, to warm-start power/Lanczos.
        tol: relative residual tolerance of the iterative solvers (default 1e-10 for
            float64 gradients, 1e-6 otherwise).
        max_iter: iteration cap of the iterative solvers.
        padding_idx: positions holding it are dropped (its row gets no gradient).

    Returns:
        A :class:`DiagonalKroneckerSum` (float32 for float16/bfloat16 gradients); ``.info``
        records the method, solver and singular values.

    Raises:
        ValueError / TypeError: see :func:`~kronfisher.linalg.token_stats.as_token_stats`,
            unknown method, solver or rank.
    """
    k = method_rank(method, rank)
    if g.dtype in _LOW_PRECISION:
        g = g.float()
    stats = as_token_stats(tokens, g, vocab_size, padding_idx=padding_idx)
    a_u, G = stats.kfac_factors()
    if method == "kfac":
        out = DiagonalKroneckerSum([(stats.full(a_u), G)])
        out.info = {"method": method}
        return out
    init_terms = init.terms if init is not None else None
    if method == "kfac_corrected":
        res = nearest_diagonal_kronecker(stats, 1, solver=solver, center=True,
                                         init=init_terms[1:] if init_terms else None,
                                         tol=tol, max_iter=max_iter)
        terms = [(stats.full(a_u), G), *res.terms]
    else:
        res = nearest_diagonal_kronecker(stats, k, solver=solver, init=init_terms, tol=tol,
                                         max_iter=max_iter)
        terms = res.terms
    out = DiagonalKroneckerSum(terms)
    out.info = {"method": method, "solver": res.solver, "iterations": res.iterations,
                "converged": res.converged, "sigmas": res.sigmas}
    return out


def average_embedding(old: DiagonalKroneckerSum | None, new: DiagonalKroneckerSum,
                      decay: float) -> DiagonalKroneckerSum:
    """Termwise running average a_k ← decay·a_k + (1 − decay)·a_k,new, likewise G_k.

    As for dense layers (``KroneckerEstimator.average``): every SVD term is normalised
    (‖a_k‖ = ‖G_k‖, Σ a_k ≥ 0), so averaging factors is well defined. ``decay = 0`` or a
    different number of terms keeps only ``new``.
    """
    if old is None or decay == 0.0 or len(old) != len(new):
        return new
    w = 1.0 - decay
    out = DiagonalKroneckerSum([(torch.lerp(a0, a1, w), torch.lerp(G0, G1, w))
                                for (a0, G0), (a1, G1) in zip(old.terms, new.terms)])
    out.info = dict(new.info)
    return out
