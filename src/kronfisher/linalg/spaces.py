"""Where the singular vectors of R(F) live and how R acts on them.

* :class:`DirectSpace`: vec(U) (d_a × d_a) and vec(V) (d_g × d_g); products with R cost
  N(d_a² + d_g²) each.
* :class:`GramSpace`: flat statistics only; coefficient vectors u = P x, v = Q y with
  P = [vec(a_n a_nᵀ)]_n, Q = [vec(g_n g_nᵀ)]_n; products cost N² each after forming the
  N × N Gram matrices K_a = PᵀP, K_g = QᵀQ once.

Both optionally act on the KFAC-centred R − vec(A_K) vec(G_K)ᵀ = (1/m) P C Qᵀ
(C = I − 11ᵀ/N), in Gram space by that identity (no subtraction of nearly equal matrices).
Each space also turns singular vectors into normalised Kronecker factors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .numerics import sym, symmetrize_
from .stats import LayerStats, outer_gram

__all__ = ["Space", "DirectSpace", "GramSpace", "Terms", "GRAM_PRECISIONS", "RESOLVE_RATIO",
           "psd_project", "combine", "matmul_in"]

Terms = list[tuple[Tensor, Tensor]]

GRAM_PRECISIONS = ("float32", "float64", "exact")
"""How K is formed for float32 statistics: float32 products stored in float32, float32
products squared into float64, or float64 products (the only choice for float64 ones)."""
RESOLVE_RATIO = 1e-2
"""A σ below this fraction of ‖R‖ needs exact Gram matrices (see GramSpace.resolves): K's
float32 rounding (~1e-7 of ‖R‖² on σ²) is then ≥ 1e-3 of σ² — 1e-2 keeps the error of
such a term well below 1e-3 of the Fisher error it is meant to reduce."""
GRAM_EPS = 1e-7
"""Gram space: norms are square roots of quadratic forms xᵀKx, so half the digits are lost:
a relative size below this is zero."""
DIRECT_EPS = {True: 1e-13, False: 1e-6}
"""Direct space, keyed by 'float64 statistics': a relative size below this is zero."""
START_SEED = 1234
"""Seed of the pseudo-random starting vectors (reproducible on every device)."""


class Space:
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
        """Write R v into ``out``."""
        raise NotImplementedError

    def Rt_into(self, u: Tensor, out: Tensor) -> None:
        """Write Rᵀ u into ``out``."""
        raise NotImplementedError

    def R(self, v: Tensor) -> Tensor:
        """R v as a new vector."""
        out = v.new_empty(self.size_u)
        self.R_into(v, out)
        return out

    def Rt(self, u: Tensor) -> Tensor:
        """Rᵀ u as a new vector."""
        out = u.new_empty(self.size_v)
        self.Rt_into(u, out)
        return out

    def left(self, x: Tensor) -> Tensor:
        """The part of a stored vector that pairs with ``right`` in inner products."""
        return x

    def right(self, x: Tensor) -> Tensor:
        """The part of a stored vector that pairs with ``left`` in inner products."""
        return x

    def ip(self, x: Tensor, y: Tensor) -> float:
        """The inner product ⟨x, y⟩ of two stored vectors."""
        return float(torch.dot(self.left(x), self.right(y)))

    def norm(self, x: Tensor) -> float:
        """The norm of a stored vector."""
        return math.sqrt(max(self.ip(x, x), 0.0))

    def default_start(self, index: int) -> Tensor:
        """A start vector for the ``index``-th singular pair."""
        raise NotImplementedError

    def v_from_matrix(self, G: Tensor) -> Tensor:
        """The v vector of a d_g × d_g factor G (for warm starts)."""
        raise NotImplementedError

    def factors(
        self, sigmas: list[float], us: list[Tensor], vs: list[Tensor], psd_first: bool
    ) -> Terms:
        """Normalised factors: ‖A_k‖_F = ‖G_k‖_F = √σ_k, tr(A_k) ≥ 0, exactly symmetric."""
        raise NotImplementedError


class DirectSpace(Space):
    """Vectors are vec(U), U (d_a, d_a), and vec(V), V (d_g, d_g); Frobenius inner products."""

    name = "direct"

    def __init__(self, stats: LayerStats, center: bool):
        self.stats = stats
        self.eps = DIRECT_EPS[stats.dtype == torch.float64]
        self.dtype = stats.dtype
        self.kfac = stats.kfac_factors() if center else None
        self.da, self.dg = stats.d_a, stats.d_g
        self.size_u, self.size_v = self.da**2, self.dg**2

    def R_into(self, v: Tensor, out: Tensor) -> None:
        """Write R v into ``out``."""
        V = v.view(self.dg, self.dg)
        U = out.view(self.da, self.da)
        U.copy_(self.stats.r_matvec(V))
        if self.kfac is not None:
            A, G = self.kfac
            U.sub_(A * (G * V).sum())

    def Rt_into(self, u: Tensor, out: Tensor) -> None:
        """Write Rᵀ u into ``out``."""
        U = u.view(self.da, self.da)
        V = out.view(self.dg, self.dg)
        V.copy_(self.stats.rt_matvec(U))
        if self.kfac is not None:
            A, G = self.kfac
            V.sub_(G * (A * U).sum())

    def ip(self, x: Tensor, y: Tensor) -> float:
        """The inner product ⟨x, y⟩ of two stored vectors."""
        # pairwise summation: a BLAS float32 dot of d² terms is too inexact for the power
        # method's test ‖Rᵀu − σv‖ ≤ tol·σ
        return float((x * y).sum())

    def v_from_matrix(self, G: Tensor) -> Tensor:
        """The v vector of a d_g × d_g factor G (for warm starts)."""
        return G.to(self.stats.dtype).reshape(-1).clone()

    def default_start(self, index: int) -> Tensor:
        """KFAC's G for the first uncentred pair, else a fixed pseudo-random symmetric matrix."""
        if index == 0 and self.kfac is None:
            return self.stats.kfac_factors()[1].reshape(-1)
        # CPU stream: the same start on every device
        gen = torch.Generator().manual_seed(START_SEED + index)
        X = torch.randn(self.dg, self.dg, generator=gen, dtype=torch.float64)
        return (X + X.mT).to(device=self.stats.a.device, dtype=self.dtype).reshape(-1)

    def factors(
        self, sigmas: list[float], us: list[Tensor], vs: list[Tensor], psd_first: bool
    ) -> Terms:
        """Normalised factors: ‖A_k‖_F = ‖G_k‖_F = √σ_k, tr(A_k) ≥ 0, exactly symmetric."""
        terms = []
        for k, (sigma, u, v) in enumerate(zip(sigmas, us, vs)):
            U, V = sym(u.view(self.da, self.da)), sym(v.view(self.dg, self.dg))
            if psd_first and k == 0:
                U, V = psd_project(U), psd_project(V)
            nu, nv = float(U.norm()), float(V.norm())
            if sigma == 0.0 or nu == 0.0 or nv == 0.0:
                terms.append((torch.zeros_like(U), torch.zeros_like(V)))
                continue
            sign = -1.0 if float(U.diagonal().sum()) < 0 else 1.0
            root = math.sqrt(sigma)
            terms.append((U.mul_(sign * root / nu), V.mul_(sign * root / nv)))
        return terms


