"""Factorised damped sums Σ diag(a_k) ⊗ G_k (an embedding's curvature), O(V + d²) each.

With every A factor diagonal the simultaneous diagonalisation of DESIGN.md §5 is trivial
on the A side: K_a = diag(k_a) with k_a = (a₁ + c_a)^(-1/2) and s_a = a₂ ⊘ (a₁ + c_a).
Every one- and two-term scheme of :class:`~kronfisher.linalg.KroneckerSum` then has the
form

    M = (K_a⁻ᵀ ⊗ K_g⁻ᵀ) diag(vec D) (K_a⁻¹ ⊗ K_g⁻¹),   D = c + s_g s_aᵀ  (d × V),

so D is never stored: ``solve`` is X = K_g [(K_gᵀ V) ∘ (k_a² ⊘ D)] (k_a² broadcast over
rows), two d × d by d × V products. Three or more terms use the conjugate gradients of
:class:`~kronfisher.linalg.ConjugateGradientSolve` with the diagonal-A product.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .factorization import ConjugateGradientSolve, KroneckerFactorization

__all__ = ["DiagonalFactorization", "DiagonalConjugateGradient"]


@dataclass(kw_only=True)
class DiagonalFactorization(KroneckerFactorization):
    """M = (K_a⁻ᵀ ⊗ K_g⁻ᵀ) diag(vec D) (K_a⁻¹ ⊗ K_g⁻¹) with K_a = diag(k_a) (module docstring).

    Attributes:
        K_g, K_g_inv: (d, d) and its inverse.
        k_a: (V,) the diagonal of K_a.
        c: the constant of D = c + s_g s_aᵀ.
        s_g, s_a: (d,) and (V,).
        floor: entries of D at or below it are raised to it (two-term clamping), or None.
    """

    K_g: Tensor = field(repr=False)
    K_g_inv: Tensor = field(repr=False)
    k_a: Tensor = field(repr=False)
    c: float = 1.0
    s_g: Tensor = field(repr=False)
    s_a: Tensor = field(repr=False)
    floor: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(d, V): the shape of the matrices it acts on."""
        return int(self.K_g.shape[0]), int(self.k_a.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in."""
        return self.K_g.dtype

    def D(self) -> Tensor:
        """The d × V eigenvalue matrix (formed on demand; clamped at ``floor``)."""
        D = torch.addr(torch.full((), self.c, dtype=self.dtype, device=self.K_g.device),
                       self.s_g, self.s_a)
        if self.floor is not None:
            D = torch.where(D <= self.floor, torch.as_tensor(self.floor, dtype=D.dtype), D)
        return D

    def _solve(self, V: Tensor) -> Tensor:
        return self.K_g @ ((self.K_g.mT @ V) * (self.k_a.square() / self.D()))

    def apply(self, V: Tensor) -> Tensor:
        """M vec(V) in matrix form, V of shape (..., d, V)."""
        V = V.to(self.dtype)
        return self.K_g_inv.mT @ ((self.K_g_inv @ V) * (self.D() / self.k_a.square()))

    def to_dense(self) -> Tensor:
        """The (d·V)² matrix M that ``solve`` inverts (tests and small baselines)."""
        left = torch.kron(torch.diag(1.0 / self.k_a), self.K_g_inv)
        d = self.D().mT.reshape(-1)  # vec(D): column stacking
        return left.mT @ (d[:, None] * left)


@dataclass(kw_only=True)
class DiagonalConjugateGradient(ConjugateGradientSolve):
    """Σ_k diag(a_k) ⊗ G_k + λ I (three or more terms) by preconditioned conjugate gradients.

    ``terms`` holds the (a_k (V,), G_k (d, d)) pairs; the iteration is the parent's.
    """

    def apply(self, V: Tensor) -> Tensor:
        """M vec(V) in matrix form, V of shape (..., d, V)."""
        V = V.to(self.dtype)
        out = self.damping * V
        for a, G in self.terms:
            out = out + (G @ V) * a
        return out

    def to_dense(self) -> Tensor:
        """The (d·V)² matrix M that ``solve`` inverts."""
        a0, G0 = self.terms[0]
        out = torch.kron(torch.diag(a0), G0)
        for a, G in self.terms[1:]:
            out = out + torch.kron(torch.diag(a), G)
        return out + self.damping * torch.eye(out.shape[0], dtype=out.dtype, device=out.device)
