"""The five approximations against the optimum from torch.linalg.svd of the explicit R(F)."""

import pytest
import torch

import kronfisher as kf
from helpers import nearly_kronecker_stats, realistic_stats, vec
from kronfisher.linalg import (
    as_stats,
    exact_fisher_block,
    rearrange,
    relative_error,
    spatial_pair_mask,
)

D = torch.float64
SOLVERS = ["power", "lanczos", "gram"]


def dense_setup(m=60, d_in=5, d_out=4, seed=0, bias=True):
    a, g = realistic_stats(m, d_in, d_out, seed=seed, bias=bias)
    F = exact_fisher_block(a, g)
    R = rearrange(F, a.shape[1], g.shape[1])
    return a, g, F, R


def rel_err(F, ks):
    return float((F - ks.to_dense()).norm() / F.norm())


def optimum(R, F, k):
    s = torch.linalg.svdvals(R)
    return float(s[k:].norm() / F.norm())


def test_exact_fisher_block_is_the_per_example_outer_product_mean():
    a, g = realistic_stats(7, 3, 2)
    F = exact_fisher_block(a, g)
    ref = sum(torch.outer(vec(torch.outer(gi, ai)), vec(torch.outer(gi, ai))) for ai, gi in
              zip(a, g)) / 7
    torch.testing.assert_close(F, ref, rtol=1e-13, atol=1e-14)
    ref2 = sum(torch.kron(torch.outer(ai, ai), torch.outer(gi, gi)) for ai, gi in zip(a, g)) / 7
    torch.testing.assert_close(F, ref2, rtol=1e-13, atol=1e-14)


def test_rearrangement_maps_kron_to_outer_product():
    A, G = torch.randn(3, 3, dtype=D), torch.randn(4, 4, dtype=D)
    torch.testing.assert_close(rearrange(torch.kron(A, G), 3, 4), torch.outer(vec(A), vec(G)))


