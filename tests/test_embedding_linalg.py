"""Embedding curvature as mathematics: every method's optimum of the one-hot Linear model's
"expand" block, and damped solves with diagonal A factors, against dense constructions."""

import pytest
import torch

from embedding_reference import (
    D,
    OneHotModel,
    method_optimum,
    per_position_grads,
    token_batch,
    unvec,
    vec,
)
from kronfisher.curvature.embedding import (
    approximate_embedding,
    average_embedding,
    check_embedding_sharing,
)
from kronfisher.linalg import KroneckerSum, SingularFactorError
from kronfisher.linalg.diagonal_kronecker import DiagonalKroneckerSum
from kronfisher.linalg.token_stats import as_token_stats

METHODS = ("kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected")
SCHEMES = ("tikhonov", "factored", "factored_pi1", "authors")
B, S, V, d = 4, 5, 9, 3


def rel(x, y):
    return float((x - y).norm() / y.norm())


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    model = OneHotModel(V, d, C=4)
    t = token_batch(B, S, V)
    y = torch.randint(0, 4, (B, S))
    return t, per_position_grads(model, t, y)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("solver", ["auto", "gram", "power", "lanczos"])
def test_each_method_is_its_optimum_of_the_one_hot_expand_block(batch, method, solver):
    t, g = batch
    c = approximate_embedding(t, g, V, method, solver=solver)
    # the iterative solvers stop at a relative residual of 1e-10 ("auto" is Lanczos)
    tol = 1e-12 if solver == "gram" else 1e-9  # "auto" is Lanczos
    assert rel(c.to_dense(), method_optimum(method, t, g, V)) < tol


def test_kpsvd_rank3_is_the_best_rank3(batch):
    t, g = batch
    c = approximate_embedding(t, g, V, "kpsvd", rank=3)
    assert len(c) == 3
    assert rel(c.to_dense(), method_optimum("kpsvd", t, g, V, rank=3)) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_storage_is_a_vector_and_a_d_by_d_matrix_per_term(batch, method):
    t, g = batch
    c = approximate_embedding(t, g, V, method)
    assert isinstance(c, DiagonalKroneckerSum) and c.shape == (d, V)
    for a, G in c.terms:
        assert a.shape == (V,) and G.shape == (d, d)
    # tokens that never occur have zero curvature in every term
    for a, _ in c.terms:
        assert torch.equal(a[V - 2:], torch.zeros(2, dtype=D))
    fac = c.factorize(1e-2, "factored")
    for name in ("k_a", "s_a"):
        assert getattr(fac, name).shape == (V,)
    assert fac.K_g.shape == (d, d) and fac.s_g.shape == (d,)


def test_factors_are_balanced_and_the_first_pair_psd(batch):
    t, g = batch
    c = approximate_embedding(t, g, V, "deflation")
    for a, G in c.terms:
        assert abs(float(a.norm()) - float(G.norm())) < 1e-12 * float(G.norm())
        assert float(a.sum()) >= 0
        assert torch.equal(G, G.mT)
    a1, G1 = c.terms[0]
    assert bool((a1 >= 0).all()) and float(torch.linalg.eigvalsh(G1).min()) > -1e-14


def test_both_routes_to_the_gram_matrix_agree(batch):
    t, g = batch
    s = as_token_stats(t, g, V)
    C = torch.zeros(s.u, d, d, dtype=D).index_add_(
        0, s.inverse, s.g[:, :, None] * s.g[:, None, :]) / B  # C_v, dense
    K = C.reshape(s.u, -1) @ C.reshape(s.u, -1).mT
    assert rel(s._gram_from_rows(), K) < 1e-14
    assert rel(s._gram_from_tokens(), K) < 1e-14


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_damped_solve_inverts_the_dense_kronecker_sum_matrix(batch, method, scheme):
    t, g = batch
    c = approximate_embedding(t, g, V, method)
    X = torch.randn(d, V, dtype=D)
    dense = c.as_kronecker_sum()  # dense V × V factors
    for lam in (1e-3, 0.3):
        fac = c.factorize(lam, scheme, warn=False)
        ref = dense.factorize(lam, scheme, warn=False)
        assert fac.clamped == ref.clamped  # indefinite two-term directions, raised alike
        M = ref.to_dense()  # the matrix inverted: to_dense(λ) where nothing is clamped
        if not ref.clamped:
            assert rel(M, dense.to_dense(lam, scheme)) < 1e-13
        assert rel(fac.to_dense(), M) < 1e-12
        Y = fac.solve(X)
        assert rel(Y, unvec(torch.linalg.solve(M, vec(X)), d, V)) < 1e-11
        assert rel(fac.apply(Y), X) < 1e-12


def test_three_terms_by_conjugate_gradients(batch):
    t, g = batch
    c = approximate_embedding(t, g, V, "kpsvd", rank=3)
    X = torch.randn(d, V, dtype=D)
    M = c.to_dense(0.05)
    assert rel(c.factorize(0.05).to_dense(), M) < 1e-13
    assert rel(c.solve(X, 0.05), unvec(torch.linalg.solve(M, vec(X)), d, V)) < 1e-9


def test_indefinite_second_term_is_clamped_like_the_dense_sum():
    gen = torch.Generator().manual_seed(3)
    a1, a2 = torch.rand(V, generator=gen, dtype=D) + 0.1, torch.randn(V, generator=gen, dtype=D)
    G1 = torch.eye(d, dtype=D)
    G2 = 5 * torch.diag(torch.tensor([1.0, -1.0, 0.5], dtype=D))
    c = DiagonalKroneckerSum([(a1, G1), (a2, G2)])
    dense = c.as_kronecker_sum()
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        fac = c.factorize(1e-2, "factored")
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        ref = dense.factorize(1e-2, "factored")
    assert fac.clamped == ref.clamped > 0
    assert rel(fac.to_dense(), ref.to_dense()) < 1e-12
    X = torch.randn(d, V, dtype=D)
    assert rel(fac.solve(X), ref.solve(X)) < 1e-11


