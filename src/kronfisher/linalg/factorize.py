"""Factorising damped sums of one or two Kronecker products.

* One term, factored damping: Cholesky of each damped factor on its support and its
  inverse (:class:`FactorInverses`; no eigendecomposition).
* One term, exact Tikhonov: eigendecompositions of A and G on their supports
  (:class:`EigenFactorization` with orthogonal K).
* Two terms: simultaneous diagonalisation of (A₁ + c_a I, A₂) and (G₁ + c_g I, G₂), by a
  Cholesky factor and one eigh per side when the shift dominates rounding, else by two
  eighs (:class:`EigenFactorization` with congruence transforms).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .damping import first_term_shifts
from .factorization import (
    EigenFactorization,
    FactorInverses,
    KroneckerFactorization,
    SingularFactorError,
)
from .numerics import eigh, sym
from .support import BlockSolve, Side, eigh_on_support, embed, restrict, support

__all__ = ["factorize_one", "factorize_two", "congruence", "EIG_FLOOR", "MIN_RATIO"]

EIG_FLOOR = 1e-10
"""Undamped one-term solve: an eigenvalue λ_g λ_a ≤ EIG_FLOOR·max is treated as zero (the
matrix is singular and damping is required)."""
MIN_RATIO = 1e-2
"""Two terms: an eigenvalue 1 + s_g s_a of the damped matrix relative to its damped first
term below this is raised to it (the sum is not positive definite there); 1e-2 bounds the
amplification of those directions to 100× the first term's."""
CHOLESKY_SHIFT_MARGIN = 10.0
"""The Cholesky congruence is used when shift > CHOLESKY_SHIFT_MARGIN·eps·‖X1‖_F: the shift
then dominates the rounding in X1 (so X1 + shift·I is safely positive definite). Below it
the two-eigh route projects X1 onto the PSD cone first. The Cholesky route is the more
accurate one where both apply (float32, n = 31, ‖X1‖ = 850, shift 0.01: relative solve
error 9e-5 against 6e-3 by two eighs), so the margin is kept small."""
CHOLESKY_SHIFT_FLOOR = 2e-12
"""Absolute floor of that margin (relative to ‖X1‖_F) for float64."""
SINGULAR_EPS_FACTOR = 1.0
"""Two-eigh congruence without a shift: the first factor is singular when its smallest
eigenvalue is at most SINGULAR_EPS_FACTOR·n·eps·(largest), the standard bound on the
absolute rounding error of a symmetric eigensolver's eigenvalues: such an eigenvalue
cannot be told from 0. With a shift > 0 nothing is refused: the damped eigenvalues are
≥ the shift by construction. (A factor of 10, applied whatever the shift, refused
well-conditioned float32 factors: with n = 31, largest 850 and damping 0.01 the bound was
0.031, so a run silently trained at 10× the damping.)"""


def _inverse_on_support(X: Tensor, c: float) -> tuple[Tensor, Tensor | None] | None:
    """((X + cI)⁻¹ on the support of X, the support), or None if the Cholesky fails."""
    idx = support(X)
    M = restrict(X, idx)
    M.diagonal().add_(c)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        return None
    return torch.cholesky_inverse(L), idx


