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

import numpy as np
import torch
from torch import Tensor

from .rearrangement import LayerStats, _outer_gram, _sym, _symmetrize_

__all__ = ["nearest_kronecker", "product_costs", "SOLVERS", "NearestKroneckerResult"]

SOLVERS = ("power", "lanczos", "gram", "auto")
GRAM_MAX_TOKENS = 4096
"""Largest N = m·T for Gram-space products (two N × N Gram matrices)."""
PRODUCT_PAIRS_ESTIMATE = 8
"""Pairs of products (R, Rᵀ) a Krylov solve is assumed to need by the cost model."""


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


Terms = list[tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------- spaces
class _Space:
    """Where the singular vectors live and how R acts on them.

    Vectors are flat tensors. Their inner product is ``left(x) · right(y)``, row-wise for a
    stack of vectors, so Lanczos reorthogonalises against a whole basis with two products.
    Direct products: vec(U) and vec(V), left = right = identity. Gram space: u = P x is
    stored as [x, K_a x], so ⟨u, u'⟩ = x · (K_a x'); linear combinations of stored vectors
    keep both halves consistent without new products with K.
    """

    name: str
    eps: float  # relative size below which a singular value / Krylov direction is zero
    dtype: torch.dtype
    size_u: int  # flat lengths of the u (range of R) and v vectors
    size_v: int

    def R_into(self, v: Tensor, out: Tensor) -> None:
        """out ← R v."""
        raise NotImplementedError

    def Rt_into(self, u: Tensor, out: Tensor) -> None:
        """out ← Rᵀ u."""
        raise NotImplementedError

    def R(self, v: Tensor) -> Tensor:
        out = v.new_empty(self.size_u)
        self.R_into(v, out)
        return out

    def Rt(self, u: Tensor) -> Tensor:
        out = u.new_empty(self.size_v)
        self.Rt_into(u, out)
        return out

    def left(self, x: Tensor) -> Tensor:
        return x

    def right(self, x: Tensor) -> Tensor:
        return x

    def ip(self, x: Tensor, y: Tensor) -> float:
        return float(torch.dot(self.left(x), self.right(y)))

    def norm(self, x: Tensor) -> float:
        return math.sqrt(max(self.ip(x, x), 0.0))

    def default_start(self, index: int) -> Tensor:
        raise NotImplementedError

    def v_from_matrix(self, G: Tensor) -> Tensor:
        raise NotImplementedError

    def factors(
        self, sigmas: list[float], us: list[Tensor], vs: list[Tensor], psd_first: bool
    ) -> Terms:
        """Normalised factors: ‖A_k‖_F = ‖G_k‖_F = √σ_k, tr(A_k) ≥ 0, exactly symmetric."""
        raise NotImplementedError


class _DirectSpace(_Space):
    """Vectors are vec(U), U (d_a, d_a), and vec(V), V (d_g, d_g); Frobenius inner products."""

    name = "direct"

    def __init__(self, stats: LayerStats, center: bool):
        self.stats = stats
        self.eps = 1e-13 if stats.dtype == torch.float64 else 1e-6
        self.dtype = stats.dtype
        self.kfac = stats.kfac_factors() if center else None
        self.da, self.dg = stats.d_a, stats.d_g
        self.size_u, self.size_v = self.da**2, self.dg**2

    def R_into(self, v: Tensor, out: Tensor) -> None:
        V = v.view(self.dg, self.dg)
        U = out.view(self.da, self.da)
        U.copy_(self.stats.r_matvec(V))
        if self.kfac is not None:
            A, G = self.kfac
            U.sub_(A * (G * V).sum())

    def Rt_into(self, u: Tensor, out: Tensor) -> None:
        U = u.view(self.da, self.da)
        V = out.view(self.dg, self.dg)
        V.copy_(self.stats.rt_matvec(U))
        if self.kfac is not None:
            A, G = self.kfac
            V.sub_(G * (A * U).sum())

    def ip(self, x: Tensor, y: Tensor) -> float:
        # pairwise summation: a BLAS float32 dot of d² terms is too inexact for the power
        # method's test ‖Rᵀu − σv‖ ≤ tol·σ
        return float((x * y).sum())

    def v_from_matrix(self, G: Tensor) -> Tensor:
        return G.to(self.stats.dtype).reshape(-1).clone()

    def default_start(self, index: int) -> Tensor:
        """KFAC's G for the first uncentred pair, else a fixed pseudo-random symmetric matrix."""
        if index == 0 and self.kfac is None:
            return self.stats.kfac_factors()[1].reshape(-1)
        gen = torch.Generator().manual_seed(1234 + index)  # CPU stream: same start everywhere
        X = torch.randn(self.dg, self.dg, generator=gen, dtype=torch.float64)
        return (X + X.mT).to(device=self.stats.a.device, dtype=self.dtype).reshape(-1)

    def factors(
        self, sigmas: list[float], us: list[Tensor], vs: list[Tensor], psd_first: bool
    ) -> Terms:
        terms = []
        for k, (sigma, u, v) in enumerate(zip(sigmas, us, vs)):
            U, V = _sym(u.view(self.da, self.da)), _sym(v.view(self.dg, self.dg))
            if psd_first and k == 0:
                U, V = _psd_project(U), _psd_project(V)
            nu, nv = float(U.norm()), float(V.norm())
            if sigma == 0.0 or nu == 0.0 or nv == 0.0:
                terms.append((torch.zeros_like(U), torch.zeros_like(V)))
                continue
            sign = -1.0 if float(U.diagonal().sum()) < 0 else 1.0
            root = math.sqrt(sigma)
            terms.append((U.mul_(sign * root / nu), V.mul_(sign * root / nv)))
        return terms


class _GramSpace(_Space):
    """Coefficient vectors: u = P x, v = Q y, stored flat as [x, K_a x] and [y, K_g y]."""

    name = "gram"

    def __init__(self, stats: LayerStats, center: bool, float32_products: bool = False):
        self.stats = stats
        # Norms are square roots of quadratic forms xᵀKx: half the digits are lost.
        self.eps = 1e-7
        self.dtype = torch.float64  # of the coefficient vectors
        self.float32 = float32_products and stats.dtype == torch.float32
        if self.float32:
            # K in float32 halves the memory traffic of every product. Products are then
            # exact only to ~1e-7·σ₁, like the float32 inner products K is made of; the
            # power method's per-pair test (‖Rᵀu − σ_k v‖ ≤ tol·σ_k) needs float64 K.
            self.Ka = _outer_gram(stats.tokens_a).square_()
            self.Kg = _outer_gram(stats.tokens_g).square_()
        else:
            self.Ka, self.Kg = stats.grams()
        self.n = stats.n_tokens
        self.size_u = self.size_v = 2 * self.n
        self.center = center
        self.s = 1.0 / stats.m

    # R v = P C Qᵀ Q y / m = P (C K_g y / m): the new coefficients need only v's K_g y half.
    def _apply(self, z: Tensor, K: Tensor, out: Tensor) -> None:
        n = self.n
        x = out[:n]
        torch.mul(z[n:], self.s, out=x)
        if self.center:
            x.sub_(x.mean())
        if K.dtype == x.dtype:
            torch.mv(K, x, out=out[n:])
        else:
            out[n:] = torch.mv(K, x.to(K.dtype))

    def R_into(self, v: Tensor, out: Tensor) -> None:
        self._apply(v, self.Ka, out)

    def Rt_into(self, u: Tensor, out: Tensor) -> None:
        self._apply(u, self.Kg, out)

    def left(self, x: Tensor) -> Tensor:
        return x[..., : self.n]

    def right(self, x: Tensor) -> Tensor:
        return x[..., self.n :]

    def _lift(self, K: Tensor, z: Tensor) -> Tensor:
        return torch.cat((z, torch.mv(K, z.to(K.dtype)).to(z.dtype)))

    def resolves(self, sigmas: list[float]) -> bool:
        """Whether float32 products resolve these singular values: all within 1e3 of ‖R‖.

        Float32 products carry errors of ~1e-7‖R‖; far below it (nearly Kronecker-factored
        blocks) a float64 K is needed. ‖R‖ ≥ ‖R v‖ for v = Q 1/‖Q 1‖ (KFAC's G direction).
        """
        if not self.float32:
            return True
        ones = torch.ones(self.n, dtype=torch.float64, device=self.Kg.device)
        z = _matmul(ones[None], self.Kg)[0]  # Qᵀ Q 1; R v = P (s z) without centring
        x = z * self.s
        ny2, nx2 = float(ones @ z), float(x @ _matmul(x[None], self.Ka)[0])
        if ny2 <= 0.0:
            return True
        scale = max(math.sqrt(max(nx2, 0.0) / ny2), max(sigmas))
        return all(sig == 0.0 or sig >= 1e-3 * scale for sig in sigmas)

    def float64(self) -> _GramSpace:
        """The same space with float64 K."""
        return _GramSpace(self.stats, self.center)

    def relift(self, v: Tensor, other: _GramSpace) -> Tensor:
        """A v vector of ``other`` with its metric half recomputed with this space's K_g."""
        return self._lift(self.Kg, other.left(v))

    def v_from_matrix(self, G: Tensor) -> Tensor:
        # v = Rᵀ R vec(G) lies in range(Q): one power step from the given factor.
        tg = self.stats.tokens_g
        z = ((tg @ G.to(tg.dtype)) * tg).sum(-1).double()
        x = z - z.mean() if self.center else z
        return self.Rt(self._lift(self.Ka, x * self.s))

    def default_start(self, index: int) -> Tensor:
        if index == 0 and not self.center:
            y = torch.ones(self.n, dtype=torch.float64, device=self.Kg.device)
        else:
            gen = torch.Generator().manual_seed(1234 + index)
            y = torch.rand(self.n, generator=gen, dtype=torch.float64) - 0.5
            y = y.to(self.Kg.device)
        return self._lift(self.Kg, y)

    def factors(
        self, sigmas: list[float], us: list[Tensor], vs: list[Tensor], psd_first: bool
    ) -> Terms:
        # Coefficients are not unique when P or Q has a null space; the canonical ones
        # x ∝ C Qᵀv (= R v up to scale) and y ∝ C Pᵀu are, and they are ≥ 0 for the top
        # uncentred pair (Qᵀv = [gₙᵀ V gₙ]ₙ with V PSD), so clamping is only rounding.
        X = torch.stack([self.right(v) for v in vs])
        Y = torch.stack([self.right(u) for u in us])
        if self.center:
            X, Y = X - X.mean(1, keepdim=True), Y - Y.mean(1, keepdim=True)
        if psd_first:  # Perron–Frobenius: the top pair has coefficients of one sign
            X[0] = X[0] if X[0].sum() >= 0 else -X[0]
            Y[0] = Y[0] if Y[0].sum() >= 0 else -Y[0]
            X[0].clamp_min_(0)
            Y[0].clamp_min_(0)
        # ‖tokensᵀ diag(x) tokens‖_F² = xᵀ K x and its trace is Σₙ xₙ ‖tokenₙ‖²: the scaling
        # and the sign ride on the coefficients, no pass over the d × d factors.
        nx = (_matmul(X, self.Ka) * X).sum(1).clamp_min(0).sqrt().tolist()
        ny = (_matmul(Y, self.Kg) * Y).sum(1).clamp_min(0).sqrt().tolist()
        trace = (X @ self.Ka.diagonal().sqrt().to(X.dtype)).tolist()
        scale_x, scale_y = [], []
        for k, sigma in enumerate(sigmas):
            ok = sigma > 0.0 and nx[k] > 0.0 and ny[k] > 0.0
            # 0.5: _combine returns W + Wᵀ
            half_root = 0.5 * math.copysign(math.sqrt(sigma), trace[k]) if ok else 0.0
            scale_x.append(half_root / nx[k] if ok else 0.0)
            scale_y.append(half_root / ny[k] if ok else 0.0)
        ta, tg = self.stats.tokens_a, self.stats.tokens_g
        scratch = ta.new_empty(max(ta.numel(), tg.numel()))  # one buffer: fewer fresh pages
        As = _combine(ta, X * X.new_tensor(scale_x)[:, None], scratch)
        Gs = _combine(tg, Y * Y.new_tensor(scale_y)[:, None], scratch)
        return list(zip(As, Gs))


def _matmul(X: Tensor, K: Tensor) -> Tensor:
    """X K in X's dtype (K may be stored in lower precision)."""
    return (X.to(K.dtype) @ K).to(X.dtype)


def _combine(tokens: Tensor, coefs: Tensor, scratch: Tensor | None = None) -> list[Tensor]:
    """[W + Wᵀ for W = tokensᵀ diag(c) tokens, c in the rows of ``coefs``]: exactly symmetric.

    ``scratch`` (at least as many elements as ``tokens``) holds the scaled tokens.
    """
    if scratch is None:
        scratch = torch.empty_like(tokens)
    scaled = scratch.reshape(-1)[: tokens.numel()].view(tokens.shape)
    out = []
    for c in coefs.to(tokens.dtype):
        torch.mul(tokens, c[:, None], out=scaled)
        out.append(_symmetrize_(scaled.mT @ tokens))
    return out


def _psd_project(X: Tensor) -> Tensor:
    X = X if torch.diagonal(X).sum() >= 0 else -X
    e, U = torch.linalg.eigh(X)
    if bool((e >= 0).all()):
        return X
    return _sym((U * e.clamp_min(0)) @ U.mT)


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


def _make_space(stats: LayerStats, center: bool, products: str, solver: str) -> _Space:
    if products == "auto":
        use_gram = stats.flat and stats.n_tokens <= GRAM_MAX_TOKENS
        if use_gram:  # float64 coefficients, exact rank detection: keep Gram space unless
            cost = product_costs(stats)  # direct products are clearly cheaper
            use_gram = cost["gram"] <= 2.0 * cost["direct"]
        products = "gram" if use_gram else "direct"
    if products == "gram":
        if not stats.flat:
            raise ValueError("products='gram' needs flat statistics (Linear, or conv radius 0)")
        return _GramSpace(stats, center, float32_products=solver == "lanczos")
    if products == "direct":
        return _DirectSpace(stats, center)
    raise ValueError(f"products must be 'auto', 'gram' or 'direct', got {products!r}")


Triplets = tuple[list[float], list[Tensor], list[Tensor]]


# --------------------------------------------------------------------------- solvers
def _power(
    space: _Space, rank: int, starts: list[Tensor], tol: float, max_iter: int
) -> tuple[list[float], list[Tensor], list[Tensor], int, bool]:
    us: list[Tensor] = []
    vs: list[Tensor] = []
    sigmas: list[float] = []
    iters, converged = 0, True
    for k in range(rank):
        v = starts[k]
        nv = space.norm(v)
        if nv == 0.0:
            v = space.default_start(k + 1)
            nv = space.norm(v)
        if nv == 0.0 or not math.isfinite(nv):  # R(F) = 0: this and later terms are zero
            us.append(space.R(v) * 0)
            vs.append(v * 0)
            sigmas.append(0.0)
            continue
        v = v / nv
        u = v  # placeholder; set in the first iteration (max_iter ≥ 1)
        sigma, ok = 0.0, False
        for _ in range(max_iter):
            iters += 1
            u = space.R(v)
            for s_j, u_j, v_j in zip(sigmas, us, vs):
                u = u - (s_j * space.ip(v_j, v)) * u_j
            sigma = space.norm(u)
            if sigma <= space.eps * (sigmas[0] if sigmas else 0.0):
                sigma = 0.0  # deflated R is zero to working accuracy: rank(R) < rank
            if sigma == 0.0:
                ok = True
                break
            u = u / sigma
            w = space.Rt(u)
            for s_j, u_j, v_j in zip(sigmas, us, vs):
                w = w - (s_j * space.ip(u_j, u)) * v_j
            resid = space.norm(w - sigma * v)
            nw = space.norm(w)
            if nw == 0.0:
                ok = True
                break
            v = w / nw
            if resid <= tol * sigma:
                ok = True
                break
        if sigma == 0.0:
            u = torch.zeros_like(space.R(v))
        converged &= ok
        us.append(u)
        vs.append(v)
        sigmas.append(sigma)
    return sigmas, us, vs, iters, converged


class _Bidiagonal:
    """Growing upper bidiagonal matrix B (diagonal α, superdiagonal β) and its SVD."""

    def __init__(self, capacity: int):
        self.B = np.zeros((capacity, capacity + 1))
        self.k = 0

    def append(self, alpha: float) -> None:
        self.B[self.k, self.k] = alpha
        self.k += 1

    def couple(self, beta: float) -> None:
        """β_k: couples the current last column to the next one."""
        self.B[self.k - 1, self.k] = beta

    @property
    def alphas(self) -> np.ndarray:
        return self.B.diagonal()[: self.k]

    def svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.linalg.svd(self.B[: self.k, : self.k])

    def converged(self, beta: float, rank: int, tol: float) -> bool:
        """Every wanted Ritz triplet has residual β |P[k, i]| ≤ tol·σ₁."""
        P, S, _ = self.svd()
        worst = max(abs(float(p)) for p in P[-1, :rank])
        return beta * worst <= tol * float(S[0])


def _lanczos(
    space: _Space, rank: int, start: Tensor, tol: float, max_iter: int, restart_every: int = 60
) -> tuple[list[float], list[Tensor], list[Tensor], int, bool]:
    """Golub–Kahan–Lanczos bidiagonalisation with full reorthogonalisation.

    R V_k = U_k B_k, Rᵀ U_k = V_k B_kᵀ + β_k v_{k+1} e_kᵀ; the Ritz triplets of B_k have
    residuals β_k |P[k, i]|. The bases live in preallocated (restart_every, ·) buffers and
    every step works in place on their rows: one product with R and one with Rᵀ per step.
    """
    total, sig_scale = 0, 0.0
    v0 = start
    while True:
        nv = space.norm(v0)
        if nv == 0.0:  # start orthogonal to range(Rᵀ) (or R = 0): try a generic start
            v0 = space.default_start(rank + 1)
            nv = space.norm(v0)
        if nv == 0.0 or not math.isfinite(nv):  # R(F) = 0: every term is zero
            z_u, z_v = space.R(v0) * 0, v0 * 0
            return [0.0] * rank, [z_u] * rank, [z_v] * rank, total, True
        U = v0.new_empty((restart_every, space.size_u))
        V = v0.new_empty((restart_every + 1, space.size_v))
        torch.div(v0, nv, out=V[0])
        UL, VL = space.left(U), space.left(V)
        B = _Bidiagonal(restart_every)
        beta, breakdown, converged = 0.0, False, False
        for j in range(restart_every):
            total += 1
            u = U[j]
            space.R_into(V[j], u)
            if j:
                u.sub_(U[j - 1], alpha=beta)
                _reorth(UL[:j], U[:j], u, space.right(u))
            alpha = space.norm(u)
            scale = sig_scale or alpha
            sig_scale = max(sig_scale, alpha)
            if alpha <= space.eps * max(scale, 1e-300):
                breakdown = True
                B.append(0.0)
                u.zero_()
                beta = 0.0
                break
            B.append(alpha)
            u.div_(alpha)
            v = V[j + 1]
            space.Rt_into(u, v)
            v.sub_(V[j], alpha=alpha)
            _reorth(VL[: j + 1], V[: j + 1], v, space.right(v))
            beta = space.norm(v)
            if beta <= space.eps * sig_scale:
                breakdown = True
                break
            if B.k >= rank:
                converged = B.converged(beta, rank, tol)
                if converged or total >= max_iter:
                    break
            B.couple(beta)
            v.div_(beta)
        k = B.k
        P, S, Qt = B.svd()
        done = breakdown or converged
        if done or total >= max_iter:
            Pd = torch.from_numpy(P[:, :rank]).to(device=U.device, dtype=U.dtype)
            Qd = torch.from_numpy(Qt[:rank].T.copy()).to(device=V.device, dtype=V.dtype)
            us, vs, sigmas = [], [], []
            for i in range(rank):
                if i < k and S[i] > space.eps * S[0]:
                    us.append(U[:k].mT @ Pd[:, i])
                    vs.append(V[:k].mT @ Qd[:, i])
                    sigmas.append(float(S[i]))
                else:  # R has rank < requested: the remaining terms are zero
                    us.append(U.new_zeros(space.size_u))
                    vs.append(V.new_zeros(space.size_v))
                    sigmas.append(0.0)
            return sigmas, us, vs, total, done
        # explicit restart from the wanted Ritz vectors
        q = torch.from_numpy(Qt[: min(rank, k)].sum(0)).to(device=V.device, dtype=V.dtype)
        v0 = V[:k].mT @ q


def _reorth(XL: Tensor, X: Tensor, w: Tensor, wr: Tensor) -> None:
    """w ← w − Σᵢ ⟨xᵢ, w⟩ xᵢ in place, twice (classical Gram–Schmidt).

    X has orthonormal rows, XL = left(X) and wr = right(w) (a view of w), so that
    ⟨xᵢ, w⟩ = (XL wr)ᵢ (see :class:`_Space`).
    """
    Xt = X.mT
    for _ in range(2):
        w.addmv_(Xt, XL @ wr, alpha=-1)


def _gram_exact(stats: LayerStats, rank: int, center: bool) -> Triplets:
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
        sigmas.append(sigma / stats.m)
    return sigmas, us, vs


# --------------------------------------------------------------------------- driver
def _default_tol(stats: LayerStats) -> float:
    """1e-10 for float64 statistics, 1e-6 for float32 ones (whose Gram matrices and products
    carry ~1e-7 relative rounding). The Frobenius error of the result is quadratic in the
    residual, so 1e-6 leaves it at its optimum to far better than 1e-6 relative."""
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
        max_iter: iteration cap (power: per singular pair, default 1000; Lanczos: total
            steps, default 300). Not converging warns and returns the best iterate.
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

    space: _Space
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
        space = _make_space(stats, center, products, solver)
        starts = []
        for k in range(rank):
            if init is not None and k < len(init) and init[k][1].shape == (stats.d_g, stats.d_g):
                starts.append(space.v_from_matrix(init[k][1]))
            else:
                starts.append(space.default_start(k))
        if tol is None:
            tol = _default_tol(stats)
        if solver == "power":
            max_iter = max_iter or 1000
            sigmas, us, vs, iters, converged = _power(space, rank, starts, tol, max_iter)
        else:
            max_iter = max_iter or 300
            start = starts[0]
            for s_k in starts[1:]:  # add later starts at half weight: no cancellation
                n_k = space.norm(s_k)
                if n_k > 0:
                    start = start + (0.5 * space.norm(start) / n_k) * s_k
            sigmas, us, vs, iters, converged = _lanczos(space, rank, start, tol, max_iter)
            if isinstance(space, _GramSpace) and not space.resolves(sigmas):
                # a wanted σ below 1e-3 ‖R‖: redo with float64 K, from the float32 Ritz vectors
                exact = space.float64()
                start = sum(exact.relift(v, space) for v in vs)
                sigmas, us, vs, more, converged = _lanczos(exact, rank, start, tol, max_iter)
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
