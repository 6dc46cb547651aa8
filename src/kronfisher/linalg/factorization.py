"""Factorised damped Kronecker matrices: typed, explicit objects that solve many times.

Conventions (DESIGN.md §2, §5): a parameter matrix V has shape (d_g, d_a), vec is column
stacking and (A ⊗ G) vec(V) = vec(G V Aᵀ), so the dense form of a term is
``torch.kron(A, G)``. Every factorisation M here has

* ``solve(V)``: X with vec(X) = M⁻¹ vec(V) (V may carry leading batch dimensions);
* ``apply(V)``: M vec(V) in matrix form (the inverse of ``solve``);
* ``to_dense()``: the (d_a·d_g)² matrix M itself (tests and small baselines);
* ``damping``, ``scheme``, ``clamped``: what was asked for and how many eigenvalues of
  M had to be raised to a floor (0: M is exactly the damped matrix asked for).

Three kinds:

* :class:`FactorInverses`: M = (A + c_a I) ⊗ (G + c_g I), stored as the two damped factor
  inverses; ``solve`` is G⁻¹ V A⁻¹, two products (one-term factored damping).
* :class:`EigenFactorization`: M = (K_a⁻ᵀ ⊗ K_g⁻ᵀ) diag(vec(D)) (K_a⁻¹ ⊗ K_g⁻¹) and
  ``solve`` is K_g [(K_gᵀ V K_a) ⊘ D] K_aᵀ, four products; orthogonal K for one term
  with exact Tikhonov damping (eigenvectors), congruence transforms for two terms
  (simultaneous diagonalisation).
* :class:`ConjugateGradientSolve`: three or more terms, Σ A_k ⊗ G_k + λ I by
  preconditioned conjugate gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .numerics import warn_once
from .support import BlockSolve

__all__ = ["KroneckerFactorization", "FactorInverses", "EigenFactorization",
           "ConjugateGradientSolve", "SingularFactorError", "CG_RTOL", "CG_MAX_ITER"]

CG_RTOL = 1e-10
"""Relative residual ‖V − M X‖ ≤ CG_RTOL·‖V‖ at which CG stops (float64-level accuracy;
in float32 the iteration stops at CG_MAX_ITER and warns)."""
CG_MAX_ITER = 500
"""CG iteration cap: preconditioned by the damped first term, a sum whose extra terms are
small converges in tens of iterations; 500 bounds the time of a bad case."""


class SingularFactorError(RuntimeError):
    """Raised when a damped Kronecker matrix cannot be factorised (not positive definite)."""


@dataclass
class KroneckerFactorization:
    """Base class of the factorised damped matrices (see the module docstring)."""

    damping: float
    scheme: str
    clamped: int

    @property
    def shape(self) -> tuple[int, int]:
        """(d_g, d_a): the shape of the matrices V it acts on."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in (``solve`` casts V to it)."""
        raise NotImplementedError

    def solve(self, V: Tensor) -> Tensor:
        """X of shape (..., d_g, d_a) with vec(X) = M⁻¹ vec(V).

        Raises:
            ValueError: if V's last two dimensions are not (d_g, d_a).
        """
        if V.ndim < 2 or tuple(V.shape[-2:]) != self.shape:
            raise ValueError(
                f"V must have shape (..., d_g, d_a) = (..., {self.shape[0]}, {self.shape[1]}),"
                f" got {tuple(V.shape)}"
            )
        return self._solve(V.to(self.dtype))

    def _solve(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def apply(self, V: Tensor) -> Tensor:
        """M vec(V) in matrix form, V of shape (..., d_g, d_a)."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        """The (d_a·d_g)² matrix M that :meth:`solve` inverts."""
        raise NotImplementedError


def _left_inverse(inv: Tensor, idx: Tensor | None, c: float, V: Tensor) -> Tensor:
    """(X + c I)⁻¹ V along dim −2, with ``inv`` the inverse on the support ``idx``."""
    if idx is None:
        return inv @ V
    out = V * (1.0 / c)
    out.index_copy_(V.ndim - 2, idx, inv @ V.index_select(-2, idx))
    return out


def _right_inverse(inv: Tensor, idx: Tensor | None, c: float, V: Tensor) -> Tensor:
    """V (X + c I)⁻¹ along dim −1 (the inverse is symmetric)."""
    if idx is None:
        return V @ inv
    out = V * (1.0 / c)
    out.index_copy_(V.ndim - 1, idx, V.index_select(-1, idx) @ inv)
    return out


@dataclass(kw_only=True)
class FactorInverses(KroneckerFactorization):
    """M = (A + c_a I) ⊗ (G + c_g I) with c_a, c_g > 0, solved as G_d⁻¹ V A_d⁻¹.

    ``A_inv`` and ``G_inv`` are the inverses of the damped factors restricted to their
    supports ``a_idx`` / ``g_idx`` (None: every coordinate); on the other coordinates the
    damped factor is c·I (see :mod:`~kronfisher.linalg.support`). ``A`` and ``G`` are the
    undamped factors (references, for ``apply`` and ``to_dense``).
    """

    A: Tensor = field(repr=False)
    G: Tensor = field(repr=False)
    c_a: float = 0.0
    c_g: float = 0.0
    A_inv: Tensor = field(repr=False)
    G_inv: Tensor = field(repr=False)
    a_idx: Tensor | None = field(repr=False, default=None)
    g_idx: Tensor | None = field(repr=False, default=None)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_g, d_a): the shape of the matrices V it acts on."""
        return self.G.shape[0], self.A.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in."""
        return self.A_inv.dtype

    def _solve(self, V: Tensor) -> Tensor:
        Y = _left_inverse(self.G_inv, self.g_idx, self.c_g, V)
        return _right_inverse(self.A_inv, self.a_idx, self.c_a, Y)

    def _damped(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye
        A, G = self.A.to(self.dtype), self.G.to(self.dtype)
        return (A + self.c_a * eye(A.shape[0], dtype=A.dtype, device=A.device),
                G + self.c_g * eye(G.shape[0], dtype=G.dtype, device=G.device))

    def apply(self, V: Tensor) -> Tensor:
        """M vec(V) in matrix form, V of shape (..., d_g, d_a)."""
        Ad, Gd = self._damped()
        return Gd @ V.to(self.dtype) @ Ad

    def to_dense(self) -> Tensor:
        """The (d_a·d_g)² matrix M that ``solve`` inverts."""
        Ad, Gd = self._damped()
        return torch.kron(Ad, Gd)


@dataclass(kw_only=True)
class EigenFactorization(KroneckerFactorization):
    """M = (K_a⁻ᵀ ⊗ K_g⁻ᵀ) diag(vec(D)) (K_a⁻¹ ⊗ K_g⁻¹) (see the module docstring).

    ``K_a`` (d_a × d_a), ``K_g`` (d_g × d_g), ``D`` (d_g × d_a). ``K_a_inv`` and
    ``K_g_inv`` give the dense form; None means K⁻¹ = Kᵀ(X₁ + c·I) with ``metric_a`` =
    (X₁, c) (a congruence of the damped first factor, formed only for ``apply`` and
    ``to_dense``), or K⁻¹ = Kᵀ if there is no metric (orthogonal K). ``blocks`` does the
    same solve on the supports when the factors have zero coordinates.
    """

    K_a: Tensor = field(repr=False)
    K_g: Tensor = field(repr=False)
    D: Tensor = field(repr=False)
    K_a_inv: Tensor | None = field(repr=False, default=None)
    K_g_inv: Tensor | None = field(repr=False, default=None)
    metric_a: tuple[Tensor, float] | None = field(repr=False, default=None)
    metric_g: tuple[Tensor, float] | None = field(repr=False, default=None)
    blocks: BlockSolve | None = field(repr=False, default=None)
    D_inv: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.D_inv = 1.0 / self.D  # one division here, a multiplication per solve

    @property
    def shape(self) -> tuple[int, int]:
        """(d_g, d_a): the shape of the matrices V it acts on."""
        d_g, d_a = self.D.shape
        return d_g, d_a

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in."""
        return self.D.dtype

    def _solve(self, V: Tensor) -> Tensor:
        if self.blocks is not None:
            return self.blocks.solve(V)
        return self.K_g @ (self.K_g.mT @ V @ self.K_a).mul_(self.D_inv) @ self.K_a.mT

    @staticmethod
    def _inverse(K: Tensor, K_inv: Tensor | None, metric: tuple[Tensor, float] | None):
        if K_inv is not None:
            return K_inv
        if metric is None:
            return K.mT
        X1, c = metric
        return K.mT @ (X1.to(K.dtype) + c * torch.eye(K.shape[0], dtype=K.dtype,
                                                        device=K.device))

    def _inverses(self) -> tuple[Tensor, Tensor]:
        return (self._inverse(self.K_a, self.K_a_inv, self.metric_a),
                self._inverse(self.K_g, self.K_g_inv, self.metric_g))

    def apply(self, V: Tensor) -> Tensor:
        """M vec(V) in matrix form, V of shape (..., d_g, d_a)."""
        Ka_inv, Kg_inv = self._inverses()
        return Kg_inv.mT @ ((Kg_inv @ V.to(self.dtype) @ Ka_inv.mT) * self.D) @ Ka_inv

    def to_dense(self) -> Tensor:
        """The (d_a·d_g)² matrix M that ``solve`` inverts."""
        Ka_inv, Kg_inv = self._inverses()
        left = torch.kron(Ka_inv, Kg_inv)
        d = self.D.mT.reshape(-1)  # vec(D): column stacking
        return left.mT @ (d[:, None] * left)


@dataclass(kw_only=True)
class ConjugateGradientSolve(KroneckerFactorization):
    """M = Σ_k A_k ⊗ G_k + λ I (three or more terms), solved by conjugate gradients.

    Preconditioned with ``preconditioner`` (the first term with exact Tikhonov damping).

    Stops at relative residual :data:`CG_RTOL` or after :data:`CG_MAX_ITER` iterations
    (then warns once per process and returns the last iterate).
    """

    terms: list[tuple[Tensor, Tensor]] = field(repr=False, default_factory=list)
    preconditioner: KroneckerFactorization = field(repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_g, d_a): the shape of the matrices V it acts on."""
        return self.terms[0][1].shape[0], self.terms[0][0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in."""
        return self.terms[0][0].dtype

    def apply(self, V: Tensor) -> Tensor:
        """M vec(V) in matrix form, V of shape (..., d_g, d_a)."""
        V = V.to(self.dtype)
        out = self.damping * V
        for A, G in self.terms:
            out = out + G @ V @ A.mT
        return out

    def to_dense(self) -> Tensor:
        """The (d_a·d_g)² matrix M that ``solve`` inverts."""
        A0, G0 = self.terms[0]
        out = torch.kron(A0, G0)
        for A, G in self.terms[1:]:
            out = out + torch.kron(A, G)
        return out + self.damping * torch.eye(out.shape[0], dtype=out.dtype, device=out.device)

    def _solve(self, V: Tensor) -> Tensor:
        pre = self.preconditioner.solve
        X = pre(V)
        r = V - self.apply(X)
        z = pre(r)
        p = z.clone()
        rz = (r * z).sum()
        vnorm = V.norm()
        for _ in range(CG_MAX_ITER):
            if r.norm() <= CG_RTOL * vnorm:
                return X
            Ap = self.apply(p)
            pAp = (p * Ap).sum()
            if pAp <= 0:
                raise SingularFactorError(
                    "sum of Kronecker products plus damping is not positive definite"
                )
            alpha = rz / pAp
            X = X + alpha * p
            r = r - alpha * Ap
            z = pre(r)
            rz_new = (r * z).sum()
            p = z + (rz_new / rz) * p
            rz = rz_new
        if r.norm() > CG_RTOL * vnorm:
            warn_once(
                "cg-not-converged",
                f"conjugate gradients stopped after {CG_MAX_ITER} iterations at relative"
                f" residual {float(r.norm() / vnorm):.2e} > {CG_RTOL:g} (warned once per"
                " process)",
            )
        return X
