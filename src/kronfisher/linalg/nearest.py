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
(``products="gram"``: u = P x, v = Q y, cost N² each after forming K_a and K_g once).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .rearrangement import LayerStats

__all__ = ["nearest_kronecker", "SOLVERS", "NearestKroneckerResult"]

SOLVERS = ("power", "lanczos", "gram", "auto")
GRAM_MAX_TOKENS = 4096


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


# --------------------------------------------------------------------------- spaces
class _DirectSpace:
    """Vectors are matrices: u ~ (d_a, d_a), v ~ (d_g, d_g); Frobenius inner products."""

    name = "direct"

    def __init__(self, stats: LayerStats, center: bool):
        self.stats = stats
        # relative size below which a singular value / Krylov direction counts as zero
        self.eps = 1e-13 if stats.dtype == torch.float64 else 1e-6
        self.kfac = stats.kfac_factors() if center else None

    def R(self, v: Tensor) -> Tensor:
        out = self.stats.r_matvec(v)
        if self.kfac is not None:
            A, G = self.kfac
            out = out - A * (G * v).sum()
        return out

    def Rt(self, u: Tensor) -> Tensor:
        out = self.stats.rt_matvec(u)
        if self.kfac is not None:
            A, G = self.kfac
            out = out - G * (A * u).sum()
        return out

    @staticmethod
    def ip(x: Tensor, y: Tensor) -> Tensor:
        return (x * y).sum()

    @staticmethod
    def ip_many(X: Tensor, y: Tensor) -> Tensor:  # X (k, ...) -> (k,)
        return (X * y).flatten(1).sum(1)

    def v_from_matrix(self, G: Tensor) -> Tensor:
        return G.to(self.stats.dtype)

    def default_start(self, index: int) -> Tensor:
        """KFAC's G for the first uncentred pair, else a fixed pseudo-random symmetric matrix."""
        if index == 0 and self.kfac is None:
            return self.stats.kfac_factors()[1]
        gen = torch.Generator().manual_seed(1234 + index)  # CPU stream: same start everywhere
        X = torch.randn(self.stats.d_g, self.stats.d_g, generator=gen, dtype=torch.float64)
        return (X + X.mT).to(dtype=self.stats.dtype, device=self.stats.a.device)

    def to_matrices(self, u: Tensor, v: Tensor, psd: bool) -> tuple[Tensor, Tensor]:
        U, V = _sym(u), _sym(v)
        if psd:
            U, V = _psd_project(U), _psd_project(V)
        return U, V


class _GramSpace:
    """Coefficient vectors: u = P x, v = Q y, stored as stacked (2, N) [x, K_a x] / [y, K_g y]."""

    name = "gram"

    def __init__(self, stats: LayerStats, center: bool):
        self.stats = stats
        # Norms are square roots of quadratic forms xᵀKx: half the digits are lost.
        self.eps = 1e-7
        self.Ka, self.Kg = stats.grams()
        self.center = center
        self.s = 1.0 / stats.m

    def _c(self, z: Tensor) -> Tensor:
        return z - z.mean() if self.center else z

    def R(self, v: Tensor) -> Tensor:
        x = self._c(v[1]) * self.s
        return torch.stack((x, self.Ka @ x))

    def Rt(self, u: Tensor) -> Tensor:
        y = self._c(u[1]) * self.s
        return torch.stack((y, self.Kg @ y))

    @staticmethod
    def ip(x: Tensor, y: Tensor) -> Tensor:
        return (x[0] * y[1]).sum()

    @staticmethod
    def ip_many(X: Tensor, y: Tensor) -> Tensor:
        return X[:, 0, :] @ y[1]

    def v_from_matrix(self, G: Tensor) -> Tensor:
        # v = Rᵀ R vec(G) lies in range(Q): one power step from the given factor.
        tg = self.stats.tokens_g
        z = ((tg @ G.to(tg.dtype)) * tg).sum(-1).double()
        x = self._c(z) * self.s
        return self.Rt(torch.stack((x, self.Ka @ x)))

    def default_start(self, index: int) -> Tensor:
        if index == 0 and not self.center:
            y = torch.ones(self.stats.n_tokens, dtype=torch.float64, device=self.Kg.device)
        else:
            gen = torch.Generator().manual_seed(1234 + index)
            y = torch.rand(self.stats.n_tokens, generator=gen, dtype=torch.float64) - 0.5
            y = y.to(self.Kg.device)
        return torch.stack((y, self.Kg @ y))

    def to_matrices(self, u: Tensor, v: Tensor, psd: bool) -> tuple[Tensor, Tensor]:
        # Coefficients are not unique when P or Q has a null space; the canonical ones
        # x ∝ C Qᵀv (= R v up to scale) and y ∝ C Pᵀu are, and they are ≥ 0 for the top
        # uncentred pair (Qᵀv = [gₙᵀ V gₙ]ₙ with V PSD), so clamping is only rounding.
        x, y = self._c(v[1]), self._c(u[1])
        return _combine(self.stats.tokens_a, x, psd), _combine(self.stats.tokens_g, y, psd)


