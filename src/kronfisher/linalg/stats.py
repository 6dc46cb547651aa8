"""Validated per-example layer statistics and the matrix-free products with R(F).

A layer's statistics are ``a`` (m, T, d_a) and ``g`` (m, T, d_g): T = 1 for a Linear
layer, T = output locations for a convolution. With a symmetric 0/1 ``pair_mask`` M
(T × T; ``None`` = all pairs) the Fisher block is (DESIGN.md §2)

    F = (1/m) Σᵢ Σ_{t,t'} M_{tt'} (a_{it} a_{it'}ᵀ) ⊗ (g_{it} g_{it'}ᵀ),

and its Van Loan–Pitsianis rearrangement (DESIGN.md §3)

    R(F) = (1/m) Σᵢ Σ_{t,t'} M_{tt'} vec(a_{it} a_{it'}ᵀ) vec(g_{it} g_{it'}ᵀ)ᵀ.

Nothing here forms F or R(F).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .numerics import all_finite, symmetrize_

__all__ = ["LayerStats", "as_stats", "scaled_gram", "outer_gram", "hadamard_square"]

OUTER_GRAM_SPLIT_MIN = 512
"""x xᵀ is computed by blocks (the off-diagonal block once) only from this many rows on;
below it one product is as fast."""


class LayerStats:
    """Validated per-example statistics of one layer (see module docstring).

    ``flat`` is True when the pairs are only (t, t) (Linear layers, or conv radius 0):
    then the statistics are N = m·T independent tokens, R(F) = (1/m) P Qᵀ with
    P = [vec(a_n a_nᵀ)]_n, Q = [vec(g_n g_nᵀ)]_n, and Gram-space algorithms apply.
    """

    def __init__(self, a: Tensor, g: Tensor, pair_mask: Tensor | None = None):
        self.a, self.g = a, g
        self.m, self.T, self.d_a = a.shape
        self.d_g = g.shape[2]
        self.pair_mask = pair_mask
        diag = False
        if pair_mask is not None:
            diag = bool(torch.equal(pair_mask, torch.diag(pair_mask.diagonal())))
            if diag and not bool((pair_mask.diagonal() == 1).all()):
                raise ValueError("a diagonal pair_mask must have ones on its diagonal")
        self.flat = self.T == 1 or diag
        self._grams: tuple[Tensor, Tensor] | None = None
        self._exact_grams: tuple[Tensor, Tensor] | None = None

    # ---------------------------------------------------------------- tokens
    @property
    def tokens_a(self) -> Tensor:
        """(N, d_a) with N = m·T."""
        return self.a.reshape(-1, self.d_a)

    @property
    def tokens_g(self) -> Tensor:
        """(N, d_g) with N = m·T."""
        return self.g.reshape(-1, self.d_g)

    @property
    def n_tokens(self) -> int:
        """N = m·T."""
        return self.m * self.T

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in."""
        return self.a.dtype

    def grams(self, exact: bool = False) -> tuple[Tensor, Tensor]:
        """K_a = PᵀP = (ã ãᵀ)∘(ã ãᵀ) and K_g = QᵀQ (N × N, float64), flat case only.

        Args:
            exact: form the token inner products ã ãᵀ in float64 too. By default they
                are formed in the statistics' dtype and squared into float64; for float32
                statistics their rounding (~1e-7 relative to the entries of K) hides
                singular values below ~1e-3 of the largest, which nearly
                Kronecker-factored blocks (and the KFAC-centred problem) need.

        Raises:
            RuntimeError: statistics that are not flat.
        """
        if not self.flat:
            raise RuntimeError("Gram matrices exist only for flat statistics (T = 1 or radius 0)")
        if exact and self.dtype != torch.float64:
            if self._exact_grams is None:
                self._exact_grams = (hadamard_square(self.tokens_a.double()),
                                     hadamard_square(self.tokens_g.double()))
            return self._exact_grams
        if self._grams is None:
            self._grams = (hadamard_square(self.tokens_a), hadamard_square(self.tokens_g))
        return self._grams

    # ------------------------------------------------------------- KFAC (KFC)
    def kfac_factors(self) -> tuple[Tensor, Tensor]:
        """A_K = (1/m) Σ_{i,t} a aᵀ and G_K = (1/(mT)) Σ_{i,t} g gᵀ (KFC for T > 1)."""
        return (scaled_gram(self.tokens_a, 1.0 / self.m),
                scaled_gram(self.tokens_g, 1.0 / self.n_tokens))

    # ------------------------------------------------------- R(F) products
    def r_matvec(self, V: Tensor) -> Tensor:
        """R(F) vec(V) as a d_a × d_a matrix, V of shape (d_g, d_g)."""
        return _quad_product(self.a, self.g, V, self.pair_mask, self.flat) / self.m

    def rt_matvec(self, U: Tensor) -> Tensor:
        """R(F)ᵀ vec(U) as a d_g × d_g matrix, U of shape (d_a, d_a)."""
        return _quad_product(self.g, self.a, U, self.pair_mask, self.flat) / self.m

    def frobenius_sq(self) -> float:
        """‖F‖_F² = ‖R(F)‖_F² without forming F."""
        if self.flat:
            ka, kg = self.grams()
            return float((ka * kg).sum()) / self.m**2
        # Σ_{i,j} Σ_{tt'ss'} M_tt' M_ss' (a_it·a_js)(a_it'·a_js')(g_it·g_js)(g_it'·g_js')
        a, g = self.a.double(), self.g.double()
        M = (
            torch.ones(self.T, self.T, dtype=torch.float64, device=a.device)
            if self.pair_mask is None
            else self.pair_mask.double()
        )
        total = 0.0
        for i in range(self.m):  # O(m² T⁴) — for tests and small studies only
            ca = torch.einsum("td,jsd->jts", a[i], a)
            cg = torch.einsum("td,jsd->jts", g[i], g)
            c = ca * cg  # (j, t, s)
            total += float(torch.einsum("tu,sv,jts,juv->", M, M, c, c))
        return total / self.m**2

    def inner(self, A: Tensor, G: Tensor) -> float:
        """⟨R(F), vec(A) vec(G)ᵀ⟩ = vec(A)ᵀ R(F) vec(G)."""
        return float((A.double() * self.r_matvec(G).double()).sum())


