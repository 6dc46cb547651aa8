"""Linear layers with weight sharing: inputs (B, …, d_in) and modules called twice.

References are dense, in float64: per-example gradients by torch.func, per-position
output gradients by autograd, the three matrices of the issue formed with torch.kron and
each method's optimum by torch.linalg.svd of the rearranged matrix.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import kronfisher as kf
from helpers import D, vec
from kronfisher.layers import UnsupportedLayerError
from kronfisher.linalg import rearrange
from kronfisher.preconditioner.kronecker import KroneckerPreconditioner

MODES = ("expand", "reduce", "exact")
METHODS = ("kfac", "kpsvd", "deflation", "kfac_corrected", "lanczos")
RTOL = 1e-8


def unrearrange(R, d_a, d_g):
    """The inverse of ``rearrange``: the dense (d_a·d_g)² matrix of R."""
    return R.reshape(d_a, d_a, d_g, d_g).permute(1, 3, 0, 2).reshape(d_a * d_g, d_a * d_g)


def best_rank(F, d_a, d_g, k):
    """The best sum of k Kronecker products to F (Frobenius), by SVD of R(F)."""
    U, s, Vh = torch.linalg.svd(rearrange(F, d_a, d_g))
    return unrearrange((U[:, :k] * s[:k]) @ Vh[:k], d_a, d_g)


def optimum(method, F, A, G):
    """The method's matrix for F, with KFAC's factors A, G."""
    d_a, d_g = A.shape[0], G.shape[0]
    kfac = torch.kron(A, G)
    if method == "kfac":
        return kfac
    if method == "kfac_corrected":
        return kfac + best_rank(F - kfac, d_a, d_g, 1)
    return best_rank(F, d_a, d_g, 1 if method == "kpsvd" else 2)


def rel(X, Y):
    return float((X - Y).norm() / Y.norm())


class Reference:
    """The issue's matrices from tokens a (B, S, d_a), g (B, S, d_g) and the exact block."""

    def __init__(self, a, g, per_example):
        B, S = a.shape[:2]
        # the references agree: Σ_s g aᵀ is torch.func's per-example gradient [∇W ∇b]
        torch.testing.assert_close(torch.einsum("bsg,bsa->bga", g, a), per_example,
                                   rtol=1e-12, atol=1e-12)
        J = torch.stack([vec(t) for t in per_example])
        self.exact = J.T @ J / B
        self.expand = sum(torch.kron(torch.outer(a[b, s], a[b, s]), torch.outer(g[b, s], g[b, s]))
                          for b in range(B) for s in range(S)) / B
        abar, ghat = a.mean(1), g.sum(1)
        self.reduce = sum(torch.kron(torch.outer(abar[b], abar[b]), torch.outer(ghat[b], ghat[b]))
                          for b in range(B)) / B
        tok_a, tok_g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        self.kfac = {"expand": (tok_a.T @ tok_a / (B * S), tok_g.T @ tok_g / B),
                     "reduce": (abar.T @ abar / B, ghat.T @ ghat / B)}
        self.kfac["exact"] = self.kfac["expand"]

    def matrix(self, mode):
        return getattr(self, mode)


def shared_problem(shape, seed=0):
    """A Linear(3, 2) + tanh on inputs ``shape`` (B, …, 3), squared error summed per example."""
    torch.manual_seed(seed)
    lin = nn.Linear(3, 2).double()
    model = nn.Sequential(lin, nn.Tanh())
    x = torch.randn(*shape, dtype=D)
    y = torch.randn(*shape[:-1], 2, dtype=D)

    def loss_b(out, y1):  # ℓ_b: summed over positions and outputs
        return 0.5 * (out - y1).square().sum()

    params = {k: v.detach() for k, v in model.named_parameters()}
    pg = vmap(grad(lambda p, x1, y1: loss_b(functional_call(model, p, (x1[None],))[0], y1)),
              in_dims=(None, 0, 0))(params, x, y)
    per_example = torch.cat([pg["0.weight"], pg["0.bias"][..., None]], -1)
    z = (x @ lin.weight.T + lin.bias).detach().requires_grad_()
    (gz,) = torch.autograd.grad(sum(loss_b(torch.tanh(z[b]), y[b]) for b in range(len(x))), z)
    B = shape[0]
    a = torch.cat([x, torch.ones(*shape[:-1], 1, dtype=D)], -1).reshape(B, -1, 4)
    ref = Reference(a, gz.reshape(B, -1, 2), per_example)

    def run(pc):
        model.zero_grad()
        with pc.collect():
            torch.stack([loss_b(o, t) for o, t in zip(model(x), y)]).mean().backward()
        return pc

    return model, lin, ref, run


