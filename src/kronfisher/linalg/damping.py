"""Damping schemes: which multiple of the identity each scheme adds, and where.

See :class:`~kronfisher.linalg.KroneckerSum` for the matrix each scheme inverts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .numerics import sym

__all__ = ["SCHEMES", "DampingScheme", "pi_factor", "first_term_shifts", "relative_abs",
           "check_scheme", "shifts_from_means"]

DampingScheme = str  # one of SCHEMES
SCHEMES = ("tikhonov", "factored", "factored_pi1", "authors")
"""Damping schemes; see :class:`~kronfisher.linalg.KroneckerSum`."""


def check_scheme(scheme: str) -> None:
    """Raise ValueError for a name not in :data:`SCHEMES`."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown damping scheme {scheme!r}; choose from {SCHEMES}")


def pi_factor(A: Tensor, G: Tensor) -> float:
    """Martens & Grosse's π = sqrt((tr(A)/d_a) / (tr(G)/d_g)) for factored Tikhonov damping.

    Returns 1 when either trace is not a positive finite number.
    """
    return _pi(A.diagonal().sum().item() / A.shape[0], G.diagonal().sum().item() / G.shape[0])


def _pi(ta: float, tg: float) -> float:
    """π from the mean diagonal entries tr(A)/d_a and tr(G)/d_g (1 if either is not > 0)."""
    if not (ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg)):
        return 1.0
    return math.sqrt(ta / tg)


def first_term_shifts(
    A: Tensor, G: Tensor, damping: float, scheme: DampingScheme, n_terms: int
) -> tuple[float, float] | None:
    """The shifts (c_a, c_g) added to the first term's factors, (A + c_a I) ⊗ (G + c_g I).

    None means exact Tikhonov damping (A ⊗ G + λ I; one-term ``"tikhonov"`` only, and the
    CG path of three or more terms). Two terms are always damped on the first term:
    ``"tikhonov"`` and ``"factored"`` use Martens & Grosse's trace-based π, (π√λ, √λ/π);
    ``"factored_pi1"`` uses π = 1, (√λ, √λ) (the authors' one-term scheme); ``"authors"``
    is (√λ, √λ) for one term and (λ, λ) for two terms (the authors' two-term scheme).

    Args:
        A: the first term's A factor (only its trace is read).
        G: the first term's G factor (only its trace is read).
        damping: λ ≥ 0; 0 gives None (no shift).
        scheme: one of :data:`SCHEMES`.
        n_terms: number of terms of the sum.
    """
    if n_terms > 2 or (n_terms == 1 and scheme == "tikhonov") or damping == 0:
        return None  # before reading the traces (a device sync)
    return shifts_from_means(A.diagonal().sum().item() / A.shape[0],
                             G.diagonal().sum().item() / G.shape[0], damping, scheme, n_terms)


def shifts_from_means(
    mean_a: float, mean_g: float, damping: float, scheme: DampingScheme, n_terms: int
) -> tuple[float, float] | None:
    """:func:`first_term_shifts` from the factors' mean diagonal entries tr(A)/d_a, tr(G)/d_g.

    For factors not stored as dense matrices (an embedding's diagonal A): the rule is the
    same, only π's traces are given.
    """
    if n_terms > 2 or (n_terms == 1 and scheme == "tikhonov") or damping == 0:
        return None
    r = math.sqrt(damping)
    if scheme in ("tikhonov", "factored"):
        pi = _pi(mean_a, mean_g)
        return pi * r, r / pi
    if scheme == "authors" and n_terms == 2:
        return damping, damping
    return r, r


def relative_abs(X1: Tensor, X2: Tensor) -> Tensor:
    """|X2| relative to the positive definite X1 (dense reference).

    With Kᵀ X1 K = I and Kᵀ X2 K = S, returns K⁻ᵀ |S| K⁻¹ = X1 K |S| Kᵀ X1 (equal to X2 when
    X2 is PSD). Used by ``to_dense`` of the ``"authors"`` two-term scheme.
    """
    e, U = torch.linalg.eigh(sym(X1))
    W = U / e.sqrt()
    s, E = torch.linalg.eigh(sym(W.mT @ sym(X2) @ W))
    K = W @ E
    B = sym(X1) @ K
    return sym(B @ torch.diag(s.abs()) @ B.mT)