def scaled_gram(x: Tensor, scale: float) -> Tensor:
    """Scale · xᵀx, exactly symmetric: the scaling rides on the matrix product."""
    return symmetrize_(torch.addmm(x.new_zeros(()), x.mT, x, beta=0, alpha=0.5 * scale))


def outer_gram(x: Tensor) -> Tensor:
    """X xᵀ (n × n). For wide x the off-diagonal block is computed once (3/4 of the work)."""
    n, d = x.shape
    if n < OUTER_GRAM_SPLIT_MIN or 2 * d < n:  # small or narrow: one product is as fast
        return x @ x.mT
    h = n // 2
    out = x.new_empty(n, n)
    out[:h] = x[:h] @ x.mT  # blocks (1, 1) and (1, 2)
    out[h:, h:] = x[h:] @ x[h:].mT
    out[h:, :h] = out[:h, h:].mT
    return out


def hadamard_square(x: Tensor) -> Tensor:
    """(x xᵀ)∘(x xᵀ) as float64, squared in x's dtype and widened in the same pass."""
    k = outer_gram(x)
    return torch.mul(k, k, out=torch.empty(k.shape, dtype=torch.float64, device=k.device))


def _quad_product(x: Tensor, y: Tensor, V: Tensor, mask: Tensor | None, flat: bool) -> Tensor:
    """Σᵢ Σ_{tt'} M_tt' (y_itᵀ V y_it') x_it x_it'ᵀ, i.e. the unscaled rearranged product."""
    if flat:
        xt, yt = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        w = ((yt @ V) * yt).sum(-1)  # yₙᵀ V yₙ
        return symmetrize_((xt * w[:, None]).mT @ xt).mul_(0.5)
    W = torch.einsum("itd,de,ise->its", y, V, y)  # (m, T, T)
    if mask is not None:
        W = W * mask
    return symmetrize_(torch.einsum("itd,its,ise->de", x, W, x)).mul_(0.5)


def as_stats(a: Tensor, g: Tensor, pair_mask: Tensor | None = None) -> LayerStats:
    """Validate ``a`` (m, d_a) or (m, T, d_a) and ``g`` (m, d_g) or (m, T, d_g)."""
    if not isinstance(a, Tensor) or not isinstance(g, Tensor):
        raise TypeError("a and g must be torch tensors")
    if a.ndim != g.ndim or a.ndim not in (2, 3):
        raise ValueError(
            "a and g must both be 2-D (m, d) or both 3-D (m, T, d); got shapes"
            f" {tuple(a.shape)} and {tuple(g.shape)}"
        )
    if a.ndim == 2:
        a, g = a[:, None, :], g[:, None, :]
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"a and g disagree on the number of examples/locations: {tuple(a.shape)} vs"
            f" {tuple(g.shape)}"
        )
    if a.shape[0] == 0:
        raise ValueError("cannot build a Fisher approximation from m = 0 examples")
    if a.shape[2] == 0 or g.shape[2] == 0:
        raise ValueError(f"empty feature dimension: a {tuple(a.shape)}, g {tuple(g.shape)}")
    if not a.is_floating_point() or not g.is_floating_point():
        raise TypeError("a and g must be floating-point tensors")
    if a.dtype != g.dtype:
        raise TypeError(f"a and g must share a dtype, got {a.dtype} and {g.dtype}")
    if not all_finite(a):
        raise ValueError("layer inputs a contain NaN or Inf")
    if not all_finite(g):
        raise ValueError("output gradients g contain NaN or Inf")
    T = a.shape[1]
    if pair_mask is not None:
        if pair_mask.shape != (T, T):
            raise ValueError(f"pair_mask must be ({T}, {T}), got {tuple(pair_mask.shape)}")
        if not torch.equal(pair_mask, pair_mask.mT):
            raise ValueError("pair_mask must be symmetric")
        pair_mask = pair_mask.to(a.dtype)
    return LayerStats(a, g, pair_mask)


