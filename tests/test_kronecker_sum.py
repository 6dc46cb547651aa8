"""KroneckerSum: dense form, products and damped solves against dense constructions."""

import pytest
import torch

from kronfisher import KroneckerSum
from kronfisher.linalg import SingularFactorError

D = torch.float64


def spd(n, seed, cond=10.0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))
    e = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=D)
    return (Q * e) @ Q.T


def sym(n, seed):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, generator=gen, dtype=D)
    return X + X.T


def vec(V):
    return V.T.reshape(-1)


def unvec(v, d_g, d_a):
    return v.reshape(d_a, d_g).T


def test_matvec_matches_torch_kron():
    A1, G1, A2, G2 = spd(4, 0), spd(3, 1), 0.05 * sym(4, 2), 0.05 * sym(3, 3)
    ks = KroneckerSum([(A1, G1), (A2, G2)])
    V = torch.randn(3, 4, dtype=D)
    dense = torch.kron(A1, G1) + torch.kron(A2, G2)
    torch.testing.assert_close(vec(ks.matvec(V)), dense @ vec(V), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ks.to_dense(), dense, rtol=0, atol=0)
    # batched V
    Vb = torch.randn(5, 3, 4, dtype=D)
    torch.testing.assert_close(ks.matvec(Vb)[2], ks.matvec(Vb[2]), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_one_term_exact_tikhonov(damping):
    A, G = spd(5, 0), spd(4, 1)
    ks = KroneckerSum([(A, G)])
    dense = torch.kron(A, G) + damping * torch.eye(20, dtype=D)
    torch.testing.assert_close(ks.to_dense(damping), dense, rtol=1e-12, atol=1e-12)
    V = torch.randn(4, 5, dtype=D)
    X = ks.solve(V, damping)
    torch.testing.assert_close(vec(X), torch.linalg.solve(dense, vec(V)), rtol=1e-10, atol=1e-12)


def test_one_term_factored_tikhonov():
    A, G = spd(5, 0), 1e-3 * spd(4, 1)
    lam = 1e-2
    ks = KroneckerSum([(A, G)])
    pi = ((A.trace() / 5) / (G.trace() / 4)).sqrt()
    dense = torch.kron(A + pi * lam**0.5 * torch.eye(5, dtype=D),
                       G + lam**0.5 / pi * torch.eye(4, dtype=D))
    torch.testing.assert_close(ks.to_dense(lam, "factored"), dense, rtol=1e-11, atol=1e-13)
    V = torch.randn(4, 5, dtype=D)
    X = ks.solve(V, lam, "factored")
    torch.testing.assert_close(vec(X), torch.linalg.solve(dense, vec(V)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_two_terms_simultaneous_diagonalisation(damping):
    A1, G1 = spd(5, 0), spd(4, 1)
    A2, G2 = 0.3 * sym(5, 2), 0.1 * sym(4, 3)  # indefinite second term, still PD overall
    ks = KroneckerSum([(A1, G1), (A2, G2)])
    pi = ((A1.trace() / 5) / (G1.trace() / 4)).sqrt()
    s = damping**0.5
    expect = torch.kron(A1 + pi * s * torch.eye(5, dtype=D), G1 + s / pi * torch.eye(4, dtype=D))
    expect = expect + torch.kron(A2, G2)
    assert torch.linalg.eigvalsh(expect).min() > 0.05  # no clamping in this example
    torch.testing.assert_close(ks.to_dense(damping), expect, rtol=1e-10, atol=1e-11)
    V = torch.randn(3, 4, 5, dtype=D)
    X = ks.solve(V, damping)
    ref = torch.linalg.solve(expect, torch.stack([vec(v) for v in V]).T).T
    torch.testing.assert_close(torch.stack([vec(x) for x in X]), ref, rtol=1e-9, atol=1e-11)


def test_two_terms_indefinite_is_clamped_and_to_dense_shows_it():
    A1, G1 = torch.eye(3, dtype=D), torch.eye(2, dtype=D)
    A2 = torch.diag(torch.tensor([2.0, 0.0, -1.0], dtype=D))
    G2 = torch.diag(torch.tensor([1.5, 0.5], dtype=D))
    ks = KroneckerSum([(A1, G1), (A2, G2)])
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        fac = ks.factorize(0.0)
    # 1 + s_g s_a: only 1 + 1.5·(-1) = -0.5 is below the floor 1e-2
    assert fac.clamped == 1
    M = fac.to_dense()
    torch.testing.assert_close(torch.linalg.eigvalsh(M).min(), torch.tensor(1e-2, dtype=D))
    V = torch.randn(2, 3, dtype=D)
    torch.testing.assert_close(vec(fac.solve(V)), torch.linalg.solve(M, vec(V)), rtol=1e-12,
                               atol=1e-12)


def test_three_terms_cg_solve():
    terms = [(spd(4, 0), spd(3, 1)), (0.2 * spd(4, 2), 0.2 * spd(3, 3)),
             (0.1 * spd(4, 4), 0.1 * spd(3, 5))]
    ks = KroneckerSum(terms)
    dense = sum(torch.kron(A, G) for A, G in terms) + 1e-3 * torch.eye(12, dtype=D)
    torch.testing.assert_close(ks.to_dense(1e-3), dense, rtol=0, atol=1e-15)
    V = torch.randn(3, 4, dtype=D)
    torch.testing.assert_close(vec(ks.solve(V, 1e-3)), torch.linalg.solve(dense, vec(V)),
                               rtol=1e-8, atol=1e-10)


def test_factorisation_is_reused():
    ks = KroneckerSum([(spd(4, 0), spd(3, 1))])
    f1 = ks.factorize(1e-2)
    assert ks.factorize(1e-2) is f1
    V = torch.randn(3, 4, dtype=D)
    torch.testing.assert_close(f1.solve(V), ks.solve(V, 1e-2), rtol=0, atol=0)


def test_singular_without_damping_raises():
    A = torch.zeros(3, 3, dtype=D)
    A[0, 0] = 1.0
    ks = KroneckerSum([(A, torch.eye(2, dtype=D))])
    with pytest.raises(SingularFactorError, match="damping"):
        ks.solve(torch.ones(2, 3, dtype=D), 0.0)


def test_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        KroneckerSum([])
    with pytest.raises(ValueError, match="square"):
        KroneckerSum([(torch.ones(2, 3), torch.eye(2))])
    with pytest.raises(ValueError, match="like term 0"):
        KroneckerSum([(torch.eye(2), torch.eye(3)), (torch.eye(3), torch.eye(3))])
    ks = KroneckerSum([(torch.eye(2, dtype=D), torch.eye(3, dtype=D))])
    with pytest.raises(ValueError, match="shape"):
        ks.solve(torch.ones(2, 3, dtype=D), 1e-3)
    with pytest.raises(ValueError, match="damping"):
        ks.solve(torch.ones(3, 2, dtype=D), float("nan"))
    bad = KroneckerSum([(torch.full((2, 2), float("nan"), dtype=D), torch.eye(3, dtype=D))])
    with pytest.raises(ValueError, match="non-finite"):
        bad.solve(torch.ones(3, 2, dtype=D), 1e-3)


def test_clamped_solve_inverts_the_factorisation_dense_form():
    A1, G1 = torch.eye(2, dtype=D), torch.eye(2, dtype=D)
    A2, G2 = torch.diag(torch.tensor([1.0, -2.0], dtype=D)), torch.eye(2, dtype=D)
    ks = KroneckerSum([(A1, G1), (A2, G2)])
    torch.testing.assert_close(ks.to_dense(0.0), torch.kron(A1, G1) + torch.kron(A2, G2))
    with pytest.warns(RuntimeWarning):
        fac = ks.factorize(0.0)
    M = fac.to_dense()
    V = torch.randn(2, 2, dtype=D)
    torch.testing.assert_close(vec(ks.solve(V, 0.0)), torch.linalg.solve(M, vec(V)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_terms", [1, 2])
@pytest.mark.parametrize("scheme", ["tikhonov", "factored"])
def test_factors_with_exactly_zero_rows(n_terms, scheme):
    """Dead units / constant-zero inputs give zero rows and columns in every factor."""
    A1, G1 = spd(6, 0), spd(5, 1)
    A2, G2 = 0.05 * sym(6, 2), 0.05 * sym(5, 3)
    for M, zero in ((A1, [1, 4]), (A2, [1, 4]), (G1, [0]), (G2, [0])):
        M[zero, :] = 0
        M[:, zero] = 0
    ks = KroneckerSum([(A1, G1), (A2, G2)][:n_terms])
    V = torch.randn(2, 5, 6, dtype=D)
    for lam in (1e-3, 0.3):
        if n_terms == 2 and scheme == "tikhonov":
            scheme_used = "tikhonov"  # two terms always damp the first term in factored form
        else:
            scheme_used = scheme
        dense = ks.to_dense(lam, scheme_used)
        X = ks.solve(V, lam, scheme_used)
        ref = torch.linalg.solve(dense, torch.stack([vec(v) for v in V]).T).T
        torch.testing.assert_close(torch.stack([vec(x) for x in X]), ref, rtol=1e-9,
                                   atol=1e-11)
        torch.testing.assert_close(ks.factorize(lam, scheme_used).to_dense(), dense,
                                   rtol=1e-9, atol=1e-11)
