"""Krylov solvers for the top singular triplets of R in a :class:`~.spaces.Space`.

* :func:`power`: alternating power iteration with deflation (the paper's algorithm),
  stopping when ‖Rᵀu − σv‖ ≤ tol·σ (relative, hence scale-invariant).
* :func:`lanczos`: Golub–Kahan bidiagonalisation with full reorthogonalisation and
  explicit restarts; stops when every wanted Ritz triplet has residual ≤ tol·σ₁.

Both return (σ's, u's, v's, iterations, converged).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .spaces import Space

__all__ = ["power", "lanczos", "Bidiagonal", "reorth", "small_svd", "LANCZOS_RESTART",
           "Triplets"]

LANCZOS_RESTART = 60
"""Lanczos steps between explicit restarts: bases of 60 vectors keep the
reorthogonalisation cheap (it grows with the basis) and are far more than the ~10–30 steps
a rank-2 solve of a Fisher block needs."""

Triplets = tuple[list[float], list[Tensor], list[Tensor]]


def power(
    space: Space, rank: int, starts: list[Tensor], tol: float, max_iter: int
) -> tuple[list[float], list[Tensor], list[Tensor], int, bool]:
    """Alternating power iteration with deflation.

    Returns:
        (σ's, u's, v's, iterations, converged).
    """
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


class Bidiagonal:
    """Growing upper bidiagonal matrix B (diagonal α, superdiagonal β) and its SVD."""

    def __init__(self, capacity: int):
        self.B = np.zeros((capacity, capacity + 1))
        self.k = 0

    def append(self, alpha: float) -> None:
        """Add α as the next diagonal entry."""
        self.B[self.k, self.k] = alpha
        self.k += 1

    def couple(self, beta: float) -> None:
        """β_k: couples the current last column to the next one."""
        self.B[self.k - 1, self.k] = beta

    @property
    def alphas(self) -> np.ndarray:
        """The diagonal entries so far."""
        return self.B.diagonal()[: self.k]

    def svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SVD of the current square bidiagonal matrix (:func:`small_svd`)."""
        return small_svd(self.B[: self.k, : self.k])

    def converged(self, beta: float, rank: int, tol: float) -> bool:
        """Every wanted Ritz triplet has residual β |P[k, i]| ≤ tol·σ₁."""
        P, S, _ = self.svd()
        worst = max(abs(float(p)) for p in P[-1, :rank])
        return beta * worst <= tol * float(S[0])


def small_svd(B: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, S, Qᵀ) with B = P diag(S) Qᵀ, S descending, for a small square float64 matrix.

    LAPACK's divide-and-conquer SVD (numpy's ``svd``) occasionally stops with "SVD did not
    converge" on finite input. Then the singular triplets are taken from the symmetric
    eigendecomposition of [[0, B], [Bᵀ, 0]] (another LAPACK routine, and no squaring of
    the singular values as BᵀB would): its eigenvalues are ±σ with eigenvectors
    [p; ±q]/√2. Only the triplets with σ > 0 are used by the solvers, and for those both
    routes agree to rounding; singular vectors of (numerically) zero σ are not unique and
    come back normalised but otherwise unspecified.

    Raises:
        numpy.linalg.LinAlgError: B has NaN/Inf entries, or both routes fail (the caller,
            :class:`~kronfisher.curvature.KroneckerEstimator`, then tries other solvers).
    """
    try:
        return np.linalg.svd(B)
    except np.linalg.LinAlgError:
        if not np.isfinite(B).all():
            raise np.linalg.LinAlgError(
                "SVD of the Lanczos bidiagonal matrix: it has NaN/Inf entries") from None
    k = B.shape[0]
    W = np.zeros((2 * k, 2 * k))
    W[:k, k:] = B
    W[k:, :k] = B.T
    w, X = np.linalg.eigh(W)  # ascending: the k largest are the σ's (≥ 0)
    top = np.arange(2 * k - 1, k - 1, -1)
    S = np.clip(w[top], 0.0, None)
    P, Q = X[:k, top].copy(), X[k:, top].copy()
    for M in (P, Q):
        norms = np.linalg.norm(M, axis=0)
        M /= np.where(norms > 0, norms, 1.0)
    return P, S, Q.T


def lanczos(
    space: Space, rank: int, start: Tensor, tol: float, max_iter: int,
    restart_every: int = LANCZOS_RESTART,
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
        B = Bidiagonal(restart_every)
        beta, breakdown, converged = 0.0, False, False
        for j in range(restart_every):
            total += 1
            u = U[j]
            space.R_into(V[j], u)
            if j:
                u.sub_(U[j - 1], alpha=beta)
                reorth(UL[:j], U[:j], u, space.right(u))
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
            reorth(VL[: j + 1], V[: j + 1], v, space.right(v))
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


def reorth(XL: Tensor, X: Tensor, w: Tensor, wr: Tensor) -> None:
    """W ← w − Σᵢ ⟨xᵢ, w⟩ xᵢ in place, twice (classical Gram–Schmidt).

    X has orthonormal rows, XL = left(X) and wr = right(w) (a view of w), so that
    ⟨xᵢ, w⟩ = (XL wr)ᵢ (see :class:`Space`).
    """
    Xt = X.mT
    for _ in range(2):
        w.addmv_(Xt, XL @ wr, alpha=-1)