def factorize_one(
    A: Tensor, G: Tensor, damping: float, scheme: str, eig_floor: float = EIG_FLOOR
) -> KroneckerFactorization:
    """Factorise A ⊗ G damped by ``scheme`` (see :class:`~kronfisher.linalg.KroneckerSum`).

    Raises:
        SingularFactorError: damping 0 and A ⊗ G singular.
    """
    shifts = first_term_shifts(A, G, damping, scheme, 1)
    if shifts is not None:
        ia, ig = _inverse_on_support(A, shifts[0]), _inverse_on_support(G, shifts[1])
        if ia is not None and ig is not None:
            return FactorInverses(damping, scheme, 0, A=A, G=G, c_a=shifts[0], c_g=shifts[1],
                                  A_inv=ia[0], G_inv=ig[0], a_idx=ia[1], g_idx=ig[1])
        # a Cholesky failed (float32 rounding made a damped factor indefinite): the eigen
        # route below projects the factors onto the PSD cone first
    ea, Ua, side_a = eigh_on_support(A)
    eg, Ug, side_g = eigh_on_support(G)
    # The factors of every method's first term are PSD; negative eigenvalues are
    # rounding (float32 eigh of a large PSD matrix) and would make λ_g λ_a + λ
    # meaningless, so they are set to 0.
    ea, eg = ea.clamp_min(0), eg.clamp_min(0)
    if shifts is not None:
        D = (eg + shifts[1])[:, None] * (ea + shifts[0])[None, :]
    else:
        D = eg[:, None] * ea[None, :] + damping
    # With PSD factors, D ≥ λ: the damped matrix is positive definite for any λ > 0.
    if damping == 0.0:
        floor = eig_floor * D.abs().max().clamp_min(torch.finfo(D.dtype).tiny)
        n_bad = int((D <= floor).sum())
        if n_bad:
            raise SingularFactorError(
                f"A ⊗ G is singular ({n_bad} eigenvalues ≤ {float(floor):.3g}) and no"
                " damping was given; pass damping > 0"
            )
    return EigenFactorization(damping, scheme, 0, K_a=Ua, K_g=Ug, D=D,
                              blocks=BlockSolve.maybe(side_g, side_a, Ug, Ua, D))


def factorize_two(
    terms: list[tuple[Tensor, Tensor]], damping: float, scheme: str,
    min_ratio: float = MIN_RATIO, *, warn: bool = True,
) -> EigenFactorization:
    """Factorise (A₁ + c_a I) ⊗ (G₁ + c_g I) + A₂ ⊗ G₂ by simultaneous diagonalisation.

    Under ``"authors"`` the second term's eigenvalues relative to the first enter as
    |s|, so the result is never clamped. Otherwise eigenvalues 1 + s_g s_a ≤ ``min_ratio``
    are raised to ``min_ratio`` (``clamped`` counts them), with a RuntimeWarning unless
    ``warn`` is False (the caller then reports ``clamped`` itself).

    Raises:
        SingularFactorError: a damped first factor is singular (damping 0).
    """
    (A1, G1), (A2, G2) = terms
    da, dg = first_term_shifts(A1, G1, damping, scheme, 2) or (0.0, 0.0)
    Ka, Ka_inv, sa, side_a = congruence(A1, A2, da, "A")
    Kg, Kg_inv, sg, side_g = congruence(G1, G2, dg, "G")
    if scheme == "authors":  # 1 + |s_g||s_a| ≥ 1: positive definite, never clamped
        sa, sg = sa.abs(), sg.abs()
    D = 1.0 + sg[:, None] * sa[None, :]
    bad = D <= min_ratio
    clamped = int(bad.sum())
    if clamped and warn:
        warnings.warn(
            f"two-term Kronecker approximation is not positive definite in {clamped}"
            f" direction(s): 1 + s_g s_a raised to {min_ratio} there",
            RuntimeWarning,
            stacklevel=4,
        )
    if clamped:
        D = torch.where(bad, torch.as_tensor(min_ratio, dtype=D.dtype), D)
    return EigenFactorization(damping, scheme, clamped, K_a=Ka, K_g=Kg, D=D, K_a_inv=Ka_inv,
                              K_g_inv=Kg_inv, metric_a=(A1, da), metric_g=(G1, dg),
                              blocks=BlockSolve.maybe(side_g, side_a, Kg, Ka, D))


