"""The five Kronecker approximations of a layer's Fisher block behind one function.

| method           | result                                             |
|------------------|----------------------------------------------------|
| "kfac"           | A_K ⊗ G_K (KFC for convolutions)                   |
| "kpsvd"          | best rank-k Kronecker approximation (k = ``rank``, default 1) |
| "deflation"      | best rank-2, paper's algorithm: power iteration + deflation |
| "lanczos"        | best rank-2, Golub–Kahan–Lanczos bidiagonalisation |
| "kfac_corrected" | A_K ⊗ G_K + C ⊗ D, (C, D) best rank-1 of F − A_K ⊗ G_K |
"""

from __future__ import annotations

from torch import Tensor

from ..linalg import KroneckerSum, as_stats, nearest_kronecker

__all__ = ["approximate", "METHODS", "method_rank"]

METHODS = ("kfac", "kpsvd", "deflation", "kfac_corrected", "lanczos")
_DEFAULT_SOLVER = {"kpsvd": "lanczos", "deflation": "lanczos", "lanczos": "lanczos",
                   "kfac_corrected": "lanczos"}


def method_rank(method: str, rank: int | None = None) -> int:
    """Number of Kronecker terms a method returns."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if rank is not None and method != "kpsvd":
        raise ValueError(f"rank= applies to method 'kpsvd' only, not {method!r}")
    if rank is not None and not (isinstance(rank, int) and not isinstance(rank, bool)
                                 and rank >= 1):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if method == "kpsvd":
        return 1 if rank is None else rank
    return 1 if method == "kfac" else 2


def approximate(
    a: Tensor,
    g: Tensor,
    method: str,
    *,
    solver: str = "auto",
    rank: int | None = None,
    pair_mask: Tensor | None = None,
    init: KroneckerSum | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    products: str = "auto",
) -> KroneckerSum:
    """Kronecker-structured approximation of one layer's Fisher block.

    Args:
        a: per-example layer inputs, (m, d_a) — bias 1 already appended by the caller —
            or (m, T, d_a) unfolded conv patches at T output locations.
        g: per-example output gradients gᵢ = ∂ℓᵢ/∂sᵢ, (m, d_g) or (m, T, d_g).
        method: one of ``METHODS`` (see the module table).
        solver: "power", "lanczos", "gram" or "auto" for the truncated SVD of R(F)
            (ignored by "kfac"). "auto" uses Golub–Kahan–Lanczos with Gram-space products
            for Linear layers (exact to 1e-10 relative residual); "deflation" with
            ``solver="power"`` is the paper's algorithm.
        rank: number of terms for "kpsvd" (default 1).
        pair_mask: (T, T) 0/1 mask of the location pairs kept in a conv Fisher block
            (:func:`~kronfisher.linalg.spatial_pair_mask`); ``None`` keeps all pairs.
        init: the previous approximation, to warm-start iterative solvers.
        tol: relative tolerance, passed to :func:`~kronfisher.linalg.nearest_kronecker`.
        max_iter: iteration cap, passed on likewise.
        products: "auto", "gram" or "direct", passed on likewise.

    Returns:
        A :class:`KroneckerSum`; ``.info`` records solver, iterations and singular values.

    Raises:
        ValueError: NaN/Inf statistics, mismatched shapes, m = 0, unknown method/solver.
    """
    k = method_rank(method, rank)
    stats = as_stats(a, g, pair_mask)
    if method == "kfac":
        ks = KroneckerSum([stats.kfac_factors()])
        ks.info = {"method": method}
        return ks
    init_terms = init.terms if init is not None else None
    if method == "kfac_corrected":
        kfac = stats.kfac_factors()
        res = nearest_kronecker(
            stats, 1, solver=_solver(method, solver), center=True,
            init=init_terms[1:] if init_terms else None, tol=tol, max_iter=max_iter,
            products=products,
        )
        terms = [kfac, *res.terms]
    else:
        res = nearest_kronecker(
            stats, k, solver=_solver(method, solver), init=init_terms, tol=tol,
            max_iter=max_iter, products=products,
        )
        terms = res.terms
    ks = KroneckerSum(terms)
    ks.info = {
        "method": method,
        "solver": res.solver,
        "products": res.products,
        "iterations": res.iterations,
        "converged": res.converged,
        "sigmas": res.sigmas,
    }
    return ks


def _solver(method: str, solver: str) -> str:
    return _DEFAULT_SOLVER[method] if solver == "auto" else solver
