"""Sums of Kronecker products and damped solves with them.

Conventions (DESIGN.md §2, §5): a parameter matrix V has shape (d_g, d_a), vec is
column stacking, and (A ⊗ G) vec(V) = vec(G V Aᵀ), so the dense form of a term is
``torch.kron(A, G)``.

Every factorisation here represents the matrix it inverts as

    M = (K_a⁻ᵀ ⊗ K_g⁻ᵀ) diag(vec(D)) (K_a⁻¹ ⊗ K_g⁻¹),
    M⁻¹ vec(V) = vec(K_g [(K_gᵀ V K_a) ⊘ D] K_aᵀ),

with orthogonal K for one term (eigenvectors) and congruence transforms for two terms
(simultaneous diagonalisation). ``to_dense(damping)`` returns exactly that M.

Performance (same results up to rounding): coordinates whose row and column are zero in
every factor of a side (inputs that are always 0, dead ReLU units) are split off exactly —
the eigenproblems run on the rest and ``solve`` multiplies only the nonzero blocks; the
two-term congruence uses a Cholesky factor of the damped first factor and one eigh instead
of two eighs whenever the damping clearly dominates rounding (else the two-eigh reference).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["KroneckerSum", "KroneckerFactorization", "DampingScheme", "SingularFactorError"]

DampingScheme = str  # one of SCHEMES
SCHEMES = ("tikhonov", "factored", "factored_pi1", "authors")
"""Damping schemes; see :class:`KroneckerSum` for the matrix each one inverts."""
_SCHEMES = SCHEMES


class SingularFactorError(RuntimeError):
    """Raised when a damped Kronecker matrix cannot be factorised (not positive definite)."""


def _sym(x: Tensor) -> Tensor:
    return 0.5 * (x + x.mT)


def _check_square(name: str, x: Tensor) -> None:
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(x.shape)}")


def all_finite(x: Tensor) -> bool:
    """torch.isfinite(x).all(), usually in one pass: a sum with a NaN or ±Inf term is never
    finite, so a finite sum proves every entry finite; otherwise check entrywise (the sum
    of finite entries may overflow)."""
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def _support(*xs: Tensor) -> Tensor | None:
    """Indices of the coordinates j where some x in ``xs`` has a nonzero row j or column j,
    or None if that is every coordinate. Zero rows/columns (inputs that are always 0, dead
    units) decouple: they span an exact invariant subspace, so the eigenproblems shrink to
    the support and the solves act on it (and by a scalar on the rest)."""
    cand = None  # a zero row has a zero diagonal entry: test only those rows entrywise
    for x in xs:
        c = x.diagonal() == 0
        cand = c if cand is None else cand & c
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


def _restrict(x: Tensor, idx: Tensor | None) -> Tensor:
    """sym(x) restricted to the rows and columns ``idx`` (all of them if None)."""
    if idx is None:
        return _sym(x)
    return _sym(x.index_select(0, idx).index_select(1, idx))


@dataclass
class _Side:
    """One side (A or G) of a factorisation with zero coordinates: K[idx][:, pos] = Ks,
    K[zidx, zpos] = c·I and zero elsewhere (idx, zidx: support and zero coordinates,
    ascending; pos, zpos: the matching columns of K)."""

    idx: Tensor
    zidx: Tensor
    Ks: Tensor
    c: float
    pos: Tensor
    zpos: Tensor

    @staticmethod
    def dense(K: Tensor) -> _Side:
        n = K.shape[0]
        ar = torch.arange(n, device=K.device)
        empty = ar[:0]
        return _Side(ar, empty, K, 1.0, ar, empty)


def _embed(
    Ks: Tensor, vals: Tensor, idx: Tensor, n: int, zero_val: float, c: float
) -> tuple[Tensor, Tensor, _Side]:
    """Embed the values/columns ``Ks`` (k × k, acting on the coordinates ``idx``) into
    dimension n: the n − k other coordinates get the value ``zero_val`` and columns c·e_j.
    Values stay in ascending order (the zero block is inserted where ``zero_val``
    belongs). Returns (vals, K, side)."""
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
    return out_vals, K, _Side(idx, zidx, Ks, c, pos, zpos)


def _eigh_sym(x: Tensor) -> tuple[Tensor, Tensor, _Side | None]:
    """_eigh of sym(x), computed on its support (exact zero eigenvalues with unit
    eigenvectors elsewhere; ascending order as torch.linalg.eigh), and the side."""
    idx = _support(x)
    if idx is None:
        e, U = _eigh(_sym(x))
        return e, U, None
    if idx.numel():
        e_s, U_s = _eigh(_restrict(x, idx))
    else:
        e_s, U_s = x.new_zeros(0), x.new_zeros(0, 0)
    return _embed(U_s, e_s, idx, x.shape[0], 0.0, 1.0)


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


def first_term_shifts(
    A: Tensor, G: Tensor, damping: float, scheme: DampingScheme, n_terms: int
) -> tuple[float, float] | None:
    """The shifts (c_a, c_g) added to the first term's factors, (A + c_a I) ⊗ (G + c_g I).

    None means exact Tikhonov damping (A ⊗ G + λ I; one-term ``"tikhonov"`` only, and the
    CG path of three or more terms). Two terms are always damped on the first term:
    ``"tikhonov"`` and ``"factored"`` use Martens & Grosse's trace-based π, (π√λ, √λ/π);
    ``"factored_pi1"`` uses π = 1, (√λ, √λ) (the authors' one-term scheme); ``"authors"``
    is (√λ, √λ) for one term and (λ, λ) for two terms (the authors' two-term scheme).
    """
    if n_terms > 2 or (n_terms == 1 and scheme == "tikhonov") or damping == 0:
        return None
    r = math.sqrt(damping)
    if scheme in ("tikhonov", "factored"):
        pi = pi_factor(A, G)
        return pi * r, r / pi
    if scheme == "authors" and n_terms == 2:
        return damping, damping
    return r, r


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
    blocks: _Blocks | None = field(default=None, repr=False)  # fast solve, same result

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
        if self.blocks is not None:
            return self.blocks.solve(V)
        return self.K_g @ ((self.K_g.mT @ V @ self.K_a) / self.D) @ self.K_a.mT

    def apply(self, V: Tensor) -> Tensor:
        """M vec(V) in matrix form (the inverse of :meth:`solve`)."""
        return self.K_g_inv.mT @ ((self.K_g_inv @ V @ self.K_a_inv.mT) * self.D) @ self.K_a_inv

    def to_dense(self) -> Tensor:
        """The (d_a·d_g)² matrix M that :meth:`solve` inverts."""
        left = torch.kron(self.K_a_inv, self.K_g_inv)
        d = self.D.mT.reshape(-1)  # vec(D): column stacking
        return left.mT @ (d[:, None] * left)


class _Blocks:
    """:meth:`KroneckerFactorization.solve` for factors with zero coordinates.

    With rows/columns permuted to (support, zero) order on both sides, K_g and K_a are
    block diagonal, diag(Ks, c·I), so the four products act on the support only:

        X_ss = K_gs [(K_gsᵀ V_ss K_as) ⊘ D_ss] K_asᵀ     X_sz = K_gs [(K_gsᵀ V_sz) ⊙ c_a²/D_sz]
        X_zs = [(V_zs K_as) ⊙ c_g²/D_zs] K_asᵀ           X_zz = V_zz ⊙ c_g² c_a²/D_zz

    — the same sums as the dense formula without the terms that are exactly zero.
    """

    def __init__(self, g: _Side, a: _Side, D: Tensor):
        self.g, self.a = g, a
        self.kg, self.ka = g.idx.numel(), a.idx.numel()
        self.rows = torch.cat([g.idx, g.zidx]) if g.zidx.numel() else None
        self.cols = torch.cat([a.idx, a.zidx]) if a.zidx.numel() else None
        self.inv_rows = None if self.rows is None else torch.argsort(self.rows)
        self.inv_cols = None if self.cols is None else torch.argsort(self.cols)
        Dp = D.index_select(0, torch.cat([g.pos, g.zpos]))
        Dp = Dp.index_select(1, torch.cat([a.pos, a.zpos]))
        kg, ka = self.kg, self.ka
        self.D_ss = Dp[:kg, :ka]
        self.W_sz = (a.c**2) / Dp[:kg, ka:]
        self.W_zs = (g.c**2) / Dp[kg:, :ka]
        self.W_zz = (g.c**2 * a.c**2) / Dp[kg:, ka:]

    def _right(self, Y: Tensor, scale: Tensor, divide: bool, zero_scale: Tensor) -> Tensor:
        """A side for rows Y (columns in (support, zero) order): ((Y_s K_as) ⊘ or ⊙ scale)
        K_asᵀ on the support columns, then Y_z ⊙ zero_scale on the zero columns."""
        Ka, ka = self.a.Ks, self.ka
        Z = Y[..., :ka] @ Ka
        Z = (Z / scale if divide else Z * scale) @ Ka.mT
        if self.cols is None:
            return Z
        return torch.cat([Z, Y[..., ka:] * zero_scale], -1)

    def solve(self, V: Tensor) -> Tensor:
        Kg = self.g.Ks
        P = V if self.cols is None else V.index_select(-1, self.cols)
        Ps = P if self.rows is None else P.index_select(-2, self.g.idx)
        X = Kg @ self._right(Kg.mT @ Ps, self.D_ss, True, self.W_sz)
        if self.rows is not None:
            bottom = self._right(P.index_select(-2, self.g.zidx), self.W_zs, False, self.W_zz)
            X = torch.cat([X, bottom], -2).index_select(-2, self.inv_rows)
        if self.cols is not None:
            X = X.index_select(-1, self.inv_cols)
        return X


def _blocks(g: _Side | None, a: _Side | None, K_g: Tensor, K_a: Tensor, D: Tensor):
    if g is None and a is None:
        return None
    return _Blocks(g or _Side.dense(K_g), a or _Side.dense(K_a), D)


class KroneckerSum:
    """A sum of Kronecker products Σ_k A_k ⊗ G_k acting on (d_g × d_a) matrices.

    Args:
        terms: list of ``(A, G)`` with A (d_a × d_a) and G (d_g × d_g), symmetric.

    ``solve(V, damping, scheme)`` inverts ``to_dense(damping, scheme)`` (λ = damping):

    * one term, ``"tikhonov"`` (default): A ⊗ G + λ I exactly, through the
      eigendecompositions A = U_a Λ_a U_aᵀ and G = U_g Λ_g U_gᵀ.
    * one term, ``"factored"``: (A + π√λ I) ⊗ (G + √λ/π I), π = :func:`pi_factor`.
    * one term, ``"factored_pi1"`` or ``"authors"``: (A + √λ I) ⊗ (G + √λ I) (π = 1, the
      authors' scheme; two factor inverses).
    * two terms, ``"tikhonov"`` or ``"factored"``: (A₁ + π√λ I) ⊗ (G₁ + √λ/π I) + A₂ ⊗ G₂;
      ``"factored_pi1"``: (A₁ + √λ I) ⊗ (G₁ + √λ I) + A₂ ⊗ G₂; all by simultaneous
      diagonalisation of the two A's and of the two G's (DESIGN.md §5). For λ = 0 the
      first term alone must be positive definite.
    * two terms, ``"authors"``: (A₁ + λ I) ⊗ (G₁ + λ I) + |A₂| ⊗ |G₂|, where |A₂| is A₂
      with the signs of its eigenvalues relative to A₁ + λ I dropped (K_aᵀ A₂ K_a = S_a
      becomes |S_a|): the inverse scales by 1 / (1 + |s_g||s_a|), never clamped.
    * three or more terms (any scheme): Σ A_k ⊗ G_k + λ I, by conjugate gradients
      preconditioned with the damped first term (tolerance 1e-10 relative); ``to_dense``
      is the exact sum.

    The first term's factors are taken as positive semi-definite (true for every method
    in this package): negative eigenvalues of A₁ and G₁, which arise from rounding, are
    set to 0 before damping.

    Not positive definite: one term never is for λ > 0 (its factors are PSD, so every
    eigenvalue λ_g λ_a + λ ≥ λ). For two terms, an eigenvalue 1 + s_g s_a of the damped
    matrix relative to its damped first term at or below ``min_ratio`` is raised to
    ``min_ratio`` and a RuntimeWarning says how many. The matrix then inverted is
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
        ``factorize(damping, scheme).to_dense()``. For two terms under ``"authors"`` the
        second term is replaced by its absolute value relative to the damped first term
        (see :class:`KroneckerSum`), so the result is always positive definite.
        """
        if scheme not in SCHEMES:
            raise ValueError(f"unknown damping scheme {scheme!r}; choose from {SCHEMES}")
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
                terms[1] = (_relative_abs(A, terms[1][0]), _relative_abs(G, terms[1][1]))
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
            if not (all_finite(A) and all_finite(G)):
                raise ValueError(f"term {i} of the KroneckerSum has non-finite entries")
        if len(self) == 1:
            fac = self._factorize_one(damping, scheme, eig_floor)
        elif len(self) == 2:
            fac = self._factorize_two(damping, scheme, min_ratio)
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
        ea, Ua, side_a = _eigh_sym(A)
        eg, Ug, side_g = _eigh_sym(G)
        ea, eg = ea.clamp_min(0), eg.clamp_min(0)
        shifts = first_term_shifts(A, G, damping, scheme, 1)
        if shifts is not None:
            ea = ea + shifts[0]
            eg = eg + shifts[1]
            D = eg[:, None] * ea[None, :]
        else:
            D = eg[:, None] * ea[None, :] + damping
        # With PSD factors, D ≥ λ: the damped matrix is positive definite for any λ > 0.
        clamped = 0
        if damping == 0.0:
            floor = eig_floor * D.abs().max().clamp_min(torch.finfo(D.dtype).tiny)
            n_bad = int((D <= floor).sum())
            if n_bad:
                raise SingularFactorError(
                    f"A ⊗ G is singular ({n_bad} eigenvalues ≤ {float(floor):.3g}) and no"
                    " damping was given; pass damping > 0"
                )
        return KroneckerFactorization(Ua, Ug, D, Ua.mT, Ug.mT, damping, scheme, clamped,
                                      blocks=_blocks(side_g, side_a, Ug, Ua, D))

    def _factorize_two(self, damping: float, scheme: str, min_ratio: float):
        (A1, G1), (A2, G2) = self._terms[0], self._terms[1]
        da, dg = first_term_shifts(A1, G1, damping, scheme, 2) or (0.0, 0.0)
        Ka, Ka_inv, sa, side_a = _congruence(A1, A2, da, "A")
        Kg, Kg_inv, sg, side_g = _congruence(G1, G2, dg, "G")
        if scheme == "authors":  # 1 + |s_g||s_a| ≥ 1: positive definite, never clamped
            sa, sg = sa.abs(), sg.abs()
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
        return KroneckerFactorization(Ka, Kg, D, Ka_inv, Kg_inv, damping, scheme, clamped,
                                      blocks=_blocks(side_g, side_a, Kg, Ka, D))

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


def _relative_abs(X1: Tensor, X2: Tensor) -> Tensor:
    """|X2| relative to the positive definite X1: with Kᵀ X1 K = I and Kᵀ X2 K = S,
    returns K⁻ᵀ |S| K⁻¹ = X1 K |S| Kᵀ X1 (equal to X2 when X2 is PSD). Dense reference
    for the ``"authors"`` two-term scheme."""
    e, U = torch.linalg.eigh(_sym(X1))
    W = U / e.sqrt()
    s, E = torch.linalg.eigh(_sym(W.mT @ _sym(X2) @ W))
    K = W @ E
    B = _sym(X1) @ K
    return _sym(B @ torch.diag(s.abs()) @ B.mT)


def _congruence(
    X1: Tensor, X2: Tensor, shift: float, name: str
) -> tuple[Tensor, Tensor, Tensor, _Side | None]:
    """K with Kᵀ(X1 + shift·I)K = I and Kᵀ X2 K = diag(s); returns (K, K⁻¹, s, side).

    X1 is PSD up to rounding. When the shift dominates that rounding (shift > 100·eps·‖X1‖_F,
    which also means X1 + shift·I is safely positive definite), a fast path gives the same
    K up to rounding: restrict to the coordinates where X1 or X2 is nonzero (elsewhere
    X1 + shift·I = shift·I and X2 = 0, so K = I/√shift and s = 0 there), Cholesky
    X1 + shift·I = LLᵀ and one eigh of L⁻¹ X2 L⁻ᵀ = E S Eᵀ: K = L⁻ᵀE, K⁻¹ = EᵀLᵀ (the
    generalised eigenvectors, unique up to signs and rotations within repeated s, as by
    two eighs). Otherwise, or if the Cholesky fails, :func:`_congruence_eigh` decides (and
    raises if singular).
    """
    n = X1.shape[0]
    idx = _support(X1, X2)
    if idx is not None and idx.numel() == 0:
        return (*_congruence_eigh(_sym(X1), _sym(X2), shift, name), None)
    M, S2 = _restrict(X1, idx), _restrict(X2, idx)
    if not shift > max(100.0 * torch.finfo(M.dtype).eps, 2e-12) * float(M.norm()):
        return (*_congruence_eigh(_sym(X1), _sym(X2), shift, name), None)
    M.diagonal().add_(shift)  # M is a fresh tensor: X1 + shift·I on the support
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        return (*_congruence_eigh(_sym(X1), _sym(X2), shift, name), None)
    C = torch.linalg.solve_triangular(L, S2, upper=False)  # L⁻¹ X2
    # L⁻¹ (L⁻¹ X2)ᵀ = L⁻¹ X2 L⁻ᵀ, symmetric up to rounding (eigh reads its lower triangle)
    C = torch.linalg.solve_triangular(L, C.mT, upper=False)
    s, E = _eigh(C)
    K = torch.linalg.solve_triangular(L.mT, E, upper=True)  # L⁻ᵀ E
    K_inv = E.mT @ L.mT
    if idx is None:
        return K, K_inv, s, None
    r = math.sqrt(shift)
    s, K_full, side = _embed(K, s, idx, n, 0.0, 1.0 / r)
    # K⁻¹ = Kᵀ(X1 + shift·I): (EᵀLᵀ) on the support, √shift·e_jᵀ on the zero coordinates
    K_inv_full = K_inv.new_zeros(n, n)
    K_inv_full[side.pos[:, None], idx] = K_inv
    K_inv_full[side.zpos, side.zidx] = r
    return K_full, K_inv_full, s, side


def _congruence_eigh(
    S1: Tensor, S2: Tensor, shift: float, name: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference congruence by two eighs (S1, S2 symmetric)."""
    e, U = _eigh(S1)
    e = e.clamp_min(0) + shift  # X1 is PSD: negative eigenvalues are rounding
    floor = 1e-12 * e.abs().max().clamp_min(torch.finfo(e.dtype).tiny)
    if (e <= floor).any():
        raise SingularFactorError(
            f"the first {name} factor is not positive definite after damping"
            f" (smallest eigenvalue {float(e.min()):.3g}); increase the damping"
        )
    r = e.sqrt()
    W = U / r  # W = U diag(1/√e): Wᵀ X1 W = I
    s, E = _eigh(_sym(W.mT @ S2 @ W))
    K = W @ E
    K_inv = E.mT @ (U * r).mT  # (U diag(√e) E)ᵀ = K⁻¹
    return K, K_inv, s
