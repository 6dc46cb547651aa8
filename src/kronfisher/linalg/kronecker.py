"""Sums of Kronecker products and damped solves with them.

Conventions (DESIGN.md §2, §5): a parameter matrix V has shape (d_g, d_a), vec is
column stacking, and (A ⊗ G) vec(V) = vec(G V Aᵀ), so the dense form of a term is
``torch.kron(A, G)``.

Every factorisation here represents the matrix it inverts as

    M = (K_a⁻ᵀ ⊗ K_g⁻ᵀ) diag(vec(D)) (K_a⁻¹ ⊗ K_g⁻¹),
    M⁻¹ vec(V) = vec(K_g [(K_gᵀ V K_a) ⊘ D] K_aᵀ),

with orthogonal K for one term (eigenvectors) and congruence transforms for two terms
(simultaneous diagonalisation). ``to_dense(damping)`` returns exactly that M.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["KroneckerSum", "KroneckerFactorization", "DampingScheme", "SingularFactorError"]

DampingScheme = str  # "tikhonov" | "factored"
_SCHEMES = ("tikhonov", "factored")


class SingularFactorError(RuntimeError):
    """Raised when a damped Kronecker matrix cannot be factorised (not positive definite)."""


def _sym(x: Tensor) -> Tensor:
    return 0.5 * (x + x.mT)


def _check_square(name: str, x: Tensor) -> None:
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(x.shape)}")


def _eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition; retried in float64 (then with jitter) if LAPACK fails.

    float32 ``syevd`` can fail, or return NaN, on low-rank factors with many repeated
    zero eigenvalues (e.g. curvature from a batch smaller than the layer width).
    """
    try:
        vals, vecs = torch.linalg.eigh(x)
        if bool(torch.isfinite(vals).all()) and bool(torch.isfinite(vecs).all()):
            return vals, vecs
    except (torch.linalg.LinAlgError, RuntimeError):
        pass
    xd = x.double()
    try:
        vals, vecs = torch.linalg.eigh(xd)
    except (torch.linalg.LinAlgError, RuntimeError):
        jitter = 1e-12 * float(xd.diagonal().abs().max().clamp_min(1e-300))
        eye = torch.eye(x.shape[0], dtype=xd.dtype, device=x.device)
        vals, vecs = torch.linalg.eigh(xd + jitter * eye)
        vals = vals - jitter
    return vals.to(x.dtype), vecs.to(x.dtype)


def pi_factor(A: Tensor, G: Tensor) -> float:
    """Martens & Grosse's π = sqrt((tr(A)/d_a) / (tr(G)/d_g)) for factored Tikhonov damping."""
    ta = A.diagonal().sum().item() / A.shape[0]
    tg = G.diagonal().sum().item() / G.shape[0]
    if not (ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg)):
        return 1.0
    return math.sqrt(ta / tg)


@dataclass
class KroneckerFactorization:
    """A factorised damped Kronecker matrix, reusable for many solves.

    ``K_a`` (d_a × d_a), ``K_g`` (d_g × d_g), ``D`` (d_g × d_a) as in the module docstring;
    ``K_a_inv`` and ``K_g_inv`` give the dense form. ``clamped`` counts the entries of D
    that were raised to the floor because the damped matrix was not positive definite
    there.
    """

    K_a: Tensor
    K_g: Tensor
    D: Tensor
    K_a_inv: Tensor
    K_g_inv: Tensor
    damping: float
    scheme: str
    clamped: int = 0
    extra_terms: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def solve(self, V: Tensor) -> Tensor:
        """X (d_g × d_a) with vec(X) = M⁻¹ vec(V); V may carry leading batch dimensions."""
        if self.extra_terms:
            raise RuntimeError("sums of three or more terms are solved by KroneckerSum.solve (CG)")
        if V.shape[-2:] != self.D.shape:
            raise ValueError(
                f"V must have shape (..., d_g, d_a) = (..., {self.D.shape[0]}, {self.D.shape[1]}),"
                f" got {tuple(V.shape)}"
            )
        V = V.to(self.D.dtype)
        return self.K_g @ ((self.K_g.mT @ V @ self.K_a) / self.D) @ self.K_a.mT

    def apply(self, V: Tensor) -> Tensor:
        """M vec(V) in matrix form (the inverse of :meth:`solve`)."""
        return self.K_g_inv.mT @ ((self.K_g_inv @ V @ self.K_a_inv.mT) * self.D) @ self.K_a_inv

    def to_dense(self) -> Tensor:
        """The (d_a·d_g)² matrix M that :meth:`solve` inverts."""
        left = torch.kron(self.K_a_inv, self.K_g_inv)
        d = self.D.mT.reshape(-1)  # vec(D): column stacking
        return left.mT @ (d[:, None] * left)


