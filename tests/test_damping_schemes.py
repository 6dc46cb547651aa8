"""The damping schemes of KroneckerSum against explicit dense constructions (float64)."""

import math

import pytest
import torch

from helpers import D, eye, spd, sym, vec
from kronfisher import KroneckerSum


def dense_solve(M, V):
    return torch.linalg.solve(M, vec(V))


def abs_relative(B, X):
    """|X| relative to the SPD B by Cholesky (independent of the library's eigh route):
    B = LLᵀ, L⁻¹XL⁻ᵀ = E S Eᵀ, |X|_B = L E |S| Eᵀ Lᵀ."""
    L = torch.linalg.cholesky(B)
    C = torch.linalg.solve_triangular(L, X, upper=False)
    C = torch.linalg.solve_triangular(L, C.T, upper=False)
    s, E = torch.linalg.eigh(0.5 * (C + C.T))
    LE = L @ E
    return LE @ torch.diag(s.abs()) @ LE.T


@pytest.mark.parametrize("scheme", ["factored_pi1", "authors"])
@pytest.mark.parametrize("lam", [1e-4, 0.3])
def test_one_term_pi1(scheme, lam):
    A, G = 1e-3 * spd(5, 0), spd(4, 1, cond=100.0)
    ks = KroneckerSum([(A, G)])
    r = math.sqrt(lam)
    dense = torch.kron(A + r * eye(5), G + r * eye(4))
    torch.testing.assert_close(ks.to_dense(lam, scheme), dense, rtol=1e-13, atol=1e-15)
    V = torch.randn(4, 5, dtype=D)
    torch.testing.assert_close(vec(ks.solve(V, lam, scheme)), dense_solve(dense, V),
                               rtol=1e-10, atol=1e-12)
    # π = 1 differs from the trace-based π when the factors have different scales
    assert not torch.allclose(ks.to_dense(lam, "factored"), dense)


@pytest.mark.parametrize("lam", [1e-3, 0.2])
def test_two_terms_factored_pi1(lam):
    A1, G1, A2, G2 = spd(5, 0), 1e-2 * spd(4, 1), 0.05 * sym(5, 2), 1e-3 * sym(4, 3)
    ks = KroneckerSum([(A1, G1), (A2, G2)])
    r = math.sqrt(lam)
    dense = torch.kron(A1 + r * eye(5), G1 + r * eye(4)) + torch.kron(A2, G2)
    torch.testing.assert_close(ks.to_dense(lam, "factored_pi1"), dense, rtol=1e-13,
                               atol=1e-15)
    fac = ks.factorize(lam, "factored_pi1")
    assert fac.clamped == 0
    V = torch.randn(4, 5, dtype=D)
    torch.testing.assert_close(vec(ks.solve(V, lam, "factored_pi1")), dense_solve(dense, V),
                               rtol=1e-9, atol=1e-12)


def test_two_terms_authors_psd_second_term_is_plain_sum():
    """With a PSD second term the absolute value changes nothing: (A₁+λI)⊗(G₁+λI) + A₂⊗G₂."""
    lam = 1e-2
    A1, G1, A2, G2 = spd(5, 0), spd(4, 1), 0.3 * spd(5, 2), 0.2 * spd(4, 3)
    ks = KroneckerSum([(A1, G1), (A2, G2)])
    dense = torch.kron(A1 + lam * eye(5), G1 + lam * eye(4)) + torch.kron(A2, G2)
    torch.testing.assert_close(ks.to_dense(lam, "authors"), dense, rtol=1e-11, atol=1e-13)
    V = torch.randn(3, 4, 5, dtype=D)
    X = ks.solve(V, lam, "authors")
    for v, x in zip(V, X):
        torch.testing.assert_close(vec(x), dense_solve(dense, v), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("zero_rows", [False, True])
def test_two_terms_authors_indefinite(zero_rows):
    """Strongly indefinite second term: "factored_pi1" has to clamp, "authors" inverts
    (A₁+λI)⊗(G₁+λI) + |A₂|⊗|G₂| exactly (|·| relative to the damped first factors)."""
    lam = 1e-2
    A1, G1, A2, G2 = spd(6, 0), spd(5, 1), 3.0 * sym(6, 2), 3.0 * sym(5, 3)
    if zero_rows:  # dead units: exactly zero rows/columns in every factor
        for M, zero in ((A1, [1, 4]), (A2, [1, 4]), (G1, [0]), (G2, [0])):
            M[zero, :] = 0
            M[:, zero] = 0
    ks = KroneckerSum([(A1, G1), (A2, G2)])
    B_a, B_g = A1 + lam * eye(6), G1 + lam * eye(5)
    dense = torch.kron(B_a, B_g) + torch.kron(abs_relative(B_a, A2), abs_relative(B_g, G2))
    torch.testing.assert_close(ks.to_dense(lam, "authors"), dense, rtol=1e-10, atol=1e-12)
    fac = ks.factorize(lam, "authors")
    assert fac.clamped == 0
    assert bool((fac.D >= 1).all())
    torch.testing.assert_close(fac.to_dense(), dense, rtol=1e-9, atol=1e-11)
    V = torch.randn(5, 6, dtype=D)
    torch.testing.assert_close(vec(ks.solve(V, lam, "authors")), dense_solve(dense, V),
                               rtol=1e-9, atol=1e-12)
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        assert ks.factorize(lam, "factored_pi1").clamped > 0


def test_unknown_scheme():
    ks = KroneckerSum([(spd(3, 0), spd(2, 1))])
    with pytest.raises(ValueError, match="damping scheme"):
        ks.solve(torch.zeros(2, 3, dtype=D), 1e-3, "bogus")
    with pytest.raises(ValueError, match="damping scheme"):
        ks.to_dense(1e-3, "bogus")