def test_undamped_solve_with_an_absent_token_is_singular(batch):
    t, g = batch
    for method in ("kfac", "kfac_corrected"):
        c = approximate_embedding(t, g, V, method)
        with pytest.raises(SingularFactorError, match="damping > 0"):
            c.factorize(0.0, "tikhonov")


def test_padding_positions_are_dropped(batch):
    t, g = batch
    pad = int(t[0, 0])
    keep = (t != pad).reshape(-1)
    for method in METHODS:
        c = approximate_embedding(t, g, V, method, padding_idx=pad)
        for a, _ in c.terms:
            assert float(a[pad]) == 0.0
        # as if the padding positions were not there (same number of examples B)
        s = as_token_stats(t, g, V, padding_idx=pad)
        assert s.n_tokens == int(keep.sum())
        assert torch.equal(s.tokens, t.reshape(-1)[keep])
        X = torch.randn(d, V, dtype=D)
        X[:, pad] = 0  # the padding row's gradient is zero: it stays zero
        assert torch.equal(c.factorize(1e-2, "factored").solve(X)[:, pad], torch.zeros(d, dtype=D))
    c = approximate_embedding(t, g, V, "kfac", padding_idx=pad)
    a, G = c.terms[0]
    gk = g.reshape(-1, d)[keep]
    assert torch.allclose(G, gk.mT @ gk / B, rtol=1e-14, atol=0)
    assert torch.allclose(a.sum(), torch.tensor(1.0, dtype=D), rtol=1e-14, atol=0)


def test_running_average_is_termwise(batch):
    t, g = batch
    c1 = approximate_embedding(t, g, V, "kfac_corrected")
    c2 = approximate_embedding(t, 2 * g, V, "kfac_corrected")
    avg = average_embedding(c1, c2, 0.25)
    for (a, G), (a1, G1), (a2, G2) in zip(avg.terms, c1.terms, c2.terms):
        assert torch.allclose(a, 0.25 * a1 + 0.75 * a2, rtol=1e-14, atol=1e-16)
        assert torch.allclose(G, 0.25 * G1 + 0.75 * G2, rtol=1e-14, atol=1e-16)
    assert average_embedding(c1, c2, 0.0) is c2 and average_embedding(None, c2, 0.5) is c2


def test_bad_batches_are_refused_with_the_reason():
    g = torch.randn(2, 3, d, dtype=D)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 9\)"):
        as_token_stats(torch.tensor([[0, 9, 1], [1, 2, 3]]), g, V)
    with pytest.raises(TypeError, match="integer tensor"):
        as_token_stats(torch.zeros(2, 3), g, V)
    with pytest.raises(ValueError, match="do not match"):
        as_token_stats(torch.zeros(2, 4, dtype=torch.long), g, V)
    with pytest.raises(ValueError, match="no token outside padding_idx"):
        as_token_stats(torch.zeros(2, 3, dtype=torch.long), g, V, padding_idx=0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        as_token_stats(torch.zeros(2, 3, dtype=torch.long), g * float("nan"), V)
    for mode, why in (("reduce", "not one-hot"), ("exact", "pairs different tokens")):
        with pytest.raises(ValueError, match=why):
            check_embedding_sharing(mode)
    check_embedding_sharing("expand")


def test_matvec_is_the_dense_product(batch):
    t, g = batch
    c = approximate_embedding(t, g, V, "lanczos")
    X = torch.randn(2, d, V, dtype=D)
    dense = KroneckerSum([(torch.diag(a), G) for a, G in c.terms]).to_dense()
    for i in range(2):
        assert rel(c.matvec(X)[i], unvec(dense @ vec(X[i]), d, V)) < 1e-14


def test_auto_is_lanczos_and_both_gram_routes_agree(batch, monkeypatch):
    import kronfisher.linalg.token_stats as ts

    t, g = batch
    ref = approximate_embedding(t, g, V, "kfac_corrected", solver="gram")
    c = approximate_embedding(t, g, V, "kfac_corrected")
    assert c.info["solver"] == "lanczos" and ref.info["solver"] == "gram"
    assert rel(c.to_dense(), ref.to_dense()) < 1e-9
    monkeypatch.setattr(ts, "GRAM_ROWS_MAX", 0)  # K from token products only
    c = approximate_embedding(t, g, V, "kfac_corrected", solver="gram")
    assert rel(c.to_dense(), ref.to_dense()) < 1e-12


def test_warm_started_power_iteration_converges_at_once(batch):
    t, g = batch
    first = approximate_embedding(t, g, V, "deflation", solver="power")
    again = approximate_embedding(t, g, V, "deflation", solver="power", init=first)
    assert again.info["iterations"] < first.info["iterations"]
    assert rel(again.to_dense(), first.to_dense()) < 1e-9


def test_diagnostics_read_the_diagonal_sum_as_its_dense_matrix(batch):
    from kronfisher.diagnostics import curvature_quadratic_form, top_eigenvalue

    t, g = batch
    for method in ("kpsvd", "kfac_corrected"):
        c = approximate_embedding(t, g, V, method)
        dense = c.to_dense()
        X = torch.randn(3, d, V, dtype=D)
        want = torch.stack([vec(x) @ dense @ vec(x) for x in X])
        assert rel(curvature_quadratic_form(c, X), want) < 1e-13
        top = float(torch.linalg.eigvalsh(dense).abs().max())
        assert abs(top_eigenvalue(c, generator=torch.Generator().manual_seed(0)) - top) < 1e-8 * top
