"""Exactly-zero coordinates of Kronecker factors, split off before factorising.

A coordinate j whose row and column are zero in every factor of one side (an input that
is 0 in every example, a dead ReLU unit) spans an exact invariant subspace: the
eigenproblems shrink to the other coordinates (the *support*) and the damped solves act on
the support by dense products and on the rest by a scalar. Everything here is exact; it
only skips products with zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .numerics import eigh, sym

__all__ = ["support", "restrict", "Side", "embed", "eigh_on_support", "BlockSolve"]


def support(*xs: Tensor) -> Tensor | None:
    """Indices (ascending) of the coordinates where some x in ``xs`` is nonzero.

    Coordinate j is kept if some x has a nonzero row j or column j; None means every
    coordinate is kept.

    Args:
        xs: square matrices of one size n.

    Raises:
        ValueError: if ``xs`` is empty.
    """
    if not xs:
        raise ValueError("support needs at least one matrix")
    # a zero row has a zero diagonal entry: test only those rows entrywise
    cand = xs[0].diagonal() == 0
    for x in xs[1:]:
        cand = cand & (x.diagonal() == 0)
    if not bool(cand.any()):
        return None
    rows = cand.nonzero().squeeze(1)
    zero = torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
    for x in xs:
        zero &= (x.index_select(0, rows) == 0).all(1) & (x.index_select(1, rows) == 0).all(0)
    if not bool(zero.any()):
        return None
    keep = torch.ones(xs[0].shape[0], dtype=torch.bool, device=rows.device)
    keep[rows[zero]] = False
    return keep.nonzero().squeeze(1)


def restrict(x: Tensor, idx: Tensor | None) -> Tensor:
    """sym(x) restricted to the rows and columns ``idx`` (all of them if None); a new tensor."""
    if idx is None:
        return sym(x)
    return sym(x.index_select(0, idx).index_select(1, idx))


@dataclass
class Side:
    """One side (A or G) of a factorisation with zero coordinates.

    The full n × n transform K has K[idx][:, pos] = Ks, K[zidx, zpos] = c·I and zeros
    elsewhere (idx, zidx: support and zero coordinates, ascending; pos, zpos: the matching
    columns of K).
    """

    idx: Tensor
    zidx: Tensor
    Ks: Tensor
    c: float
    pos: Tensor
    zpos: Tensor

    @staticmethod
    def dense(K: Tensor) -> Side:
        """The trivial side of a K without zero coordinates."""
        n = K.shape[0]
        ar = torch.arange(n, device=K.device)
        empty = ar[:0]
        return Side(ar, empty, K, 1.0, ar, empty)


def embed(
    Ks: Tensor, vals: Tensor, idx: Tensor, n: int, zero_val: float, c: float
) -> tuple[Tensor, Tensor, Side]:
    """Embed the values/columns ``Ks`` (k × k, on the coordinates ``idx``) into dimension n.

    The n − k other coordinates get the value ``zero_val`` and columns c·e_j.

    Values stay in ascending order (the zero block is inserted where ``zero_val`` belongs).

    Returns:
        (values (n,), K (n, n), the :class:`Side`).
    """
    z = n - idx.numel()
    dev = Ks.device
    p = int((vals < zero_val).sum())
    zero_rows = torch.ones(n, dtype=torch.bool, device=dev)
    zero_rows[idx] = False
    zidx = zero_rows.nonzero().squeeze(1)
    out_vals = torch.cat([vals[:p], vals.new_full((z,), zero_val), vals[p:]])
    pos = torch.cat([torch.arange(p, device=dev), torch.arange(p + z, n, device=dev)])
    zpos = torch.arange(p, p + z, device=dev)
    # column-major like eigh's eigenvectors, so that K.mT (K⁻¹ of one term) is contiguous
    K = Ks.new_zeros(n, n).mT
    K[idx[:, None], pos] = Ks
    K[zidx, zpos] = c
    return out_vals, K, Side(idx, zidx, Ks, c, pos, zpos)


def eigh_on_support(x: Tensor) -> tuple[Tensor, Tensor, Side | None]:
    """:func:`~kronfisher.linalg.numerics.eigh` of sym(x), computed on its support.

    Zero coordinates get eigenvalue 0 and unit eigenvectors; the order is ascending as in
    ``torch.linalg.eigh``.

    Returns:
        (eigenvalues, eigenvectors, the side or None when there are no zero coordinates).
    """
    idx = support(x)
    if idx is None:
        e, U = eigh(sym(x))
        return e, U, None
    if idx.numel():
        e_s, U_s = eigh(restrict(x, idx))
    else:
        e_s, U_s = x.new_zeros(0), x.new_zeros(0, 0)
    return embed(U_s, e_s, idx, x.shape[0], 0.0, 1.0)


class BlockSolve:
    """X = K_g [(K_gᵀ V K_a) ⊘ D] K_aᵀ for transforms with zero coordinates.

    With rows/columns permuted to (support, zero) order on both sides, K_g and K_a are
    block diagonal, diag(Ks, c·I), so the four products act on the support only:

        X_ss = K_gs [(K_gsᵀ V_ss K_as) ⊘ D_ss] K_asᵀ     X_sz = K_gs [(K_gsᵀ V_sz) ⊙ c_a²/D_sz]
        X_zs = [(V_zs K_as) ⊙ c_g²/D_zs] K_asᵀ           X_zz = V_zz ⊙ c_g² c_a²/D_zz

    — the same sums as the dense formula without the terms that are exactly zero.
    """

    def __init__(self, g: Side, a: Side, D: Tensor):
        self.g, self.a = g, a
        self.kg, self.ka = g.idx.numel(), a.idx.numel()
        self.rows = torch.cat([g.idx, g.zidx]) if g.zidx.numel() else None
        self.cols = torch.cat([a.idx, a.zidx]) if a.zidx.numel() else None
        self.inv_rows = None if self.rows is None else torch.argsort(self.rows)
        self.inv_cols = None if self.cols is None else torch.argsort(self.cols)
        Dp = D.index_select(0, torch.cat([g.pos, g.zpos]))
        Dp = Dp.index_select(1, torch.cat([a.pos, a.zpos]))
        kg, ka = self.kg, self.ka
        self.D_inv_ss = 1.0 / Dp[:kg, :ka]
        self.W_sz = (a.c**2) / Dp[:kg, ka:]
        self.W_zs = (g.c**2) / Dp[kg:, :ka]
        self.W_zz = (g.c**2 * a.c**2) / Dp[kg:, ka:]

    @staticmethod
    def maybe(g: Side | None, a: Side | None, K_g: Tensor, K_a: Tensor, D: Tensor):
        """A BlockSolve if either side has zero coordinates, else None (use dense products)."""
        if g is None and a is None:
            return None
        return BlockSolve(g or Side.dense(K_g), a or Side.dense(K_a), D)

    def _right(self, Y: Tensor, scale: Tensor, zero_scale: Tensor) -> Tensor:
        """((Y_s K_as) ⊙ scale) K_asᵀ on the support columns, Y_z ⊙ zero_scale elsewhere.

        Y's columns are in (support, zero) order.
        """
        Ka, ka = self.a.Ks, self.ka
        Z = (Y[..., :ka] @ Ka).mul_(scale) @ Ka.mT
        if self.cols is None:
            return Z
        return torch.cat([Z, Y[..., ka:] * zero_scale], -1)

    def solve(self, V: Tensor) -> Tensor:
        """X of shape (..., d_g, d_a); see the class docstring."""
        Kg = self.g.Ks
        P = V if self.cols is None else V.index_select(-1, self.cols)
        Ps = P if self.rows is None else P.index_select(-2, self.g.idx)
        X = Kg @ self._right(Kg.mT @ Ps, self.D_inv_ss, self.W_sz)
        if self.inv_rows is not None:  # set exactly when self.rows is
            bottom = self._right(P.index_select(-2, self.g.zidx), self.W_zs, self.W_zz)
            X = torch.cat([X, bottom], -2).index_select(-2, self.inv_rows)
        if self.inv_cols is not None:
            X = X.index_select(-1, self.inv_cols)
        return X
