"""Nearest sums of diagonal-A Kronecker products to an embedding's Fisher block.

The rearranged block of an embedding is R = Σ_v e_v vec(C_v)ᵀ (V × d² where it is not
zero; see :mod:`~kronfisher.linalg.token_stats`), so the truncated SVD of R gives
factors A_k = √σ_k diag(x_k) with x_k a unit u-vector on the tokens present and
G_k = √σ_k mat(v_k), v_k = Rᵀx_k/σ_k. KFAC-corrected works on the centred
R − vec(A_K) vec(G_K)ᵀ, whose rows are vec(C_v − (a_K)_v G_K): diagonal again.

Solvers (the names of :func:`~kronfisher.linalg.nearest_kronecker`):

* ``"gram"``: exact, one eigh of the u × u Gram matrix K = R Rᵀ (centred:
  P K Pᵀ with P = I − a_K 1ᵀ, since Rᵀ1 = vec(G_K));
* ``"power"`` / ``"lanczos"``: the same power iteration with deflation and Golub–Kahan–
  Lanczos as for dense layers (:mod:`~kronfisher.linalg.krylov`), on :class:`TokenSpace`
  (u-vectors and vec of d × d matrices, N d² per product, warm-startable);
* ``"auto"``: ``"lanczos"``, as for dense layers. Its products cost N d² each and a
  rank-2 solve needs tens of them, while forming K costs N d² + u² d² (or N² d) and its
  eigh u³: measured (``python benchmarks/embedding_solvers.py --threads 1``) KPSVD at
  V = 65, d = 128, N = 4096 took ≈ 0.02 s by Lanczos against 0.27 s by the Gram solver,
  and at V = 20,000, d = 64, N = 4096, ≈ 0.007 s against 6.6–7.0 s (two runs).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .krylov import lanczos, power
from .nearest import SOLVERS, NearestKroneckerResult
from .numerics import sym
from .spaces import DIRECT_EPS, START_SEED, Space, Terms, psd_project
from .token_stats import TokenStats

__all__ = ["TokenSpace", "nearest_diagonal_kronecker"]

GRAM_ZERO_SQ = 1e-14
"""gram solver: σ² ≤ GRAM_ZERO_SQ·σ₁² (σ ≤ 1e-7 σ₁) is zero (float64 eigh of K)."""
POWER_MAX_ITER = 1000
LANCZOS_MAX_ITER = 300


class TokenSpace(Space):
    """u-vectors (diagonal A on the tokens present) and vec(M), M d × d; Euclidean products.

    Args:
        stats: the embedding's statistics.
        center: act on R − vec(A_K) vec(G_K)ᵀ (KFAC-corrected) instead of R.
    """

    name = "tokens"

    def __init__(self, stats: TokenStats, center: bool):
        self.stats = stats
        self.eps = DIRECT_EPS[stats.dtype == torch.float64]
        self.dtype = stats.dtype
        self.d = stats.d
        self.size_u, self.size_v = stats.u, stats.d * stats.d
        self.kfac = stats.kfac_factors() if center else None

    def R_into(self, v: Tensor, out: Tensor) -> None:
        """Write R v into ``out``."""
        M = v.view(self.d, self.d)
        out.copy_(self.stats.r(M))
        if self.kfac is not None:
            a, G = self.kfac
            out.sub_(a * (G * M).sum())

    def Rt_into(self, u: Tensor, out: Tensor) -> None:
        """Write Rᵀ u into ``out``."""
        M = out.view(self.d, self.d)
        M.copy_(self.stats.rt(u))
        if self.kfac is not None:
            a, G = self.kfac
            M.sub_(G * (a * u).sum())

    def ip(self, x: Tensor, y: Tensor) -> float:
        """The inner product ⟨x, y⟩ (pairwise summation, as for dense layers)."""
        return float((x * y).sum())

    def v_from_matrix(self, G: Tensor) -> Tensor:
        """The v vector of a d × d factor G (for warm starts)."""
        return G.to(self.dtype).reshape(-1).clone()

    def default_start(self, index: int) -> Tensor:
        """KFAC's G for the first uncentred pair, else a fixed pseudo-random symmetric matrix."""
        if index == 0 and self.kfac is None:
            return self.stats.kfac_factors()[1].reshape(-1).clone()
        gen = torch.Generator().manual_seed(START_SEED + index)  # the same on every device
        X = torch.randn(self.d, self.d, generator=gen, dtype=torch.float64)
        return (X + X.mT).to(device=self.stats.g.device, dtype=self.dtype).reshape(-1)

    def factors(
        self, sigmas: list[float], us: list[Tensor], vs: list[Tensor], psd_first: bool
    ) -> Terms:
        """(a_k (V,), G_k): ‖a_k‖ = ‖G_k‖_F = √σ_k, Σ a_k ≥ 0, G_k exactly symmetric."""
        terms = []
        for k, (sigma, x, v) in enumerate(zip(sigmas, us, vs)):
            G = sym(v.view(self.d, self.d))
            x = x.clone()
            if psd_first and k == 0:  # Perron–Frobenius: x ≥ 0 up to rounding
                x = (x if float(x.sum()) >= 0 else -x).clamp_min_(0)
                G = psd_project(G)
            terms.append(_balanced(self.stats, sigma, x, G))
        return terms


