"""KroneckerSum: dense form, products and damped solves against dense constructions."""

import warnings

import pytest
import torch

import kronfisher.linalg.numerics as numerics
from helpers import D, spd, sym, vec, vec_batch
from kronfisher import KroneckerSum
from kronfisher.linalg import (
    EigenFactorization,
    FactorInverses,
    SingularFactorError,
    factorization,
)


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
    ref = torch.linalg.solve(expect, vec_batch(V))
    torch.testing.assert_close(vec_batch(X), ref, rtol=1e-9, atol=1e-11)


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


def test_factorisations_are_explicit_objects():
    """No cache inside the sum: each factorisation keeps solving with its own damping."""
    A, G = spd(4, 0), spd(3, 1)
    ks = KroneckerSum([(A, G)])
    f1 = ks.factorize(1e-2)
    f2 = ks.factorize(0.5)
    assert f1 is not f2 and f1.damping == 1e-2 and f2.damping == 0.5
    V = torch.randn(3, 4, dtype=D)
    for fac, lam in ((f1, 1e-2), (f2, 0.5)):
        dense = torch.kron(A, G) + lam * torch.eye(12, dtype=D)
        torch.testing.assert_close(vec(fac.solve(V)), torch.linalg.solve(dense, vec(V)),
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(vec(fac.apply(fac.solve(V))), vec(V), rtol=1e-10,
                                   atol=1e-12)
    torch.testing.assert_close(f1.solve(V), ks.solve(V, 1e-2), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["factored", "factored_pi1", "authors"])
def test_one_term_factored_damping_uses_factor_inverses(scheme):
    A, G = spd(5, 0), 1e-2 * spd(4, 1)
    ks = KroneckerSum([(A, G)])
    fac = ks.factorize(1e-3, scheme)
    assert isinstance(fac, FactorInverses)
    torch.testing.assert_close(fac.to_dense(), ks.to_dense(1e-3, scheme), rtol=1e-13,
                               atol=1e-15)
    V = torch.randn(2, 4, 5, dtype=D)
    ref = torch.linalg.solve(ks.to_dense(1e-3, scheme), vec_batch(V))
    torch.testing.assert_close(vec_batch(fac.solve(V)), ref, rtol=1e-9, atol=1e-12)
    assert isinstance(ks.factorize(1e-3, "tikhonov"), EigenFactorization)


def test_failed_cholesky_falls_back_to_the_psd_projection():
    """A first factor with a negative eigenvalue beyond the shift (not PSD): the Cholesky
    fails and the eigen route inverts the factors projected onto the PSD cone."""
    Q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=D))
    e = torch.tensor([-0.5, 0.2, 1.0, 3.0], dtype=D)
    A, G = (Q * e) @ Q.T, spd(3, 1)
    ks = KroneckerSum([(A, G)])
    fac = ks.factorize(1e-2, "factored_pi1")
    assert isinstance(fac, EigenFactorization)
    A_psd = (Q * e.clamp_min(0)) @ Q.T
    expect = torch.kron(A_psd + 0.1 * torch.eye(4, dtype=D), G + 0.1 * torch.eye(3, dtype=D))
    torch.testing.assert_close(fac.to_dense(), expect, rtol=1e-10, atol=1e-12)


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
@pytest.mark.parametrize("scheme", ["tikhonov", "factored", "factored_pi1"])
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
        dense = ks.to_dense(lam, scheme)
        X = ks.solve(V, lam, scheme)
        ref = torch.linalg.solve(dense, vec_batch(V))
        torch.testing.assert_close(vec_batch(X), ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(ks.factorize(lam, scheme).to_dense(), dense,
                                   rtol=1e-9, atol=1e-11)


def test_eigh_falls_back_to_float64_on_lapack_failure_only(monkeypatch):
    """A float32 LinAlgError is retried in float64 (warning once); other errors surface."""
    real = torch.linalg.eigh
    calls = []

    def failing(x):
        calls.append(x.dtype)
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated syevd failure")
        return real(x)

    monkeypatch.setattr(numerics, "_warned", set())
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    A = spd(4, 0).float()
    with pytest.warns(RuntimeWarning, match="retrying in float64"):
        e, U = numerics.eigh(A)
    assert e.dtype == torch.float32 and calls == [torch.float32, torch.float64]
    torch.testing.assert_close((U * e) @ U.T, A, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process: silent now
        numerics.eigh(A)

    def oom(x):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch.linalg, "eigh", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        numerics.eigh(A)


@pytest.mark.parametrize("nan_calls", [2, 3])
def test_eigh_that_returns_nan_in_float64_too_is_jittered_or_raises(monkeypatch, nan_calls):
    """NaN without an exception from float32 and float64 syevd: the jittered float64 retry
    gives a finite decomposition; if that is NaN too, LinAlgError (never NaN returned)."""
    real = torch.linalg.eigh
    calls = []

    def nan_first(x):
        calls.append(x.dtype)
        e, U = real(x)
        return (e * float("nan"), U) if len(calls) <= nan_calls else (e, U)

    monkeypatch.setattr(numerics, "_warned", set())
    monkeypatch.setattr(torch.linalg, "eigh", nan_first)
    A = spd(4, 0).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float64 retry warning is tested above
        if nan_calls == 3:
            with pytest.raises(torch.linalg.LinAlgError, match="even in float64 with jitter"):
                numerics.eigh(A)
            return
        e, U = numerics.eigh(A)
    assert calls == [torch.float32, torch.float64, torch.float64]
    torch.testing.assert_close((U * e) @ U.T, A, rtol=1e-5, atol=1e-5)


def test_cg_that_does_not_converge_warns(monkeypatch):
    terms = [(spd(4, 0), spd(3, 1)), (0.5 * spd(4, 2), 0.5 * spd(3, 3)),
             (0.5 * spd(4, 4), 0.5 * spd(3, 5))]
    monkeypatch.setattr(numerics, "_warned", set())
    monkeypatch.setattr(factorization, "CG_MAX_ITER", 1)
    with pytest.warns(RuntimeWarning, match="conjugate gradients stopped"):
        KroneckerSum(terms).solve(torch.randn(3, 4, dtype=D), 1e-3)


def test_support_of_no_matrices_is_a_clear_error():
    from kronfisher.linalg.support import support

    with pytest.raises(ValueError, match="at least one matrix"):
        support()


def _psd_with(e: list[float], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(e), len(e), generator=gen, dtype=D))
    return (Q * torch.tensor(e, dtype=D)) @ Q.T


@pytest.mark.parametrize("big", [(1, 850.0), (25, 2000.0), (1, 9e4)])
def test_float32_two_terms_with_large_inputs_are_not_called_singular(big):
    """The MNIST code layer (31 inputs) late in training: A₁ reaches 850 … 9e4 while the
    damping is 0.01. The damped first factor is positive definite (eigenvalues ≥ 0.01), so
    factorising must succeed at the requested damping; it used to raise
    SingularFactorError, and the preconditioner retried with 10× and 100× the damping.
    (1, 850): the Cholesky congruence; (25, 2000): ‖A₁‖_F = 1e4 takes the two-eigh route
    (computed in float64: in float32 its eigenvalue errors made the solve 2e-2 off);
    (1, 9e4): measured in a MNIST run, the shift is at float32's rounding level of A₁, yet
    the factorisation of the given float32 matrices is well defined. The float32 solve
    matches the float64 solve of the same float32 matrices."""
    count, top = big
    n = 31
    e_a = [top] * count + torch.logspace(1, -2.3, n - count).tolist()
    A1 = _psd_with(e_a, 1).float()
    G1 = _psd_with(torch.logspace(-6, -8, 5).tolist(), 2).float()
    A2 = (10 * _psd_with(torch.logspace(0, -3, n).tolist(), 3)).float()
    G2 = _psd_with(torch.logspace(-7, -9, 5).tolist(), 4).float()
    ks = KroneckerSum([(A1, G1), (A2, G2)])
    fac = ks.factorize(0.01, "authors")
    assert fac.damping == 0.01
    V = torch.randn(5, n, generator=torch.Generator().manual_seed(5), dtype=D)
    got = fac.solve(V.float()).double()
    ref = KroneckerSum([(A1.double(), G1.double()), (A2.double(), G2.double())]).solve(
        V, 0.01, "authors")
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 1e-3, rel