def congruence(
    X1: Tensor, X2: Tensor, shift: float, name: str
) -> tuple[Tensor, Tensor | None, Tensor, Side | None]:
    """K with Kᵀ(X1 + shift·I)K = I and Kᵀ X2 K = diag(s); returns (K, K⁻¹, s, side).

    K⁻¹ is None when it equals Kᵀ(X1 + shift·I) (the Cholesky route; the factorisation
    forms it only if its dense form is asked for). The two-eigh route returns it, since
    there X1 is first projected onto the PSD cone.

    X1 is PSD up to rounding. When the shift dominates that rounding (see
    :data:`CHOLESKY_SHIFT_MARGIN`), a fast path gives the same K up to rounding: restrict
    to the coordinates where X1 or X2 is nonzero (elsewhere X1 + shift·I = shift·I and
    X2 = 0, so K = I/√shift and s = 0 there), Cholesky X1 + shift·I = LLᵀ and one eigh of
    L⁻¹ X2 L⁻ᵀ = E S Eᵀ: K = L⁻ᵀE, K⁻¹ = EᵀLᵀ (the generalised eigenvectors, unique up to
    signs and rotations within repeated s, as by two eighs). Otherwise, or if the
    Cholesky fails, the two-eigh reference decides (and raises if singular).
    """
    n = X1.shape[0]
    idx = support(X1, X2)
    if idx is not None and idx.numel() == 0:
        return (*_congruence_eigh(sym(X1), sym(X2), shift, name), None)
    M, S2 = restrict(X1, idx), restrict(X2, idx)
    margin = max(CHOLESKY_SHIFT_MARGIN * torch.finfo(M.dtype).eps, CHOLESKY_SHIFT_FLOOR)
    if not shift > margin * float(M.norm()):
        return (*_congruence_eigh(sym(X1), sym(X2), shift, name), None)
    M.diagonal().add_(shift)  # M is a fresh tensor: X1 + shift·I on the support
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        return (*_congruence_eigh(sym(X1), sym(X2), shift, name), None)
    C = torch.linalg.solve_triangular(L, S2, upper=False)  # L⁻¹ X2
    # L⁻¹ (L⁻¹ X2)ᵀ = L⁻¹ X2 L⁻ᵀ, symmetric up to rounding (eigh reads its lower triangle)
    C = torch.linalg.solve_triangular(L, C.mT, upper=False)
    s, E = eigh(C)
    K = torch.linalg.solve_triangular(L.mT, E, upper=True)  # L⁻ᵀ E
    if idx is None:
        return K, None, s, None
    s, K_full, side = embed(K, s, idx, n, 0.0, 1.0 / math.sqrt(shift))
    return K_full, None, s, side


def _congruence_eigh(
    S1: Tensor, S2: Tensor, shift: float, name: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference congruence by two eighs (S1, S2 symmetric).

    Computed in float64 for lower-precision input: this route is taken when the shift is
    small next to ‖S1‖, where float32 eigenvalue errors (~eps·‖S1‖) would be a large part
    of the smallest damped eigenvalues (relative solve error 2e-2 against 1e-6 in float64
    at ‖S1‖_F = 1e4, shift 0.01). Singular means: without a shift, an eigenvalue within
    the input's rounding bound n·eps·(largest) (it cannot be told from 0). With a shift
    > 0 the damped factor is positive definite by construction (its eigenvalues, the
    clamped ones plus the shift, are ≥ the shift), so it is never refused: MNIST's code
    layer reaches ‖X1‖ ≈ 9e4 with shift 0.0156, and a bound relative to the largest
    eigenvalue refused it and trained at 10× the damping.
    """
    dtype = S1.dtype
    work = torch.float64 if torch.finfo(dtype).bits < 64 else dtype
    e, U = eigh(S1.to(work))
    e = e.clamp_min(0) + shift  # X1 is PSD: negative eigenvalues are rounding
    if not shift > 0:
        top = float(e.abs().max().clamp_min(torch.finfo(e.dtype).tiny))
        floor = SINGULAR_EPS_FACTOR * e.numel() * torch.finfo(dtype).eps * top
        if float(e.min()) <= floor:
            raise SingularFactorError(
                f"the first {name} factor is numerically singular in {dtype} and there is"
                f" no damping shift: smallest eigenvalue {float(e.min()):.3g} ≤ {floor:.3g}"
                f" = {SINGULAR_EPS_FACTOR:g}·n·eps × the largest ({top:.3g}); pass damping"
                " > 0"
            )
    r = e.sqrt()
    W = U / r  # W = U diag(1/√e): Wᵀ X1 W = I
    s, E = eigh(sym(W.mT @ S2.to(work) @ W))
    K = W @ E
    K_inv = E.mT @ (U * r).mT  # (U diag(√e) E)ᵀ = K⁻¹
    return K.to(dtype), K_inv.to(dtype), s.to(dtype)
