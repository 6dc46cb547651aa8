"""kronfisher.diagnostics: both sides of vᵀF̂v vs vᵀJᵀHJv against dense constructions."""

import math

import pytest
import torch
import torch.nn.functional as F

import kronfisher as kf
from ggn_reference import layer_ggn_of, some_targets, tiny_net
from helpers import vec, vec_batch
from kronfisher.diagnostics import (
    curvature_quadratic_form,
    curvature_scale,
    format_table,
    ggn_quadratic_form,
    random_directions,
    top_eigenvalue,
)

D = torch.float64


def conv_net():
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2)).double()


def fold_in(pc, loss):
    with pc.collect():
        loss().backward()
    assert pc.step()
    pc.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("case", ["bernoulli_mean", "categorical_sum", "quartic", "conv"])
def test_ggn_quadratic_form_matches_dense_jthj(case):
    """⟨Jv, H Jv⟩ by two JVPs equals vec(V)ᵀ (Jᵀ H J) vec(V) with J by jacrev and H by
    torch.func.hessian, for NLLs, a non-NLL loss (Σ out⁴, any loss works) and Conv2d."""
    if case == "conv":
        model, x = conv_net(), torch.randn(4, 2, 4, 4, dtype=D)
        layers = [model[0], model[3]]

        def loss(out):
            return F.mse_loss(out, torch.ones_like(out))
    else:
        lik = "categorical" if case == "categorical_sum" else "bernoulli"
        model, x = tiny_net(lik), torch.randn(5, 3, dtype=D)
        layers = [model[0], model[2]]
        y = some_targets(model(x).detach(), lik)
        if case == "quartic":
            def loss(out):
                return (out**4).sum() / 10
        elif case == "bernoulli_mean":
            def loss(out):
                return F.binary_cross_entropy_with_logits(out, y)
        else:
            def loss(out):
                return F.cross_entropy(out, y, reduction="sum")
    pc = kf.KFAC(model)
    for lay in layers:
        s = next(st for st in pc.layers.values() if st.module is lay)
        d_g = lay.weight.shape[0]
        V = random_directions((d_g, lay.weight[0].numel() + 1), 3,
                              generator=torch.Generator().manual_seed(0), dtype=D)
        got = ggn_quadratic_form(model, x, loss, lay, s.adapter, V)
        dense = layer_ggn_of(model, lay, x, loss)
        v = vec_batch(V)
        torch.testing.assert_close(got, ((dense @ v) * v).sum(0), rtol=1e-10, atol=1e-14)


def test_curvature_side_is_the_dense_kronecker_form():
    """vᵀF̂v = vec(V)ᵀ Σ kron(A_k, G_k) vec(V) (one and two terms), = vᵀ F v for ExactNG."""
    model, x = tiny_net("gaussian"), torch.randn(20, 3, dtype=D)
    V = random_directions((3, 5), 4, generator=torch.Generator().manual_seed(1), dtype=D)
    v = vec_batch(V)
    for cls in (kf.KFAC, kf.Deflation, kf.ExactNG):
        pc = cls(model, ema_decay=0.0)
        fold_in(pc, lambda: kf.sampled_nll(model(x), "gaussian",
                                           generator=torch.Generator().manual_seed(2)))
        curv = pc.curvature(model[2])
        dense = curv if cls is kf.ExactNG else curv.to_dense()
        torch.testing.assert_close(curvature_quadratic_form(curv, V), ((dense @ v) * v).sum(0),
                                   rtol=1e-12, atol=0)
        top = float(torch.linalg.eigvalsh(dense).abs().max())
        rtol = 1e-12 if cls is not kf.Deflation else 1e-8  # two terms: Lanczos
        assert top_eigenvalue(curv, generator=torch.Generator().manual_seed(3)) == (
            pytest.approx(top, rel=rtol))
        pc.remove_hooks()


def test_top_eigenvalue_of_one_term_uses_both_spectrum_ends():
    """An indefinite factor pair: the largest |λ| of A ⊗ G can be λ_min(A) λ_min(G)."""
    A = torch.diag(torch.tensor([-3.0, 1.0], dtype=D))
    G = torch.diag(torch.tensor([-2.0, 0.5], dtype=D))
    assert top_eigenvalue(kf.KroneckerSum([(A, G)])) == 6.0


@pytest.mark.parametrize("likelihood", ["bernoulli", "categorical", "gaussian"])
def test_curvature_scale_is_one_for_the_exact_ggn_and_c_for_the_paper_scaling(likelihood):
    """ExactNG fed by exact_ggn_loss at the objective's reduction: F̂ is the GGN, every
    ratio 1 to 1e-9. The batchmean pass scaled by c = 1/D (what the paper's code does)
    gives every ratio c exactly."""
    model, x = tiny_net(likelihood), torch.randn(6, 3, dtype=D)
    y = some_targets(model(x).detach(), likelihood)
    objective = {
        "bernoulli": lambda out: F.binary_cross_entropy_with_logits(out, y),
        "categorical": lambda out: F.cross_entropy(out, y),
        "gaussian": lambda out: 0.5 * F.mse_loss(out, y),
    }[likelihood]
    c = 1.0 / (2 if likelihood == "categorical" else 3)
    pc = kf.ExactNG(model, damping=1e-3, ema_decay=0.0)
    fold_in(pc, lambda: kf.exact_ggn_loss(model, x, likelihood, reduction="mean"))
    rows = curvature_scale(pc, model, x, objective, n_vectors=3,
                           generator=torch.Generator().manual_seed(0))
    assert [r.layer for r in rows] == ["0", "2"]
    for r in rows:
        assert r.ratios == pytest.approx([1.0] * 3, rel=1e-9)
        top = float(torch.linalg.eigvalsh(pc.curvature(model[int(r.layer)])).max())
        assert r.curvature_top == pytest.approx(top, rel=1e-12)
        assert r.damping_ratio == pytest.approx(1e-3 / top, rel=1e-12)
    fold_in(pc, lambda: kf.exact_ggn_loss(model, x, likelihood) * c)
    for r in curvature_scale(pc, model, x, objective, n_vectors=3):
        assert r.ratios == pytest.approx([c] * 3, rel=1e-9)
        assert r.ratio == pytest.approx(c, rel=1e-9)
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:2] == ["layer", "params"] and len(lines) == 3
    cells = lines[1].split()  # layer, params, means of both forms, ratio, range, λ, λ/λmax
    assert cells[:2] == ["0", str(rows[0].n_params)] and float(cells[4]) == 1.0
    assert float(cells[-1]) == pytest.approx(rows[0].damping_ratio, rel=1e-3)


def test_curvature_scale_needs_curvature_and_valid_options():
    model, x = tiny_net("gaussian"), torch.randn(4, 3, dtype=D)
    pc = kf.KFAC(model)
    with pytest.raises(ValueError, match="layer '0' has no curvature yet"):
        curvature_scale(pc, model, x, lambda out: out.square().sum())
    with pytest.raises(ValueError, match="n_vectors"):
        curvature_scale(pc, model, x, lambda out: out.square().sum(), n_vectors=0)


def test_random_directions_are_unit_and_reproducible():
    a = random_directions((3, 4), 5, generator=torch.Generator().manual_seed(7), dtype=D)
    b = random_directions((3, 4), 5, generator=torch.Generator().manual_seed(7), dtype=D)
    assert torch.equal(a, b) and a.shape == (5, 3, 4)
    torch.testing.assert_close(a.flatten(1).norm(dim=1), torch.ones(5, dtype=D))
    assert math.isclose(float(vec(a[0]).norm()), 1.0, rel_tol=1e-15)
