"""The Levenberg–Marquardt damping rule, alone and inside AdaptiveNG on exact quadratics."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import kronfisher as kf
from helpers import D
from kronfisher.optim import LevenbergMarquardt, reduction_ratio

OMEGA = 0.95**5


def test_rule_moves_by_exactly_omega_and_keeps_the_middle():
    rule = LevenbergMarquardt(decay=OMEGA, min_damping=1e-8, max_damping=1e8)
    lam = 3.0
    assert rule.update(lam, 0.9, -1.0) == lam * OMEGA
    assert rule.update(lam, 0.1, -1.0) == lam / OMEGA
    assert rule.update(lam, -5.0, -1.0) == lam / OMEGA
    assert rule.update(lam, 0.5, -1.0) == lam
    assert rule.update(lam, 0.75, -1.0) == lam  # the thresholds themselves keep λ
    assert rule.update(lam, 0.25, -1.0) == lam


@pytest.mark.parametrize("rho,q", [(math.nan, -1.0), (math.inf, -1.0), (-math.inf, -1.0),
                                   (0.9, 0.0), (0.9, 2.0), (0.9, math.nan)])
def test_rule_raises_damping_on_nan_rho_or_a_model_without_decrease(rho, q):
    rule = LevenbergMarquardt(decay=OMEGA, min_damping=0.0, max_damping=1e8)
    assert rule.update(2.0, rho, q) == 2.0 / OMEGA


def test_rule_clamps_to_its_range():
    rule = LevenbergMarquardt(decay=0.5, min_damping=1.0, max_damping=4.0)
    assert rule.update(1.5, 0.9, -1.0) == 1.0
    assert rule.update(3.0, 0.1, -1.0) == 4.0
    assert rule.update(4.0, math.nan, -1.0) == 4.0
    assert rule.increase(3.0) == 4.0
    assert rule.clamp(0.2) == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(decay=1.0, min_damping=0.0, max_damping=1.0), "damping_decay"),
    (dict(decay=0.0, min_damping=0.0, max_damping=1.0), "damping_decay"),
    (dict(decay=0.5, min_damping=-1.0, max_damping=1.0), "min_damping"),
    (dict(decay=0.5, min_damping=2.0, max_damping=1.0), "max_damping"),
])
def test_rule_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LevenbergMarquardt(**kwargs)


def test_reduction_ratio():
    assert reduction_ratio(2.0, 1.0, -2.0) == 0.5
    assert math.isnan(reduction_ratio(2.0, 1.0, 0.0))
    assert math.isnan(reduction_ratio(2.0, math.nan, -1.0))
    assert math.isnan(reduction_ratio(2.0, math.inf, -1.0))


# --------------------------------------------------- exact quadratics inside AdaptiveNG

def least_squares(seed=0, m=32, d_in=4, d_out=3):
    torch.manual_seed(seed)
    model = nn.Linear(d_in, d_out).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, d_in, generator=gen, dtype=D)
    y = torch.randn(m, d_out, generator=gen, dtype=D)
    loss_fn = lambda out: 0.5 * ((out - y) ** 2).sum(1).mean()
    return model, x, loss_fn


def flat(model, tensors):
    return torch.cat([tensors[n].reshape(-1) for n, _ in model.named_parameters()])


def dense_hessian(model, x, loss_fn):
    """The Hessian of the (exactly quadratic) loss in the flat parameter order."""
    shapes = {n: p.shape for n, p in model.named_parameters()}

    def f(t):
        out, i = {}, 0
        for n, s in shapes.items():
            k = math.prod(s)
            out[n] = t[i:i + k].reshape(s)
            i += k
        return loss_fn(functional_call(model, out, (x,)))

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return hessian(f)(theta)


def run_step(model, pc, opt, x, loss_fn, seed, curvature_scale=1.0, sub=None):
    """One AdaptiveNG step; the curvature batch's loss is scaled by ``curvature_scale``
    (so the method's curvature is off by its square); ``sub`` = (inputs, loss_fn) of the
    quadratic model and ρ when not the closure's batch."""
    with pc.collect():
        gen = torch.Generator().manual_seed(seed)
        (curvature_scale * kf.sampled_nll(model(x), "gaussian", generator=gen)).backward()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss_fn(model(x)).backward()
    eta = opt.param_groups[0]["weight_decay"]
    grads = {n: p.grad.clone() + eta * p.detach() for n, p in model.named_parameters()}

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x))
        loss.backward()
        return loss

    inputs, model_loss = (x, loss_fn) if sub is None else sub
    opt.step(closure, inputs=inputs, loss_fn=model_loss)
    delta = {n: opt.state[p]["delta_prev"] for n, p in model.named_parameters()}
    return theta, grads, delta


@pytest.mark.parametrize("lr,expect", [(1e-2, "down"), (0.2, "keep"), (1.0, "up"),
                                        (3.0, "up, q > 0")])
