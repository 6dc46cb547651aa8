"""Issue 16, item 4: frozen parameters and non-leaf weights, decided at construction.

A frozen bias never gets a ``.grad``; its layer is preconditioned with the weight-only block
F_WW = (1/m) Σᵢ vec(∇_W ℓᵢ) vec(∇_W ℓᵢ)ᵀ (the principal submatrix of the [W b] block on the
weight's coordinates), each method's optimum of that matrix, checked against torch.func
per-example gradients in float64. A frozen weight with a trainable bias, and old-API
``weight_norm`` / ``spectral_norm`` layers, are listed in ``skipped`` with the reason.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import kronfisher as kf
from helpers import vec
from kronfisher.linalg import rearrange

D = torch.float64
KRON = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation,
        "kfac_corrected": kf.KFACCorrected, "lanczos": kf.Lanczos}
ALL = {**KRON, "exact": kf.ExactNG}
LAM = 1e-2


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)


def data(m=24, seed=1, shape=(5,), out=3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, *shape, generator=gen, dtype=D),
            torch.randn(m, out, generator=gen, dtype=D))


def loss_fn(out, y):
    return (out - y).square().sum(-1).mean()  # ℓᵢ summed over outputs, mean over examples


def one_step(pc, model, x, y):
    """Empirical-Fisher curvature batch of (x, y), then a step on the same gradient."""
    with pc.collect():
        loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert pc.step()
    return raw


def per_example_vec_grads(model, names, x, y):
    """(m, n) rows vec of the per-example gradients of ``names`` ([W b] column order)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_i(sub, xi, yi):
        out = functional_call(model, params | sub, (xi[None],))
        return (out[0] - yi).square().sum()

    g = vmap(grad(loss_i), in_dims=(None, 0, 0))({n: params[n] for n in names}, x, y)
    cols = []
    for n in names:
        t = g[n]
        cols.append(t.reshape(t.shape[0], t.shape[1], -1).mT.reshape(t.shape[0], -1)
                    if t.ndim > 2 else t)
    return torch.cat(cols, 1)


def weight_only_fisher(model, name, x, y):
    J = per_example_vec_grads(model, [f"{name}.weight"], x, y)
    return J.mT @ J / J.shape[0]


def optimum_error(F, d_a, d_g, method, kfac):
    """The smallest ‖F − F̂‖_F / ‖F‖_F the method can reach (Van Loan–Pitsianis)."""
    R = rearrange(F, d_a, d_g)
    if method == "kfac_corrected":
        A, G = kfac
        R = R - vec(A)[:, None] * vec(G)[None, :]
        return float(torch.linalg.svdvals(R)[1:].norm() / F.norm())
    k = 1 if method == "kpsvd" else 2
    return float(torch.linalg.svdvals(R)[k:].norm() / F.norm())


@pytest.mark.parametrize("method", list(ALL))
def test_frozen_bias_gets_no_grad_and_the_weight_only_block_is_preconditioned(method):
    model = mlp()
    model[0].bias.requires_grad_(False)
    pc = ALL[method](model, damping=LAM)
    assert pc.skipped == [] and set(pc.layers) == {"0", "2"}
    x, y = data()
    raw = one_step(pc, model, x, y)
    assert model[0].bias.grad is None  # never a .grad on a frozen parameter
    F = weight_only_fisher(model, "0", x, y)  # (20, 20): W only, no bias column
    # F_WW is the principal submatrix of the [W b] block on the weight's coordinates
    J_wb = per_example_vec_grads(model, ["0.weight", "0.bias"], x, y)
    torch.testing.assert_close(F, (J_wb.mT @ J_wb / len(x))[:20, :20], rtol=1e-12, atol=1e-14)
    c = pc.curvature(model[0])
    if method == "exact":
        torch.testing.assert_close(c, F, rtol=1e-10, atol=1e-13)
        M = c + LAM * torch.eye(20, dtype=D)
    else:
        assert tuple(c.shape) == (4, 5)
        A_k = x.mT @ x / len(x)  # KFAC's A of the weight-only layer: no trailing 1
        g = per_example_vec_grads(model, ["0.bias"], x, y)  # ∂ℓᵢ/∂sᵢ (frozen or not)
        G_k = g.mT @ g / len(x)
        if method == "kfac":
            torch.testing.assert_close(c.to_dense(), torch.kron(A_k, G_k), rtol=1e-10,
                                       atol=1e-13)
        else:
            err = float((F - c.to_dense()).norm() / F.norm())
            assert err == pytest.approx(optimum_error(F, 5, 4, method, (A_k, G_k)), abs=1e-8)
        M = c.factorize(LAM, pc.damping_scheme).to_dense()
    want = torch.linalg.solve(M, vec(raw["0.weight"]))
    torch.testing.assert_close(vec(model[0].weight.grad), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["kfac", "exact"])