@pytest.mark.parametrize("T", [1, 4])  # Linear (one token per example) and conv-style
def test_matrix_free_products_match_explicit_rearrangement(T):
    m = 10
    a = torch.randn(m, T, 3, dtype=D)
    g = torch.randn(m, T, 2, dtype=D)
    masks = [None, torch.eye(T, dtype=D)]
    if T == 4:
        masks += [spatial_pair_mask(2, 2, 0), spatial_pair_mask(1, 4, 1)]
    for mask in masks:
        st = as_stats(a, g, mask)
        F = exact_fisher_block(a, g, mask)
        R = rearrange(F, 3, 2)
        V = torch.randn(2, 2, dtype=D)
        V = V + V.T
        U = torch.randn(3, 3, dtype=D)
        U = U + U.T
        torch.testing.assert_close(vec(st.r_matvec(V)), R @ vec(V), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(vec(st.rt_matvec(U)), R.T @ vec(U), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.frobenius_sq(), float(F.norm() ** 2), rtol=1e-11, atol=0)


def test_spatial_mask_uses_2d_chebyshev_distance_without_wraparound():
    M = spatial_pair_mask(3, 3, 1)
    # location 2 = (0, 2) and 3 = (1, 0): flattened indices adjacent, grid distance 2
    assert M[2, 3] == 0
    assert M[0, 4] == 1  # diagonal neighbour
    assert M.sum() == 9 + 2 * 20  # 20 unordered neighbour pairs in a 3x3 king graph
    assert spatial_pair_mask(3, 3, "all") is None
    with pytest.raises(ValueError):
        spatial_pair_mask(3, 3, -1)


def test_kfac_factors():
    a, g, F, _ = dense_setup()
    (A, G), = kf.approximate(a, g, "kfac").terms
    torch.testing.assert_close(A, a.T @ a / len(a))
    torch.testing.assert_close(G, g.T @ g / len(g))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_methods_reach_their_optimum(solver, seed):
    a, g, F, R = dense_setup(seed=seed)
    fnorm = F.norm()
    opt1, opt2 = optimum(R, F, 1), optimum(R, F, 2)
    (A_k, G_k), = kf.approximate(a, g, "kfac").terms
    Rc = R - torch.outer(vec(A_k), vec(G_k))
    opt_cor = float(torch.linalg.svdvals(Rc)[1:].norm() / fnorm)
    err_kfac = rel_err(F, kf.approximate(a, g, "kfac"))
    got = {m: rel_err(F, kf.approximate(a, g, m, solver=solver))
           for m in ["kpsvd", "deflation", "lanczos", "kfac_corrected"]}
    assert got["kpsvd"] == pytest.approx(opt1, rel=1e-9)
    assert got["deflation"] == pytest.approx(opt2, rel=1e-9)
    assert got["lanczos"] == pytest.approx(opt2, rel=1e-9)
    assert got["kfac_corrected"] == pytest.approx(opt_cor, rel=1e-9)
    # the guarantees of DESIGN.md §3
    assert got["kpsvd"] <= err_kfac
    assert got["kfac_corrected"] <= err_kfac
    assert got["deflation"] <= got["kpsvd"]
    # matrix-free error evaluation agrees with the dense one
    ks = kf.approximate(a, g, "deflation", solver=solver)
    assert relative_error(as_stats(a, g), ks.terms) == pytest.approx(got["deflation"], rel=1e-7)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_rank_k_kpsvd_error_is_tail_of_singular_values(k):
    a, g, F, R = dense_setup(seed=3)
    s = torch.linalg.svdvals(R)
    for solver in SOLVERS:
        ks = kf.approximate(a, g, "kpsvd", rank=k, solver=solver)
        assert len(ks.terms) == k
        assert rel_err(F, ks) == pytest.approx(float(s[k:].norm() / F.norm()), rel=1e-8)


def test_singular_values_match_and_factors_are_balanced():
    a, g, F, R = dense_setup(seed=2)
    s = torch.linalg.svdvals(R)
    ks = kf.approximate(a, g, "deflation")
    torch.testing.assert_close(torch.tensor(ks.info["sigmas"], dtype=D), s[:2], rtol=1e-10,
                               atol=0)
    for (A, G), sigma in zip(ks.terms, s[:2]):
        torch.testing.assert_close(A.norm() ** 2, sigma, rtol=1e-10, atol=0)
        torch.testing.assert_close(G.norm() ** 2, sigma, rtol=1e-10, atol=0)


@pytest.mark.parametrize("method", ["kpsvd", "deflation", "lanczos", "kfac_corrected"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_factors_are_exactly_symmetric_and_first_pair_psd(method, solver):
    a, g = realistic_stats(50, 6, 5, seed=4)
    ks = kf.approximate(a, g, method, solver=solver)
    for A, G in ks.terms:
        assert torch.equal(A, A.T) and torch.equal(G, G.T)
    A1, G1 = ks.terms[0]
    assert torch.linalg.eigvalsh(A1).min() >= -1e-12 * A1.norm()
    assert torch.linalg.eigvalsh(G1).min() >= -1e-12 * G1.norm()


def test_solvers_agree_and_warm_start_helps():
    a, g = realistic_stats(80, 7, 6, seed=5)
    results = [kf.approximate(a, g, "deflation", solver=s) for s in SOLVERS]
    for ks in results[1:]:
        for (A0, G0), (A1, G1) in zip(results[0].terms, ks.terms):
            torch.testing.assert_close(torch.kron(A1, G1), torch.kron(A0, G0), rtol=1e-7,
                                       atol=1e-9 * float(A0.norm() * G0.norm()))
    cold = kf.approximate(a, g, "kpsvd", solver="power", products="direct")
    warm = kf.approximate(a, g, "kpsvd", solver="power", products="direct", init=cold)
    assert warm.info["iterations"] < cold.info["iterations"]
    torch.testing.assert_close(warm.terms[0][0], cold.terms[0][0], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("products", ["gram", "direct"])
def test_exact_recovery_of_kronecker_structured_fisher(products):
    # gᵢ = cᵢ h with a fixed direction h: F = (E[c² a aᵀ]) ⊗ h hᵀ exactly
    a, _ = realistic_stats(40, 4, 3, seed=6)
    c = torch.randn(40, 1, dtype=D)
    h = torch.tensor([0.5, -1.0, 2.0], dtype=D)
    g = c * h
    F = exact_fisher_block(a, g)
    ks = kf.approximate(a, g, "kpsvd", products=products)
    assert rel_err(F, ks) < 1e-12
    # two Kronecker products: two groups of examples with fixed gradient directions
    g2 = torch.cat([c[:20] * h, c[20:] * torch.tensor([1.0, 1.0, 0.0], dtype=D)])
    F2 = exact_fisher_block(a, g2)
    for method in ["deflation", "lanczos"]:
        ks = kf.approximate(a, g2, method, products=products)
        assert rel_err(F2, ks) < 1e-10, method
    ks = kf.approximate(a, g2, "deflation", solver="gram")
    assert rel_err(F2, ks) < 1e-10


def test_rank_deficient_fisher_returns_zero_extra_terms():
    a = torch.randn(10, 3, dtype=D)
    g = torch.ones(10, 2, dtype=D)  # every gradient identical up to a ≡ rank-1 R(F)
    F = exact_fisher_block(a, g)
    for solver in SOLVERS:
        ks = kf.approximate(a, g, "kpsvd", rank=3, solver=solver)
        assert rel_err(F, ks) < 1e-10


@pytest.mark.parametrize("solver", SOLVERS)
def test_scale_invariance(solver):
    a, g = realistic_stats(60, 6, 5, seed=7)
    F = exact_fisher_block(a, g)
    small = g * 1e-5  # Fisher entries near 1e-10 · ‖F‖
    Fs = exact_fisher_block(a, small)
    for method in ["kpsvd", "deflation", "kfac_corrected"]:
        ks = kf.approximate(a, g, method, solver=solver)
        ks_s = kf.approximate(a, small, method, solver=solver)
        assert rel_err(Fs, ks_s) == pytest.approx(rel_err(F, ks), rel=1e-8)
        for (A, G), (As, Gs) in zip(ks.terms, ks_s.terms):
            torch.testing.assert_close(torch.kron(As, Gs), 1e-10 * torch.kron(A, G),
                                       rtol=1e-6, atol=1e-18 * float(A.norm() * G.norm()))


@pytest.mark.parametrize("radius", [0, 1, "all"])
def test_conv_statistics_against_dense(radius):
    m, h, w = 6, 3, 3
    a = torch.randn(m, h * w, 4, dtype=D)
    g = torch.randn(m, h * w, 3, dtype=D)
    mask = spatial_pair_mask(h, w, radius)
    if mask is not None:
        mask = mask.to(D)
    F = exact_fisher_block(a, g, mask)
    R = rearrange(F, 4, 3)
    s = torch.linalg.svdvals(R)
    solvers = SOLVERS if radius == 0 else ["power", "lanczos"]
    for solver in solvers:
        ks = kf.approximate(a, g, "kpsvd", pair_mask=mask, solver=solver)
        assert rel_err(F, ks) == pytest.approx(float(s[1:].norm() / F.norm()), rel=1e-8)
        ks = kf.approximate(a, g, "lanczos", pair_mask=mask, solver=solver)
        assert rel_err(F, ks) == pytest.approx(float(s[2:].norm() / F.norm()), rel=1e-8)
    if radius != 0:
        with pytest.raises(ValueError, match="flat"):
            kf.approximate(a, g, "kpsvd", pair_mask=mask, solver="gram")
    # KFC factors
    (A, G), = kf.approximate(a, g, "kfac", pair_mask=mask).terms
    torch.testing.assert_close(A, torch.einsum("itd,ite->de", a, a) / m)
    torch.testing.assert_close(G, torch.einsum("itd,ite->de", g, g) / (m * h * w))


def test_conv_kfac_corrected_reaches_optimum_of_centred_problem():
    m, T = 5, 4
    a, g = torch.randn(m, T, 3, dtype=D), torch.randn(m, T, 2, dtype=D)
    mask = spatial_pair_mask(2, 2, 0).to(D)
    F = exact_fisher_block(a, g, mask)
    (A_k, G_k), = kf.approximate(a, g, "kfac", pair_mask=mask).terms
    Rc = rearrange(F, 3, 2) - torch.outer(vec(A_k), vec(G_k))
    opt = float(torch.linalg.svdvals(Rc)[1:].norm() / F.norm())
    for solver in SOLVERS:
        ks = kf.approximate(a, g, "kfac_corrected", pair_mask=mask, solver=solver)
        assert rel_err(F, ks) == pytest.approx(opt, rel=1e-8)


def test_float32_statistics_give_float32_factors_near_optimum():
    a, g, F, R = dense_setup(seed=8)
    ks = kf.approximate(a.float(), g.float(), "deflation")
    assert ks.terms[0][0].dtype == torch.float32
    err = float((F - ks.to_dense().double()).norm() / F.norm())
    assert err == pytest.approx(optimum(R, F, 2), rel=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_nearly_kronecker_block_reaches_its_optimum(solver):
    """F − A_K ⊗ G_K is ~1e-4 of F. In Gram space the information sits in the ~1e-8 part
    of K, below float32 resolution: each method must still be within 1e-3 of its optimum
    (the optimum of the float32 statistics, evaluated in float64)."""
    a, g = nearly_kronecker_stats(512, 40, 8, 3e-4)
    a32, g32 = a.float(), g.float()
    a, g = a32.double(), g32.double()
    F = exact_fisher_block(a, g)
    R = rearrange(F, 40, 8)
    (A_k, G_k), = kf.approximate(a, g, "kfac").terms
    assert 5e-5 < rel_err(F, kf.approximate(a, g, "kfac")) < 5e-4
    Rc = R - torch.outer(vec(A_k), vec(G_k))
    opt = {"kfac_corrected": float(torch.linalg.svdvals(Rc)[1:].norm() / F.norm()),
           "kpsvd": optimum(R, F, 1), "lanczos": optimum(R, F, 2),
           "deflation": optimum(R, F, 2)}
    for method, best in opt.items():
        ks = kf.approximate(a32, g32, method, solver=solver)
        err = float((F - ks.to_dense().double()).norm() / F.norm())
        assert err <= best * (1 + 1e-3), (method, err / best - 1)


def test_bad_input_is_a_clear_error():
    a, g = realistic_stats(10, 3, 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        kf.approximate(torch.where(a > 0.5, float("nan"), a), g, "kpsvd")
    with pytest.raises(ValueError, match="NaN or Inf"):
        kf.approximate(a, g * float("inf"), "kfac")
    with pytest.raises(ValueError, match="disagree"):
        kf.approximate(a, g[:5], "kpsvd")
    with pytest.raises(ValueError, match="m = 0"):
        kf.approximate(a[:0], g[:0], "kpsvd")
    with pytest.raises(ValueError, match="unknown method"):
        kf.approximate(a, g, "kfc")
    with pytest.raises(ValueError, match="unknown solver"):
        kf.approximate(a, g, "kpsvd", solver="svd")
    with pytest.raises(ValueError, match="rank"):
        kf.approximate(a, g, "kpsvd", rank=0)
    with pytest.raises(ValueError, match="rank= applies"):
        kf.approximate(a, g, "deflation", rank=3)
    with pytest.raises(ValueError, match="both"):
        kf.approximate(a, g[:, None, :], "kpsvd")
    with pytest.raises(TypeError, match="dtype"):
        kf.approximate(a, g.float(), "kpsvd")


@pytest.mark.parametrize("solver", SOLVERS)
def test_zero_fisher_gives_zero_terms(solver):
    """All output gradients zero (a dead layer): F = 0, every SVD term is exactly zero."""
    a = torch.randn(12, 4, dtype=D)
    g = torch.zeros(12, 3, dtype=D)
    for method in ["kpsvd", "deflation", "lanczos", "kfac_corrected"]:
        ks = kf.approximate(a, g, method, solver=solver)
        assert all(torch.isfinite(A).all() and torch.isfinite(G).all() for A, G in ks.terms)
        torch.testing.assert_close(ks.to_dense(), torch.zeros(12, 12, dtype=D))
        V = torch.randn(3, 4, dtype=D)
        expect = torch.linalg.solve(ks.to_dense(0.5), vec(V))
        torch.testing.assert_close(vec(ks.solve(V, 0.5)), expect)
        if method != "kfac_corrected":  # one term, exact Tikhonov: (0 + λI)⁻¹
            torch.testing.assert_close(ks.solve(V, 0.5), V / 0.5)