def _combine(tokens: Tensor, coef: Tensor, psd: bool) -> Tensor:
    """tokensᵀ diag(coef) tokens, exactly symmetric; PSD by construction when ``psd``."""
    if psd:
        # Perron–Frobenius: the top pair of R(F) has coefficients of one sign.
        coef = coef if coef.sum() >= 0 else -coef
        B = tokens * coef.clamp_min(0).sqrt().to(tokens.dtype)[:, None]
        return _sym(B.mT @ B)
    return _sym((tokens * coef.to(tokens.dtype)[:, None]).mT @ tokens)


def _sym(x: Tensor) -> Tensor:
    return 0.5 * (x + x.mT)


def _psd_project(X: Tensor) -> Tensor:
    X = X if torch.diagonal(X).sum() >= 0 else -X
    e, U = torch.linalg.eigh(X)
    if bool((e >= 0).all()):
        return X
    return _sym((U * e.clamp_min(0)) @ U.mT)


def _make_space(stats: LayerStats, center: bool, products: str):
    if products == "auto":
        products = "gram" if stats.flat and stats.n_tokens <= GRAM_MAX_TOKENS else "direct"
    if products == "gram":
        if not stats.flat:
            raise ValueError("products='gram' needs flat statistics (Linear, or conv radius 0)")
        return _GramSpace(stats, center)
    if products == "direct":
        return _DirectSpace(stats, center)
    raise ValueError(f"products must be 'auto', 'gram' or 'direct', got {products!r}")


def _norm(space, x: Tensor) -> float:
    return math.sqrt(max(float(space.ip(x, x)), 0.0))


# --------------------------------------------------------------------------- solvers
def _power(space, rank, starts, tol, max_iter):
    us, vs, sigmas, iters, converged = [], [], [], 0, True
    for k in range(rank):
        v = starts[k]
        nv = _norm(space, v)
        if nv == 0.0:
            v = space.default_start(k + 1)
            nv = _norm(space, v)
        if nv == 0.0 or not math.isfinite(nv):  # R(F) = 0: this and later terms are zero
            us.append(space.R(v) * 0)
            vs.append(v * 0)
            sigmas.append(0.0)
            continue
        v = v / nv
        sigma, ok = 0.0, False
        for _ in range(max_iter):
            iters += 1
            u = space.R(v)
            for s_j, u_j, v_j in zip(sigmas, us, vs):
                u = u - (s_j * float(space.ip(v_j, v))) * u_j
            sigma = _norm(space, u)
            if sigma == 0.0:
                ok = True
                break
            u = u / sigma
            w = space.Rt(u)
            for s_j, u_j, v_j in zip(sigmas, us, vs):
                w = w - (s_j * float(space.ip(u_j, u))) * v_j
            resid = _norm(space, w - sigma * v)
            nw = _norm(space, w)
            if nw == 0.0:
                ok = True
                break
            v = w / nw
            if resid <= tol * sigma:
                ok = True
                break
        if sigma == 0.0:
            u = torch.zeros_like(v)
        converged &= ok
        us.append(u)
        vs.append(v)
        sigmas.append(sigma)
    return sigmas, us, vs, iters, converged


