"""Nearest sums of Kronecker products: truncated SVD of the rearranged Fisher R(F).

Three solvers (DESIGN.md §4), all for the top-k singular triplets (σ_k, u_k, v_k) of
R = R(F) (optionally "centred": R − vec(A_K) vec(G_K)ᵀ, for KFAC-corrected). The factors
are A_k = √σ_k mat(u_k), G_k = √σ_k mat(v_k).

* ``"power"``: alternating power iteration with deflation (the paper's algorithm),
  warm-startable, stopping when ‖Rᵀu − σv‖ ≤ tol·σ (relative, hence scale-invariant).
* ``"lanczos"``: Golub–Kahan bidiagonalisation with full reorthogonalisation and
  explicit restarts; stops when every wanted Ritz triplet has residual ≤ tol·σ₁.
* ``"gram"``: exact and iteration-free, for flat statistics (Linear layers, conv radius
  0): eigendecompositions of N × N Gram matrices, N = number of tokens.

Power and Lanczos are matrix-free. Their products with R are evaluated either directly
(``products="direct"``: d_a × d_a and d_g × d_g matrices, cost N(d_a² + d_g²) each) or,
for flat statistics, in the coefficient space of the Gram matrices
(``products="gram"``: u = P x, v = Q y, cost N² each after forming K_a and K_g once, which
costs N²(d_a + d_g); coefficients in float64, K in float64 except for Lanczos on float32
statistics, where float32 K halves the memory traffic).

Float32 statistics: Gram-space results are checked (:meth:`~.spaces.GramSpace.resolves`);
a wanted σ below 1e-2‖R‖ — a nearly Kronecker-factored block, whose information sits in
the ~σ²/‖R‖² ≪ 1 part of K — is recomputed with K formed from float64 token products.
``products="auto"`` uses Gram space for flat statistics with N ≤ ``GRAM_MAX_TOKENS`` unless
direct products are at least twice cheaper by the cost model :func:`product_costs`.

Every solver ends with the factor formation A = tokensᵀ diag(x) tokens (one KFAC-sized
product per term and side). In Gram space the norms and traces of the factors are known
from the coefficients (‖A‖² = xᵀK_a x, tr A = Σₙ xₙ‖aₙ‖²), so the scaling and the sign are
folded into x and each factor costs one matrix product and one symmetrising addition.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .krylov import Triplets, lanczos, power
from .spaces import DirectSpace, GramSpace, Space
from .stats import LayerStats

__all__ = ["nearest_kronecker", "product_costs", "SOLVERS", "NearestKroneckerResult"]

SOLVERS = ("power", "lanczos", "gram", "auto")
GRAM_MAX_TOKENS = 4096
"""Largest N = m·T for Gram-space products (two N × N float64 Gram matrices, 256 MiB)."""
PRODUCT_PAIRS_ESTIMATE = 8
"""Pairs of products (R, Rᵀ) a Krylov solve is assumed to need by the cost model."""
POWER_MAX_ITER = 1000
"""Default cap of power iterations per singular pair."""
LANCZOS_MAX_ITER = 300
"""Default cap of Lanczos steps in total (five restarts)."""
GRAM_ZERO_SQ = 1e-14
"""gram solver: σ² ≤ GRAM_ZERO_SQ·σ₁², i.e. σ ≤ 1e-7 σ₁, is zero (float64 eigh of K)."""


@dataclass
class NearestKroneckerResult:
    """Top-k singular triplets of (centred) R(F) as Kronecker factors."""

    terms: list[tuple[Tensor, Tensor]]
    sigmas: list[float]
    solver: str
    products: str
    iterations: int = 0
    converged: bool = True
    info: dict = field(default_factory=dict)


def product_costs(stats: LayerStats, pairs: int = PRODUCT_PAIRS_ESTIMATE) -> dict[str, float]:
    """Multiply-adds of ``pairs`` pairs of products (R, Rᵀ) in each space (flat statistics).

    Direct: 2N(d_a² + d_g²) per pair. Gram: N²(d_a + d_g) once for K_a and K_g, then 2N²
    per pair. The factor formation (N(d_a² + d_g²) per term) is common to both.
    """
    n, da, dg = stats.n_tokens, stats.d_a, stats.d_g
    return {
        "direct": float(pairs) * 2 * n * (da * da + dg * dg),
        "gram": float(n) * n * (da + dg) + pairs * 2.0 * n * n,
    }


def make_space(stats: LayerStats, center: bool, products: str, solver: str) -> Space:
    """The space ``products`` names (see the module docstring for "auto")."""
    if products == "auto":
        use_gram = stats.flat and stats.n_tokens <= GRAM_MAX_TOKENS
        if use_gram:  # float64 coefficients, exact rank detection: keep Gram space unless
            cost = product_costs(stats)  # direct products are clearly cheaper
            use_gram = cost["gram"] <= 2.0 * cost["direct"]
        products = "gram" if use_gram else "direct"
    if products == "gram":
        if not stats.flat:
            raise ValueError("products='gram' needs flat statistics (Linear, or conv radius 0)")
        return GramSpace(stats, center, "float32" if solver == "lanczos" else "float64")
    if products == "direct":
        return DirectSpace(stats, center)
    raise ValueError(f"products must be 'auto', 'gram' or 'direct', got {products!r}")


def gram_exact(space: GramSpace, rank: int) -> Triplets:
    """Exact top-k SVD of (centred) R from two N × N eigendecompositions of ``space``'s K."""
    Ka, Kg0, center, m = space.Ka, space.Kg, space.center, space.stats.m
    N = Ka.shape[0]
    Kg = Kg0
    if center:
        C = torch.eye(N, dtype=Ka.dtype, device=Ka.device) - 1.0 / N
        Kg = C @ Kg0 @ C
    lam, Vk = torch.linalg.eigh(Ka)
    r = lam.clamp_min(0).sqrt()
    Sv = Vk * r  # V diag(√λ)
    H = Sv.mT @ Kg @ Sv
    mu, Z = torch.linalg.eigh(0.5 * (H + H.mT))
    us, vs, sigmas = [], [], []
    for i in range(rank):
        idx = N - 1 - i
        s2 = float(mu[idx]) if idx >= 0 else 0.0
        if idx < 0 or s2 <= GRAM_ZERO_SQ * max(float(mu[-1]), 1e-300):
            z = torch.zeros(2 * N, dtype=Ka.dtype, device=Ka.device)
            us.append(z)
            vs.append(z)
            sigmas.append(0.0)
            continue
        sigma = math.sqrt(s2)
        # v = Q y with y = C S z / σ (unit norm), u = R v / σ_R = P x with x = C K_g y / σ.
        y = Sv @ Z[:, idx] / sigma
        if center:
            y = y - y.mean()
        x = Kg0 @ y / sigma
        if center:
            x = x - x.mean()
        us.append(torch.cat((x, Ka @ x)))
        vs.append(torch.cat((y, Kg0 @ y)))
        sigmas.append(sigma / m)
    return sigmas, us, vs


