"""AdaptiveNG end to end: the exact span minimiser, every step rule, bad values, resume."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronfisher as kf
from helpers import D
from test_optim_damping import dense_hessian, flat, least_squares, run_step


def test_automatic_step_is_the_exact_minimiser_over_the_span_on_least_squares():
    """Linear least squares: the loss is its own quadratic model with C = Hessian, so δ must
    be the dense minimiser of ∇ᵀδ + ½δᵀ(H + (λ + η)I)δ over span{Δ, δ_prev}."""
    model, x, loss_fn = least_squares(seed=5)
    lam, eta = 0.3, 0.05
    pc = kf.KFAC(model, damping_scheme="factored")
    opt = kf.optim.AdaptiveNG(pc, damping=lam, weight_decay=eta, adapt_damping=False)
    H = dense_hessian(model, x, loss_fn)  # constant: the loss is quadratic
    M = H + (lam + eta) * torch.eye(H.shape[0], dtype=D)
    prev = None
    for step in range(4):
        theta, grads, delta = run_step(model, pc, opt, x, loss_fn, seed=step)
        g, d = flat(model, grads), flat(model, delta)
        Delta = flat(model, {n: p.grad for n, p in model.named_parameters()})
        V = torch.stack([Delta] if prev is None else [Delta, prev], 1)
        c = -torch.linalg.solve(V.T @ M @ V, V.T @ g)
        torch.testing.assert_close(d, V @ c, rtol=1e-10, atol=1e-13)
        rec = opt.last_step
        assert rec.alpha == pytest.approx(-float(c[0]), rel=1e-10)
        assert rec.momentum == (0.0 if prev is None else pytest.approx(float(c[1]), rel=1e-9))
        assert rec.q == pytest.approx(float(g @ d + 0.5 * d @ M @ d), rel=1e-10)
        moved = flat(model, dict(model.named_parameters())).detach()
        torch.testing.assert_close(moved, flat(model, theta) + d, rtol=0, atol=1e-15)
        prev = d


def test_momentum_range_step_is_the_constrained_minimiser_on_least_squares():
    """With lo ≤ μ ≤ hi, δ = c₀Δ + μ δ_prev is the Karush–Kuhn–Tucker point of the dense
    quadratic ∇ᵀδ + ½δᵀ(H + (λ + η)I)δ over the span with μ in the interval."""
    model, x, loss_fn = least_squares(seed=7)
    lam, eta, lo, hi = 0.3, 0.05, 0.2, 0.3
    pc = kf.KFAC(model, damping_scheme="factored")
    opt = kf.optim.AdaptiveNG(pc, damping=lam, weight_decay=eta, adapt_damping=False,
                              momentum_range=(lo, hi))
    H = dense_hessian(model, x, loss_fn)
    M = H + (lam + eta) * torch.eye(H.shape[0], dtype=D)
    prev, bounds_hit = None, 0
    for step in range(5):
        theta, grads, delta = run_step(model, pc, opt, x, loss_fn, seed=step)
        g, d = flat(model, grads), flat(model, delta)
        Delta = flat(model, {n: p.grad for n, p in model.named_parameters()})
        if prev is None:  # first step: 1×1, μ = 0 outside the range is not a constraint
            c = -(Delta @ g) / (Delta @ M @ Delta)
            torch.testing.assert_close(d, c * Delta, rtol=1e-10, atol=1e-13)
        else:
            mu = opt.last_step.momentum
            assert lo <= mu <= hi
            c0 = -opt.last_step.alpha
            torch.testing.assert_close(d, c0 * Delta + mu * prev, rtol=1e-10, atol=1e-13)
            dq = torch.stack([Delta, prev]) @ (M @ d + g)  # ∂q/∂(c₀, μ)
            assert abs(float(dq[0])) < 1e-9 * float(dq.abs().max() + Delta.norm() * g.norm())
            if mu == lo:
                assert float(dq[1]) > 0
            elif mu == hi:
                assert float(dq[1]) < 0
            else:
                assert abs(float(dq[1])) < 1e-9
            bounds_hit += mu in (lo, hi)
        prev = d
    assert bounds_hit >= 1  # the range did bind in this problem


def autoencoder(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 8)).double()
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.rand(64, 8, generator=gen, dtype=D).round()
    loss_fn = lambda out: F.binary_cross_entropy_with_logits(out, x, reduction="none"
                                                            ).sum(1).mean()
    return model, x, loss_fn


def train(model, pc, opt, x, loss_fn, steps, seed=0, inputs=None):
    """``steps`` steps on the batch x; the quadratic model and ρ on ``inputs`` (default x)."""
    sub = x if inputs is None else inputs
    sub_loss = loss_fn if inputs is None else (
        lambda out: F.binary_cross_entropy_with_logits(out, sub, reduction="none").sum(1).mean())
    losses = []
    for it in range(steps):
        if pc.steps % pc.cov_update_freq == 0:
            with pc.collect():
                gen = torch.Generator().manual_seed(seed * 1000 + it)
                kf.sampled_nll(model(x[:32]), "bernoulli", generator=gen).backward()

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x))
            loss.backward()
            return loss

        losses.append(float(opt.step(closure, inputs=sub, loss_fn=sub_loss).detach()))
    return losses


MODES = {
    "auto_alpha_mu": dict(),
    "auto_alpha_fixed_mu": dict(momentum=0.5),
    "fixed_lr": dict(lr=0.5, momentum=0.9),
    "fixed_lr_kl_clip": dict(lr=1.0, momentum=0.5, kl_clip=0.1),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", [kf.KFAC, kf.KPSVD])
def test_every_step_rule_decreases_the_loss(method, mode):
    model, x, loss_fn = autoencoder()
    pc = method(model, damping_scheme="factored", inv_update_freq=2)
    opt = kf.optim.AdaptiveNG(pc, damping=1.0, weight_decay=1e-3, **MODES[mode])
    losses = train(model, pc, opt, x, loss_fn, 20)
    with torch.no_grad():
        final = float(loss_fn(model(x)))
    assert final < 0.7 * losses[0]
    assert all(math.isfinite(v) for v in losses)
    rec = opt.last_step
    assert rec.applied and rec.step == 19 and opt.steps == 20
    if "lr" in MODES[mode]:
        assert rec.alpha <= MODES[mode]["lr"]
    if mode == "auto_alpha_fixed_mu":
        assert rec.momentum == 0.5
    # the damping is adapted every 5 steps: 4 updates, each by exactly ω^(±1) or none
    k = math.log(rec.next_damping) / math.log(0.95**5)
    assert abs(k - round(k)) < 1e-9 and abs(round(k)) <= 4


def test_curvature_on_a_sub_batch_and_exact_ng():
    model, x, loss_fn = autoencoder(seed=1)
    pc = kf.ExactNG(model, damping=1.0)
    opt = kf.optim.AdaptiveNG(pc, damping=1.0, quad_model="approx")
    losses = train(model, pc, opt, x, loss_fn, 20, inputs=x[:16])
    with torch.no_grad():
        assert float(loss_fn(model(x))) < 0.7 * losses[0]


def one_step_setup(**kw):
    model, x, loss_fn = autoencoder(seed=2)
    pc = kf.KFAC(model, damping_scheme="factored")
    opt = kf.optim.AdaptiveNG(pc, damping=1.0, **kw)
    train(model, pc, opt, x, loss_fn, 2)
    with pc.collect():
        kf.sampled_nll(model(x), "bernoulli").backward()
    return model, x, loss_fn, pc, opt


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("what", ["nan_gradient", "nan_loss_fn", "inf_closure_loss",
                                  "nan_loss_fn_fixed_lr", "overflowing_step"])
def test_non_finite_values_never_change_the_parameters(what):
    kw = {"nan_loss_fn_fixed_lr": dict(lr=0.1, quad_model="approx", damping_update_freq=1),
          "overflowing_step": dict(lr=1e308)}.get(what, {})
    model, x, loss_fn, pc, opt = one_step_setup(**kw)
    before, lam = params_of(model), opt.param_groups[0]["damping"]

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x))
        if what == "nan_gradient":
            loss = loss * float("nan")
        loss.backward()
        return loss.detach() + (math.inf if what == "inf_closure_loss" else 0.0)

    bad_loss_fn = loss_fn
    if what.startswith("nan_loss_fn"):
        bad_loss_fn = lambda out: loss_fn(out) * float("nan")
    with pytest.warns(RuntimeWarning):
        opt.step(closure, inputs=x, loss_fn=bad_loss_fn)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    rec = opt.last_step
    assert not rec.applied and rec.reason
    omega = 0.95**5
    expected = lam if what == "nan_gradient" else lam / omega
    assert opt.param_groups[0]["damping"] == expected == rec.next_damping
    assert all("delta_prev" not in opt.state[p] for p in model.parameters())
    if what != "overflowing_step":  # the next good step works, with a new momentum history
        train(model, pc, opt, x, loss_fn, 1)
        assert opt.last_step.applied and opt.last_step.momentum == 0.0


def test_kl_clip_scales_the_preconditioned_part_of_the_step():
    model, x, loss_fn = autoencoder(seed=4)
    lr, kappa, eta = 1.0, 1e-3, 1e-2
    pc = kf.KFAC(model, damping_scheme="factored")
    opt = kf.optim.AdaptiveNG(pc, lr=lr, momentum=0.9, kl_clip=kappa, weight_decay=eta,
                              adapt_damping=False)
    for it in range(2):
        with pc.collect():
            kf.sampled_nll(model(x), "bernoulli").backward()
        model.zero_grad()
        loss_fn(model(x)).backward()
        g = torch.cat([(p.grad + eta * p).reshape(-1) for p in model.parameters()])
        prev = [opt.state[p].get("delta_prev") for p in model.parameters()]

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x))
            loss.backward()
            return loss

        opt.step(closure)  # nothing adapts: no inputs needed
        Delta = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        nu = min(1.0, math.sqrt(kappa / (lr**2 * abs(float(Delta @ g)))))
        assert nu < 0.5  # the constraint is active
        assert opt.last_step.alpha == pytest.approx(lr * nu, rel=1e-12)
        delta = torch.cat([opt.state[p]["delta_prev"].reshape(-1) for p in model.parameters()])
        expected = -lr * nu * Delta
        if it:
            expected = expected + 0.9 * torch.cat([d.reshape(-1) for d in prev])
        torch.testing.assert_close(delta, expected, rtol=1e-12, atol=1e-15)


def resume_setup(seed=7, **kw):
    model, x, loss_fn = autoencoder(seed=3)
    pc = kf.KFAC(model, damping_scheme="factored", cov_update_freq=2, inv_update_freq=3)
    opt = kf.optim.AdaptiveNG(pc, damping=2.0, damping_update_freq=2, weight_decay=1e-3, **kw)
    return model, x, loss_fn, pc, opt


@pytest.mark.parametrize("kw", [dict(), dict(lr=0.3, momentum=0.8, quad_model="approx"),
                                dict(momentum_range=(0.0, 0.5))])
def test_state_dict_resume_is_bit_identical(kw):
    model, x, loss_fn, pc, opt = resume_setup(**kw)
    train(model, pc, opt, x, loss_fn, 5, seed=0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "pc": pc.state_dict(), "opt": opt.state_dict()},
               buf)
    train(model, pc, opt, x, loss_fn, 6, seed=1)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2, x2, loss_fn2, pc2, opt2 = resume_setup(**kw)
    train(model2, pc2, opt2, x2, loss_fn2, 1, seed=9)  # a different history, overwritten
    model2.load_state_dict(saved["model"])
    pc2.load_state_dict(saved["pc"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.steps == 5 and opt2.last_step.step == 4
    train(model2, pc2, opt2, x2, loss_fn2, 6, seed=1)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.last_step == opt.last_step
    assert opt2.param_groups[0]["damping"] == opt.param_groups[0]["damping"]


def test_a_state_dict_without_momentum_range_loads_unbounded():
    """Saved before the option existed: the group lacks the key; it loads as None."""
    model, x, loss_fn, pc, opt = resume_setup(momentum_range=(0.0, 0.5))
    train(model, pc, opt, x, loss_fn, 3)
    sd = opt.state_dict()
    del sd["param_groups"][0]["momentum_range"]
    opt.load_state_dict(sd)
    assert "momentum_range" not in opt.param_groups[0]
    train(model, pc, opt, x, loss_fn, 2)
    assert opt.steps == 5 and opt.last_step.applied


def test_load_errors_are_clear_and_change_nothing():
    model, x, loss_fn, pc, opt = resume_setup()
    train(model, pc, opt, x, loss_fn, 3)
    good = opt.state_dict()
    w = model[0].weight

    def broken(edit):
        sd = copy.deepcopy(good)
        edit(sd)
        return sd

    idx = good["param_groups"][0]["params"][0]
    cases = [
        ({"state": {}, "param_groups": good["param_groups"]}, "not an AdaptiveNG"),
        (broken(lambda s: s["state"][idx].update(delta_prev=torch.zeros(2, 2))), "shape"),
        (broken(lambda s: s["state"][idx]["delta_prev"].fill_(float("nan"))), "not finite"),
        (broken(lambda s: s["param_groups"][0].update(damping=-1.0)), "damping"),
        (broken(lambda s: s["param_groups"][0]["params"].pop()), "parameters"),
        (broken(lambda s: s["adaptive"].update(steps=-2)), "step count"),
    ]
    before = opt.state[w]["delta_prev"].clone()
    for sd, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        assert torch.equal(opt.state[w]["delta_prev"], before) and opt.steps == 3


def test_argument_errors_are_clear():
    model, x, loss_fn = autoencoder()
    pc = kf.KFAC(model)
    with pytest.raises(ValueError, match="kl_clip.*fixed lr"):
        kf.optim.AdaptiveNG(pc, kl_clip=0.1)
    with pytest.raises(ValueError, match="not parameters of"):
        kf.optim.AdaptiveNG(pc, params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="one parameter group"):
        kf.optim.AdaptiveNG(pc, params=[{"params": list(model.parameters())}])
    with pytest.raises(TypeError, match="Preconditioner"):
        kf.optim.AdaptiveNG(model)
    for kw, match in [(dict(lr=-1.0), "lr"), (dict(damping_decay=1.5), "damping_decay"),
                      (dict(quad_model="hessian"), "quad_model"),
                      (dict(damping=1e9), "damping"), (dict(damping_update_freq=0), "freq"),
                      (dict(momentum_range=(0.9, 0.1)), "lo <= hi"),
                      (dict(momentum_range=(0.0, math.inf)), "finite"),
                      (dict(momentum_range=0.9), "pair"),
                      (dict(momentum_range=(0.0, 0.9), momentum=0.5), "automatic momentum"),
                      (dict(momentum_range=(0.0, 0.9), lr=0.1), "automatic momentum")]:
        with pytest.raises(ValueError, match=match):
            kf.optim.AdaptiveNG(pc, **kw)
    opt = kf.optim.AdaptiveNG(pc)
    with pytest.raises(ValueError, match="one parameter group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    closure = lambda: loss_fn(model(x))
    with pytest.raises(ValueError, match="inputs= and loss_fn="):
        opt.step(closure)
    with pytest.raises(ValueError, match="closure"):
        opt.step(inputs=x, loss_fn=loss_fn)
    with pc.collect():
        with pytest.raises(RuntimeError, match="inside preconditioner.collect"):
            opt.step(closure, inputs=x, loss_fn=loss_fn)


def test_a_step_on_used_gradients_is_refused_and_fixed_lr_follows_a_scheduler():
    model, x, loss_fn = autoencoder()
    pc = kf.KFAC(model, damping_scheme="factored")
    opt = kf.optim.AdaptiveNG(pc, lr=0.5, adapt_damping=False, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, pc, opt, x, loss_fn, 1)
    sched.step()
    train(model, pc, opt, x, loss_fn, 1)  # no inputs needed: nothing adapts (passed anyway)
    assert opt.last_step.alpha == 0.25
    with pytest.raises(RuntimeError, match="already used"):
        opt.step(lambda: torch.zeros(()))  # no backward: the gradients are the old ones


def test_a_model_predicting_a_loss_below_the_bound_is_not_trusted():
    model, x, loss_fn = autoencoder(seed=5)
    pc = kf.KFAC(model, damping_scheme="factored")
    opt = kf.optim.AdaptiveNG(pc, damping=1.0, loss_lower_bound=0.0)
    train(model, pc, opt, x, loss_fn, 2)
    assert opt.last_step.applied  # a BCE ≥ 0: an ordinary step respects the bound
    with torch.no_grad():
        level = float(loss_fn(model(x)))
    opt.param_groups[0]["loss_lower_bound"] = level  # now any predicted decrease violates it
    before, lam = params_of(model), opt.param_groups[0]["damping"]
    with pytest.warns(RuntimeWarning, match="loss_lower_bound"):
        train(model, pc, opt, x, loss_fn, 1)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.last_step.applied and opt.last_step.next_damping == lam / 0.95**5
