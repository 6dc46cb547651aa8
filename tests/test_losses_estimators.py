"""Curvature propagation and the exact GGN pass against torch.func's Jᵀ H J."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

import kronfisher as kf
from ggn_reference import (
    LIKELIHOODS,
    REDUCTIONS,
    check_monte_carlo,
    fold_in,
    layer_g,
    layer_ggn,
    some_targets,
    tiny_net,
)
from kronfisher.losses import hessian_sqrt_apply

D = torch.float64



def per_example_nll(likelihood, y):
    """ℓ(out) of one example, summed over its output elements (torch's losses)."""
    def f(out):
        if likelihood == "gaussian":
            return 0.5 * F.mse_loss(out, y, reduction="sum")
        if likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(out, y, reduction="sum")
        return F.cross_entropy(out[None], y[None], reduction="sum")
    return f


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_hessian_square_root_times_its_transpose_is_the_output_hessian(likelihood):
    """S Sᵀ = H per example, with S's columns S e_k from hessian_sqrt_apply and H the
    Hessian of the per-example NLL by torch.func (categorical: diag(p) − p pᵀ per position,
    S = diag(√p) − p √pᵀ)."""
    out = 2 * torch.randn(4, 3, 2, dtype=D)
    y = some_targets(out, likelihood)
    n = out[0].numel()
    eye = torch.eye(n, dtype=D).reshape(n, 1, *out.shape[1:])
    cols = hessian_sqrt_apply(out, likelihood, eye)  # (n, m, ...): column k of S_i at [k, i]
    for i in range(out.shape[0]):
        S = cols[:, i].reshape(n, n).T
        H = hessian(per_example_nll(likelihood, y[i]))(out[i]).reshape(n, n)
        torch.testing.assert_close(S @ S.T, H, rtol=1e-12, atol=1e-14)
    if likelihood == "categorical":  # the closed form, checked on one position
        p = torch.softmax(out[0, :, 0], 0)
        S = torch.diag(p.sqrt()) - torch.outer(p, p.sqrt())
        r = torch.randn(3, dtype=D)
        full = torch.zeros(3, 2, dtype=D)
        full[:, 0] = r
        got = hessian_sqrt_apply(out[:1], likelihood, full[None])[0, :, 0]
        torch.testing.assert_close(got, S @ r, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_exact_ggn_pass_gives_exng_the_exact_block(likelihood, reduction):
    """One pass of exact_ggn_loss (batch repeated D times) inside collect(): ExactNG's block
    of each layer equals torch.func's Jᵀ H J of the objective at that reduction to 1e-10."""
    model = tiny_net(likelihood)
    x = torch.randn(5, 3, dtype=D)
    pc = kf.ExactNG(model, damping=1e-3, ema_decay=0.0)
    fold_in(pc, lambda: kf.exact_ggn_loss(model, x, likelihood, reduction=reduction))
    for lay in (model[0], model[2]):
        ggn = layer_ggn(model, lay, x, likelihood, reduction)
        torch.testing.assert_close(pc.curvature(lay), ggn, rtol=1e-10,
                                   atol=1e-12 * float(ggn.abs().max()))


def test_exact_ggn_pass_gives_kfac_the_exact_g():
    """KFAC's G from the exact pass is Σᵢ Jₛ,ᵢᵀ Hᵢᵢ Jₛ,ᵢ exactly (Bernoulli, reduction mean)."""
    model = tiny_net("bernoulli")
    x = torch.randn(6, 3, dtype=D)
    pc = kf.KFAC(model, damping=1e-3, ema_decay=0.0)
    fold_in(pc, lambda: kf.exact_ggn_loss(model, x, "bernoulli", reduction="mean"))
    for index in (0, 2):
        G = pc.curvature(model[index]).terms[0][1]
        torch.testing.assert_close(G, layer_g(model, index, x, "bernoulli", "mean"),
                                   rtol=1e-10, atol=1e-14)


def test_exact_ggn_pass_refuses_large_outputs_and_bad_models():
    model = torch.nn.Linear(3, 100).double()
    with pytest.raises(ValueError, match="D = 100 elements per example, above max_columns=64"):
        kf.exact_ggn_loss(model, torch.randn(2, 3, dtype=D), "bernoulli")
    assert kf.exact_ggn_loss(model, torch.randn(2, 3, dtype=D), "bernoulli",
                             max_columns=100).requires_grad
    with pytest.raises(ValueError, match="non-empty batch"):
        kf.exact_ggn_loss(model, torch.randn(0, 3, dtype=D), "bernoulli")

    class Pooled(torch.nn.Module):  # mixes examples: (m, d) → (1, d)
        def forward(self, x):
            return x.sum(0, keepdim=True)

    with pytest.raises(ValueError, match="expected"):
        kf.exact_ggn_loss(Pooled(), torch.randn(3, 2, dtype=D), "gaussian")


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_curvature_propagation_is_unbiased_for_kfacs_g(likelihood, reduction):
    """KFAC's G from 40 curvature-propagation passes over 3 inputs × 25 replicas converges
    to Σᵢ Jₛ,ᵢᵀ Hᵢᵢ Jₛ,ᵢ (torch.func) within 3 standard errors (SE ≤ 5 % of G); A is the
    inputs' second moment, untouched by the estimator."""
    model = tiny_net(likelihood)
    x = torch.randn(3, 3, dtype=D).repeat(25, 1)
    pc = kf.KFAC(model, damping=1e-3, ema_decay=0.0)
    gs: dict = {0: [], 2: []}
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        fold_in(pc, lambda: kf.curvature_propagation_loss(model(x), likelihood,
                                                          reduction=reduction, generator=gen))
        for index in gs:
            A, G = pc.curvature(model[index]).terms[0]
            gs[index].append(G.clone())
    for index, samples in gs.items():
        check_monte_carlo(torch.stack(samples), layer_g(model, index, x, likelihood, reduction))
    a = torch.cat([x, torch.ones(len(x), 1, dtype=D)], 1)
    torch.testing.assert_close(pc.curvature(model[0]).terms[0][0], a.T @ a / len(x),
                               rtol=1e-13, atol=0)


def test_curvature_propagation_rejects_bad_outputs():
    with pytest.raises(TypeError, match="floating-point"):
        kf.curvature_propagation_loss(torch.zeros(2, 3, dtype=torch.long), "bernoulli")
    with pytest.raises(ValueError, match="NaN or Inf"):
        kf.curvature_propagation_loss(torch.tensor([[float("inf")]]), "gaussian")
    with pytest.raises(ValueError, match="reduction"):
        kf.curvature_propagation_loss(torch.zeros(2, 3), "gaussian", reduction="avg")