def test_conv_with_frozen_bias_uses_the_patches_without_the_one(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(48, 2)).to(D)
    model[0].bias.requires_grad_(False)
    pc = ALL[method](model, damping=LAM)
    x, y = data(m=6, shape=(2, 4, 4), out=2)
    raw = one_step(pc, model, x, y)
    assert model[0].bias.grad is None
    F = weight_only_fisher(model, "0", x, y)  # (54, 54)
    c = pc.curvature(model[0])
    if method == "exact":
        torch.testing.assert_close(c, F, rtol=1e-10, atol=1e-13)
        M = c + LAM * torch.eye(54, dtype=D)
    else:
        cols = torch.nn.functional.unfold(x, 3, padding=1).mT  # (m, T, 18), no 1 column
        A = torch.einsum("mti,mtj->ij", cols, cols) / len(x)  # KFC: (1/m) Σᵢ Σ_t a aᵀ
        s = model[0](x)
        g = torch.autograd.grad((model[1:](s) - y).square().sum(), s)[0].flatten(2)
        G = torch.einsum("mit,mjt->ij", g, g) / (len(x) * 16)  # (1/(mT)) Σᵢ Σ_t g gᵀ
        assert tuple(c.shape) == (3, 18)
        torch.testing.assert_close(c.to_dense(), torch.kron(A, G), rtol=1e-10, atol=1e-13)
        M = c.factorize(LAM, pc.damping_scheme).to_dense()
    want = torch.linalg.solve(M, vec(raw["0.weight"].reshape(3, -1)))
    torch.testing.assert_close(vec(model[0].weight.grad.reshape(3, -1)), want, rtol=1e-9,
                               atol=1e-12)


def test_optimizer_over_trainable_parameters_only_runs_without_a_false_double_step():
    # before: the second iteration raised "step() called again on gradients it already
    # preconditioned" (the frozen biases kept the .grad step() had written)
    model = mlp()
    for i in (0, 2):
        model[i].bias.requires_grad_(False)
    pc = kf.KPSVD(model, damping=LAM)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    biases = [model[i].bias.detach().clone() for i in (0, 2)]
    for it in range(3):
        x, y = data(seed=it)
        with pc.collect():
            loss_fn(model(x), y).backward()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and no "left as they are" warning either
            assert pc.step()
        opt.step()
    for i, b in zip((0, 2), biases):
        assert model[i].bias.grad is None and torch.equal(model[i].bias, b)


def test_sgd_over_all_parameters_never_moves_a_frozen_bias():
    model = mlp()
    model[0].bias.requires_grad_(False)
    b0 = model[0].bias.detach().clone()
    pc = kf.KFAC(model, damping=LAM)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for it in range(3):
        x, y = data(seed=it)
        with pc.collect():
            loss_fn(model(x), y).backward()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        assert pc.step()
        opt.step()
    assert torch.equal(model[0].bias, b0)


def test_frozen_weight_with_trainable_bias_is_listed_and_keeps_its_raw_gradient():
    model = mlp()
    model[0].weight.requires_grad_(False)
    pc = kf.KFAC(model, damping=LAM)
    assert list(pc.layers) == ["2"] and pc.skipped == ["0.bias"]
    assert "weight is frozen" in pc.skip_reasons["0.bias"]
    raw = one_step(pc, model, *data())
    assert torch.equal(model[0].bias.grad, raw["0.bias"]) and model[0].weight.grad is None
    assert not torch.equal(model[2].weight.grad, raw["2.weight"])


def test_fully_frozen_layer_is_neither_registered_nor_listed():
    model = mlp()
    model[0].requires_grad_(False)
    pc = kf.Lanczos(model, damping=LAM)
    assert list(pc.layers) == ["2"] and pc.skipped == []
    one_step(pc, model, *data())
    assert model[0].weight.grad is None and model[0].bias.grad is None


@pytest.mark.parametrize("change", ["freeze_bias", "freeze_weight", "unfreeze_bias"])
def test_freezing_or_unfreezing_after_construction_raises_before_writing(change):
    model = mlp()
    if change == "unfreeze_bias":
        model[0].bias.requires_grad_(False)
    pc = kf.KFAC(model, damping=LAM)
    x, y = data()
    one_step(pc, model, x, y)
    param = {"freeze_bias": model[0].bias, "freeze_weight": model[0].weight,
             "unfreeze_bias": model[0].bias}[change]
    param.requires_grad_(change == "unfreeze_bias")
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    name = "0.weight" if change == "freeze_weight" else "0.bias"
    with pytest.raises(RuntimeError, match=rf"\['{name}'\] were frozen or unfrozen"):
        pc.step()
    after = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)


def _old_api(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated
        lin = nn.Linear(4, 3).to(D)
        if kind == "weight_norm":
            return nn.utils.weight_norm(lin), ["bias", "weight_g", "weight_v"]
        return nn.utils.spectral_norm(lin), ["bias", "weight_orig"]


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
@pytest.mark.parametrize("method", ["kpsvd", "exact"])
def test_non_leaf_weights_are_skipped_with_the_reason_at_construction(kind, method):
    torch.manual_seed(0)
    layer, own = _old_api(kind)
    model = nn.Sequential(nn.Linear(5, 4).to(D), nn.Tanh(), layer)
    pc = ALL[method](model, damping=LAM)
    assert list(pc.layers) == ["0"]
    assert sorted(pc.skipped) == sorted(f"2.{n}" for n in own)
    assert all("not a leaf nn.Parameter" in pc.skip_reasons[f"2.{n}"] for n in own)
    raw = one_step(pc, model, *data())
    for n in own:  # the skipped parameters keep their raw gradients
        assert torch.equal(dict(model.named_parameters())[f"2.{n}"].grad, raw[f"2.{n}"])