class KroneckerSum:
    """A sum of Kronecker products Σ_k A_k ⊗ G_k acting on (d_g × d_a) matrices.

    Args:
        terms: list of ``(A, G)`` with A (d_a × d_a) and G (d_g × d_g), symmetric.

    ``solve(V, damping)`` inverts ``to_dense(damping)``:

    * one term, ``scheme="tikhonov"`` (default): A ⊗ G + λ I exactly, through the
      eigendecompositions A = U_a Λ_a U_aᵀ and G = U_g Λ_g U_gᵀ.

    The first term's factors are taken as positive semi-definite (true for every method
    in this package): negative eigenvalues of A₁ and G₁, which arise from rounding, are
    set to 0 before damping.
    * one term, ``scheme="factored"``: (A + π√λ I) ⊗ (G + √λ/π I).
    * two terms (both schemes): (A₁ + π√λ I) ⊗ (G₁ + √λ/π I) + A₂ ⊗ G₂, by simultaneous
      diagonalisation of the two A's and of the two G's (DESIGN.md §5). For λ = 0 the
      first term alone must be positive definite.
    * three or more terms: Σ A_k ⊗ G_k + λ I, by conjugate gradients preconditioned with
      the damped first term (tolerance 1e-10 relative); ``to_dense`` is the exact sum.

    Not positive definite: an eigenvalue of the damped matrix (one term: λ_g λ_a + λ; two
    terms: 1 + s_g s_a relative to the damped first term) at or below a floor is raised to
    that floor (``eig_floor`` × largest for one term, ``min_ratio`` for two terms) and a
    RuntimeWarning says how many. The matrix then inverted is
    ``factorize(damping).to_dense()``; ``factorize(damping).clamped`` counts the clamped
    eigenvalues (0 means ``solve`` inverts ``to_dense(damping)`` exactly). A singular
    matrix with damping λ = 0 raises :class:`SingularFactorError` instead.
    """

    def __init__(self, terms: list[tuple[Tensor, Tensor]]):
        if len(terms) == 0:
            raise ValueError("a KroneckerSum needs at least one (A, G) term")
        d_a, d_g = terms[0][0].shape[0], terms[0][1].shape[0]
        for i, (A, G) in enumerate(terms):
            _check_square(f"A[{i}]", A)
            _check_square(f"G[{i}]", G)
            if A.shape[0] != d_a or G.shape[0] != d_g:
                raise ValueError(
                    f"term {i} has shapes A {tuple(A.shape)}, G {tuple(G.shape)}; expected"
                    f" A ({d_a}, {d_a}) and G ({d_g}, {d_g}) like term 0"
                )
        self._terms = [(A, G) for A, G in terms]
        self._cache: dict[tuple[float, str], KroneckerFactorization] = {}
        self.info: dict = {}

    # ------------------------------------------------------------------ basics
    @property
    def terms(self) -> list[tuple[Tensor, Tensor]]:
        return list(self._terms)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_g, d_a): the shape of the parameter matrices it acts on."""
        return self._terms[0][1].shape[0], self._terms[0][0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._terms[0][0].dtype

    def __len__(self) -> int:
        return len(self._terms)

    def __repr__(self) -> str:
        d_g, d_a = self.shape
        return f"KroneckerSum(terms={len(self)}, d_a={d_a}, d_g={d_g}, dtype={self.dtype})"

    def matvec(self, V: Tensor) -> Tensor:
        """(Σ A_k ⊗ G_k) vec(V) in matrix form: Σ G_k V A_kᵀ, V of shape (..., d_g, d_a)."""
        self._check_V(V)
        out = None
        for A, G in self._terms:
            t = G @ V @ A.mT
            out = t if out is None else out + t
        return out

    def to_dense(self, damping: float = 0.0, scheme: DampingScheme = "tikhonov") -> Tensor:
        """Σ torch.kron(A_k, G_k) plus the damping ``solve(·, damping, scheme)`` applies.

        This is the matrix ``solve`` inverts whenever it is positive definite. Where it is
        not, ``solve`` inverts a clamped version (with a warning); that matrix is
        ``factorize(damping, scheme).to_dense()``.
        """
        eye = torch.eye
        terms = list(self._terms)
        if damping and (len(self) == 2 or (len(self) == 1 and scheme == "factored")):
            A, G = terms[0]
            pi, r = pi_factor(A, G), math.sqrt(damping)
            A = A + pi * r * eye(A.shape[0], dtype=A.dtype, device=A.device)
            G = G + r / pi * eye(G.shape[0], dtype=G.dtype, device=G.device)
            terms[0] = (A, G)
            damping = 0.0
        out = sum(torch.kron(A, G) for A, G in terms)
        if damping:
            out = out + damping * eye(out.shape[0], dtype=out.dtype, device=out.device)
        return out

    # ----------------------------------------------------------------- solving
    def factorize(
        self,
        damping: float,
        scheme: DampingScheme = "tikhonov",
        *,
        eig_floor: float = 1e-10,
        min_ratio: float = 1e-2,
    ) -> KroneckerFactorization:
        """Factorise the damped matrix once; the result is cached per (damping, scheme).

        The factorisation is computed in the terms' dtype (float64 retried if LAPACK
        fails) and reused by every later ``solve`` with the same damping and scheme.
        """
        if scheme not in _SCHEMES:
            raise ValueError(f"unknown damping scheme {scheme!r}; choose from {_SCHEMES}")
        if not (damping >= 0.0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        key = (float(damping), scheme)
        if key in self._cache:
            return self._cache[key]
        for i, (A, G) in enumerate(self._terms):
            if not (torch.isfinite(A).all() and torch.isfinite(G).all()):
                raise ValueError(f"term {i} of the KroneckerSum has non-finite entries")
        if len(self) == 1:
            fac = self._factorize_one(damping, scheme, eig_floor)
        elif len(self) == 2:
            fac = self._factorize_two(damping, min_ratio)
        else:  # CG preconditioner: the first term with exact Tikhonov damping
            fac = KroneckerSum([self._terms[0]])._factorize_one(damping, "tikhonov", eig_floor)
            fac.extra_terms = self._terms[1:]
        self._cache = {key: fac}  # keep only the latest: factors are large
        return fac

    def solve(self, V: Tensor, damping: float, scheme: DampingScheme = "tikhonov") -> Tensor:
        """X of shape (..., d_g, d_a) with vec(X) = to_dense(damping)⁻¹ vec(V)."""
        self._check_V(V)
        fac = self.factorize(damping, scheme)
        if len(self) <= 2:
            return fac.solve(V)
        return self._cg_solve(V, damping, fac)

    # ---------------------------------------------------------------- internal
    def _check_V(self, V: Tensor) -> None:
        if V.ndim < 2 or tuple(V.shape[-2:]) != self.shape:
            raise ValueError(
                f"V must have shape (..., d_g, d_a) = (..., {self.shape[0]}, {self.shape[1]}),"
                f" got {tuple(V.shape)}"
            )

    def _factorize_one(self, damping: float, scheme: str, eig_floor: float):
        A, G = self._terms[0]
        # The factors of every method's first term are PSD; negative eigenvalues are
        # rounding (float32 eigh of a large PSD matrix) and would make λ_g λ_a + λ
        # meaningless, so they are set to 0.
        ea, Ua = _eigh(_sym(A))
        eg, Ug = _eigh(_sym(G))
        ea, eg = ea.clamp_min(0), eg.clamp_min(0)
        if scheme == "factored" and damping > 0:
            pi = pi_factor(A, G)
            ea = ea + pi * math.sqrt(damping)
            eg = eg + math.sqrt(damping) / pi
            D = eg[:, None] * ea[None, :]
        else:
            D = eg[:, None] * ea[None, :] + damping
        floor = eig_floor * D.abs().max().clamp_min(torch.finfo(D.dtype).tiny)
        bad = D <= floor
        clamped = int(bad.sum())
        if clamped:
            if damping == 0.0:
                raise SingularFactorError(
                    f"A ⊗ G is singular or indefinite ({clamped} eigenvalues ≤ {float(floor):.3g})"
                    " and no damping was given; pass damping > 0"
                )
            warnings.warn(
                f"damped Kronecker matrix not positive definite: {clamped} eigenvalue(s) raised"
                f" to the floor {float(floor):.3g}",
                RuntimeWarning,
                stacklevel=3,
            )
            D = torch.where(bad, floor, D)
        return KroneckerFactorization(Ua, Ug, D, Ua.mT, Ug.mT, damping, scheme, clamped)

    def _factorize_two(self, damping: float, min_ratio: float):
        (A1, G1), (A2, G2) = self._terms[0], self._terms[1]
        pi = pi_factor(A1, G1)
        da, dg = (pi * math.sqrt(damping), math.sqrt(damping) / pi) if damping > 0 else (0, 0)
        Ka, Ka_inv, sa = _congruence(A1, A2, da, "A")
        Kg, Kg_inv, sg = _congruence(G1, G2, dg, "G")
        D = 1.0 + sg[:, None] * sa[None, :]
        bad = D <= min_ratio
        clamped = int(bad.sum())
        if clamped:
            warnings.warn(
                f"two-term Kronecker approximation is not positive definite in {clamped}"
                f" direction(s): 1 + s_g s_a raised to {min_ratio} there",
                RuntimeWarning,
                stacklevel=3,
            )
            D = torch.where(bad, torch.as_tensor(min_ratio, dtype=D.dtype), D)
        return KroneckerFactorization(Ka, Kg, D, Ka_inv, Kg_inv, damping, "factored", clamped)

    def _cg_solve(self, V: Tensor, damping: float, pre: KroneckerFactorization) -> Tensor:
        pre = KroneckerFactorization(pre.K_a, pre.K_g, pre.D, pre.K_a_inv, pre.K_g_inv, damping, "")

        def op(X: Tensor) -> Tensor:
            return self.matvec(X) + damping * X

        X = pre.solve(V)
        r = V - op(X)
        z = pre.solve(r)
        p = z.clone()
        rz = (r * z).sum()
        vnorm = V.norm()
        for _ in range(500):
            if r.norm() <= 1e-10 * vnorm:
                break
            Ap = op(p)
            pAp = (p * Ap).sum()
            if pAp <= 0:
                raise SingularFactorError(
                    "sum of Kronecker products plus damping is not positive definite"
                )
            alpha = rz / pAp
            X = X + alpha * p
            r = r - alpha * Ap
            z = pre.solve(r)
            rz_new = (r * z).sum()
            p = z + (rz_new / rz) * p
            rz = rz_new
        return X


def _congruence(
    X1: Tensor, X2: Tensor, shift: float, name: str
) -> tuple[Tensor, Tensor, Tensor]:
    """K with Kᵀ(X1 + shift·I)K = I and Kᵀ X2 K = diag(s); returns (K, K⁻¹, s)."""
    e, U = _eigh(_sym(X1))
    e = e.clamp_min(0) + shift  # X1 is PSD: negative eigenvalues are rounding
    floor = 1e-12 * e.abs().max().clamp_min(torch.finfo(e.dtype).tiny)
    if (e <= floor).any():
        raise SingularFactorError(
            f"the first {name} factor is not positive definite after damping"
            f" (smallest eigenvalue {float(e.min()):.3g}); increase the damping"
        )
    r = e.sqrt()
    W = U / r  # W = U diag(1/√e): Wᵀ X1 W = I
    s, E = _eigh(_sym(W.mT @ X2 @ W))
    K = W @ E
    K_inv = E.mT @ (U * r).mT  # (U diag(√e) E)ᵀ = K⁻¹
    return K, K_inv, s
