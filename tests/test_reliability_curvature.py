"""Fault class 1 (docs/reliability.md): overflowing curvature and low-precision statistics.

A curvature batch whose factors overflow is dropped for that layer (the running average is
kept), float16/bfloat16 statistics are computed in float32, and the exact power-of-two
scaling makes large inputs safe without changing the result.
"""

import warnings

import pytest
import torch
from torch import nn

import kronfisher as kf
from kronfisher.curvature import KroneckerEstimator
from kronfisher.linalg import SingularFactorError
from kronfisher.preconditioner.exact import per_example_gradients

SVD_METHODS = ["kpsvd", "deflation", "lanczos", "kfac_corrected"]
CLASSES = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation,
           "lanczos": kf.Lanczos, "kfac_corrected": kf.KFACCorrected}


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _curvature_batch(pc, model, x, scale=1.0):
    with pc.collect():
        kf.sampled_nll(model(x * scale), "gaussian").backward()


def _grad_batch(model, x):
    model.zero_grad(set_to_none=True)
    (model(x) - 1).square().mean().backward()


def _dense(ks):
    return ks.to_dense().double()


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_overflowing_factors_skip_that_layer_and_keep_the_average(nonfinite):
    """KFAC with inputs ×1e20 at one step: A = aᵀa/m ~ 1e40 overflows float32."""
    model = _mlp()
    pc = kf.KFAC(model, damping=1e-3, nonfinite=nonfinite)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 6)
    _curvature_batch(pc, model, x)
    _grad_batch(model, x)
    assert pc.step()
    opt.step()
    first, last = pc.layers["0"], pc.layers["2"]
    kept = [t.clone() for t in first.curvature.terms[0]]
    kept_updates, last_updates = first.updates, last.updates

    _curvature_batch(pc, model, torch.randn(16, 6), scale=1e20)
    _grad_batch(model, x)
    if nonfinite == "raise":
        with pytest.raises(kf.NonFiniteError, match="layer '0'"):
            pc.step()
    else:
        with pytest.warns(RuntimeWarning, match="layer '0'.*curvature update skipped"):
            assert pc.step()
        opt.step()
        assert last.updates == last_updates + 1  # the other layer's update went in
    assert first.updates == kept_updates
    for t, k in zip(first.curvature.terms[0], kept):
        assert torch.equal(t, k)  # running average unchanged, finite
    # training goes on with finite curvature and parameters
    for _ in range(3):
        _curvature_batch(pc, model, torch.randn(16, 6))
        _grad_batch(model, x)
        assert pc.step()
        opt.step()
    assert first.updates == kept_updates + 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_raise_mode_restores_every_overflowing_layer_before_raising():
    """No tanh in between: ×1e20 inputs overflow both layers' factors. "raise" must leave
    neither layer's running average NaN (it used to restore only the first one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    pc = kf.KFAC(model, damping=1e-3, nonfinite="raise")
    x = torch.randn(16, 6)
    _curvature_batch(pc, model, x)
    _grad_batch(model, x)
    assert pc.step()
    kept = {n: [t.clone() for t in s.curvature.terms[0]] for n, s in pc.layers.items()}
    _curvature_batch(pc, model, x, scale=1e20)
    _grad_batch(model, x)
    with pytest.raises(kf.NonFiniteError, match="layer '0'"):
        pc.step()
    for n, s in pc.layers.items():
        assert s.updates == 1, n
        for t, k in zip(s.curvature.terms[0], kept[n]):
            assert torch.equal(t, k), n


@pytest.mark.parametrize("method", ["kfac", *SVD_METHODS])
def test_large_inputs_give_the_scaled_approximation(method):
    """×1e12 inputs in float32: the SVD solvers' Gram products (∝ scale⁴ = 1e48) would
    overflow; the power-of-two scaling gives the float64 reference's approximation."""
    torch.manual_seed(1)
    a = torch.cat([torch.randn(40, 6), torch.ones(40, 1)], 1) * 1e12
    g = torch.randn(40, 4)
    est = KroneckerEstimator(method)
    ks = est.estimate(a, g, (1, 1), None)
    assert all(torch.isfinite(A).all() and torch.isfinite(G).all() for A, G in ks.terms)
    ref = kf.approximate(a.double(), g.double(), method)
    D, R = _dense(ks), _dense(ref)
    assert torch.linalg.norm(D - R) <= 1e-4 * torch.linalg.norm(R)