def _lanczos(space, rank, start, tol, max_iter, restart_every=60):
    """Golub–Kahan–Lanczos bidiagonalisation with full reorthogonalisation."""
    total, v0 = 0, start
    sig_scale = None
    while True:
        nv = _norm(space, v0)
        if nv == 0.0:  # start orthogonal to range(Rᵀ) (or R = 0): try a generic start
            v0 = space.default_start(rank + 1)
            nv = _norm(space, v0)
        if nv == 0.0 or not math.isfinite(nv):  # R(F) = 0: every term is zero
            z_u, z_v = space.R(v0) * 0, v0 * 0
            return [0.0] * rank, [z_u] * rank, [z_v] * rank, total, True
        v = v0 / nv
        Us, Vs, alphas, betas = [], [v], [], []
        beta_next, breakdown = 0.0, False
        for _j in range(restart_every):
            total += 1
            u = space.R(v)
            if Us:
                u = u - betas[-1] * Us[-1]
                u = _reorth(space, torch.stack(Us), u)
            alpha = _norm(space, u)
            scale = sig_scale or alpha
            sig_scale = max(sig_scale or 0.0, alpha)
            if alpha <= space.eps * max(scale, 1e-300):
                breakdown = True
                alphas.append(0.0)
                Us.append(torch.zeros_like(u))
                beta_next = 0.0
                break
            u = u / alpha
            Us.append(u)
            alphas.append(alpha)
            w = space.Rt(u) - alpha * v
            w = _reorth(space, torch.stack(Vs), w)
            beta_next = _norm(space, w)
            k = len(alphas)
            B = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if k > 1:
                B += torch.diag(torch.tensor(betas, dtype=torch.float64), 1)
            if beta_next <= space.eps * sig_scale:
                breakdown = True
                break
            if k >= rank:
                P, S, Qt = torch.linalg.svd(B)
                res = beta_next * P[-1, :rank].abs()
                if bool((res <= tol * S[0]).all()) or total >= max_iter:
                    break
            v = w / beta_next
            Vs.append(v)
            betas.append(beta_next)
        k = len(alphas)
        B = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if k > 1:
            B += torch.diag(torch.tensor(betas[: k - 1], dtype=torch.float64), 1)
        P, S, Qt = torch.linalg.svd(B)
        Vmat = torch.stack(Vs[:k])
        Umat = torch.stack(Us[:k])
        Pd = P.to(dtype=Umat.dtype, device=Umat.device)
        Qd = Qt.mT.to(dtype=Vmat.dtype, device=Vmat.device)
        res = beta_next * P[-1, : min(rank, k)].abs()
        done = breakdown or bool((res <= tol * S[0]).all())
        if done or total >= max_iter:
            us, vs, sigmas = [], [], []
            for i in range(rank):
                if i < k and S[i] > space.eps * S[0]:
                    us.append(torch.tensordot(Pd[:, i], Umat, dims=1))
                    vs.append(torch.tensordot(Qd[:, i], Vmat, dims=1))
                    sigmas.append(float(S[i]))
                else:  # R has rank < requested: the remaining terms are zero
                    us.append(torch.zeros_like(Umat[0]))
                    vs.append(torch.zeros_like(Vmat[0]))
                    sigmas.append(0.0)
            return sigmas, us, vs, total, done
        # explicit restart from the wanted Ritz vectors
        v0 = sum(torch.tensordot(Qd[:, i], Vmat, dims=1) for i in range(min(rank, k)))


def _reorth(space, X: Tensor, w: Tensor) -> Tensor:
    for _ in range(2):  # classical Gram–Schmidt, twice
        c = space.ip_many(X, w).to(w.dtype)
        w = w - torch.tensordot(c, X, dims=1)
    return w


