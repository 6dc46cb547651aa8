"""Scale-and-shift layers (LayerNorm, BatchNorm1d/2d, GroupNorm): the exact 2×2 blocks.

The reference everywhere is the per-example-gradient Fisher built by torch.func in float64:
J (B, 2C) with rows [∇_γ ℓ_b; ∇_β ℓ_b] (vec of [γ β], i.e. all γ then all β), F = JᵀJ/B,
and the library's per-feature block F_j must equal F restricted to the pair (γ_j, β_j).
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import kronfisher as kf
from kronfisher.curvature.scale_shift import (
    ScaleShiftCurvature,
    checked_scale_shift_blocks,
    estimate_scale_shift,
)
from kronfisher.layers import UnsupportedLayerError
from kronfisher.layers.scale_shift import (
    normalized_input,
    scale_shift_grads,
    scale_shift_params,
    to_feature_layout,
    uses_batch_statistics,
)
from kronfisher.linalg import SingularFactorError

D = torch.float64
B = 6


def _randomise(norm: nn.Module) -> None:
    """Non-trivial γ, β (γ ≠ 1 so that x̂ and the output differ) and running statistics."""
    with torch.no_grad():
        for p in scale_shift_params(norm):
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p is norm.weight else 0.0))
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.copy_(torch.randn_like(norm.running_mean) * 0.3)
            norm.running_var.copy_(torch.rand_like(norm.running_var) + 0.5)


def _case(name: str):
    """(model, index of the norm module in the Sequential, input X) of one layer type."""
    if name == "ln_seq":  # LayerNorm over (B, S, d): positions s share γ, β
        m = nn.Sequential(nn.Linear(5, 12), nn.Unflatten(1, (4, 3)), nn.LayerNorm(3),
                          nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
        return m, 2, torch.randn(B, 5, dtype=D)
    if name == "ln_tokens":  # (B, S, d) between Linear layers on (B, S, ·) inputs
        m = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 2))
        return m, 1, torch.randn(B, 4, 5, dtype=D)
    if name == "ln_seq_nobias":
        m = nn.Sequential(nn.Linear(5, 12), nn.Unflatten(1, (4, 3)),
                          nn.LayerNorm(3, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
        return m, 2, torch.randn(B, 5, dtype=D)
    if name == "ln_2d_shape":  # normalized_shape (4, 3): 12 features, one position
        m = nn.Sequential(nn.Linear(5, 12), nn.Unflatten(1, (4, 3)), nn.LayerNorm((4, 3)),
                          nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
        return m, 2, torch.randn(B, 5, dtype=D)
    if name.startswith("bn1d_flat"):
        m = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
        return m, 1, torch.randn(B, 5, dtype=D)
    if name.startswith("bn1d_seq"):  # (B, C, L)
        m = nn.Sequential(nn.Linear(5, 12), nn.Unflatten(1, (4, 3)), nn.BatchNorm1d(4),
                          nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
        return m, 2, torch.randn(B, 5, dtype=D)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    norm = nn.BatchNorm2d(4) if name.startswith("bn2d") else nn.GroupNorm(2, 4)
    m = nn.Sequential(conv, norm, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 4, 3))
    return m, 1, torch.randn(B, 2, 5, 4, dtype=D)


CASES = ["ln_seq", "ln_tokens", "ln_seq_nobias", "ln_2d_shape", "bn1d_flat_eval", "bn1d_flat_train",
         "bn1d_seq_eval", "bn1d_seq_train", "bn2d_eval", "bn2d_train", "gn"]


def _build(name: str):
    model, i, X = _case(name)
    model = model.to(D)
    _randomise(model[i])
    model.train("train" in name)
    with torch.no_grad():
        Y = torch.randn_like(model(X))
    return model, model[i], i, X, Y


def _loss(out, y):
    """The per-example Gaussian NLL ½‖f − y‖² summed over outputs, summed over the batch."""
    return 0.5 * ((out - y) ** 2).sum()


def reference_jacobian(model, norm, i, X, Y) -> torch.Tensor:
    """(B, C·k): per-example [∇γ ℓ_b; ∇β ℓ_b] from torch.func (k = 2, or 1 without a shift).

    Every layer but a training-mode BatchNorm: vmap over examples of the gradient of each
    example's loss with functional_call (an example's loss depends on its own input only).

    A training-mode BatchNorm normalises with the batch's statistics, so ℓ_b depends on
    every example's input and vmap over single examples would compute other statistics.
    What the Fisher needs is the gradient of the batch objective L = (1/B) Σ_b ℓ_b with
    respect to the parameters *as applied to example b*: give each example its own copy
    (γ_b, β_b) of the affine parameters, y_b = γ_b ⊙ x̂_b + β_b, where x̂ is the module's
    own output at γ = 1, β = 0 (same batch statistics), and take B·∂L/∂(γ_b, β_b) with
    torch.func.grad. At γ_b = γ this is exactly the model's forward; the test checks that
    the copies' gradients average to the real module's ∇γ, ∇β.
    """
    names = [n for n, p in norm.named_parameters()]
    if not uses_batch_statistics(norm):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def one(p, x, y):
            return _loss(functional_call(model, (p, buffers), (x[None],)), y[None])

        g = vmap(grad(one), in_dims=(None, 0, 0))(params, X, Y)
        return torch.cat([g[f"{i}.{n}"].reshape(B, -1) for n in names], 1)
    pre, post = model[:i], model[i + 1:]
    h = pre(X).detach()
    ones = {"weight": torch.ones_like(norm.weight), "bias": torch.zeros_like(norm.bias)}
    stats = {k: v.detach().clone() for k, v in norm.named_buffers()}
    xhat = functional_call(norm, (ones, stats), (h,))
    shape = (B, -1) + (1,) * (h.ndim - 2)

    def objective(gam, bet):
        y = gam.reshape(shape) * xhat + bet.reshape(shape)
        return _loss(post(y), Y) / B

    gam = norm.weight.detach().expand(B, -1).clone()
    bet = norm.bias.detach().expand(B, -1).clone()
    dg, db = grad(objective, argnums=(0, 1))(gam, bet)
    return torch.cat([dg, db], 1) * B


def library_stats(model, norm, X, Y):
    """(x̂, g) in the (m, T, C) layout as the library computes them from hooks' data.

    g is B × the gradient of the batch-mean loss at the module's output, i.e. the
    per-example output gradients (collect()'s convention).
    """
    seen = {}

    def fwd(mod, inp, out):
        seen["x"] = inp[0]
        out.register_hook(lambda gr: seen.__setitem__("g", gr))

    h = norm.register_forward_hook(fwd)
    try:
        model.zero_grad()
        (_loss(model(X), Y) / B).backward()
    finally:
        h.remove()
    xhat = to_feature_layout(norm, normalized_input(norm, seen["x"]))
    g = to_feature_layout(norm, seen["g"] * B)
    return xhat, g


def _pair_mask(C: int, k: int) -> torch.Tensor:
    """1 where two coordinates of vec([γ β]) belong to the same feature."""
    j = torch.arange(C * k) % C
    return (j[:, None] == j[None, :]).to(D)


@pytest.mark.parametrize("name", CASES)
def test_blocks_equal_the_per_feature_blocks_of_the_per_example_fisher(name):
    """F_j from x̂ and g equals the (γ_j, β_j) block of JᵀJ/B from torch.func, to 1e-12;
    the diagonal mode equals the diagonal of JᵀJ/B."""
    model, norm, i, X, Y = _build(name)
    J = reference_jacobian(model, norm, i, X, Y)
    xhat, g = library_stats(model, norm, X, Y)
    has_shift = len(scale_shift_params(norm)) == 2
    grads = scale_shift_grads(xhat, g, has_shift)
    k = 2 if has_shift else 1
    C = norm.weight.numel()
    # the per-example gradients themselves
    torch.testing.assert_close(grads.stacked().transpose(1, 2).reshape(B, -1), J,
                               rtol=1e-12, atol=1e-13)
    # the reference is the model's own gradient: its mean is the module's ∇γ, ∇β
    real = torch.cat([p.grad.reshape(-1) for p in scale_shift_params(norm)])
    torch.testing.assert_close(J.mean(0), real, rtol=1e-12, atol=1e-13)
    F = J.T @ J / B
    full = estimate_scale_shift(grads.stacked(), "full")
    assert full.shape == (C, k)
    torch.testing.assert_close(full.to_dense(), F * _pair_mask(C, k), rtol=1e-12, atol=1e-13)
    diag = estimate_scale_shift(grads.stacked(), "diagonal")
    torch.testing.assert_close(diag.to_dense(), torch.diag(torch.diag(F)), rtol=1e-12,
                               atol=1e-13)
    assert (F * (1 - _pair_mask(C, k))).abs().max() > 1e-3  # the blocks drop real terms


@pytest.mark.parametrize("name", ["ln_seq", "ln_seq_nobias", "bn2d_train", "gn"])
@pytest.mark.parametrize("mode", ["full", "diagonal"])
def test_preconditioned_gradient_is_the_dense_solve(name, mode):
    """(F_j + λI)⁻¹ (∇γ_j, ∇β_j) equals torch.linalg.solve with the dense block-diagonal
    matrix built from torch.func's Fisher; apply() is its inverse map."""
    model, norm, i, X, Y = _build(name)
    J = reference_jacobian(model, norm, i, X, Y)
    C, k = norm.weight.numel(), J.shape[1] // norm.weight.numel()
    F = J.T @ J / B
    Fd = F * (_pair_mask(C, k) if mode == "full" else torch.eye(C * k, dtype=D))
    xhat, g = library_stats(model, norm, X, Y)
    curv = estimate_scale_shift(scale_shift_grads(xhat, g, k == 2).stacked(), mode)
    lam = 1e-2
    inv = curv.factorize(lam)
    V = torch.stack([p.grad.reshape(-1) for p in scale_shift_params(norm)], 1)  # (C, k)
    want = torch.linalg.solve(Fd + lam * torch.eye(C * k, dtype=D), V.T.reshape(-1))
    got = inv.solve(V)
    torch.testing.assert_close(got.T.reshape(-1), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(inv.apply(got), V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(inv.to_dense(), Fd + lam * torch.eye(C * k, dtype=D))


def test_normalised_input_is_the_modules_own_not_the_output_inverted():
    """x̂ is the module's normalisation of its input: γ·x̂ + β reproduces the output, also
    where γ_j = 0 (where (y − β)/γ is undefined); BatchNorm eval uses running statistics
    and leaves them unchanged."""
    x = torch.randn(B, 4, 5, 3, dtype=D)
    for norm in (nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.LayerNorm((5, 3))):
        norm = norm.to(D)
        _randomise(norm)
        with torch.no_grad():
            norm.weight.view(-1)[0] = 0.0
        for training in (True, False):
            norm.train(training)
            before = [b.clone() for b in norm.buffers()]
            xhat = normalized_input(norm, x)
            after = [b.clone() for b in norm.buffers()]
            assert all(torch.equal(u, v) for u, v in zip(before, after))
            y = norm(x)
            shape = norm.weight.shape if isinstance(norm, nn.LayerNorm) else (1, 4, 1, 1)
            rebuilt = norm.weight.reshape(shape) * xhat + norm.bias.reshape(shape)
            torch.testing.assert_close(rebuilt, y.detach(), rtol=1e-13, atol=1e-13)
            assert torch.isfinite(xhat).all() and xhat.abs().max() > 0.1
    bn = nn.BatchNorm1d(4, track_running_stats=False).to(D).eval()  # eval: still batch stats
    assert uses_batch_statistics(bn)
    xb = torch.randn(B, 4, dtype=D) * 3 + 1
    torch.testing.assert_close(normalized_input(bn, xb).mean(0), torch.zeros(4, dtype=D),
                               atol=1e-12, rtol=0)


def test_bad_modules_and_inputs_are_refused_with_the_reason():
    with pytest.raises(UnsupportedLayerError, match="without affine"):
        normalized_input(nn.LayerNorm(3, elementwise_affine=False), torch.randn(2, 3))
    with pytest.raises(UnsupportedLayerError, match="without affine"):
        normalized_input(nn.BatchNorm1d(3, affine=False), torch.randn(2, 3))
    with pytest.raises(UnsupportedLayerError, match=r"batch first"):
        normalized_input(nn.LayerNorm(3), torch.randn(3))
    with pytest.raises(UnsupportedLayerError, match="not a scale-and-shift"):
        normalized_input(nn.Linear(3, 3), torch.randn(2, 3))
    mixed = scale_shift_grads(torch.ones(2, 1, 3), torch.ones(2, 1, 3, dtype=torch.bfloat16), True)
    assert mixed.scale.dtype == mixed.shift.dtype == torch.float32
    with pytest.raises(ValueError, match="one shape"):
        scale_shift_grads(torch.zeros(2, 1, 3), torch.zeros(2, 2, 3), True)
    with pytest.raises(ValueError, match="scale_shift must be one of"):
        estimate_scale_shift(torch.zeros(2, 3, 2), "block")
    with pytest.raises(ValueError, match="0 examples"):
        estimate_scale_shift(torch.zeros(0, 3, 2))


def test_running_average_and_singular_blocks():
    """The running average is ρ·old + (1−ρ)·new entrywise; a rank-1 block (one example)
    with λ = 0 is refused as singular naming the feature; a 1×1 block inverts exactly."""
    J1, J2 = torch.randn(5, 3, 2, dtype=D), torch.randn(4, 3, 2, dtype=D)
    c1, c2 = estimate_scale_shift(J1), estimate_scale_shift(J2)
    avg = ScaleShiftCurvature.average(c1, c2, 0.75)
    torch.testing.assert_close(avg.blocks, 0.75 * c1.blocks + 0.25 * c2.blocks)
    assert ScaleShiftCurvature.average(c1, c2, 0.0) is c2
    assert ScaleShiftCurvature.average(None, c2, 0.5) is c2
    with pytest.raises(SingularFactorError, match="3 of 3 .* feature 0"):
        estimate_scale_shift(J1[:1]).factorize(0.0)
    one = estimate_scale_shift(J1[:, :, :1])
    V = torch.randn(3, 1, dtype=D)
    torch.testing.assert_close(one.factorize(0.0).solve(V)[:, 0],
                               V[:, 0] / (J1[:, :, 0] ** 2).mean(0))


def test_scale_safe_estimate_and_half_precision():
    """Gradients scaled by 2^60 or 2^-55 give exactly the blocks times the square;
    bfloat16 gradients give float32 blocks; an unrepresentable block is not finite."""
    J = torch.randn(5, 3, 2)
    ref = estimate_scale_shift(J).blocks.double()
    for s in (2.0**60, 2.0**-55):  # powers of two: the same blocks times s²
        got = estimate_scale_shift(J * s).blocks.double() / (s * s)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert estimate_scale_shift(J.bfloat16()).blocks.dtype == torch.float32
    # squares beyond float32's range come back as Inf, for the preconditioner to drop
    assert not estimate_scale_shift(torch.full((2, 3, 2), 1e30)).finite()


def test_saved_blocks_are_checked():
    good = estimate_scale_shift(torch.randn(5, 3, 2, dtype=D)).blocks
    where = "state_dict layer 'ln': curvature"
    assert torch.equal(checked_scale_shift_blocks(where, good, (3, 2), "full").blocks, good)
    for bad, msg in ((good[:2], r"needs \(3, 2, 2\)"), ("x", "not a floating-point"),
                     (good.clone().fill_(float("nan")), "NaN"),
                     (good + torch.triu(torch.ones(2, 2, dtype=D), 1), "not symmetric")):
        with pytest.raises(ValueError, match=msg):
            checked_scale_shift_blocks(where, bad, (3, 2), "full")
    with pytest.raises(ValueError, match="diagonal"):
        checked_scale_shift_blocks(where, good, (3, 2), "diagonal")


# ----------------------------------------------------------- through the preconditioners
METHODS = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation,
           "kfac_corrected": kf.KFACCorrected, "lanczos": kf.Lanczos}
LAM = 1e-2


def _collected(cls, model, X, Y, **kw):
    """A preconditioner whose curvature batch is (X, Y) with the batch-mean loss."""
    pc = cls(model, damping=LAM, **kw)
    with pc.collect():
        (_loss(model(X), Y) / B).backward()
    return pc


def _gradient(model, norm, X, Y):
    """A new backward of the batch-mean loss; returns [∇γ ∇β] as (C, k)."""
    model.zero_grad()
    (_loss(model(X), Y) / B).backward()
    return torch.stack([p.grad.reshape(-1) for p in scale_shift_params(norm)], 1).clone()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", CASES)
def test_every_method_keeps_the_exact_blocks_and_solves_with_them(name, method):
    """Every Kronecker preconditioner registers the layer (kind scale_shift), its curvature
    is the per-feature blocks of torch.func's Fisher (1e-12), and step() writes
    (F_j + λI)⁻¹ (∇γ_j, ∇β_j) as the dense solve gives it (1e-10)."""
    model, norm, i, X, Y = _build(name)
    J = reference_jacobian(model, norm, i, X, Y)
    C, k = norm.weight.numel(), J.shape[1] // norm.weight.numel()
    pc = _collected(METHODS[method], model, X, Y)
    assert pc.skipped == [] and pc.layers[str(i)].adapter.kind == "scale_shift"
    Fd = (J.T @ J / B) * _pair_mask(C, k)
    V = _gradient(model, norm, X, Y)
    assert pc.step()
    curv = pc.curvature(norm)
    assert isinstance(curv, ScaleShiftCurvature) and curv.shape == (C, k)
    torch.testing.assert_close(curv.to_dense(), Fd, rtol=1e-12, atol=1e-13)
    want = torch.linalg.solve(Fd + LAM * torch.eye(C * k, dtype=D), V.T.reshape(-1))
    got = torch.cat([p.grad.reshape(-1) for p in scale_shift_params(norm)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert [p.grad.shape for p in scale_shift_params(norm)] == [
        p.shape for p in scale_shift_params(norm)]


@pytest.mark.parametrize("name", ["ln_seq", "bn2d_train", "gn"])
def test_diagonal_option_and_damping_scheme(name):
    """scale_shift="diagonal" keeps diag(F) only; the scale-and-shift block is F_j + λI
    under every damping scheme (curvature_product is what the solve inverts)."""
    model, norm, i, X, Y = _build(name)
    J = reference_jacobian(model, norm, i, X, Y)
    C, k = norm.weight.numel(), J.shape[1] // norm.weight.numel()
    pc = _collected(kf.KPSVD, model, X, Y, scale_shift="diagonal", damping_scheme="factored")
    V = _gradient(model, norm, X, Y)
    pc.step()
    Fd = torch.diag((J**2).mean(0))
    torch.testing.assert_close(pc.curvature(norm).to_dense(), Fd, rtol=1e-12, atol=1e-13)
    got = torch.stack([p.grad.reshape(-1) for p in scale_shift_params(norm)], 1)
    torch.testing.assert_close(got, V / (torch.diagonal(Fd).reshape(k, C).T + LAM),
                               rtol=1e-12, atol=1e-13)
    back = pc.curvature_product({str(i): got})[str(i)]
    torch.testing.assert_close(back, V, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="scale_shift must be one of"):
        kf.KFAC(model, scale_shift="block")


@pytest.mark.parametrize("name", ["ln_seq", "bn1d_seq_train", "gn"])
def test_exact_ng_uses_the_whole_fisher_of_the_layer(name):
    """ExactNG's block of a scale-and-shift layer is all of JᵀJ/B (cross-feature terms
    included), in block-diagonal and in full-Fisher mode, and its step is the dense solve."""
    model, norm, i, X, Y = _build(name)
    J = reference_jacobian(model, norm, i, X, Y)
    F = J.T @ J / B
    for block_diagonal in (True, False):
        pc = _collected(kf.ExactNG, model, X, Y, block_diagonal=block_diagonal)
        V = _gradient(model, norm, X, Y)
        pc.step()
        torch.testing.assert_close(pc.curvature(norm), F, rtol=1e-12, atol=1e-13)
        if block_diagonal:
            want = torch.linalg.solve(F + LAM * torch.eye(F.shape[0], dtype=D),
                                      V.T.reshape(-1))
            got = torch.cat([p.grad.reshape(-1) for p in scale_shift_params(norm)])
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_running_average_state_dict_and_dtype():
    """Two batches at ema_decay 0.5 average equally; a state_dict resumes the blocks and is
    checked (mode, shape); model.float() casts the blocks along."""
    model, norm, i, X, Y = _build("ln_seq")
    X2, Y2 = torch.randn_like(X), torch.randn_like(Y)
    pc = kf.KFAC(model, damping=LAM, ema_decay=0.5)
    blocks = []
    for x, y in ((X, Y), (X2, Y2)):
        J = reference_jacobian(model, norm, i, x, y)
        blocks.append((J.T @ J / B) * _pair_mask(3, 2))
        with pc.collect(force=True):
            (_loss(model(x), y) / B).backward()
        _gradient(model, norm, x, y)
        pc.step()
    torch.testing.assert_close(pc.curvature(norm).to_dense(), 0.5 * (blocks[0] + blocks[1]),
                               rtol=1e-12, atol=1e-13)
    sd = pc.state_dict()
    assert sd["extra"]["scale_shift"] == "full"
    other = kf.KFAC(model, damping=LAM, ema_decay=0.5)
    other.load_state_dict(sd)
    assert torch.equal(other.curvature(norm).blocks, pc.curvature(norm).blocks)
    with pytest.raises(ValueError, match="scale_shift='full'"):
        kf.KFAC(model, scale_shift="diagonal").load_state_dict(sd)
    bad = pc.state_dict()
    bad["layers"][str(i)]["curvature"] = bad["layers"][str(i)]["curvature"][:2]
    with pytest.raises(ValueError, match=rf"layer '{i}'.*needs \(3, 2, 2\)"):
        other.load_state_dict(bad)
    model.float()
    _gradient(model, norm, X.float(), Y.float())
    assert pc.step()
    assert pc.curvature(norm).blocks.dtype == torch.float32


def test_overflowing_blocks_are_dropped_and_singular_damping_is_retried():
    """Blocks that overflow float64 skip the update with a warning naming the layer (the
    previous blocks stay); λ = 0 with one example (rank-1 blocks) is retried at 1e-8."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).to(D)
    pc = kf.KFAC(model, damping=0.0)
    x = torch.randn(1, 4, dtype=D)
    with pc.collect():
        model(x).square().sum().backward()
    model.zero_grad()
    model(x).square().sum().backward()
    with pytest.warns(RuntimeWarning, match="layer '1'.*retrying with damping 1e-08"):
        assert pc.step()
    assert pc.layers["1"].inverse.damping == 1e-8
    before = pc.curvature(model[1]).blocks.clone()
    with pc.collect(force=True):
        (model(x).square().sum() * 1e160).backward()
    model.zero_grad()
    model(x).square().sum().backward()
    with pytest.warns(RuntimeWarning, match="layer '1': the curvature built from its"):
        pc.step()
    assert torch.equal(pc.curvature(model[1]).blocks, before)


def test_curvature_scale_diagnostic_reads_the_blocks():
    """vᵀF̂v of the diagnostics is Σ_j V_jᵀ F_j V_j = vec(V)ᵀ to_dense() vec(V)."""
    from kronfisher.diagnostics import curvature_quadratic_form, top_eigenvalue

    c = estimate_scale_shift(torch.randn(7, 4, 2, dtype=D))
    V = torch.randn(3, 4, 2, dtype=D)
    v = V.mT.reshape(3, -1)
    torch.testing.assert_close(curvature_quadratic_form(c, V),
                               ((v @ c.to_dense()) * v).sum(1), rtol=1e-13, atol=0)
    assert top_eigenvalue(c) == pytest.approx(
        float(torch.linalg.eigvalsh(c.to_dense()).abs().max()), rel=1e-13)


def test_quadratic_model_form_and_adaptive_step_on_a_2d_normalized_shape():
    """approx_curvature_form reads the LayerNorm((4, 3)) layer's (F_j + λI) through its
    adapter (γ of shape (4, 3) flattened like weight.reshape(-1)); AdaptiveNG takes a
    finite automatic step on the model."""
    from kronfisher.optim import approx_curvature_form

    model, norm, i, X, Y = _build("ln_2d_shape")
    J = reference_jacobian(model, norm, i, X, Y)
    pc = _collected(kf.KFAC, model, X, Y)
    _gradient(model, norm, X, Y)
    pc.step()
    names = {id(p): n for n, p in model.named_parameters()}
    delta = {f"{i}.weight": torch.randn(4, 3, dtype=D), f"{i}.bias": torch.randn(4, 3, dtype=D)}
    v = torch.cat([delta[f"{i}.weight"].reshape(-1), delta[f"{i}.bias"].reshape(-1)])
    M = (J.T @ J / B) * _pair_mask(12, 2) + LAM * torch.eye(24, dtype=D)
    assert approx_curvature_form(pc, names, delta, 0.3) == pytest.approx(float(v @ M @ v),
                                                                         rel=1e-12)
    opt = kf.optim.AdaptiveNG(pc, lr=None, momentum=None, damping=LAM)
    before = norm.weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = _loss(model(X), Y) / B
        loss.backward()
        return loss

    opt.step(closure, inputs=X, loss_fn=lambda out: _loss(out, Y) / B)
    assert torch.isfinite(norm.weight).all() and not torch.equal(norm.weight, before)