@pytest.mark.parametrize("shape", [(5, 4, 3), (4, 2, 3, 3)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_curvature_is_the_methods_optimum_of_the_modes_matrix(shape, mode, method):
    model, lin, ref, run = shared_problem(shape)
    pc = run(KroneckerPreconditioner(model, method=method, weight_sharing=mode,
                                     ema_decay=0.0, damping=1e-3))
    old = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).clone()
    pc.step()
    ks = pc.curvature(lin)
    A, G = ref.kfac[mode]
    want = optimum(method, ref.matrix(mode), A, G)
    assert rel(ks.to_dense(), want) <= RTOL
    if method in ("kfac", "kfac_corrected"):  # the factor split, not only the product
        torch.testing.assert_close(ks.terms[0][0], A, rtol=1e-12, atol=0)
        torch.testing.assert_close(ks.terms[0][1], G, rtol=1e-12, atol=0)
    # step() wrote the solve of the layer's own curvature
    new = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
    torch.testing.assert_close(new, ks.solve(old, 1e-3), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("shape", [(5, 4, 3), (4, 2, 3, 3)])
def test_exact_ng_block_is_the_per_example_gradients_block(shape):
    model, lin, ref, run = shared_problem(shape)
    pc = run(kf.ExactNG(model, ema_decay=0.0))
    pc.step()
    assert rel(pc.curvature(lin), ref.exact) <= 1e-12


def test_the_three_modes_differ_and_agree_on_one_position():
    _, _, ref, _ = shared_problem((5, 4, 3))
    assert rel(ref.expand, ref.exact) > 0.05 and rel(ref.reduce, ref.exact) > 0.05
    # a 2-D input: one position; every mode gives today's curvature
    model2, lin2, ref2, run2 = shared_problem((6, 3))
    dense = []
    for mode in MODES:
        pc = run2(kf.KPSVD(model2, weight_sharing=mode, ema_decay=0.0))
        pc.step()
        dense.append(pc.curvature(lin2).to_dense())
    assert torch.equal(dense[0], dense[1]) and torch.equal(dense[0], dense[2])
    assert rel(dense[0], optimum("kpsvd", ref2.exact, *ref2.kfac["expand"])) <= RTOL


class Twice(nn.Module):
    """One Linear(3, 3) called twice in one forward: out = lin(tanh(lin(x)))."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def twice_problem(B=6, seed=1):
    torch.manual_seed(seed)
    model = Twice().double()
    x, y = torch.randn(B, 3, dtype=D), torch.randn(B, 3, dtype=D)
    W, b = model.lin.weight.detach(), model.lin.bias.detach()

    def loss_b(out, y1):
        return 0.5 * (out - y1).square().sum(-1)

    params = {k: v.detach() for k, v in model.named_parameters()}
    pg = vmap(grad(lambda p, x1, y1: loss_b(functional_call(model, p, (x1[None],))[0], y1)),
              in_dims=(None, 0, 0))(params, x, y)
    per_example = torch.cat([pg["lin.weight"], pg["lin.bias"][..., None]], -1)
    z1 = (x @ W.T + b).requires_grad_()
    h = torch.tanh(z1)
    z2 = h @ W.T + b
    g1, g2 = torch.autograd.grad(loss_b(z2, y).sum(), (z1, z2))
    ones = torch.ones(B, 1, dtype=D)
    a = torch.stack([torch.cat([x, ones], 1), torch.cat([h.detach(), ones], 1)], 1)
    ref = Reference(a, torch.stack([g1, g2], 1), per_example)
    return model, x, y, loss_b, ref


def test_module_called_twice_is_weight_sharing_not_more_examples():
    model, x, y, loss_b, ref = twice_problem()
    for pc in (kf.ExactNG(model, ema_decay=0.0),
               kf.KPSVD(model, weight_sharing="exact", ema_decay=0.0),
               kf.KFAC(model, ema_decay=0.0)):
        model.zero_grad()
        with pc.collect():
            loss_b(model(x), y).mean().backward()
        pc.step()
        c = pc.curvature(model.lin)
        if isinstance(pc, kf.ExactNG):
            assert rel(c, ref.exact) <= 1e-12
        elif isinstance(pc, kf.KPSVD):
            assert rel(c.to_dense(), optimum("kpsvd", ref.exact, *ref.kfac["exact"])) <= RTOL
        else:
            A, G = ref.kfac["expand"]  # A over both calls / (2B), G / B
            torch.testing.assert_close(c.terms[0][0], A, rtol=1e-12, atol=0)
            torch.testing.assert_close(c.terms[0][1], G, rtol=1e-12, atol=0)


def test_two_forwards_in_one_collect_are_two_micro_batches_of_examples():
    model, x, y, loss_b, _ = twice_problem(B=8)
    whole = kf.ExactNG(model, ema_decay=0.0)
    with whole.collect():
        loss_b(model(x), y).mean().backward()
    whole.step()
    parts = kf.ExactNG(model, ema_decay=0.0)
    model.zero_grad()
    with parts.collect(batch_size=8):
        for sl in (slice(0, 3), slice(3, 8)):
            (loss_b(model(x[sl]), y[sl]).sum() / 8).backward()
    parts.step()
    torch.testing.assert_close(parts.curvature(model.lin), whole.curvature(model.lin),
                               rtol=1e-12, atol=1e-14)


def test_two_backwards_through_one_forward_pair_each_call_with_its_own_backward():
    model, x, y, loss_b, _ = twice_problem(B=5)
    y2 = torch.randn_like(y)
    pc = kf.ExactNG(model, ema_decay=0.0)
    with pc.collect():
        out = model(x)
        loss_b(out, y).mean().backward(retain_graph=True)
        loss_b(out, y2).mean().backward()
    pc.step()
    ref = kf.ExactNG(model, ema_decay=0.0)  # the batch repeated with each backward's targets
    with ref.collect():
        loss_b(model(torch.cat([x, x])), torch.cat([y, y2])).mean().backward()
    ref.step()
    torch.testing.assert_close(pc.curvature(model.lin), ref.curvature(model.lin),
                               rtol=1e-12, atol=1e-14)


def test_conv_called_twice_in_one_forward_is_refused_naming_it():
    class ConvTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.tanh(self.conv(x)))

    model = ConvTwice().double()
    pc = kf.KFAC(model)
    with pytest.raises(UnsupportedLayerError, match="layer 'conv' .*called more than once"):
        with pc.collect():
            model(torch.randn(2, 2, 4, 4, dtype=D)).sum().backward()
    assert all(not s.captures for s in pc.layers.values())


def test_one_parameter_in_two_modules_is_refused_at_construction():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    model[2].weight = model[0].weight
    with pytest.raises(UnsupportedLayerError, match=r"\['0.weight', '2.weight'\]"):
        kf.KPSVD(model)
    with pytest.raises(UnsupportedLayerError, match="shared by modules"):
        kf.ExactNG(model)
    tied = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)).double()
    tied[1].weight = tied[0].weight  # a tied head: the embedding is not registered
    with pytest.raises(UnsupportedLayerError, match=r"\['0.weight', '1.weight'\]"):
        kf.KFAC(tied)


def test_weight_sharing_is_checked_and_kept_in_the_state_dict():
    model, _, _, run = shared_problem((3, 2, 3))
    with pytest.raises(ValueError, match="weight_sharing must be one of"):
        kf.KFAC(model, weight_sharing="mean")
    pc = run(kf.KFAC(model, weight_sharing="reduce"))
    pc.step()
    state = pc.state_dict()
    assert state["extra"]["weight_sharing"] == "reduce"
    with pytest.raises(ValueError, match="weight_sharing='reduce'"):
        kf.KFAC(model, weight_sharing="expand").load_state_dict(state)
    other = kf.KFAC(model, weight_sharing="reduce")
    other.load_state_dict(state)
    assert torch.equal(other.curvature(model[0]).to_dense(), pc.curvature(model[0]).to_dense())


def test_calls_outside_the_models_forward_stay_separate_examples():
    model, lin, _, _ = shared_problem((6, 3))
    x = torch.randn(6, 3, dtype=D)
    whole = kf.ExactNG(model, ema_decay=0.0)
    with whole.collect():
        model(x).square().sum().mul(1 / 6).backward()  # a mean over the 6 examples
    whole.step()
    direct = kf.ExactNG(model, ema_decay=0.0)
    with direct.collect(batch_size=6):  # the module called directly: no model forward
        for sl in (slice(0, 2), slice(2, 6)):
            torch.tanh(lin(x[sl])).square().sum().mul(1 / 6).backward()
    direct.step()
    torch.testing.assert_close(direct.curvature(lin), whole.curvature(lin), rtol=1e-12,
                               atol=1e-14)


def test_a_backward_through_only_some_calls_is_refused_naming_the_layer():
    model, x, _, _, _ = twice_problem(B=4)

    class Branches(nn.Module):  # the second call's output is a separate head
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            first = self.inner.lin(x)
            return first, self.inner.lin(torch.tanh(first))

    pc = kf.ExactNG(Branches(model))
    with pc.collect():
        first, second = pc.model(x)
        first.square().sum().backward(retain_graph=True)  # reaches call 0 only
        second.square().sum().backward()  # reaches both calls
    with pytest.raises(ValueError,
                       match=r"layer 'inner.lin' was called 2 times .* call\(s\) \[0\]"):
        pc.step()