def _gram_exact(stats: LayerStats, rank: int, center: bool):
    """Exact top-k SVD of (centred) R from two N × N eigendecompositions."""
    Ka, Kg0 = stats.grams()
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
        if idx < 0 or s2 <= 1e-14 * max(float(mu[-1]), 1e-300):  # σ ≤ 1e-7 σ₁: zero
            z = torch.zeros(N, dtype=Ka.dtype, device=Ka.device)
            us.append(torch.stack((z, z)))
            vs.append(torch.stack((z, z)))
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
        us.append(torch.stack((x, Ka @ x)))
        vs.append(torch.stack((y, Kg0 @ y)))
        sigmas.append(sigma / stats.m)
    return sigmas, us, vs


# --------------------------------------------------------------------------- driver
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
        solver: "power", "lanczos", "gram" or "auto" (Lanczos; Gram-space products for
            flat statistics with at most 4096 tokens).
        center: approximate R − vec(A_K)vec(G_K)ᵀ instead of R (KFAC-corrected).
        init: previous factors ``[(A, G), ...]`` to warm-start power/Lanczos from.
        tol: relative residual tolerance (default 1e-10 in float64 arithmetic, 1e-6
            for float32 direct products).
        max_iter: iteration cap (power: per singular pair, default 1000; Lanczos: total
            steps, default 300). Not converging warns and returns the best iterate.
        products: "auto", "gram" or "direct" (see module docstring).

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

    if solver == "gram":
        if not stats.flat:
            raise ValueError(
                "solver='gram' needs flat statistics (Linear layers or conv radius 0);"
                " use 'lanczos' or 'power'"
            )
        space = _GramSpace(stats, center)
        sigmas, us, vs = _gram_exact(stats, rank, center)
        iters, converged = 0, True
    else:
        space = _make_space(stats, center, products)
        starts = []
        for k in range(rank):
            if init is not None and k < len(init) and init[k][1].shape == (stats.d_g, stats.d_g):
                starts.append(space.v_from_matrix(init[k][1]))
            else:
                starts.append(space.default_start(k))
        in_f64 = space.name == "gram" or stats.dtype == torch.float64
        tol = tol if tol is not None else (1e-10 if in_f64 else 1e-6)
        if solver == "power":
            max_iter = max_iter or 1000
            sigmas, us, vs, iters, converged = _power(space, rank, starts, tol, max_iter)
        else:
            max_iter = max_iter or 300
            start = starts[0]
            for s_k in starts[1:]:  # add later starts at half weight: no cancellation
                n_k = _norm(space, s_k)
                if n_k > 0:
                    start = start + (0.5 * _norm(space, start) / n_k) * s_k
            sigmas, us, vs, iters, converged = _lanczos(space, rank, start, tol, max_iter)
        if not converged:
            warnings.warn(
                f"{solver} solver did not reach the relative tolerance {tol:g} in"
                f" {iters} iterations; returning the last iterate",
                RuntimeWarning,
                stacklevel=2,
            )

    terms = []
    for k, (sigma, u, v) in enumerate(zip(sigmas, us, vs)):
        U, V = space.to_matrices(u, v, psd=psd_first and k == 0)
        if sigma == 0.0:
            terms.append((torch.zeros_like(U), torch.zeros_like(V)))
            continue
        # Normalise exactly: ‖A‖ = ‖G‖ = √σ, and fix the sign so that tr(A) ≥ 0.
        nu, nv = U.norm(), V.norm()
        sign = -1.0 if float(U.diagonal().sum()) < 0 else 1.0
        root = math.sqrt(sigma)
        terms.append((U * (sign * root / nu), V * (sign * root / nv)))
    return NearestKroneckerResult(
        terms=terms,
        sigmas=[float(s) for s in sigmas],
        solver=solver,
        products=space.name,
        iterations=iters,
        converged=converged,
    )
