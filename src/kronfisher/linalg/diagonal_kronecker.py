"""Sums of Kronecker products with diagonal A factors: Σ_k diag(a_k) ⊗ G_k.

The curvature of an embedding (``nn.Linear(V, d, bias=False)`` on one-hot inputs,
Θ = weightᵀ of shape (d, V)): every method's A factors are diagonal, so a term is stored
as a V-vector and a d × d matrix, O(V + d²), and acts on a (d × V) matrix as
(diag(a) ⊗ G) vec(X) = vec(G X diag(a)). Damping means exactly what it means for
:class:`~kronfisher.linalg.KroneckerSum` (the same schemes, the same matrix):
:meth:`DiagonalKroneckerSum.to_dense` is the dense KroneckerSum's ``to_dense`` and
``solve`` inverts it (:mod:`~kronfisher.linalg.diagonal_factorization`).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .damping import DampingScheme, check_scheme, shifts_from_means
from .diagonal_factorization import DiagonalConjugateGradient, DiagonalFactorization
from .factorization import KroneckerFactorization, SingularFactorError
from .factorize import EIG_FLOOR, MIN_RATIO, congruence
from .kronecker import KroneckerSum
from .numerics import all_finite, check_square, eigh, sym

__all__ = ["DiagonalKroneckerSum"]


class DiagonalKroneckerSum:
    """Σ_k diag(a_k) ⊗ G_k acting on (d × V) matrices.

    Args:
        terms: list of ``(a, G)`` with a a V-vector (the diagonal of A) and G (d × d)
            symmetric.

    Raises:
        ValueError: no term, a not 1-D, G not square, or terms of different sizes.
    """

    def __init__(self, terms: list[tuple[Tensor, Tensor]]):
        if len(terms) == 0:
            raise ValueError("a DiagonalKroneckerSum needs at least one (a, G) term")
        V, d = terms[0][0].shape[-1], terms[0][1].shape[0]
        for i, (a, G) in enumerate(terms):
            check_square(f"G[{i}]", G)
            if a.ndim != 1 or a.shape[0] != V or G.shape[0] != d:
                raise ValueError(f"term {i} has a {tuple(a.shape)}, G {tuple(G.shape)};"
                                 f" expected a ({V},) and G ({d}, {d}) like term 0")
        self._terms = [(a, G) for a, G in terms]
        self.info: dict = {}

    @property
    def terms(self) -> list[tuple[Tensor, Tensor]]:
        """The (a_k, G_k) pairs (a new list; the tensors are shared)."""
        return list(self._terms)

    @property
    def shape(self) -> tuple[int, int]:
        """(d, V): the shape of the parameter matrices it acts on."""
        return int(self._terms[0][1].shape[0]), int(self._terms[0][0].shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """The factors' dtype."""
        return self._terms[0][1].dtype

    def __len__(self) -> int:
        return len(self._terms)

    def __repr__(self) -> str:
        d, V = self.shape
        return f"DiagonalKroneckerSum(terms={len(self)}, V={V}, d={d}, dtype={self.dtype})"

    def matvec(self, X: Tensor) -> Tensor:
        """(Σ diag(a_k) ⊗ G_k) vec(X) in matrix form: Σ G_k X diag(a_k), X (..., d, V)."""
        self._check(X)
        a0, G0 = self._terms[0]
        out = (G0 @ X) * a0
        for a, G in self._terms[1:]:
            out = out + (G @ X) * a
        return out

    def as_kronecker_sum(self) -> KroneckerSum:
        """The same matrix as a :class:`KroneckerSum` with dense V × V factors (tests only)."""
        return KroneckerSum([(torch.diag(a), G) for a, G in self._terms])

    def to_dense(self, damping: float = 0.0, scheme: DampingScheme = "tikhonov") -> Tensor:
        """The (d·V)² matrix ``solve(·, damping, scheme)`` inverts, as for a KroneckerSum.

        Forms V × V factors: for tests and small baselines only.
        """
        return self.as_kronecker_sum().to_dense(damping, scheme)

    def factorize(self, damping: float, scheme: DampingScheme = "tikhonov", *,
                  eig_floor: float = EIG_FLOOR, min_ratio: float = MIN_RATIO,
                  warn: bool = True) -> KroneckerFactorization:
        """A new factorisation of the damped matrix (see :class:`KroneckerSum.factorize`).

        Raises:
            ValueError: unknown scheme, damping not a finite number ≥ 0, non-finite factors.
            SingularFactorError: the damped matrix is singular (damping 0 and a token, or a
                direction of G, the curvature does not see).
        """
        check_scheme(scheme)
        if not (damping >= 0.0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        for i, (a, G) in enumerate(self._terms):
            if not (all_finite(a) and all_finite(G)):
                raise ValueError(f"term {i} of the DiagonalKroneckerSum has non-finite entries")
        if len(self) == 1:
            return _one_term(*self._terms[0], damping, scheme, eig_floor)
        if len(self) == 2:
            return _two_terms(self._terms, damping, scheme, min_ratio, warn)
        pre = _one_term(*self._terms[0], damping, "tikhonov", eig_floor)
        return DiagonalConjugateGradient(damping, scheme, 0, terms=self.terms, preconditioner=pre)

    def solve(self, X: Tensor, damping: float, scheme: DampingScheme = "tikhonov") -> Tensor:
        """Y of shape (..., d, V) with vec(Y) = to_dense(damping, scheme)⁻¹ vec(X)."""
        self._check(X)
        return self.factorize(damping, scheme).solve(X)

    def _check(self, X: Tensor) -> None:
        if X.ndim < 2 or tuple(X.shape[-2:]) != self.shape:
            raise ValueError(f"X must have shape (..., d, V) = (..., {self.shape[0]},"
                             f" {self.shape[1]}), got {tuple(X.shape)}")


def _shifts(a: Tensor, G: Tensor, damping: float, scheme: str, n_terms: int):
    if n_terms > 2 or (n_terms == 1 and scheme == "tikhonov") or damping == 0:
        return None
    return shifts_from_means(float(a.mean()), float(G.diagonal().mean()), damping, scheme,
                             n_terms)


def _one_term(a: Tensor, G: Tensor, damping: float, scheme: str, eig_floor: float
              ) -> DiagonalFactorization:
    """diag(a) ⊗ G damped by ``scheme``: eigh of G only (A is its own eigenbasis)."""
    shifts = _shifts(a, G, damping, scheme, 1)
    eg, U = eigh(sym(G))
    # the first term of every method is PSD: negative eigenvalues are rounding
    eg, a = eg.clamp_min(0), a.to(eg.dtype).clamp_min(0)
    if shifts is not None:  # (diag(a) + c_a I) ⊗ (G + c_g I)
        r = (eg + shifts[1]).sqrt()
        return DiagonalFactorization(damping, scheme, 0, K_g=U / r, K_g_inv=(U * r).mT,
                                     k_a=(a + shifts[0]).rsqrt(), c=1.0,
                                     s_g=eg.new_zeros(eg.shape), s_a=a.new_zeros(a.shape))
    fac = DiagonalFactorization(damping, scheme, 0, K_g=U, K_g_inv=U.mT,
                                k_a=torch.ones_like(a), c=damping, s_g=eg, s_a=a)
    if damping == 0.0:
        D = fac.D()
        floor = eig_floor * D.abs().max().clamp_min(torch.finfo(D.dtype).tiny)
        n_bad = int((D <= floor).sum())
        if n_bad:
            raise SingularFactorError(
                f"diag(a) ⊗ G is singular ({n_bad} eigenvalues ≤ {float(floor):.3g}, e.g. a"
                " token the curvature never saw) and no damping was given; pass damping > 0")
    return fac


def _two_terms(terms: list[tuple[Tensor, Tensor]], damping: float, scheme: str,
               min_ratio: float, warn: bool) -> DiagonalFactorization:
    """(diag(a₁) + c_a I) ⊗ (G₁ + c_g I) + diag(a₂) ⊗ G₂ by simultaneous diagonalisation."""
    (a1, G1), (a2, G2) = terms
    c_a, c_g = _shifts(a1, G1, damping, scheme, 2) or (0.0, 0.0)
    p = a1.clamp_min(0) + c_a  # the first term is PSD: negative entries are rounding
    if not bool((p > 0).all()):
        raise SingularFactorError(
            f"the first A factor is singular at {int((p <= 0).sum())} token(s) (tokens the"
            " curvature never saw) and there is no damping shift; pass damping > 0")
    Kg, Kg_inv, sg, _ = congruence(G1, G2, c_g, "G")
    if Kg_inv is None:  # the Cholesky route: K⁻¹ = Kᵀ (G₁ + c_g I)
        Kg_inv = Kg.mT @ (G1.to(Kg.dtype) + c_g * torch.eye(Kg.shape[0], dtype=Kg.dtype,
                                                             device=Kg.device))
    sa = a2.to(p.dtype) / p
    if scheme == "authors":  # 1 + |s_g||s_a| ≥ 1: never clamped
        sa, sg = sa.abs(), sg.abs()
    fac = DiagonalFactorization(damping, scheme, 0, K_g=Kg, K_g_inv=Kg_inv,
                                k_a=p.rsqrt().to(Kg.dtype), c=1.0, s_g=sg, s_a=sa.to(Kg.dtype),
                                floor=None if scheme == "authors" else min_ratio)
    clamped = 0 if scheme == "authors" else int((torch.outer(sg, fac.s_a) <= min_ratio - 1.0)
                                                .sum())
    fac.clamped = clamped
    if clamped and warn:
        warnings.warn(f"two-term Kronecker approximation is not positive definite in"
                      f" {clamped} direction(s): 1 + s_g s_a raised to {min_ratio} there",
                      RuntimeWarning, stacklevel=4)
    return fac
