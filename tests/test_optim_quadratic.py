"""kronfisher.optim.quadratic: the small solve, GGN products by JVP, q, curvature products."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

import kronfisher as kf
from helpers import Affine, D, spd, vec
from kronfisher.optim import QuadraticModel, approx_curvature_form, ggn_gram, layer_matrix
from kronfisher.optim import solve_model as solve


def dense_model(C, g, V):
    return QuadraticModel(curvature=V.T @ C @ V, gram=V.T @ V, grad=V.T @ g)


def span_minimiser(C, g, V, d):
    """argmin_c f(Vc) of the dense quadratic f(δ) = ∇ᵀδ + ½ δᵀ(C + dI)δ, from the gradient
    and Hessian of c ↦ f(Vc) by autodiff (Newton's step from 0 is exact for a quadratic)."""
    M = C + d * torch.eye(C.shape[0], dtype=D)
    f = lambda c: g @ (V @ c) + 0.5 * (V @ c) @ M @ (V @ c)
    c0 = torch.zeros(V.shape[1], dtype=D)
    return -torch.linalg.solve(hessian(f)(c0), grad(f)(c0))


@pytest.mark.parametrize("d", [0.0, 0.3])
def test_two_by_two_solve_is_the_dense_minimiser_over_the_span(d):
    n = 9
    gen = torch.Generator().manual_seed(2)
    B = torch.randn(n, n - 2, generator=gen, dtype=D)
    C = B @ B.T  # PSD and singular, like a GGN from fewer outputs than parameters
    g = torch.randn(n, generator=gen, dtype=D)
    V = torch.randn(n, 2, generator=gen, dtype=D)
    sol = solve(dense_model(C, g, V), d, rtol=1e-14)
    c = torch.tensor([-sol.alpha, sol.momentum], dtype=D)
    c_ref = span_minimiser(C, g, V, d)
    torch.testing.assert_close(c, c_ref, rtol=1e-10, atol=0)
    M = C + d * torch.eye(n, dtype=D)
    # first-order optimality of the span problem, and q = f(Vc) of the dense quadratic
    torch.testing.assert_close(V.T @ (M @ (V @ c) + g), torch.zeros(2, dtype=D), atol=1e-10,
                               rtol=0)
    delta = V @ c
    assert sol.q == pytest.approx(float(g @ delta + 0.5 * delta @ M @ delta), rel=1e-12)
    assert sol.q < 0 and not sol.fallback


def test_one_by_one_and_fixed_momentum_solves():
    n = 6
    C = spd(n, seed=3)
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(n, generator=gen, dtype=D)
    V = torch.randn(n, 2, generator=gen, dtype=D)
    d = 0.2
    M = C + d * torch.eye(n, dtype=D)
    sol1 = solve(dense_model(C, g, V[:, :1]), d)
    c_ref = span_minimiser(C, g, V[:, :1], d)
    assert -sol1.alpha == pytest.approx(float(c_ref[0]), rel=1e-10)
    assert sol1.momentum == 0.0
    # μ fixed: the best α along Δ given μ δ_prev (1-D minimiser by a dense line search)
    mu = 0.7
    sol = solve(dense_model(C, g, V), d, momentum=mu)
    base = mu * V[:, 1]
    c0 = -float(V[:, 0] @ (M @ base + g)) / float(V[:, 0] @ M @ V[:, 0])
    assert -sol.alpha == pytest.approx(c0, rel=1e-12)
    assert sol.momentum == mu
    delta = -sol.alpha * V[:, 0] + base
    assert sol.q == pytest.approx(float(g @ delta + 0.5 * delta @ M @ delta), rel=1e-12)


def test_singular_two_by_two_falls_back_and_bad_one_by_one_fails():
    n = 5
    C = spd(n, seed=5)
    g = torch.randn(n, dtype=D)
    v = torch.randn(n, dtype=D)
    V = torch.stack([v, 3.0 * v], 1)  # δ_prev parallel to Δ: the 2×2 is singular
    sol = solve(dense_model(C, g, V), 0.1)
    assert sol.fallback and sol.momentum == 0.0
    assert -sol.alpha == pytest.approx(float(span_minimiser(C, g, V[:, :1], 0.1)[0]), rel=1e-10)
    nan_model = QuadraticModel(curvature=torch.full((2, 2), math.nan, dtype=D),
                               gram=torch.eye(2, dtype=D), grad=torch.ones(2, dtype=D))
    assert solve(nan_model, 0.1) is None
    zero = QuadraticModel(curvature=torch.zeros(1, 1, dtype=D), gram=torch.zeros(1, 1, dtype=D),
                          grad=torch.ones(1, dtype=D))
    assert solve(zero, 0.1) is None  # no curvature along a non-zero gradient: no minimiser


def test_directions_of_very_different_lengths_are_not_singular():
    """Δ ~ 1/λ at a small λ and a short δ_prev: the unscaled 2×2 has an eigenvalue ratio
    ~1e-18, but the directions are far from parallel, so the 2×2 must be solved."""
    n = 6
    C = spd(n, seed=6)
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(n, generator=gen, dtype=D)
    V = torch.randn(n, 2, generator=gen, dtype=D) * torch.tensor([1e6, 1e-3], dtype=D)
    sol = solve(dense_model(C, g, V), 0.1)  # default rtol: float32's
    assert not sol.fallback
    c = torch.tensor([-sol.alpha, sol.momentum], dtype=D)
    torch.testing.assert_close(c, span_minimiser(C, g, V, 0.1), rtol=1e-9, atol=0)


def kkt_gradient(C, g, V, d, c):
    """∂/∂c of the dense span quadratic f(Vc) = ∇ᵀVc + ½ cᵀVᵀ(C + dI)Vc, by autodiff."""
    M = C + d * torch.eye(C.shape[0], dtype=D)
    return grad(lambda c: g @ (V @ c) + 0.5 * (V @ c) @ M @ (V @ c))(c)


def test_momentum_range_gives_the_constrained_minimiser():
    """lo ≤ μ ≤ hi: inside, the free solution; outside, the Karush–Kuhn–Tucker point of the
    convex span quadratic — ∂f/∂c₀ = 0 and ∂f/∂μ pointing out of the interval at the bound
    (which, f being convex, is the constrained minimiser)."""
    n, d = 8, 0.2
    C = spd(n, seed=11)
    gen = torch.Generator().manual_seed(12)
    g = torch.randn(n, generator=gen, dtype=D)
    V = torch.randn(n, 2, generator=gen, dtype=D)
    model = dense_model(C, g, V)
    free = solve(model, d, rtol=1e-14)
    inside = solve(model, d, momentum_range=(free.momentum - 1, free.momentum + 1), rtol=1e-14)
    assert inside == free
    for lo, hi, at in [(free.momentum + 0.3, free.momentum + 2, "lo"),
                       (free.momentum - 2, free.momentum - 0.3, "hi")]:
        sol = solve(model, d, momentum_range=(lo, hi), rtol=1e-14)
        assert sol.momentum == (lo if at == "lo" else hi) and not sol.fallback
        c = torch.tensor([-sol.alpha, sol.momentum], dtype=D)
        dc = kkt_gradient(C, g, V, d, c)
        assert abs(float(dc[0])) < 1e-10 * float(dc.abs().max())
        assert (float(dc[1]) > 0) if at == "lo" else (float(dc[1]) < 0)
        delta = V @ c
        M = C + d * torch.eye(n, dtype=D)
        assert sol.q == pytest.approx(float(g @ delta + 0.5 * delta @ M @ delta), rel=1e-12)
        assert sol.q > free.q  # the constraint costs model decrease
    v = torch.randn(n, generator=gen, dtype=D)
    parallel = dense_model(C, g, torch.stack([v, 3.0 * v], 1))  # singular: the 1×1 fallback
    sol = solve(parallel, d, momentum_range=(0.25, 0.5))
    assert sol.fallback and sol.momentum == 0.25
    with pytest.raises(ValueError, match="lo <= hi"):
        solve(model, d, momentum_range=(1.0, 0.0))


def tiny_mlp(out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).double()


def dense_ggn(model, x, loss_fn):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflatten(t):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            out[n] = t[i:i + k].reshape(s)
            i += k
        return out

    f = lambda t: functional_call(model, unflatten(t), (x,)).reshape(-1)
    out = f(theta)
    J = jacrev(f)(theta)
    shape = functional_call(model, unflatten(theta), (x,)).shape
    H = hessian(lambda o: loss_fn(o.reshape(shape)))(out)
    return J.T @ H @ J, unflatten


LOSSES = {
    "bernoulli_bce_mean": (3, lambda y: lambda o: F.binary_cross_entropy_with_logits(o, y)),
    "gaussian_mse": (3, lambda y: lambda o: F.mse_loss(o, y)),
    "cross_entropy": (4, lambda y: lambda o: F.cross_entropy(o, y)),
}


def loss_problem(loss, n, gen):
    """(tiny_mlp, inputs (n, 4), loss_fn) for one of LOSSES, targets of the right kind."""
    out_dim, make = LOSSES[loss]
    model = tiny_mlp(out_dim)
    x = torch.randn(n, 4, generator=gen, dtype=D)
    if loss == "cross_entropy":
        y = torch.randint(0, out_dim, (n,), generator=gen)
    elif loss == "bernoulli_bce_mean":
        y = torch.rand(n, out_dim, generator=gen, dtype=D).round()
    else:
        y = torch.randn(n, out_dim, generator=gen, dtype=D)
    return model, x, make(y)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_ggn_gram_by_jvp_equals_dense_jt_h_j(loss):
    gen = torch.Generator().manual_seed(7)
    model, x, loss_fn = loss_problem(loss, 6, gen)
    C, unflatten = dense_ggn(model, x, loss_fn)
    P = C.shape[0]
    params = dict(model.named_parameters())
    # every basis direction: the Gram matrix is the whole GGN
    basis = [unflatten(e) for e in torch.eye(P, dtype=D)]
    gram = ggn_gram(model, params, x, loss_fn, basis)
    torch.testing.assert_close(gram.curvature, C, rtol=1e-10, atol=1e-13)
    V = torch.randn(P, 2, generator=gen, dtype=D)
    gram2 = ggn_gram(model, params, x, loss_fn, [unflatten(V[:, 0]), unflatten(V[:, 1])])
    torch.testing.assert_close(gram2.curvature, V.T @ C @ V, rtol=1e-10, atol=1e-13)
    assert gram2.loss == pytest.approx(float(loss_fn(model(x)).detach()), rel=1e-14)
    model.zero_grad()
    loss_fn(model(x)).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(gram2.grad, V.T @ g, rtol=1e-12, atol=1e-15)


def true_and_model_change(model, x, loss_fn, eta, direction, t):
    params = dict(model.named_parameters())
    theta = {n: p.detach().clone() for n, p in params.items()}
    loss = lambda th: float(loss_fn(functional_call(model, th, (x,)))) + 0.5 * eta * sum(
        float((v * v).sum()) for v in th.values())
    model.zero_grad()
    loss_fn(model(x)).backward()
    grads = {n: p.grad + eta * p.detach() for n, p in params.items()}
    delta = {n: t * v for n, v in direction.items()}
    gram = ggn_gram(model, params, x, loss_fn, [delta])
    qm = QuadraticModel(curvature=gram.curvature,
                        gram=torch.tensor([[sum(float((d * d).sum()) for d in delta.values())]],
                                          dtype=D),
                        grad=torch.tensor([sum(float((delta[n] * grads[n]).sum())
                                               for n in delta)], dtype=D))
    q = qm.value([1.0], eta)  # the l2 term is part of the loss: damping λ = 0 here
    moved = {n: theta[n] + delta[n] for n in theta}
    return loss(moved) - loss(theta), q


def test_quadratic_model_predicts_the_change_to_third_order_at_zero_residual():
    """At zero residual the GGN is the Hessian: |ΔL − q| = O(t³) (÷8 when t halves)."""
    model = tiny_mlp()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(10, 4, generator=gen, dtype=D)
    with torch.no_grad():
        y = model(x).clone()
    loss_fn = lambda o: 0.5 * ((o - y) ** 2).sum(1).mean()
    direction = {n: torch.randn(p.shape, generator=gen, dtype=D)
                 for n, p in model.named_parameters()}
    errs = []
    for t in (1e-2, 5e-3):
        change, q = true_and_model_change(model, x, loss_fn, 0.3, direction, t)
        errs.append(abs(change - q))
        assert abs(change - q) < 1e-2 * abs(change)
    assert 6.0 < errs[0] / errs[1] < 10.0


def test_quadratic_model_relative_error_vanishes_with_the_step():
    """Away from zero residual (GGN ≠ Hessian) the relative error is O(t): ÷2 when t halves."""
    model = tiny_mlp()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(10, 4, generator=gen, dtype=D)
    y = torch.rand(10, 3, generator=gen, dtype=D).round()
    loss_fn = lambda o: F.binary_cross_entropy_with_logits(o, y, reduction="none").sum(1).mean()
    direction = {n: torch.randn(p.shape, generator=gen, dtype=D)
                 for n, p in model.named_parameters()}
    rel = []
    for t in (1e-3, 5e-4):
        change, q = true_and_model_change(model, x, loss_fn, 0.0, direction, t)
        rel.append(abs(change - q) / abs(change))
    assert rel[0] < 1e-2
    assert 1.6 < rel[0] / rel[1] < 2.5


def collected(pc, model, x, likelihood="gaussian"):
    with pc.collect():
        kf.sampled_nll(model(x), likelihood).backward()
    model.zero_grad()
    out = model(x)
    (0.5 * (out ** 2).sum(1).mean() + out.sum()).backward()
    grads = {n: s.adapter.grad_matrix().clone() for n, s in pc.layers.items()}
    assert pc.step()
    return grads


PRECONDITIONERS = {
    "kfac_factored": lambda m: kf.KFAC(m, damping=0.1, damping_scheme="factored"),
    "kfac_tikhonov": lambda m: kf.KFAC(m, damping=0.1),
    "kpsvd": lambda m: kf.KPSVD(m, damping=0.1),
    "deflation": lambda m: kf.Deflation(m, damping=0.1),
    "kfac_corrected": lambda m: kf.KFACCorrected(m, damping=0.1, damping_scheme="authors"),
    "exact_block": lambda m: kf.ExactNG(m, damping=0.1),
    "exact_full": lambda m: kf.ExactNG(m, damping=0.1, block_diagonal=False),
}


@pytest.mark.parametrize("name", list(PRECONDITIONERS))
def test_curvature_product_is_what_the_solve_inverts(name):
    model = tiny_mlp()
    pc = PRECONDITIONERS[name](model)
    x = torch.randn(12, 4, dtype=D)
    grads = collected(pc, model, x)
    deltas = {n: s.adapter.grad_matrix() for n, s in pc.layers.items()}
    back = pc.curvature_product(deltas)  # M Δ = ∇: M is what step() inverted
    for n in grads:
        torch.testing.assert_close(back[n], grads[n], rtol=1e-9, atol=1e-12)
    if not name.startswith("exact"):
        V = torch.randn_like(grads["0"])
        dense = pc.layers["0"].inverse.to_dense()
        torch.testing.assert_close(vec(pc.curvature_product({"0": V})["0"]), dense @ vec(V),
                                   rtol=1e-10, atol=1e-12)
    with pytest.raises(KeyError, match="not a registered layer"):
        pc.curvature_product({"1": grads["0"]})
    with pytest.raises(ValueError, match="shape"):
        pc.curvature_product({"0": grads["0"][:, :-1]})


def test_curvature_product_before_any_step_is_a_clear_error():
    model = tiny_mlp()
    pc = kf.KFAC(model)
    with pytest.raises(RuntimeError, match="no factorisation yet"):
        pc.curvature_product({"0": torch.zeros(5, 5, dtype=D)})


def test_layer_matrix_matches_the_adapters_gradient_matrix():
    conv = nn.Conv2d(2, 3, 3).double()
    for module in (nn.Linear(4, 3).double(), nn.Linear(4, 3, bias=False).double(), conv):
        ps = list(module.parameters())
        for p in ps:
            p.grad = torch.randn_like(p)
        model = nn.Sequential(module)
        pc = kf.KFAC(model)
        s = pc.layers["0"]
        torch.testing.assert_close(layer_matrix([p.grad for p in s.adapter.params()]),
                                   s.adapter.grad_matrix(), rtol=0, atol=0)


def test_approx_form_uses_the_layer_curvature_and_damping_elsewhere():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), Affine(5), nn.Tanh(), nn.Linear(5, 3)).double()
    pc = kf.KFAC(model, damping=0.2, damping_scheme="factored")
    assert "1.weight" in " ".join(pc.skipped)
    collected(pc, model, torch.randn(12, 4, dtype=D))
    names = {id(p): n for n, p in model.named_parameters()}
    delta = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    expected = 0.0
    for lname in ("0", "3"):
        V = layer_matrix([delta[f"{lname}.weight"], delta[f"{lname}.bias"]])
        expected += float(vec(V) @ pc.layers[lname].inverse.to_dense() @ vec(V))
    expected += 0.7 * float((delta["1.weight"] ** 2).sum() + (delta["1.bias"] ** 2).sum())
    assert approx_curvature_form(pc, names, delta, 0.7) == pytest.approx(expected, rel=1e-12)
