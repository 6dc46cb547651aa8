"""The exactness contract of the preconditioners, checked against torch.func references."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import kronfisher as kf
from helpers import Affine, D, vec
from kronfisher.linalg import FactorInverses, exact_fisher_block, rearrange

CLASSES = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation,
           "kfac_corrected": kf.KFACCorrected, "lanczos": kf.Lanczos}


def mlp(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6, bias=bias), nn.Tanh(), nn.Linear(6, 4, bias=bias),
                         nn.Sigmoid(), nn.Linear(4, 3, bias=bias)).double()


def per_example_loss(out, y):
    return 0.5 * ((out - y) ** 2).sum(-1)


def reference_stats(model, x, y):
    """Per-example (a, g) for each Linear layer: a from a manual forward, g from torch.func."""
    linears = [m for m in model if isinstance(m, nn.Linear)]

    def forward(x1, probes):
        h, ins, k = x1, [], 0
        for mod in model:
            if isinstance(mod, nn.Linear):
                ins.append(h)
                h = mod(h) + probes[k]
                k += 1
            else:
                h = mod(h)
        return h, ins

    probes = [torch.zeros(m.out_features, dtype=D) for m in linears]
    with torch.no_grad():
        _, ins = forward(x, [p[None] for p in probes])
    gs = vmap(grad(lambda p, x1, y1: per_example_loss(forward(x1, p)[0], y1)),
              in_dims=(None, 0, 0))(probes, x, y)
    out = {}
    for m, a, g in zip(linears, ins, gs):
        if m.bias is not None:
            a = torch.cat([a, torch.ones(len(a), 1, dtype=D)], 1)
        out[m] = (a.detach(), g.detach())
    return out


def grad_matrix(m):
    G = m.weight.grad.reshape(m.weight.shape[0], -1)
    return torch.cat([G, m.bias.grad[:, None]], 1) if m.bias is not None else G


def collect_and_step(precond, model, x, y):
    model.zero_grad()
    with precond.collect():
        loss = per_example_loss(model(x), y).mean()
        loss.backward()
    old = {m: grad_matrix(m).clone() for m in model if isinstance(m, nn.Linear)}
    assert precond.step()
    return old


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", list(CLASSES))
def test_exactness_contract_mlp(method, bias):
    model = mlp(bias)
    x, y = torch.randn(32, 5, dtype=D), torch.randn(32, 3, dtype=D)
    lam = 1e-2
    precond = CLASSES[method](model, damping=lam, ema_decay=0.0, cov_update_freq=1,
                              inv_update_freq=1, kl_clip=None)
    ref = reference_stats(model, x, y)
    old = collect_and_step(precond, model, x, y)
    for m, (a, g) in ref.items():
        # the references themselves: per-example gradients g aᵀ = torch.func's
        expect = kf.approximate(a, g, method)
        got = precond.curvature(m)
        assert len(got.terms) == len(expect.terms)
        for (A, G), (Ae, Ge) in zip(got.terms, expect.terms):
            torch.testing.assert_close(A, Ae, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(G, Ge, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grad_matrix(m), got.solve(old[m], lam), rtol=1e-10,
                                   atol=1e-13)
        # and against a dense solve with the approximation's dense form
        dense = got.to_dense(lam)
        torch.testing.assert_close(vec(grad_matrix(m)), torch.linalg.solve(dense, vec(old[m])),
                                   rtol=1e-8, atol=1e-11)


def test_reference_per_example_gradients_are_g_a_transpose():
    model = mlp()
    x, y = torch.randn(8, 5, dtype=D), torch.randn(8, 3, dtype=D)
    ref = reference_stats(model, x, y)
    params = dict(model.named_parameters())
    pg = vmap(grad(lambda p, x1, y1: per_example_loss(functional_call(model, p, (x1,)), y1)),
              in_dims=(None, 0, 0))(params, x, y)
    a, g = ref[model[0]]
    W_i = torch.cat([pg["0.weight"], pg["0.bias"][:, :, None]], 2)
    torch.testing.assert_close(W_i, torch.einsum("ig,ia->iga", g, a))


def test_sum_reduction_gives_same_statistics():
    model = mlp()
    x, y = torch.randn(16, 5, dtype=D), torch.randn(16, 3, dtype=D)
    p1 = kf.KFAC(model, ema_decay=0.0)
    collect_and_step(p1, model, x, y)
    p2 = kf.KFAC(model, ema_decay=0.0)
    model.zero_grad()
    with p2.collect(reduction="sum"):
        per_example_loss(model(x), y).sum().backward()
    p2.step()
    for m in [model[0], model[2]]:
        torch.testing.assert_close(p1.curvature(m).terms[0][1], p2.curvature(m).terms[0][1])


@pytest.mark.parametrize("stride,padding,dilation,bias", [(1, 0, 1, True), (2, 1, 1, False),
                                                          (1, 2, 2, True)])
def test_conv_kpsvd_all_is_best_rank1_of_exact_conv_block(stride, padding, dilation, bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation,
                     bias=bias).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten())
    x = torch.randn(6, 2, 6, 6, dtype=D)
    with torch.no_grad():
        n_out = model(x).shape[1]
    y = torch.randn(6, n_out, dtype=D)
    # exact block from torch.func per-example gradients
    params = dict(model.named_parameters())
    pg = vmap(grad(lambda p, x1, y1: per_example_loss(
        functional_call(model, p, (x1[None],))[0], y1)), in_dims=(None, 0, 0))(params, x, y)
    Wi = pg["0.weight"].reshape(6, 3, -1)
    if bias:
        Wi = torch.cat([Wi, pg["0.bias"][:, :, None]], 2)
    J = torch.stack([vec(w) for w in Wi])
    F = (J.T @ J / 6).detach()
    d_g, d_a = Wi.shape[1], Wi.shape[2]
    s = torch.linalg.svdvals(rearrange(F, d_a, d_g))
    opt = float(s[1:].norm() / F.norm().detach())
    lam = 1e-3
    pc = kf.KPSVD(model, damping=lam, ema_decay=0.0, conv_radius="all")
    model.zero_grad()
    with pc.collect():
        per_example_loss(model(x), y).mean().backward()
    old = torch.cat([conv.weight.grad.reshape(3, -1)] +
                    ([conv.bias.grad[:, None]] if bias else []), 1).clone()
    pc.step()
    ks = pc.curvature(conv)
    err = float((F - ks.to_dense()).norm() / F.norm())
    assert err == pytest.approx(opt, rel=1e-8)
    new = torch.cat([conv.weight.grad.reshape(3, -1)] +
                    ([conv.bias.grad[:, None]] if bias else []), 1)
    torch.testing.assert_close(new, ks.solve(old, lam), rtol=1e-10, atol=1e-13)
    # KFAC on the conv layer is KFC: A from unfolded patches, G averaged over locations
    pk = kf.KFAC(model, ema_decay=0.0)
    model.zero_grad()
    with pk.collect():
        per_example_loss(model(x), y).mean().backward()
    pk.step()
    A, G = pk.curvature(conv).terms[0]
    cols = torch.nn.functional.unfold(x, 3, dilation=dilation, padding=padding, stride=stride)
    if bias:
        cols = torch.cat([cols, torch.ones(6, 1, cols.shape[2], dtype=D)], 1)
    torch.testing.assert_close(A, torch.einsum("iat,ibt->ab", cols, cols) / 6)
    assert torch.equal(G, G.T)


def test_conv_radius_zero_matches_dense_masked_block():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 2, 2).double()
    model = nn.Sequential(conv, nn.Flatten())
    x = torch.randn(5, 2, 4, 4, dtype=D)
    y = torch.randn(5, 18, dtype=D)
    pc = kf.Deflation(model, ema_decay=0.0, conv_radius=0)
    with pc.collect():
        per_example_loss(model(x), y).mean().backward()
    pc.step()
    cols = torch.nn.functional.unfold(x, 2).transpose(1, 2)
    a = torch.cat([cols, torch.ones(5, 9, 1, dtype=D)], 2)
    # output gradients: ∂ℓᵢ/∂s = s − y for a linear model with this loss
    s = conv(x).flatten(2).transpose(1, 2)
    g = (s - y.reshape(5, 2, 9).transpose(1, 2)).detach()
    F = exact_fisher_block(a, g, torch.eye(9, dtype=D))
    sv = torch.linalg.svdvals(rearrange(F, 9, 2))
    err = float((F - pc.curvature(conv).to_dense()).norm() / F.norm())
    assert err == pytest.approx(float(sv[2:].norm() / F.norm()), rel=1e-8)


@pytest.mark.parametrize("block_diagonal", [True, False])
def test_exact_ng_equals_dense_solve_with_per_example_fisher(block_diagonal):
    model = mlp()
    x, y = torch.randn(20, 5, dtype=D), torch.randn(20, 3, dtype=D)
    lam = 1e-2
    pc = kf.ExactNG(model, damping=lam, block_diagonal=block_diagonal, ema_decay=0.0)
    params = dict(model.named_parameters())
    pg = vmap(grad(lambda p, x1, y1: per_example_loss(functional_call(model, p, (x1,)), y1)),
              in_dims=(None, 0, 0))(params, x, y)
    blocks = []
    for i in (0, 2, 4):
        Wi = torch.cat([pg[f"{i}.weight"], pg[f"{i}.bias"][:, :, None]], 2)
        blocks.append(torch.stack([vec(w) for w in Wi]))
    old = collect_and_step(pc, model, x, y)
    olds = [vec(old[model[i]]) for i in (0, 2, 4)]
    if block_diagonal:
        for i, J, g0 in zip((0, 2, 4), blocks, olds):
            F = J.T @ J / 20
            expect = torch.linalg.solve(F + lam * torch.eye(len(F), dtype=D), g0)
            torch.testing.assert_close(vec(grad_matrix(model[i])), expect, rtol=1e-9, atol=1e-12)
    else:
        J = torch.cat(blocks, 1)
        F = J.T @ J / 20
        expect = torch.linalg.solve(F + lam * torch.eye(len(F), dtype=D), torch.cat(olds))
        got = torch.cat([vec(grad_matrix(model[i])) for i in (0, 2, 4)])
        torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-12)


def test_exact_ng_refuses_large_models():
    with pytest.raises(ValueError, match="max_params"):
        kf.ExactNG(nn.Linear(100, 100), max_params=5000)


@pytest.mark.parametrize("method", list(CLASSES) + ["exact"])
def test_state_dict_round_trip_continues_identically(method):
    torch.manual_seed(3)
    model = mlp()
    xs = [torch.randn(16, 5, dtype=D) for _ in range(7)]
    ys = [torch.randn(16, 3, dtype=D) for _ in range(7)]

    def make(m):
        if method == "exact":
            return kf.ExactNG(m, damping=1e-2, block_diagonal=False, inv_update_freq=3)
        return CLASSES[method](m, damping=1e-2, ema_decay=0.9, cov_update_freq=2,
                               inv_update_freq=3, kl_clip=1e-2, lr=0.1)

    def run(m, pc, opt, steps):
        out = []
        for x, y in steps:
            opt.zero_grad()
            with pc.collect():
                per_example_loss(m(x), y).mean().backward()
            pc.step()
            out.append([p.grad.clone() for p in m.parameters()])
            opt.step()
        return out

    pc = make(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run(model, pc, opt, list(zip(xs[:4], ys[:4])))
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
             copy.deepcopy(pc.state_dict()))
    cont = run(model, pc, opt, list(zip(xs[4:], ys[4:])))

    model2 = mlp(seed=99)
    model2.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved[1])
    pc2 = make(model2)
    pc2.load_state_dict(saved[2])
    resumed = run(model2, pc2, opt2, list(zip(xs[4:], ys[4:])))
    for a, b in zip(cont, resumed):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga, gb, rtol=0, atol=0)


def test_nan_gradient_never_reaches_parameters():
    model = mlp()
    pc = kf.KPSVD(model, damping=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(8, 5, dtype=D), torch.randn(8, 3, dtype=D)
    collect_and_step(pc, model, x, y)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    per_example_loss(model(x), y).mean().backward()
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        assert pc.step() is False
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert pc.skipped_steps == 1
    # "raise" mode
    pr = kf.KFAC(model, nonfinite="raise")
    collect_and_step(pr, model, x, y)
    model.zero_grad()
    per_example_loss(model(x), y).mean().backward()
    model[0].bias.grad[0] = float("inf")
    with pytest.raises(kf.NonFiniteError):
        pr.step()


def test_nan_statistics_skip_the_curvature_update():
    model = mlp()
    pc = kf.KFAC(model, damping=1e-2, ema_decay=0.0)
    x, y = torch.randn(8, 5, dtype=D), torch.randn(8, 3, dtype=D)
    collect_and_step(pc, model, x, y)
    A0 = pc.curvature(model[0]).terms[0][0].clone()
    xb = x.clone()
    xb[0, 0] = float("nan")
    model.zero_grad()
    with pc.collect():
        per_example_loss(model(xb), y).mean().backward()
    for m in model:
        if isinstance(m, nn.Linear):  # keep the gradient itself finite for this check
            m.weight.grad = torch.nan_to_num(m.weight.grad)
            m.bias.grad = torch.nan_to_num(m.bias.grad)
    with pytest.warns(RuntimeWarning, match="non-finite curvature statistics"):
        pc.step()
    assert torch.equal(pc.curvature(model[0]).terms[0][0], A0)


def test_unsupported_layers_are_listed_and_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Affine(5), nn.Identity(),
                          nn.Linear(5, 2, bias=False),
                          nn.Conv2d(1, 1, 1, groups=1, padding_mode="reflect"))
    pc = kf.KFAC(model[:4])
    assert set(pc.skipped) == {"1.weight", "1.bias"}
    assert "Affine" in pc.skip_reasons["1.weight"]
    pc2 = kf.KFAC(model)
    assert "4.weight" in pc2.skipped and "padding_mode" in pc2.skip_reasons["4.weight"]
    x = torch.randn(8, 4)
    with pc.collect():
        model[:4](x).square().sum().backward()
    bn_grad = model[1].weight.grad.clone()
    pc.step()
    assert torch.equal(model[1].weight.grad, bn_grad)
    with pytest.raises(kf.layers.UnsupportedLayerError):
        kf.KFAC(nn.Sequential(nn.ReLU()))


def test_step_without_curvature_is_a_clear_error():
    model = mlp()
    pc = kf.KFAC(model)
    x, y = torch.randn(4, 5, dtype=D), torch.zeros(4, 3, dtype=D)
    per_example_loss(model(x), y).mean().backward()
    with pytest.raises(RuntimeError, match="collect"):
        pc.step()


@pytest.mark.parametrize("cls,kind", [(kf.KFAC, "KroneckerSum"), (kf.ExactNG, "dense Tensor")])
def test_curvature_of_the_wrong_kind_is_a_clear_error(cls, kind):
    model = mlp()
    pc = cls(model)
    x, y = torch.randn(4, 5, dtype=D), torch.zeros(4, 3, dtype=D)
    state = next(iter(pc.layers.values()))
    state.curvature = "not a curvature"
    with pc.collect():
        per_example_loss(model(x), y).mean().backward()
    with pytest.raises(TypeError, match=f"must be a {kind}, got str"):
        pc.step()


@pytest.mark.parametrize("method", list(CLASSES))
def test_batch_of_one_works(method):
    model = mlp()
    pc = CLASSES[method](model, damping=1e-2)
    collect_and_step(pc, model, torch.randn(1, 5, dtype=D), torch.randn(1, 3, dtype=D))
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()


def test_cov_update_frequency_and_ema():
    model = mlp()
    pc = kf.KFAC(model, ema_decay=0.5, cov_update_freq=2)
    x1, x2, x3 = (torch.randn(8, 5, dtype=D) for _ in range(3))
    y = torch.randn(8, 3, dtype=D)
    recorded = []
    for x in (x1, x2, x3):
        model.zero_grad()
        with pc.collect() as active:
            per_example_loss(model(x), y).mean().backward()
        recorded.append(active)
        pc.step()
    assert recorded == [True, False, True]
    a1 = torch.cat([x1, torch.ones(8, 1, dtype=D)], 1)
    a3 = torch.cat([x3, torch.ones(8, 1, dtype=D)], 1)
    A = pc.curvature(model[0]).terms[0][0]
    # second update: decay min(1 − 1/2, 0.5) = 0.5
    torch.testing.assert_close(A, 0.5 * a1.T @ a1 / 8 + 0.5 * a3.T @ a3 / 8)


@pytest.mark.parametrize("counter", ["updates", "steps"])
def test_ema_counter_sets_the_decay_of_later_batches(counter):
    """ρ = 0.9, T_cov = 4: the batch of step 4 is the second curvature batch (decay
    min(1 − 1/2, 0.9) = 0.5 when k counts updates) and comes after 4 steps (decay
    min(1 − 1/4, 0.9) = 0.75 when k counts steps, the paper's code); the batch of step 8
    gets min(2/3, 0.9) or min(7/8, 0.9). The first batch is kept as it is either way."""
    model = mlp()
    pc = kf.KFAC(model, ema_decay=0.9, cov_update_freq=4, ema_counter=counter)
    y = torch.randn(8, 3, dtype=D)
    xs = [torch.randn(8, 5, dtype=D) for _ in range(9)]
    for x in xs:
        model.zero_grad()
        with pc.collect():
            per_example_loss(model(x), y).mean().backward()
        pc.step()

    def second_moment(x):
        a = torch.cat([x, torch.ones(8, 1, dtype=D)], 1)
        return a.T @ a / 8

    r1, r2 = (0.5, 2 / 3) if counter == "updates" else (0.75, 0.875)
    expect = second_moment(xs[0])
    expect = r1 * expect + (1 - r1) * second_moment(xs[4])
    expect = r2 * expect + (1 - r2) * second_moment(xs[8])
    torch.testing.assert_close(pc.curvature(model[0]).terms[0][0], expect)
    with pytest.raises(ValueError, match="ema_counter"):
        kf.KFAC(model, ema_counter="epochs")


def test_kl_clip_scales_the_update():
    model = mlp()
    x, y = torch.randn(16, 5, dtype=D), 10 * torch.randn(16, 3, dtype=D)
    pc = kf.KFAC(model, damping=1e-2, ema_decay=0.0)
    old = collect_and_step(pc, model, x, y)
    free = {m: grad_matrix(m).clone() for m in old}
    vg = sum(float((free[m] * old[m]).sum()) for m in old) * 0.1**2
    pc2 = kf.KFAC(model, damping=1e-2, ema_decay=0.0, kl_clip=1e-3, lr=0.1)
    collect_and_step(pc2, model, x, y)
    nu = min(1.0, (1e-3 / vg) ** 0.5)
    assert nu < 1
    for m in old:
        torch.testing.assert_close(grad_matrix(m), nu * free[m], rtol=1e-10, atol=1e-14)


def test_kl_clip_authors_mode_has_no_lr_and_sums_absolute_layer_products():
    model = mlp()
    x, y = torch.randn(16, 5, dtype=D), 10 * torch.randn(16, 3, dtype=D)
    pc = kf.KFAC(model, damping=1e-2, ema_decay=0.0)
    old = collect_and_step(pc, model, x, y)
    free = {m: grad_matrix(m).clone() for m in old}
    dots = [float((free[m] * old[m]).sum()) for m in old]
    kappa = 1e-2 * sum(abs(d) for d in dots)  # clips by a factor 10 in mode "authors"
    pc2 = kf.KFAC(model, damping=1e-2, ema_decay=0.0, kl_clip=kappa, kl_clip_mode="authors")
    collect_and_step(pc2, model, x, y)
    nu = (kappa / sum(abs(d) for d in dots)) ** 0.5
    for m in old:
        torch.testing.assert_close(grad_matrix(m), nu * free[m], rtol=1e-10, atol=1e-14)
    # the lr² convention (lr = 0.1) divides by lr² = 0.01: κ/100 clips as much as κ did
    # above (every dot is positive here, so Σ|d| = Σd); the same κ would not clip at all
    assert all(d > 0 for d in dots)
    pc3 = kf.KFAC(model, damping=1e-2, ema_decay=0.0, kl_clip=kappa / 100, lr=0.1)
    collect_and_step(pc3, model, x, y)
    nu3 = min(1.0, (kappa / 100 / (0.01 * sum(dots))) ** 0.5)
    assert nu3 == pytest.approx(nu) and nu3 < 0.5
    for m in old:
        torch.testing.assert_close(grad_matrix(m), nu3 * free[m], rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="kl_clip_mode"):
        kf.KFAC(model, kl_clip=1e-2, kl_clip_mode="bogus")


@pytest.mark.parametrize("scheme", ["factored_pi1", "authors"])
@pytest.mark.parametrize("method", ["kpsvd", "kfac_corrected"])
def test_preconditioner_uses_its_damping_scheme(method, scheme):
    model = mlp()
    x, y = torch.randn(16, 5, dtype=D), torch.randn(16, 3, dtype=D)
    pc = CLASSES[method](model, damping=3e-2, ema_decay=0.0, damping_scheme=scheme)
    old = collect_and_step(pc, model, x, y)
    for m in old:
        dense = pc.curvature(m).to_dense(3e-2, scheme)
        torch.testing.assert_close(vec(grad_matrix(m)), torch.linalg.solve(dense, vec(old[m])),
                                   rtol=1e-8, atol=1e-12)


def test_sampled_nll_values_and_true_fisher():
    out = torch.randn(4, 3, dtype=D, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    loss = kf.sampled_nll(out, "gaussian", generator=gen)
    gen = torch.Generator().manual_seed(0)
    y = out.detach() + torch.randn(4, 3, generator=gen, dtype=D)
    torch.testing.assert_close(loss, (0.5 * (out - y) ** 2).sum(1).mean())
    # categorical: E[g gᵀ] over sampled labels = diag(p) − p pᵀ (the Fisher w.r.t. logits)
    logits = torch.tensor([[1.0, -0.5, 0.3]], dtype=D).repeat(40000, 1).requires_grad_()
    kf.sampled_nll(logits, "categorical", generator=torch.Generator().manual_seed(1)).backward()
    g = logits.grad * 40000
    p = torch.softmax(logits[0].detach(), 0)
    torch.testing.assert_close(g.T @ g / 40000, torch.diag(p) - torch.outer(p, p), atol=5e-3,
                               rtol=0)
    logits.grad = None
    kf.sampled_nll(logits, "bernoulli", generator=torch.Generator().manual_seed(2)).backward()
    g = logits.grad * 40000
    s = torch.sigmoid(logits[0].detach())
    torch.testing.assert_close(g.T @ g / 40000, torch.diag(s * (1 - s)), atol=5e-3, rtol=0)
    with pytest.raises(ValueError, match="likelihood"):
        kf.sampled_nll(out, "poisson")
    with pytest.raises(ValueError, match="NaN or Inf"):
        kf.sampled_nll(torch.tensor([[0.0, float("nan")]]), "bernoulli")


def test_every_preconditioner_beats_sgd_on_a_small_regression():
    """Ill-conditioned inputs; curvature from sampled targets (true Fisher), 25 steps each."""
    torch.manual_seed(4)
    X = torch.randn(256, 5, dtype=D) * torch.tensor([3.0, 1.0, 0.3, 1.0, 0.1], dtype=D)
    with torch.no_grad():
        Y = 3 * mlp(seed=11)(X) + 0.01 * torch.randn(256, 3, dtype=D)

    def train(make_pc, lr, steps=25):
        model = mlp(seed=5)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        pc = make_pc(model) if make_pc else None
        for _ in range(steps):
            opt.zero_grad()
            if pc:
                with pc.collect():
                    kf.sampled_nll(model(X), "gaussian").backward()
                opt.zero_grad()
            per_example_loss(model(X), Y).mean().backward()
            if pc:
                pc.step()
            opt.step()
        with torch.no_grad():
            return float(per_example_loss(model(X), Y).mean())

    best_sgd = min(train(None, lr) for lr in (0.03, 0.1, 0.3, 1.0, 2.0))
    for name, cls in CLASSES.items():
        loss = train(lambda m, c=cls: c(m, damping=1e-2, ema_decay=0.5), 0.5)
        assert loss < best_sgd, (name, loss, best_sgd)
    loss = train(lambda m: kf.ExactNG(m, damping=1e-2, ema_decay=0.5), 0.5)
    assert loss < best_sgd


def test_remove_hooks_detaches_them_from_the_model():
    """The modules keep no hook of ours (collect/step then raise: test_reliability_steps).

    The forward hook is a global one (nothing on the modules); each registered parameter
    carries one post-accumulate-grad hook until remove_hooks()."""
    from torch.nn.modules.module import _global_forward_hooks

    def ours(pc):
        return [h for h in _global_forward_hooks.values() if getattr(h, "target", None) is pc]

    model = mlp()
    pc = kf.KFAC(model, ema_decay=0.0)
    assert all(not m._forward_hooks for m in model)
    assert len(ours(pc)) == 1
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())
    pc.remove_hooks()
    assert not ours(pc)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    model(torch.randn(4, 5, dtype=D)).sum().backward()  # a plain pass records nothing
    assert all(not s.captures for s in pc.layers.values())


def test_collect_force_records_off_schedule():
    model = mlp()
    pc = kf.KFAC(model, ema_decay=0.0, cov_update_freq=10)
    x1, x2 = torch.randn(8, 5, dtype=D), torch.randn(8, 5, dtype=D)
    y = torch.randn(8, 3, dtype=D)
    collect_and_step(pc, model, x1, y)  # step 0: on schedule
    model.zero_grad()
    with pc.collect() as active:
        per_example_loss(model(x2), y).mean().backward()
    assert not active
    pc.step()
    model.zero_grad()
    with pc.collect(force=True) as active:
        per_example_loss(model(x2), y).mean().backward()
    assert active
    pc.step()
    a2 = torch.cat([x2, torch.ones(8, 1, dtype=D)], 1)
    torch.testing.assert_close(pc.curvature(model[0]).terms[0][0], a2.T @ a2 / 8)


@pytest.mark.parametrize("scheme", ["tikhonov", "factored_pi1"])
def test_damping_change_refactorises_and_other_solves_do_not_interfere(scheme):
    """step() uses the factorisation of the current damping, refreshed when the damping
    changes between scheduled refreshes; solving the curvature with another damping
    elsewhere never changes what step() uses."""
    model = mlp()
    pc = kf.KFAC(model, damping=1e-2, ema_decay=0.0, inv_update_freq=100,
                 damping_scheme=scheme)
    x, y = torch.randn(16, 5, dtype=D), torch.randn(16, 3, dtype=D)
    collect_and_step(pc, model, x, y)
    ks = pc.curvature(model[2])
    if scheme == "factored_pi1":
        assert isinstance(pc.layers["2"].inverse, FactorInverses)
    ks.solve(torch.randn(4, 7, dtype=D), 0.7, scheme)  # a user's solve with another λ
    for lam in (1e-2, 0.3):
        pc.damping = lam
        model.zero_grad()
        per_example_loss(model(x), y).mean().backward()
        g = grad_matrix(model[2]).clone()
        pc.step()
        dense = ks.to_dense(lam, scheme)
        torch.testing.assert_close(vec(grad_matrix(model[2])), torch.linalg.solve(dense, vec(g)),
                                   rtol=1e-9, atol=1e-12)
        assert pc.layers["2"].inverse.damping == lam


def test_singular_factor_is_retried_with_more_damping():
    """Damping 0 and a rank-deficient factor (batch of 2 < layer width): SingularFactorError
    inside, a warning and a retry with damping 1e-8 outside; the step uses that damping."""
    model = mlp()
    pc = kf.KFAC(model, damping=0.0, ema_decay=0.0)
    x, y = torch.randn(2, 5, dtype=D), torch.randn(2, 3, dtype=D)
    model.zero_grad()
    with pc.collect():
        per_example_loss(model(x), y).mean().backward()
    g = grad_matrix(model[0]).clone()
    with pytest.warns(RuntimeWarning, match="retrying with damping 1e-08"):
        assert pc.step()
    fac = pc.layers["0"].inverse
    assert fac.damping == 1e-8
    dense = pc.curvature(model[0]).to_dense(1e-8)
    torch.testing.assert_close(vec(grad_matrix(model[0])), torch.linalg.solve(dense, vec(g)),
                               rtol=1e-6, atol=1e-9)


def test_kfac_corrected_at_input_scale_1e6_is_truthful():
    """Huge inputs (A ~ 1e12 next to a bias entry of 1): the damped first factor is
    ill-conditioned but positive definite, so the step succeeds and solves exactly."""
    model = mlp()
    pc = kf.KFACCorrected(model, damping=1e-2, ema_decay=0.0)
    x, y = 1e6 * torch.randn(32, 5, dtype=D), torch.randn(32, 3, dtype=D)
    old = collect_and_step(pc, model, x, y)
    m = model[0]
    dense = pc.curvature(m).to_dense(1e-2)
    expect = torch.linalg.solve(dense, vec(old[m]))
    torch.testing.assert_close(vec(grad_matrix(m)), expect, rtol=1e-6,
                               atol=1e-9 * float(expect.abs().max()))