def test_rho_with_the_methods_own_curvature_is_the_dense_ratio(lr, expect):
    """quad_model="approx": ρ = (∇ᵀδ + ½δᵀ(H + η)δ) / (∇ᵀδ + ½δᵀMδ), M = KFAC's damped matrix.

    The curvature batch is scaled by 0.3, so M ≈ 0.09·H + damping: the model underestimates
    the curvature and ρ falls from ≈ 1 (short step) below ¼ (long step), until q > 0.
    """
    model, x, loss_fn = least_squares()
    eta, lam = 0.01, 0.01
    pc = kf.KFAC(model, damping_scheme="factored")
    opt = kf.optim.AdaptiveNG(pc, lr=lr, damping=lam, weight_decay=eta, quad_model="approx",
                              damping_update_freq=1)
    H = dense_hessian(model, x, loss_fn)
    theta, grads, delta = run_step(model, pc, opt, x, loss_fn, seed=0, curvature_scale=0.3)
    g, d = flat(model, grads), flat(model, delta)
    # the layer's damped matrix in [W b] column-stacking order, mapped to the flat order
    M_vec = next(iter(pc.layers.values())).inverse.to_dense()
    perm = column_stacking_to_flat(model)
    M = M_vec[perm][:, perm]
    torch.testing.assert_close(d, -lr * torch.linalg.solve(M, g), rtol=1e-10, atol=1e-14)
    true = float(g @ d + 0.5 * d @ (H + eta * torch.eye(len(d), dtype=D)) @ d)
    q = float(g @ d + 0.5 * d @ M @ d)
    rec = opt.last_step
    assert rec.q == pytest.approx(q, rel=1e-10)
    assert rec.rho == pytest.approx(true / q, rel=1e-9)
    if expect == "down":
        assert rec.rho > 0.75 and q < 0 and rec.next_damping == lam * OMEGA
    elif expect == "keep":
        assert 0.25 < rec.rho < 0.75 and q < 0 and rec.next_damping == lam
    elif expect == "up":
        assert rec.rho < 0.25 and q < 0 and rec.next_damping == lam / OMEGA
    else:  # ρ is large, but the model predicted an increase: the step is not trusted
        assert rec.rho > 0.75 and q > 0 and rec.next_damping == lam / OMEGA
    assert opt.param_groups[0]["damping"] == rec.next_damping
    assert pc.damping == lam + eta  # the preconditioner used λ + η


def column_stacking_to_flat(model):
    """perm with flat[i] = vec([W b])[perm[i]] for an nn.Linear (flat: W row-major, then b)."""
    d_g, d_in = model.weight.shape
    d_a = d_in + 1
    idx = torch.arange(d_g * d_a).reshape(d_a, d_g).T  # idx[r, c] = position of V[r, c] in vec
    return torch.cat([idx[:, :d_in].reshape(-1), idx[:, d_in]])


def test_rho_is_one_on_an_exact_quadratic_with_the_exact_ggn_and_no_damping():
    """Loss exactly quadratic, C its own GGN (= Hessian), λ = 0: q is the true change."""
    model, x, loss_fn = least_squares(seed=3)
    pc = kf.KFAC(model, damping_scheme="factored")
    for lr in (None, 0.3):  # automatic α, μ; fixed lr with q from one JVP of δ
        opt = kf.optim.AdaptiveNG(pc, lr=lr, damping=0.0, min_damping=0.0, weight_decay=0.05,
                                  damping_update_freq=1)
        for step in range(3):
            run_step(model, pc, opt, x, loss_fn, seed=step)
            assert opt.last_step.rho == pytest.approx(1.0, abs=1e-10)
            assert opt.last_step.next_damping == 0.0  # ρ > ¾: ω·0, clamped at the floor 0


def test_on_a_sub_batch_the_inputs_gradient_makes_the_model_exact():
    """inputs = a sub-batch: with model_grad="inputs" the model is the sub-batch's exact
    quadratic (ρ = 1 at λ = 0, δ its span minimiser); with the closure's full-batch
    gradient it is not (ρ ≠ 1)."""
    model, x, loss_fn = least_squares(seed=4)
    y = model(x).detach() + torch.randn(32, 3, dtype=D, generator=torch.Generator().manual_seed(9))
    sub_x = x[:8]
    sub_loss = lambda out: 0.5 * ((out - y[:8]) ** 2).sum(1).mean()
    full = lambda out: 0.5 * ((out - y) ** 2).sum(1).mean()
    rhos = {}
    for model_grad in ("inputs", "closure"):
        m, _, _ = least_squares(seed=4)
        pc = kf.KFAC(m, damping_scheme="factored")
        opt = kf.optim.AdaptiveNG(pc, damping=0.0, min_damping=0.0, weight_decay=0.05,
                                  damping_update_freq=1, model_grad=model_grad)
        H = dense_hessian(m, sub_x, sub_loss) + 0.05 * torch.eye(15, dtype=D)
        prev = None
        for step in range(2):
            theta, _, delta = run_step(m, pc, opt, x, full, seed=step, sub=(sub_x, sub_loss))
            if model_grad == "inputs":
                m_theta = {n: t.clone().requires_grad_() for n, t in theta.items()}
                g_sub = torch.autograd.grad(sub_loss(torch.func.functional_call(
                    m, m_theta, (sub_x,))), list(m_theta.values()))
                g = flat(m, dict(zip(m_theta, g_sub))) + 0.05 * flat(m, theta)
                Delta = flat(m, {n: p.grad for n, p in m.named_parameters()})
                V = torch.stack([Delta] if prev is None else [Delta, prev], 1)
                c = -torch.linalg.solve(V.T @ H @ V, V.T @ g)
                torch.testing.assert_close(flat(m, delta), V @ c, rtol=1e-9, atol=1e-13)
            prev = flat(m, delta)
            rhos.setdefault(model_grad, []).append(opt.last_step.rho)
    assert rhos["inputs"] == [pytest.approx(1.0, abs=1e-10)] * 2
    assert all(abs(r - 1.0) > 1e-3 for r in rhos["closure"])
