"""Statistics of a layer whose inputs are one-hot tokens (an embedding), never one-hot.

An embedding with table W (V × d) is ``nn.Linear(V, d, bias=False)`` on one-hot inputs
a = e_t with Θ = Wᵀ (d × V). With m examples, tokens t_n at their positions n = (i, s)
and output gradients g_n, the weight-sharing "expand" block is

    F = (1/m) Σ_n (e_{t_n} e_{t_n}ᵀ) ⊗ (g_n g_nᵀ) = Σ_v (e_v e_vᵀ) ⊗ C_v,
    C_v = (1/m) Σ_{n: t_n = v} g_n g_nᵀ.

Every a aᵀ is diagonal, so R(F) (DESIGN.md §3) is zero outside the rows of diagonal
entries of A: as a V × d² matrix, R = Σ_v e_v vec(C_v)ᵀ, and every Kronecker factor on
the A side of every method is diagonal. Here everything lives on the u tokens present in
the batch (coefficient space): u-vectors x (a diagonal A restricted to those tokens),
products R vec(M) = [⟨C_v, M⟩]_v and Rᵀx = vec(Σ_v x_v C_v) = vec((1/m) gᵀ diag(x_t) g)
(N d² each), and the u × u Gram matrix K = R Rᵀ, K_vw = ⟨C_v, C_w⟩. Neither the one-hot
matrix, nor a V × V factor, nor F is formed; the C_v are formed (u · d² numbers, in
chunks) only where that is the cheaper way to K.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .numerics import all_finite, symmetrize_

__all__ = ["TokenStats", "as_token_stats", "GRAM_ROWS_MAX", "CHUNK_ELEMENTS"]

GRAM_ROWS_MAX = 1 << 24
"""Largest u·d² for which K is formed from the per-token matrices C_v (128 MiB float64);
above it K comes from token products only (N² d, no C_v)."""
CHUNK_ELEMENTS = 1 << 22
"""Elements of the temporary chunks (outer products, token-product rows) formed at once."""


class TokenStats:
    """Validated token statistics of one embedding (see the module docstring).

    Attributes:
        tokens: (N,) int64 token ids of the positions kept (padding positions dropped).
        g: (N, d) their output gradients.
        m: the number of examples (the 1/m of the Fisher).
        vocab_size: V.
        present: (u,) the distinct tokens present, ascending.
        inverse: (N,) each position's index into ``present``.
        counts: (u,) how many positions hold each present token (in g's dtype).
    """

    def __init__(self, tokens: Tensor, g: Tensor, m: int, vocab_size: int):
        self.tokens, self.g, self.m, self.vocab_size = tokens, g, m, vocab_size
        self.present, self.inverse, counts = torch.unique(
            tokens, sorted=True, return_inverse=True, return_counts=True)
        self.counts = counts.to(g.dtype)
        self._gram: Tensor | None = None

    @property
    def n_tokens(self) -> int:
        """N: positions kept."""
        return int(self.tokens.shape[0])

    @property
    def d(self) -> int:
        """The embedding width d (= d_g)."""
        return int(self.g.shape[1])

    @property
    def u(self) -> int:
        """The number of distinct tokens present."""
        return int(self.present.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in."""
        return self.g.dtype

    def full(self, x: Tensor) -> Tensor:
        """A u-vector on the present tokens as a V-vector (zeros elsewhere)."""
        out = x.new_zeros(self.vocab_size)
        out[self.present] = x
        return out

    # ------------------------------------------------------------------- KFAC
    def kfac_factors(self) -> tuple[Tensor, Tensor]:
        """(a_K on the present tokens (u,), G_K): A_K = diag(counts)/N, G_K = (1/m) gᵀg.

        The Linear weight-sharing convention (issue 16): A = (1/(m·T)) Σ a aᵀ with m·T = N
        positions, G = (1/m) Σ g gᵀ.
        """
        G = symmetrize_(self.g.mT @ self.g).mul_(0.5 / self.m)
        return self.counts / self.n_tokens, G

    # ------------------------------------------------------------ R products
    def rt(self, x: Tensor) -> Tensor:
        """Rᵀ x as a d × d matrix: (1/m) Σ_n x_{t_n} g_n g_nᵀ, x a u-vector."""
        w = x.to(self.dtype)[self.inverse] * (0.5 / self.m)
        return symmetrize_((self.g * w[:, None]).mT @ self.g)

    def r(self, M: Tensor) -> Tensor:
        """R vec(M) as a u-vector: ⟨C_v, M⟩ = (1/m) Σ_{n: t_n = v} g_nᵀ M g_n."""
        w = ((self.g @ M.to(self.dtype)) * self.g).sum(-1) / self.m
        return w.new_zeros(self.u).index_add_(0, self.inverse, w)

    # ------------------------------------------------------------------ Gram
    def gram(self) -> Tensor:
        """K = R Rᵀ (u × u, float64), K_vw = ⟨C_v, C_w⟩; computed once and kept.

        By the cheaper of two exact routes: the per-token C_v (N d² + u² d², only while
        u·d² ≤ :data:`GRAM_ROWS_MAX`) or token products (g gᵀ)∘(g gᵀ) summed over each
        token's positions (N² d, chunked). Always in float64: the KFAC-centred problem
        reads the ~σ²/‖R‖² part of K.
        """
        if self._gram is None:
            n, d, u = self.n_tokens, self.d, self.u
            rows_cost = n * d * d + u * u * d * d
            if u * d * d <= GRAM_ROWS_MAX and rows_cost <= n * n * (d + 1):
                self._gram = self._gram_from_rows()
            else:
                self._gram = self._gram_from_tokens()
        return self._gram

    def _gram_from_rows(self) -> Tensor:
        g = self.g.double()
        n, d = g.shape
        C = g.new_zeros(self.u, d * d)
        step = max(1, CHUNK_ELEMENTS // (d * d))
        for lo in range(0, n, step):  # chunks of positions, not a loop over examples
            gc = g[lo:lo + step]
            C.index_add_(0, self.inverse[lo:lo + step],
                         (gc[:, :, None] * gc[:, None, :]).reshape(-1, d * d))
        C /= self.m
        return symmetrize_(C @ C.mT).mul_(0.5)

    def _gram_from_tokens(self) -> Tensor:
        g = self.g.double()
        n = g.shape[0]
        K = g.new_zeros(self.u, self.u)
        step = max(1, CHUNK_ELEMENTS // max(n, 1))
        for lo in range(0, n, step):
            rows = (g[lo:lo + step] @ g.mT).square_()  # (c, N): (g_n · g_n')²
            by_token = rows.new_zeros(rows.shape[0], self.u).index_add_(1, self.inverse, rows)
            K.index_add_(0, self.inverse[lo:lo + step], by_token)
        K /= self.m * self.m
        return symmetrize_(K).mul_(0.5)


def as_token_stats(tokens: Tensor, g: Tensor, vocab_size: int, *,
                   padding_idx: int | None = None) -> TokenStats:
    """Validate an embedding's batch and drop its padding positions.

    Args:
        tokens: (m,) or (m, T) integer token ids in [0, vocab_size): m examples of T
            positions that share the table (weight-sharing "expand").
        g: (m, d) or (m, T, d) output gradients, matching ``tokens``.
        vocab_size: V, the number of rows of the table.
        padding_idx: positions holding this token are dropped: the table's row
            ``padding_idx`` gets no gradient (``nn.Embedding``'s backward zeros it), so it
            is no parameter of the Fisher; its A entries are 0 in every term.

    Raises:
        TypeError: non-integer tokens or non-floating gradients.
        ValueError: mismatched shapes, token ids out of range, m = 0, no position left
            after dropping the padding, or NaN/Inf gradients.
    """
    if not isinstance(tokens, Tensor) or not isinstance(g, Tensor):
        raise TypeError("tokens and g must be torch tensors")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if not g.is_floating_point():
        raise TypeError(f"g must be a floating-point tensor, got {g.dtype}")
    if tokens.ndim == 1:
        tokens = tokens[:, None]
    if g.ndim == 2:
        g = g[:, None, :]
    if tokens.ndim != 2 or g.ndim != 3 or tuple(g.shape[:2]) != tuple(tokens.shape):
        raise ValueError(f"tokens (m, T) and g (m, T, d) do not match: {tuple(tokens.shape)}"
                         f" and {tuple(g.shape)}")
    m = int(tokens.shape[0])
    if m == 0:
        raise ValueError("cannot build a Fisher approximation from m = 0 examples")
    if g.shape[2] == 0:
        raise ValueError(f"empty embedding dimension: g {tuple(g.shape)}")
    flat, gf = tokens.reshape(-1).long(), g.reshape(-1, g.shape[2])
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got"
                         f" [{int(flat.min())}, {int(flat.max())}]")
    if not all_finite(gf):
        raise ValueError("output gradients g contain NaN or Inf")
    if padding_idx is not None:
        keep = flat != padding_idx
        flat, gf = flat[keep], gf[keep]
    if flat.numel() == 0:
        raise ValueError("the batch has no token outside padding_idx: nothing to estimate a"
                         " Fisher from")
    return TokenStats(flat, gf, m, vocab_size)
