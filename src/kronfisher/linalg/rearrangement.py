"""Dense references and the conv location-pair mask.

:func:`exact_fisher_block` forms F and :func:`rearrange` forms R(F) explicitly (tests and
small baselines only; see :mod:`~kronfisher.linalg.stats` for the conventions);
:func:`relative_error` evaluates ‖F − Σ A_k ⊗ G_k‖_F / ‖F‖_F without forming F.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .stats import LayerStats, as_stats

__all__ = [
    "exact_fisher_block",
    "rearrange",
    "spatial_pair_mask",
    "relative_error",
]


def spatial_pair_mask(h: int, w: int, radius: int | str, device=None) -> Tensor | None:
    """(h·w) × (h·w) 0/1 mask of output-location pairs within Chebyshev distance ``radius``.

    Distances are measured on the 2-D output grid (row-major flattening), so pairs never
    wrap around rows. ``radius="all"`` returns ``None`` (every pair: the exact block).
    """
    if radius == "all":
        return None
    if not isinstance(radius, int) or radius < 0:
        raise ValueError(f"conv radius must be an int >= 0 or 'all', got {radius!r}")
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    cheb = torch.maximum(
        (rows[:, None] - rows[None, :]).abs(), (cols[:, None] - cols[None, :]).abs()
    )
    return (cheb <= radius).to(torch.get_default_dtype())


def exact_fisher_block(a: Tensor, g: Tensor, pair_mask: Tensor | None = None) -> Tensor:
    """Dense F = (1/m) Σᵢ kron(aᵢaᵢᵀ, gᵢgᵢᵀ) ((d_a·d_g)²; conv form with 3-D inputs)."""
    s = as_stats(a, g, pair_mask)
    J = torch.einsum("itd,ite->itde", s.a, s.g).reshape(s.m, s.T, -1)  # rows a⊗g
    if s.pair_mask is None:
        J = J.sum(1)  # per-example gradient vec(Σ_t g aᵀ)
        return J.mT @ J / s.m
    return torch.einsum("itp,ts,isq->pq", J, s.pair_mask, J) / s.m


def rearrange(F: Tensor, d_a: int, d_g: int) -> Tensor:
    """Explicit Van Loan–Pitsianis rearrangement R(F) (d_a² × d_g²) of a dense F.

    R(F)[vec(A) index, vec(G) index] so that R(kron(A, G)) = vec(A) vec(G)ᵀ.
    """
    if F.shape != (d_a * d_g, d_a * d_g):
        raise ValueError(f"F must be ({d_a * d_g}, {d_a * d_g}), got {tuple(F.shape)}")
    # F[j*d_g + i, l*d_g + k] = A[j, l] G[i, k]  ->  R[l*d_a + j, k*d_g + i]
    return F.reshape(d_a, d_g, d_a, d_g).permute(2, 0, 3, 1).reshape(d_a * d_a, d_g * d_g)


def relative_error(stats: LayerStats, terms: list[tuple[Tensor, Tensor]]) -> float:
    """‖F − Σ A_k⊗G_k‖_F / ‖F‖_F computed without forming F (float64 accumulation)."""
    f2 = stats.frobenius_sq()
    cross = sum(stats.inner(A, G) for A, G in terms)
    self_sq = 0.0
    for A1, G1 in terms:
        for A2, G2 in terms:
            self_sq += float((A1.double() * A2.double()).sum() * (G1.double() * G2.double()).sum())
    err2 = max(f2 - 2.0 * cross + self_sq, 0.0)
    return (err2 / f2) ** 0.5 if f2 > 0 else float("nan")
