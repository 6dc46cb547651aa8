"""Issue 15 item 7: no refusal of positively shifted factors, LAPACK failures of the
Krylov solver never escape step(), repeated warnings summarised per layer."""

import warnings

import numpy as np
import pytest
import torch

import kronfisher as kf
from helpers import D, vec
from kronfisher.curvature import estimator as estimator_mod
from kronfisher.linalg import KroneckerSum, SingularFactorError
from kronfisher.linalg.factorize import congruence
from kronfisher.linalg.krylov import small_svd


def _psd_with(e, seed, dtype=D):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(e), len(e), generator=gen, dtype=D))
    return ((Q * torch.tensor(e, dtype=D)) @ Q.T).to(dtype)


def mlp(seed=0, d_in=5, hidden=7, d_out=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, d_out)).double()


def curvature_step(pc, model, x, seed=0):
    with pc.collect(force=True):
        kf.sampled_nll(model(x), "gaussian", generator=torch.Generator().manual_seed(seed)
                       ).backward()
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    grads = {n: s.adapter.grad_matrix().clone() for n, s in pc.layers.items()}
    ok = pc.step()
    return ok, grads


# ------------------------------------------------------------- 1. shifted factors
@pytest.mark.parametrize("count", [1, 25])  # 1: Cholesky congruence; 25: the two-eigh route
def test_mnist_scale_float32_factor_with_shift_is_not_singular(count):
    """The MNIST code layer (31 inputs) under the authors' two-term damping: A₁'s top
    eigenvalue 1e4, shift λ = 0.0156. The float32 factorisation keeps the requested
    damping (no SingularFactorError, no retry) and its solve matches the float64 dense
    solve of the same float32 matrices to a tenth of κ·u, the float32 bound for the
    damped first factor's condition number κ = (1e4 + λ)/λ (u = 2⁻²⁴)."""
    n, lam = 31, 0.0156
    A1 = _psd_with([1e4] * count + torch.logspace(1, -2.3, n - count).tolist(), 1, torch.float32)
    G1 = _psd_with(torch.logspace(-5, -8, 5).tolist(), 2, torch.float32)
    A2 = (10 * _psd_with(torch.logspace(0, -3, n).tolist(), 3)).float()
    G2 = _psd_with(torch.logspace(-6, -9, 5).tolist(), 4, torch.float32)
    ks = KroneckerSum([(A1, G1), (A2, G2)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fac = ks.factorize(lam, "authors")
    assert fac.damping == lam and fac.clamped == 0
    V = torch.randn(5, n, generator=torch.Generator().manual_seed(5), dtype=D)
    dense = KroneckerSum([(A1.double(), G1.double()), (A2.double(), G2.double())]).to_dense(
        lam, "authors")
    ref = torch.linalg.solve(dense, vec(V))
    got = vec(fac.solve(V.float()).double())
    kappa_u = (1e4 + lam) / lam * 2.0**-24
    assert float((got - ref).norm() / ref.norm()) < 0.1 * kappa_u


def test_positive_shift_is_never_refused_but_zero_shift_is():
    """A shift far below float64's resolution of the largest eigenvalue (1e-9 next to 1e8:
    the former bound n·eps·largest = 1.6e-7 refused it). With the shift the factor is
    positive definite, and the congruence is exact: Kᵀ(X₁ + cI)K = I, KᵀX₂K = diag(s).
    Without a shift the same singular X₁ is refused."""
    X1 = torch.diag(torch.tensor([1e8] * 3 + [0.0] * 4, dtype=D))
    X2 = _psd_with(torch.linspace(1.0, 2.0, 7).tolist(), 7) - 1.2 * torch.eye(7, dtype=D)
    K, K_inv, s, _ = congruence(X1, X2, 1e-9, "A")
    assert bool(torch.isfinite(K).all())
    torch.testing.assert_close(K.T @ (X1 + 1e-9 * torch.eye(7, dtype=D)) @ K,
                               torch.eye(7, dtype=D), rtol=0, atol=1e-9)
    torch.testing.assert_close(K.T @ X2 @ K, torch.diag(s), rtol=0, atol=1e-9 * float(
        s.abs().max()))
    with pytest.raises(SingularFactorError, match="no damping shift"):
        congruence(X1, X2, 0.0, "A")


# ------------------------------------------------------------- 2. LAPACK failures
def _gesdd_fails(*a, **k):
    raise np.linalg.LinAlgError("SVD did not converge")


def test_small_svd_falls_back_to_eigh_and_agrees():
    rng = np.random.default_rng(0)
    B = np.diag(rng.random(8) + 0.1) + np.diag(rng.random(7), 1)
    P, S, Qt = np.linalg.svd(B)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(np.linalg, "svd", _gesdd_fails)
        P2, S2, Qt2 = small_svd(B)
        np.testing.assert_allclose(S2, S, rtol=1e-13, atol=0)
        np.testing.assert_allclose(P2 @ np.diag(S2) @ Qt2, B, rtol=0, atol=1e-14)
        np.testing.assert_allclose(np.abs(P2.T @ P), np.eye(8), atol=1e-12)  # same vectors
        np.testing.assert_allclose(np.abs(Qt2 @ Qt.T), np.eye(8), atol=1e-12)
        with pytest.raises(np.linalg.LinAlgError, match="NaN/Inf"):
            small_svd(np.array([[np.nan]]))


@pytest.mark.parametrize("method", ["lanczos", "deflation", "kfac_corrected"])
def test_lanczos_with_failing_svd_gives_the_same_curvature(method, monkeypatch):
    """numpy's SVD of the bidiagonal matrix raising: the eigh route gives the same
    approximation (no fallback solver needed, no warning)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.cat([torch.randn(40, 6, generator=gen, dtype=D), torch.ones(40, 1, dtype=D)], 1)
    g = torch.randn(40, 4, generator=gen, dtype=D) * torch.rand(40, 1, generator=gen, dtype=D)
    ref = kf.approximate(a, g, method).to_dense()
    monkeypatch.setattr(np.linalg, "svd", _gesdd_fails)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = kf.approximate(a, g, method)
    assert got.info["solver"] == "lanczos"
    torch.testing.assert_close(got.to_dense(), ref, rtol=1e-9, atol=1e-12 * float(ref.norm()))


def test_step_survives_every_lapack_failure_of_the_lanczos_solver(monkeypatch):
    """numpy's SVD and eigh both raising inside Lanczos: the estimator falls back to the
    exact Gram solver; step() preconditions with the same (exact) curvature as a run
    without failures, finite, and warns once per layer over three refreshes."""
    model, x = mlp(), torch.randn(32, 5, dtype=D)
    ref_model = mlp()
    ref = kf.Lanczos(ref_model, damping=1e-2, ema_decay=0.0)
    monkeypatch.setattr(np.linalg, "svd", _gesdd_fails)
    monkeypatch.setattr(np.linalg, "eigh", _gesdd_fails)
    pc = kf.Lanczos(model, damping=1e-2, ema_decay=0.0)
    with pytest.warns(RuntimeWarning) as record:
        for seed in range(3):
            ok, _ = curvature_step(pc, model, x, seed)
            assert ok
            for s in pc.layers.values():
                assert bool(torch.isfinite(s.adapter.grad_matrix()).all())
    msgs = [str(w.message) for w in record if "solver failed" in str(w.message)]
    assert len(msgs) == 2 and all("'gram' solver" in m for m in msgs)  # one per layer
    assert pc.warning_counts == {("0", "solver_fallback"): 3, ("2", "solver_fallback"): 3}
    monkeypatch.undo()
    curvature_step(ref, ref_model, x, 2)
    for n in pc.layers:
        torch.testing.assert_close(pc.layers[n].curvature.to_dense(),
                                   ref.layers[n].curvature.to_dense(), rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(pc.layers[n].adapter.grad_matrix(),
                                   ref.layers[n].adapter.grad_matrix(),
                                   rtol=1e-7, atol=1e-12)


def test_when_every_solver_fails_the_layer_keeps_its_previous_curvature(monkeypatch):
    """Every solver raising LinAlgError: the first batch (no previous curvature) gets
    KFAC's factors plus a zero second term; later batches keep it. step() still solves
    exactly with that curvature; one warning per layer, every occurrence counted."""
    def failing(*a, **k):
        raise torch.linalg.LinAlgError("simulated LAPACK failure")

    model, x = mlp(), torch.randn(32, 5, dtype=D)
    pc = kf.KFACCorrected(model, damping=1e-2, ema_decay=0.0)
    monkeypatch.setattr(estimator_mod, "approximate", lambda a, g, method, **k: (
        failing() if method != "kfac" else kf.approximate(a, g, method, **k)))
    with pytest.warns(RuntimeWarning, match="layer '0': every solver failed.*KFAC's factors"):
        ok, grads = curvature_step(pc, model, x, 0)
    assert ok
    first = {n: s.curvature for n, s in pc.layers.items()}
    for n, s in pc.layers.items():
        a = torch.cat([x, torch.ones(32, 1, dtype=D)], 1) if n == "0" else None
        (A, G), (C, Dg) = s.curvature.terms
        assert not C.any() and not Dg.any()
        if a is not None:
            torch.testing.assert_close(A, a.T @ a / 32, rtol=1e-13, atol=0)
        dense = s.curvature.to_dense(1e-2, pc.damping_scheme)
        torch.testing.assert_close(vec(s.adapter.grad_matrix()),
                                   torch.linalg.solve(dense, vec(grads[n])), rtol=1e-8,
                                   atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # summarised: no second warning
        for seed in (1, 2):
            assert curvature_step(pc, model, x, seed)[0]
    assert all(pc.layers[n].curvature is first[n] for n in first)
    assert pc.warning_counts == {("0", "curvature_kept"): 3, ("2", "curvature_kept"): 3}


# ------------------------------------------------------------- 3. summarised warnings
def test_ten_refactorisations_of_a_clamped_layer_warn_once_and_count_ten():
    """Layer '0' holds an indefinite two-term curvature (1 + s_g s_a < 0 where s_a = −2,
    s_g ≥ 0.5), layer '2' a positive definite one; refactorised at each of ten steps."""
    model, x = mlp(), torch.randn(16, 5, dtype=D)
    pc = kf.Deflation(model, damping=1e-4, inv_update_freq=1)
    s = pc.layers["0"]
    A1, G1 = torch.eye(6, dtype=D), torch.eye(7, dtype=D)
    A2 = torch.diag(torch.linspace(-2.0, 2.0, 6, dtype=D))
    G2 = torch.diag(torch.linspace(0.5, 1.5, 7, dtype=D))
    s.curvature = KroneckerSum([(A1, G1), (A2, G2)])
    pc.layers["2"].curvature = KroneckerSum([(torch.eye(8, dtype=D), torch.eye(3, dtype=D)),
                                             (torch.eye(8, dtype=D), torch.eye(3, dtype=D))])
    with pytest.warns(RuntimeWarning) as record:
        for _ in range(10):
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            assert pc.step()
            assert s.inverse.clamped > 0  # refactorised and clamped at every step
    clamped = [w for w in record if "not positive definite" in str(w.message)]
    assert len(clamped) == 1 and "layer '0'" in str(clamped[0].message)
    assert pc.warning_counts[("0", "clamped")] == 10
    assert pc.warning_log.count("2", "clamped") == 0


def test_singular_retries_are_counted_per_layer():
    """Damping 0 and a batch of 2 (< the layer width): every refactorisation retries; one
    warning per layer, the count per refactorisation."""
    model = mlp()
    pc = kf.KFAC(model, damping=0.0, ema_decay=0.0, cov_update_freq=1000)
    x = torch.randn(2, 5, dtype=D)
    with pytest.warns(RuntimeWarning, match="retrying with damping 1e-08") as record:
        for seed in range(4):
            curvature_step(pc, model, x, seed)
    retries = [w for w in record if "retrying" in str(w.message)]
    assert len(retries) == 2  # layers '0' and '2', once each
    assert pc.warning_counts == {("0", "singular_retry"): 4, ("2", "singular_retry"): 4}