class GramSpace(Space):
    """Coefficient vectors: u = P x, v = Q y, stored flat as [x, K_a x] and [y, K_g y]."""

    name = "gram"

    def __init__(self, stats: LayerStats, center: bool, precision: str = "float64"):
        if precision not in GRAM_PRECISIONS:
            raise ValueError(f"precision must be one of {GRAM_PRECISIONS}, got {precision!r}")
        self.stats = stats
        self.eps = GRAM_EPS
        self.dtype = torch.float64  # of the coefficient vectors
        if stats.dtype == torch.float64:
            precision = "exact"  # float64 statistics: every route is exact
        self.precision = precision
        if precision == "float32":
            # K in float32 halves the memory traffic of every product. Products are then
            # exact only to ~1e-7·σ₁, like the float32 inner products K is made of; the
            # power method's per-pair test (‖Rᵀu − σ_k v‖ ≤ tol·σ_k) needs float64 K.
            self.Ka = outer_gram(stats.tokens_a).square_()
            self.Kg = outer_gram(stats.tokens_g).square_()
        else:
            self.Ka, self.Kg = stats.grams(exact=precision == "exact")
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
        """Write R v into ``out``."""
        self._apply(v, self.Ka, out)

    def Rt_into(self, u: Tensor, out: Tensor) -> None:
        """Write Rᵀ u into ``out``."""
        self._apply(u, self.Kg, out)

    def left(self, x: Tensor) -> Tensor:
        """The part of a stored vector that pairs with ``right`` in inner products."""
        return x[..., : self.n]

    def right(self, x: Tensor) -> Tensor:
        """The part of a stored vector that pairs with ``left`` in inner products."""
        return x[..., self.n :]

    def _lift(self, K: Tensor, z: Tensor) -> Tensor:
        return torch.cat((z, torch.mv(K, z.to(K.dtype)).to(z.dtype)))

    def resolves(self, sigmas: list[float]) -> bool:
        """Whether this space's K resolves these singular values.

        K formed from float32 token products carries errors of ~1e-7 relative to its
        entries, i.e. ~1e-7‖R‖² on the squared singular values it works with, so a σ
        below :data:`RESOLVE_RATIO`·‖R‖ (nearly Kronecker-factored blocks, the
        KFAC-centred problem of such a block) is not resolved and needs the exact space.
        ‖R‖ ≥ ‖R v‖ for v = Q 1/‖Q 1‖ (KFAC's G direction) gives the scale.
        """
        if self.precision == "exact":
            return True
        ones = torch.ones(self.n, dtype=torch.float64, device=self.Kg.device)
        z = matmul_in(ones[None], self.Kg)[0]  # Qᵀ Q 1; R v = P (s z) without centring
        x = z * self.s
        ny2, nx2 = float(ones @ z), float(x @ matmul_in(x[None], self.Ka)[0])
        if ny2 <= 0.0:
            return True
        scale = max(math.sqrt(max(nx2, 0.0) / ny2), max(sigmas))
        return all(sig == 0.0 or sig >= RESOLVE_RATIO * scale for sig in sigmas)

    def exact(self) -> GramSpace:
        """The same space with K formed from float64 token products."""
        return GramSpace(self.stats, self.center, "exact")

    def relift(self, v: Tensor, other: GramSpace) -> Tensor:
        """A v vector of ``other`` with its metric half recomputed with this space's K_g."""
        return self._lift(self.Kg, other.left(v))

    def v_from_matrix(self, G: Tensor) -> Tensor:
        """The v vector of a d_g × d_g factor G (for warm starts)."""
        # v = Rᵀ R vec(G) lies in range(Q): one power step from the given factor.
        tg = self.stats.tokens_g
        z = ((tg @ G.to(tg.dtype)) * tg).sum(-1).double()
        x = z - z.mean() if self.center else z
        return self.Rt(self._lift(self.Ka, x * self.s))

    def default_start(self, index: int) -> Tensor:
        """A start vector for the ``index``-th singular pair."""
        if index == 0 and not self.center:
            y = torch.ones(self.n, dtype=torch.float64, device=self.Kg.device)
        else:
            gen = torch.Generator().manual_seed(START_SEED + index)
            y = torch.rand(self.n, generator=gen, dtype=torch.float64) - 0.5
            y = y.to(self.Kg.device)
        return self._lift(self.Kg, y)

    def factors(
        self, sigmas: list[float], us: list[Tensor], vs: list[Tensor], psd_first: bool
    ) -> Terms:
        """Normalised factors: ‖A_k‖_F = ‖G_k‖_F = √σ_k, tr(A_k) ≥ 0, exactly symmetric."""
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
        nx = (matmul_in(X, self.Ka) * X).sum(1).clamp_min(0).sqrt().tolist()
        ny = (matmul_in(Y, self.Kg) * Y).sum(1).clamp_min(0).sqrt().tolist()
        trace = (X @ self.Ka.diagonal().sqrt().to(X.dtype)).tolist()
        scale_x, scale_y = [], []
        for k, sigma in enumerate(sigmas):
            ok = sigma > 0.0 and nx[k] > 0.0 and ny[k] > 0.0
            # 0.5: combine returns W + Wᵀ
            half_root = 0.5 * math.copysign(math.sqrt(sigma), trace[k]) if ok else 0.0
            scale_x.append(half_root / nx[k] if ok else 0.0)
            scale_y.append(half_root / ny[k] if ok else 0.0)
        ta, tg = self.stats.tokens_a, self.stats.tokens_g
        scratch = ta.new_empty(max(ta.numel(), tg.numel()))  # one buffer: fewer fresh pages
        As = combine(ta, X * X.new_tensor(scale_x)[:, None], scratch)
        Gs = combine(tg, Y * Y.new_tensor(scale_y)[:, None], scratch)
        return list(zip(As, Gs))


def matmul_in(X: Tensor, K: Tensor) -> Tensor:
    """X K in X's dtype (K may be stored in lower precision)."""
    return (X.to(K.dtype) @ K).to(X.dtype)


def combine(tokens: Tensor, coefs: Tensor, scratch: Tensor | None = None) -> list[Tensor]:
    """[W + Wᵀ for W = tokensᵀ diag(c) tokens, c in the rows of ``coefs``]: exactly symmetric.

    ``scratch`` (at least as many elements as ``tokens``) holds the scaled tokens.
    """
    if scratch is None:
        scratch = torch.empty_like(tokens)
    scaled = scratch.reshape(-1)[: tokens.numel()].view(tokens.shape)
    out = []
    for c in coefs.to(tokens.dtype):
        torch.mul(tokens, c[:, None], out=scaled)
        out.append(symmetrize_(scaled.mT @ tokens))
    return out


def psd_project(X: Tensor) -> Tensor:
    """X (sign fixed so that tr X ≥ 0) projected onto the PSD cone."""
    X = X if torch.diagonal(X).sum() >= 0 else -X
    e, U = torch.linalg.eigh(X)
    if bool((e >= 0).all()):
        return X
    return sym((U * e.clamp_min(0)) @ U.mT)