def _balanced(stats: TokenStats, sigma: float, x: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """(√σ x/‖x‖ as a V-vector, √σ G/‖G‖) with the sign that makes Σ a ≥ 0; zeros if σ = 0."""
    nx, ng = float(x.norm()), float(G.norm())
    x, G = x.to(stats.dtype), G.to(stats.dtype)
    if sigma == 0.0 or nx == 0.0 or ng == 0.0:
        return stats.full(torch.zeros_like(x)), torch.zeros_like(G)
    root = math.copysign(math.sqrt(sigma), float(x.sum()))
    return stats.full(x * (root / nx)), G * (root / ng)


def gram_exact(stats: TokenStats, rank: int, center: bool) -> Terms:
    """The exact top-``rank`` terms from one eigh of the (centred) u × u Gram matrix."""
    K = stats.gram()
    if center:
        a = (stats.counts / stats.n_tokens).to(K.dtype)
        k1 = K.sum(1)
        K = K - a[:, None] * k1[None, :] - k1[:, None] * a[None, :] + k1.sum() * torch.outer(a, a)
        K = sym(K)
    mu, X = torch.linalg.eigh(K)
    top = max(float(mu[-1]), 1e-300)
    terms = []
    for i in range(rank):
        idx = stats.u - 1 - i
        if idx < 0 or float(mu[idx]) <= GRAM_ZERO_SQ * top:
            terms.append(_balanced(stats, 0.0, X.new_zeros(stats.u), stats.g.new_zeros(
                stats.d, stats.d)))
            continue
        x = X[:, idx]
        if i == 0 and not center:  # Perron–Frobenius: K ≥ 0 entrywise, x of one sign
            x = (x if float(x.sum()) >= 0 else -x).clamp_min(0)
        # Rᵀ x (centred: Rᵀ(x − (a_K·x) 1), as Rᵀ1 = vec(G_K)); its norm is σ, and _balanced
        # normalises it exactly
        y = x - float((stats.counts / stats.n_tokens).double() @ x) if center else x
        terms.append(_balanced(stats, math.sqrt(float(mu[idx])), x, stats.rt(y)))
    return terms


def nearest_diagonal_kronecker(
    stats: TokenStats,
    rank: int,
    *,
    solver: str = "auto",
    center: bool = False,
    init: Terms | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
) -> NearestKroneckerResult:
    """Best rank-``rank`` sum Σ diag(a_k) ⊗ G_k to an embedding's (centred) Fisher block.

    Args:
        stats: the embedding's statistics (:func:`~kronfisher.linalg.token_stats.as_token_stats`).
        rank: number of terms k ≥ 1.
        solver: "auto", "gram", "power" or "lanczos" (see the module docstring).
        center: approximate R − vec(A_K)vec(G_K)ᵀ (KFAC-corrected).
        init: previous terms ``[(a, G), ...]`` to warm-start power/Lanczos from.
        tol: relative residual tolerance of power/Lanczos (default 1e-10 for float64
            statistics, 1e-6 otherwise).
        max_iter: iteration cap of power (per pair) / Lanczos (total).

    Returns:
        terms ``[(a_k (V,), G_k (d, d))]`` ordered by σ_k, with ‖a_k‖ = ‖G_k‖_F = √σ_k and
        Σ a_k ≥ 0; the first uncentred pair has a_k ≥ 0 and G_k PSD. A not converged
        iterative solve warns and returns its last iterate.

    Raises:
        ValueError: unknown solver, rank not an integer ≥ 1.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if solver == "auto":
        solver = "lanczos"
    if solver == "gram":
        terms = gram_exact(stats, rank, center)
        sigmas = [float(a.norm()) ** 2 for a, _ in terms]
        return NearestKroneckerResult(terms, sigmas, "gram", "tokens")
    space = TokenSpace(stats, center)
    starts = []
    for k in range(rank):
        if init is not None and k < len(init) and tuple(init[k][1].shape) == (stats.d, stats.d):
            starts.append(space.v_from_matrix(init[k][1]))
        else:
            starts.append(space.default_start(k))
    tol = default_tol_for(stats) if tol is None else tol
    if solver == "power":
        max_iter = max_iter or POWER_MAX_ITER
        sigmas, us, vs, iters, converged = power(space, rank, starts, tol, max_iter)
    else:
        max_iter = max_iter or LANCZOS_MAX_ITER
        start = starts[0]
        for s_k in starts[1:]:  # later starts at half weight, as for dense layers
            n_k = space.norm(s_k)
            if n_k > 0:
                start = start + (0.5 * space.norm(start) / n_k) * s_k
        sigmas, us, vs, iters, converged = lanczos(space, rank, start, tol, max_iter)
    if not converged:
        warnings.warn(f"{solver} solver did not reach the relative tolerance {tol:g} in"
                      f" {iters} iterations; returning the last iterate", RuntimeWarning,
                      stacklevel=2)
    return NearestKroneckerResult(space.factors(sigmas, us, vs, not center),
                                  [float(s) for s in sigmas], solver, "tokens", iters, converged)


def default_tol_for(stats: TokenStats) -> float:
    """1e-10 for float64 statistics, 1e-6 otherwise (the dense layers' ``default_tol``)."""
    return 1e-10 if stats.dtype == torch.float64 else 1e-6

