"""sampled_nll(reduction=...): the curvature collected is the Fisher of that objective."""

import math

import pytest
import torch

import kronfisher as kf
from ggn_reference import (
    LIKELIHOODS,
    REDUCTIONS,
    check_monte_carlo,
    fold_in,
    layer_ggn,
    objective,
    some_targets,
    tiny_net,
)
from kronfisher.losses import averaged_elements, objective_scale

D = torch.float64



def kfac_terms(model, x, likelihood, reduction, seed=3):
    pc = kf.KFAC(model, damping=1e-3, ema_decay=0.0)
    fold_in(pc, lambda: kf.sampled_nll(model(x), likelihood, reduction=reduction,
                                       generator=torch.Generator().manual_seed(seed)))
    pc.remove_hooks()
    return {name: pc.curvature(s.module).terms[0] for name, s in pc.layers.items()}


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_mean_and_sum_scale_kfac_g_by_one_over_d_and_by_m(likelihood):
    model = tiny_net(likelihood)
    x = torch.randn(7, 3, dtype=D)
    out_shape = tuple(model(x).shape)
    d = averaged_elements(out_shape, likelihood)
    assert d == (2 if likelihood == "categorical" else 3)  # positions, not classes
    base = kfac_terms(model, x, likelihood, "batchmean")
    for reduction, c in (("mean", 1.0 / d), ("sum", 7.0)):
        assert objective_scale(out_shape, likelihood, reduction) == c
        got = kfac_terms(model, x, likelihood, reduction)
        for name, (A0, G0) in base.items():
            A, G = got[name]
            assert torch.equal(A, A0)  # inputs only: the reduction does not touch A
            torch.testing.assert_close(G, c * G0, rtol=1e-13, atol=0)
            torch.testing.assert_close(torch.kron(A, G), c * torch.kron(A0, G0), rtol=1e-13,
                                       atol=0)


def test_power_of_four_scales_are_bitwise_exact():
    """D = 4 outputs and m = 16 examples: √c = 1/2 and 4 are exact, so G scales bitwise."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 4)).double()
    x = torch.randn(16, 3, dtype=D)
    base = kfac_terms(model, x, "bernoulli", "batchmean")
    for reduction, c in (("mean", 0.25), ("sum", 16.0)):
        got = kfac_terms(model, x, "bernoulli", reduction)
        for name, (A0, G0) in base.items():
            assert torch.equal(got[name][0], A0)
            assert torch.equal(got[name][1], c * G0)


def test_the_sampled_loss_carries_the_square_root_of_the_scale():
    out = torch.randn(5, 3, 2, dtype=D, requires_grad=True)
    for reduction, c in (("batchmean", 1.0), ("mean", 0.5), ("sum", 5.0)):
        loss = kf.sampled_nll(out, "categorical", reduction=reduction,
                              generator=torch.Generator().manual_seed(0))
        ref = kf.sampled_nll(out, "categorical", generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(loss, math.sqrt(c) * ref, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="unknown reduction 'none'"):
        kf.sampled_nll(out, "categorical", reduction="none")


def test_the_batchmean_objective_is_torchs_sum_over_outputs_over_m():
    """Our c = 1/D matches torch: BCE/CE 'mean' = c × (sum over elements / m)."""
    out = torch.randn(6, 3, 4, dtype=D)
    for likelihood in LIKELIHOODS:
        y = some_targets(out, likelihood)
        bm = objective(likelihood, "batchmean", y)(out)
        for reduction in ("mean", "sum"):
            c = objective_scale(tuple(out.shape), likelihood, reduction)
            torch.testing.assert_close(objective(likelihood, reduction, y)(out), c * bm,
                                       rtol=1e-14, atol=0)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sampled_exact_ng_converges_to_the_objectives_ggn(likelihood, reduction):
    """ExactNG's blocks from 40 independent sampled passes over 3 inputs × 25 replicas
    (3,000 samples per input) against Jᵀ H J from torch.func with H the Hessian of the
    objective at that reduction: within 3 standard errors, the standard error ≤ 5 % of the
    GGN. The paper-style scaling (loss × c, curvature c² F) is then far outside."""
    model = tiny_net(likelihood)
    x = torch.randn(3, 3, dtype=D).repeat(25, 1)
    pc = kf.ExactNG(model, damping=1e-3, ema_decay=0.0)
    layers = [model[0], model[2]]
    blocks: dict = {lay: [] for lay in layers}
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        fold_in(pc, lambda: kf.sampled_nll(model(x), likelihood, reduction=reduction,
                                           generator=gen))
        for lay in layers:
            blocks[lay].append(pc.curvature(lay).clone())
    c = objective_scale(tuple(model(x).shape), likelihood, reduction)
    for lay in layers:
        ggn = layer_ggn(model, lay, x, likelihood, reduction)
        samples = torch.stack(blocks[lay])
        check_monte_carlo(samples, ggn)
        if c != 1.0:  # what scaling the sampled loss by c (not √c) would have collected
            err = float((samples.mean(0) * c - ggn).norm())
            assert err > 0.3 * float(ggn.norm())