def default_tol(stats: LayerStats) -> float:
    """1e-10 for float64 statistics, 1e-6 for float32 ones.

    Float32 Gram matrices and products carry ~1e-7 relative rounding. The Frobenius error
    of the result is quadratic in the residual, so 1e-6 leaves it at its optimum to far
    better than 1e-6 relative.
    """
    return 1e-10 if stats.dtype == torch.float64 else 1e-6


def nearest_kronecker(
    stats: LayerStats,
    rank: int,
    *,
    solver: str = "auto",
    center: bool = False,
    init: list[tuple[Tensor, Tensor]] | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    products: str = "auto",
) -> NearestKroneckerResult:
    """Best rank-``rank`` Kronecker approximation of the (centred) Fisher block.

    Args:
        stats: validated layer statistics (:func:`~kronfisher.linalg.as_stats`).
        rank: number of Kronecker terms k ≥ 1.
        solver: "power", "lanczos", "gram" or "auto" (Lanczos).
        center: approximate R − vec(A_K)vec(G_K)ᵀ instead of R (KFAC-corrected).
        init: previous factors ``[(A, G), ...]`` to warm-start power/Lanczos from.
        tol: relative residual tolerance (Lanczos: every wanted triplet to tol·σ₁; power:
            ‖Rᵀu − σv‖ ≤ tol·σ). Default 1e-10 for float64 statistics, 1e-6 for float32
            ones (the error of the approximation is quadratic in the residual).
        max_iter: iteration cap (power: per singular pair, default
            :data:`POWER_MAX_ITER`; Lanczos: total steps, default :data:`LANCZOS_MAX_ITER`).
            Not converging warns and returns the best iterate.
        products: "auto", "gram" or "direct" (see module docstring). "auto" uses Gram
            space for flat statistics with N ≤ 4096 tokens unless :func:`product_costs`
            finds direct products at least twice cheaper.

    Returns:
        terms ``[(A_k, G_k)]`` ordered by σ_k, each exactly symmetric, with
        ‖A_k‖_F = ‖G_k‖_F = √σ_k and tr(A_k) ≥ 0. The first pair of the uncentred
        problem is positive semi-definite (for a PSD-preserving pair mask).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if solver == "auto":
        solver = "lanczos"
    psd_first = not center and (
        stats.pair_mask is None or stats.flat
    )  # all-pairs and diagonal masks preserve PSD-ness

    space: Space
    if solver == "gram":
        if not stats.flat:
            raise ValueError(
                "solver='gram' needs flat statistics (Linear layers or conv radius 0);"
                " use 'lanczos' or 'power'"
            )
        space = GramSpace(stats, center)
        sigmas, us, vs = gram_exact(space, rank)
        if not space.resolves(sigmas):
            space = space.exact()
            sigmas, us, vs = gram_exact(space, rank)
        iters, converged = 0, True
    else:
        space = make_space(stats, center, products, solver)
        starts = []
        for k in range(rank):
            if init is not None and k < len(init) and init[k][1].shape == (stats.d_g, stats.d_g):
                starts.append(space.v_from_matrix(init[k][1]))
            else:
                starts.append(space.default_start(k))
        if tol is None:
            tol = default_tol(stats)
        if solver == "power":
            max_iter = max_iter or POWER_MAX_ITER
            sigmas, us, vs, iters, converged = power(space, rank, starts, tol, max_iter)
        else:
            max_iter = max_iter or LANCZOS_MAX_ITER
            start = starts[0]
            for s_k in starts[1:]:  # add later starts at half weight: no cancellation
                n_k = space.norm(s_k)
                if n_k > 0:
                    start = start + (0.5 * space.norm(start) / n_k) * s_k
            sigmas, us, vs, iters, converged = lanczos(space, rank, start, tol, max_iter)
        if isinstance(space, GramSpace) and not space.resolves(sigmas):
            # a wanted σ below 1e-2 ‖R‖: redo with exact K, from the previous vectors
            exact = space.exact()
            starts = [exact.relift(v, space) for v in vs]
            if solver == "power":
                sigmas, us, vs, more, converged = power(exact, rank, starts, tol, max_iter)
            else:
                restart = starts[0]
                for v in starts[1:]:
                    restart = restart + v
                sigmas, us, vs, more, converged = lanczos(exact, rank, restart, tol, max_iter)
            space, iters = exact, iters + more
        if not converged:
            warnings.warn(
                f"{solver} solver did not reach the relative tolerance {tol:g} in"
                f" {iters} iterations; returning the last iterate",
                RuntimeWarning,
                stacklevel=2,
            )

    return NearestKroneckerResult(
        terms=space.factors(sigmas, us, vs, psd_first),
        sigmas=[float(s) for s in sigmas],
        solver=solver,
        products=space.name,
        iterations=iters,
        converged=converged,
    )