@pytest.mark.parametrize("method", ["kfac", *SVD_METHODS])
def test_power_of_two_scaling_is_exact_in_floating_point(method):
    """float64 statistics: the scaled estimate equals the unscaled one up to the solver's
    own rounding (bitwise for KFAC, whose products are scaled exactly)."""
    torch.manual_seed(2)
    a = torch.cat([torch.randn(30, 5) * 37.0, torch.ones(30, 1)], 1).double()
    g = torch.randn(30, 3).double() * 0.013
    ks = KroneckerEstimator(method).estimate(a, g, (1, 1), None)
    ref = kf.approximate(a, g, method)
    if method == "kfac":
        for (A, G), (A0, G0) in zip(ks.terms, ref.terms):
            assert torch.equal(A, A0) and torch.equal(G, G0)
    assert torch.linalg.norm(_dense(ks) - _dense(ref)) <= 1e-10 * torch.linalg.norm(_dense(ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["kfac", *SVD_METHODS])
def test_half_precision_models_keep_float32_curvature(method, dtype):
    """Half-precision statistics (batch 128: the products of ordinary data overflow
    float16, and LAPACK has no half eigh) give float32 curvature equal to the float64
    approximation of the same (exactly upcast) statistics."""
    model = _mlp(dtype)
    pc = CLASSES[method](model, damping=1e-3)
    x = torch.randn(128, 6).to(dtype)
    _curvature_batch(pc, model, x)
    stats = {n: (torch.cat([c.a for c in s.captures]), torch.cat([c.g for c in s.captures]))
             for n, s in pc.layers.items()}
    # the hooks keep half-precision statistics as their exact float32 upcasts (factor dtype)
    assert all(a.dtype == g.dtype == torch.float32 for a, g in stats.values())
    _grad_batch(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two-term clamping warnings are not the point
        assert pc.step()
    for name, s in pc.layers.items():
        ks = s.curvature
        assert ks.dtype == torch.float32
        a, g = stats[name]
        ref = kf.approximate(a.double(), g.double(), method)
        err = torch.linalg.norm(_dense(ks) - _dense(ref)) / torch.linalg.norm(_dense(ref))
        assert err <= 1e-4, (name, float(err))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_diagonal", [True, False])
def test_exact_ng_in_half_precision(dtype, block_diagonal):
    model = _mlp(dtype)
    pc = kf.ExactNG(model, damping=1e-3, block_diagonal=block_diagonal)
    x = torch.randn(64, 6).to(dtype)
    _curvature_batch(pc, model, x)
    J = torch.cat([per_example_gradients(torch.cat([c.a for c in s.captures]).double(),
                                         torch.cat([c.g for c in s.captures]).double())
                   for s in pc.layers.values()], 1)
    F = J.mT @ J / J.shape[0]
    _grad_batch(model, x)
    assert pc.step()
    lo = 0
    for s in pc.layers.values():
        n = s.curvature.shape[0]
        assert s.curvature.dtype == torch.float32
        block = F[lo:lo + n, lo:lo + n]
        assert torch.linalg.norm(s.curvature.double() - block) <= 1e-5 * torch.linalg.norm(block)
        lo += n


def test_exact_ng_singular_block_without_damping_names_the_layer():
    model = _mlp(torch.float64)
    pc = kf.ExactNG(model, damping=0.0)
    x = torch.randn(4, 6, dtype=torch.float64)  # 4 examples < 35 parameters: rank ≤ 4
    _curvature_batch(pc, model, x)
    _grad_batch(model, x)
    with pytest.raises(SingularFactorError, match="layer '0'.*singular.*damping is 0"):
        pc.step()
    pc.damping = 1e-3
    assert pc.step()


@pytest.mark.parametrize("block_diagonal", [True, False])
def test_exact_ng_float32_eigh_failure_is_retried_in_float64(monkeypatch, block_diagonal):
    """ExactNG's dense eigh goes through the library's fallback (it used to raise)."""
    import kronfisher.linalg.numerics as numerics

    real = torch.linalg.eigh

    def failing(x):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated syevd failure")
        return real(x)

    model = _mlp()
    pc = kf.ExactNG(model, damping=0.1, block_diagonal=block_diagonal)  # cond ≲ 1e2
    x = torch.randn(16, 6)
    _curvature_batch(pc, model, x)
    _grad_batch(model, x)
    free = {n: p.grad.clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(numerics, "_warned", set())
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.warns(RuntimeWarning, match="retrying in float64"):
        assert pc.step()
    if block_diagonal:  # each layer: vec([W b]) ← (F + λI)⁻¹ vec([W b]), as in float64
        for s in pc.layers.values():
            F = s.curvature.double()
            g = torch.cat([free[f"{s.name}.weight"].mT.reshape(-1), free[f"{s.name}.bias"]])
            want = torch.linalg.solve(F + 0.1 * torch.eye(F.shape[0], dtype=F.dtype),
                                      g.double())
            got = torch.cat([s.module.weight.grad.mT.reshape(-1), s.module.bias.grad])
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
