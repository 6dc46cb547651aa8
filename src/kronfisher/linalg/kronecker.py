"""Sums of Kronecker products Σ_k A_k ⊗ G_k and their dense form.

Conventions (DESIGN.md §2, §5): a parameter matrix V has shape (d_g, d_a), vec is column
stacking, and (A ⊗ G) vec(V) = vec(G V Aᵀ), so the dense form of a term is
``torch.kron(A, G)``.

:meth:`KroneckerSum.factorize` returns a new, explicit
:class:`~kronfisher.linalg.factorization.KroneckerFactorization` each time (nothing is
cached inside the sum): whoever solves many times keeps that object.

``all_finite`` and ``SCHEMES`` are re-exported here for code that imports them from this
module.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .damping import SCHEMES, DampingScheme, check_scheme, first_term_shifts, relative_abs
from .factorization import (
    ConjugateGradientSolve,
    KroneckerFactorization,
    SingularFactorError,
)
from .factorize import EIG_FLOOR, MIN_RATIO, factorize_one, factorize_two
from .numerics import all_finite, check_square

__all__ = ["KroneckerSum", "KroneckerFactorization", "SingularFactorError", "SCHEMES",
           "all_finite"]


class KroneckerSum:
    """A sum of Kronecker products Σ_k A_k ⊗ G_k acting on (d_g × d_a) matrices.

    Args:
        terms: list of ``(A, G)`` with A (d_a × d_a) and G (d_g × d_g), symmetric.

    ``solve(V, damping, scheme)`` inverts ``to_dense(damping, scheme)`` (λ = damping):

    * one term, ``"tikhonov"`` (default): A ⊗ G + λ I exactly, through the
      eigendecompositions A = U_a Λ_a U_aᵀ and G = U_g Λ_g U_gᵀ.
    * one term, ``"factored"``: (A + π√λ I) ⊗ (G + √λ/π I), π = :func:`pi_factor`, by the
      Cholesky-based inverses of the two damped factors (X = G_d⁻¹ V A_d⁻¹).
    * one term, ``"factored_pi1"`` or ``"authors"``: (A + √λ I) ⊗ (G + √λ I) (π = 1, the
      authors' scheme), likewise.
    * two terms, ``"tikhonov"`` or ``"factored"``: (A₁ + π√λ I) ⊗ (G₁ + √λ/π I) + A₂ ⊗ G₂;
      ``"factored_pi1"``: (A₁ + √λ I) ⊗ (G₁ + √λ I) + A₂ ⊗ G₂; all by simultaneous
      diagonalisation of the two A's and of the two G's (DESIGN.md §5). For λ = 0 the
      first term alone must be positive definite.
    * two terms, ``"authors"``: (A₁ + λ I) ⊗ (G₁ + λ I) + |A₂| ⊗ |G₂|, where |A₂| is A₂
      with the signs of its eigenvalues relative to A₁ + λ I dropped (K_aᵀ A₂ K_a = S_a
      becomes |S_a|): the inverse scales by 1 / (1 + |s_g||s_a|), never clamped.
    * three or more terms (any scheme): Σ A_k ⊗ G_k + λ I, by conjugate gradients
      preconditioned with the damped first term; ``to_dense`` is the exact sum.

    The first term's factors are taken as positive semi-definite (true for every method
    in this package). In the eigendecomposition routes negative eigenvalues of A₁ and G₁,
    which arise from rounding, are set to 0 before damping; the factored one-term route
    inverts the damped factors as they are (rounding is far below the shift) and falls
    back to the eigen route if a Cholesky fails.

    Not positive definite: one term never is for λ > 0. For two terms, an eigenvalue
    1 + s_g s_a of the damped matrix relative to its damped first term at or below
    ``min_ratio`` is raised to ``min_ratio`` and a RuntimeWarning says how many; the
    matrix then inverted is ``factorize(damping).to_dense()`` and
    ``factorize(damping).clamped`` counts the clamped eigenvalues. A singular matrix with
    damping λ = 0 raises :class:`SingularFactorError` instead.
    """

    def __init__(self, terms: list[tuple[Tensor, Tensor]]):
        if len(terms) == 0:
            raise ValueError("a KroneckerSum needs at least one (A, G) term")
        d_a, d_g = terms[0][0].shape[0], terms[0][1].shape[0]
        for i, (A, G) in enumerate(terms):
            check_square(f"A[{i}]", A)
            check_square(f"G[{i}]", G)
            if A.shape[0] != d_a or G.shape[0] != d_g:
                raise ValueError(
                    f"term {i} has shapes A {tuple(A.shape)}, G {tuple(G.shape)}; expected"
                    f" A ({d_a}, {d_a}) and G ({d_g}, {d_g}) like term 0"
                )
        self._terms = [(A, G) for A, G in terms]
        self.info: dict = {}

    # ------------------------------------------------------------------ basics
    @property
    def terms(self) -> list[tuple[Tensor, Tensor]]:
        """The (A_k, G_k) pairs (a new list; the tensors are shared)."""
        return list(self._terms)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_g, d_a): the shape of the parameter matrices it acts on."""
        return self._terms[0][1].shape[0], self._terms[0][0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The factors' dtype."""
        return self._terms[0][0].dtype

    def __len__(self) -> int:
        return len(self._terms)

    def __repr__(self) -> str:
        d_g, d_a = self.shape
        return f"KroneckerSum(terms={len(self)}, d_a={d_a}, d_g={d_g}, dtype={self.dtype})"

    def matvec(self, V: Tensor) -> Tensor:
        """(Σ A_k ⊗ G_k) vec(V) in matrix form: Σ G_k V A_kᵀ, V of shape (..., d_g, d_a)."""
        self._check_V(V)
        A0, G0 = self._terms[0]
        out = G0 @ V @ A0.mT
        for A, G in self._terms[1:]:
            out = out + G @ V @ A.mT
        return out

    def to_dense(self, damping: float = 0.0, scheme: DampingScheme = "tikhonov") -> Tensor:
        """Σ torch.kron(A_k, G_k) plus the damping ``solve(·, damping, scheme)`` applies.

        This is the matrix ``solve`` inverts whenever it is positive definite. Where it is
        not, ``solve`` inverts a clamped version (with a warning); that matrix is
        ``factorize(damping, scheme).to_dense()``. For two terms under ``"authors"`` the
        second term is replaced by its absolute value relative to the damped first term
        (see :class:`KroneckerSum`), so the result is always positive definite.

        Raises:
            ValueError: unknown scheme, or damping not a finite number ≥ 0 (as ``factorize``).
        """
        check_scheme(scheme)
        if not (damping >= 0.0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        eye = torch.eye
        terms = list(self._terms)
        A, G = terms[0]
        shifts = first_term_shifts(A, G, damping, scheme, len(self))
        if shifts is not None:
            ca, cg = shifts
            A = A + ca * eye(A.shape[0], dtype=A.dtype, device=A.device)
            G = G + cg * eye(G.shape[0], dtype=G.dtype, device=G.device)
            terms[0] = (A, G)
            if scheme == "authors" and len(self) == 2:
                terms[1] = (relative_abs(A, terms[1][0]), relative_abs(G, terms[1][1]))
            damping = 0.0
        out = torch.kron(*terms[0])
        for A, G in terms[1:]:
            out = out + torch.kron(A, G)
        if damping:
            out = out + damping * eye(out.shape[0], dtype=out.dtype, device=out.device)
        return out

    # ----------------------------------------------------------------- solving
    def factorize(
        self,
        damping: float,
        scheme: DampingScheme = "tikhonov",
        *,
        eig_floor: float = EIG_FLOOR,
        min_ratio: float = MIN_RATIO,
        warn: bool = True,
    ) -> KroneckerFactorization:
        """A new factorisation of the damped matrix, to be kept by the caller.

        Computed in the terms' dtype (eigh falls back to float64 if LAPACK fails).
        ``warn=False`` leaves reporting clamped eigenvalues (``.clamped``) to the caller
        (the preconditioners summarise them per layer).

        Raises:
            ValueError: unknown scheme, damping not a finite number ≥ 0, or non-finite
                factors.
            SingularFactorError: the damped matrix is singular (only possible for
                damping 0, or a numerically singular damped first factor).
        """
        check_scheme(scheme)
        if not (damping >= 0.0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        for i, (A, G) in enumerate(self._terms):
            if not (all_finite(A) and all_finite(G)):
                raise ValueError(f"term {i} of the KroneckerSum has non-finite entries")
        if len(self) == 1:
            return factorize_one(*self._terms[0], damping, scheme, eig_floor)
        if len(self) == 2:
            return factorize_two(self._terms, damping, scheme, min_ratio, warn=warn)
        pre = factorize_one(*self._terms[0], damping, "tikhonov", eig_floor)
        return ConjugateGradientSolve(damping, scheme, 0, terms=self.terms, preconditioner=pre)

    def solve(self, V: Tensor, damping: float, scheme: DampingScheme = "tikhonov") -> Tensor:
        """X of shape (..., d_g, d_a) with vec(X) = to_dense(damping)⁻¹ vec(V).

        Factorises afresh on every call; keep ``factorize(damping, scheme)`` to solve
        repeatedly.
        """
        self._check_V(V)
        return self.factorize(damping, scheme).solve(V)

    def _check_V(self, V: Tensor) -> None:
        if V.ndim < 2 or tuple(V.shape[-2:]) != self.shape:
            raise ValueError(
                f"V must have shape (..., d_g, d_a) = (..., {self.shape[0]}, {self.shape[1]}),"
                f" got {tuple(V.shape)}"
            )
