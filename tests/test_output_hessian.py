"""kronfisher.losses.OutputHessian: H u in closed form against torch.func.hessian, and the
quadratic model / AdaptiveNG step it speeds up against the generic second derivative."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian

import kronfisher as kf
from helpers import D
from kronfisher.optim import ggn_gram
from test_optim_quadratic import LOSSES, loss_problem, tiny_mlp


def per_example_nll(out, y, likelihood):
    """ℓᵢ: the NLL of each example summed over its output elements (positions)."""
    if likelihood == "gaussian":
        return 0.5 * ((out - y) ** 2).flatten(1).sum(1)
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(out, y, reduction="none").flatten(1).sum(1)
    return F.cross_entropy(out, y, reduction="none").reshape(out.shape[0], -1).sum(1)


def objective(likelihood, reduction, scale, y):
    def f(out):
        ell = per_example_nll(out, y, likelihood)
        if reduction == "sum":
            total = ell.sum()
        elif reduction == "batchmean":
            total = ell.mean()
        else:  # the mean over elements (positions for categorical)
            n = out[0].numel() if likelihood != "categorical" else out[0, 0].numel()
            total = ell.mean() / n
        return scale * total
    return f


def batch(likelihood, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(shape, generator=gen, dtype=D)
    if likelihood == "categorical":
        y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    elif likelihood == "bernoulli":
        y = torch.rand(shape, generator=gen, dtype=D).round()
    else:
        y = torch.randn(shape, generator=gen, dtype=D)
    U = torch.randn((3, *shape), generator=gen, dtype=D)
    return out, y, U


def dense_product(loss, out, U):
    H = hessian(loss)(out).reshape(out.numel(), out.numel())
    return (U.reshape(U.shape[0], -1) @ H).reshape(U.shape)  # H is symmetric


@pytest.mark.parametrize("likelihood,shape", [("gaussian", (4, 3)), ("bernoulli", (4, 2, 3)),
                                              ("categorical", (4, 5)),
                                              ("categorical", (3, 4, 2))])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_closed_form_equals_the_dense_hessian_of_the_objective(likelihood, shape, reduction):
    out, y, U = batch(likelihood, shape, seed=len(shape) + len(reduction))
    scale = 0.7
    expect = dense_product(objective(likelihood, reduction, scale, y), out, U)
    got = kf.OutputHessian(likelihood, reduction, scale)(out, U)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name,loss,h", [
    ("bce mean", lambda o, y: F.binary_cross_entropy_with_logits(o, y),
     kf.OutputHessian("bernoulli", "mean")),
    ("mse", lambda o, y: F.mse_loss(o, y), kf.OutputHessian("gaussian", "mean", scale=2.0)),
])
def test_the_docstring_table_for_torch_losses(name, loss, h):
    likelihood = h.likelihood
    out, y, U = batch(likelihood, (5, 3), seed=11)
    expect = dense_product(lambda o: loss(o, y), out, U)
    torch.testing.assert_close(h(out, U), expect, rtol=1e-12, atol=1e-15)


def test_cross_entropy_with_positions_matches_the_table():
    out, y, U = batch("categorical", (3, 4, 2), seed=12)
    expect = dense_product(lambda o: F.cross_entropy(o, y), out, U)
    got = kf.OutputHessian("categorical", "mean")(out, U)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-15)


HESSIANS = {"bernoulli_bce_mean": kf.OutputHessian("bernoulli", "mean"),
            "gaussian_mse": kf.OutputHessian("gaussian", "mean", scale=2.0),
            "cross_entropy": kf.OutputHessian("categorical", "mean")}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_ggn_gram_with_the_closed_form_equals_the_generic_route(loss):
    gen = torch.Generator().manual_seed(3)
    model, x, loss_fn = loss_problem(loss, 7, gen)
    params = dict(model.named_parameters())
    V = [{n: torch.randn(p.shape, generator=gen, dtype=D) for n, p in params.items()}
         for _ in range(2)]
    generic = ggn_gram(model, params, x, loss_fn, V)
    fast = ggn_gram(model, params, x, loss_fn, V, output_hessian=HESSIANS[loss])
    torch.testing.assert_close(fast.curvature, generic.curvature, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(fast.grad, generic.grad, rtol=1e-12, atol=1e-15)
    assert fast.loss == generic.loss


def adaptive_records(h, steps=4):
    """(α, μ, q, ρ, next λ) of a few AdaptiveNG steps on BCE, with output_hessian ``h``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 5, generator=gen, dtype=D)

    def loss_fn(out):
        return F.binary_cross_entropy_with_logits(out, x)

    pc = kf.KFAC(model, damping_scheme="factored")
    opt = kf.optim.AdaptiveNG(pc, damping=1.0, weight_decay=1e-3, damping_update_freq=2)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x))
        loss.backward()
        return loss

    out = []
    for i in range(steps):
        with pc.collect():
            kf.sampled_nll(model(x), "bernoulli", reduction="mean",
                           generator=torch.Generator().manual_seed(i)).backward()
        opt.step(closure, inputs=x, loss_fn=loss_fn, output_hessian=h)
        r = opt.last_step
        out.append((r.alpha, r.momentum, r.q, r.rho, r.next_damping))
    return out


def test_adaptive_steps_with_the_closed_form_match_the_generic_route():
    generic = adaptive_records(None)
    fast = adaptive_records(kf.OutputHessian("bernoulli", "mean"))
    for rg, rf in zip(generic, fast):
        for g, f in zip(rg, rf):
            assert (f is None) if g is None else f == pytest.approx(g, rel=1e-10, abs=1e-14)
    assert any(r[3] is not None for r in generic)  # ρ (and the "ggn" q) were exercised


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="likelihood"):
        kf.OutputHessian("poisson")
    with pytest.raises(ValueError, match="reduction"):
        kf.OutputHessian("bernoulli", "none")
    with pytest.raises(ValueError, match="scale"):
        kf.OutputHessian("bernoulli", scale=0.0)
    h = kf.OutputHessian("gaussian")
    with pytest.raises(ValueError, match="directions must be"):
        h(torch.zeros(4, 3, dtype=D), torch.zeros(4, 3, dtype=D))
    model = tiny_mlp(3)
    x = torch.randn(2, 4, dtype=D)
    params = dict(model.named_parameters())
    V = [{n: torch.ones_like(p) for n, p in params.items()}]
    with pytest.raises(ValueError, match="output_hessian returned shape"):
        ggn_gram(model, params, x, lambda o: (o ** 2).sum(), V,
                 output_hessian=lambda o, U: U[0])
