"""Mixed precision (issue 16, item 5): torch.autocast, factor_dtype and torch.amp.GradScaler.

Tolerance of the autocast test. Under bfloat16 autocast the captured output gradients are
bfloat16: 8 significant bits, unit roundoff u = 2^-8 ≈ 3.9e-3 (float16: 11 bits, 2^-11).
The preconditioner must cast them to float32 *before* any arithmetic (× B for a mean loss,
÷ the loss scale); then its curvature and a float32 reference built from the same captured
values, cast exactly, see identical inputs and can differ only by float32 rounding in
another order: each entry of A, G (sums of ≤ 200 products) by ≲ 200·2^-24 ≈ 1.2e-5 of its
scale in the worst case, ≈ 1e-6 typically (measured: 0, the same operations). TOL = 1e-5
(relative Frobenius) passes that. One half-precision rounding on the way (e.g. g·B formed
in bfloat16, B = 12 not a power of two) perturbs every g by up to u/2 relative and the
curvature by ~1e-3 (bfloat16) or ~1e-4 (float16): the control in the test asserts it
exceeds CONTROL·TOL, so the test fails on it.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronfisher as kf
from kronfisher.curvature.embedding import approximate_embedding
from kronfisher.curvature.scale_shift import estimate_scale_shift
from kronfisher.layers.scale_shift import normalized_input, scale_shift_grads
from kronfisher.preconditioner.exact import per_example_gradients

CLASSES = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation,
           "lanczos": kf.Lanczos, "kfac_corrected": kf.KFACCorrected, "exact": kf.ExactNG}
B = 12  # batch size: not a power of two, so a batch scale applied in bfloat16 would round
TOL = 1e-5  # see the module docstring
CONTROL = {torch.bfloat16: 10.0, torch.float16: 3.0}  # measured controls: ≥ 5.7e-4, ≥ 6.4e-5


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 5),
                         nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _make(name, model, **kw):
    if name != "exact":
        kw.setdefault("conv_radius", "all")  # every location pair: the conv block is exact
    return CLASSES[name](model, damping=1e-2, **kw)


def _data(dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    return torch.randn(B, 2, 4, 4, dtype=dtype), torch.randn(B, 3, dtype=dtype)


def _mse(out, y):
    return (out.float() if out.dtype != y.dtype else out).sub(y).square().mean()


class RawStats:
    """The inputs and output gradients of the layers exactly as torch hands them over."""

    def __init__(self, model):
        self.x, self.g = {}, {}
        kinds = nn.Linear | nn.Conv2d | nn.Embedding | nn.LayerNorm | nn.BatchNorm1d
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in
                         model.named_modules() if isinstance(m, kinds)]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.x[name] = inputs[0].detach()
            output.register_hook(lambda g: self.g.__setitem__(name, g.detach()))
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def _as_stats(model, name, x, g, dtype=torch.float32):
    """(a, g) of DESIGN.md §2 in ``dtype`` (exact casts), g scaled by B (mean loss)."""
    m = dict(model.named_modules())[name]
    x, g = x.to(dtype), g.to(dtype) * B
    if isinstance(m, nn.Conv2d):
        a = F.unfold(x, 3, padding=1).transpose(1, 2)
        g = g.flatten(2).transpose(1, 2)
    else:
        a, g = x[:, None, :], g[:, None, :]
    return torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=dtype)], 2), g


def _reference(name, a, g):
    if name == "exact":
        J = per_example_gradients(a, g)
        return J.mT @ J / J.shape[0]
    return kf.approximate(a, g, name).to_dense()


def _dense(name, curvature):
    return curvature if name == "exact" else curvature.to_dense()


def _rel(X, Y):
    return float(torch.linalg.norm(X.double() - Y.double()) / torch.linalg.norm(Y.double()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CLASSES))
def test_autocast_curvature_equals_float32_curvature_of_the_captured_statistics(name, dtype):
    model = _model()
    pc = _make(name, model)
    raw = RawStats(model)
    x, y = _data()
    with pc.collect():
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
        _mse(out, y).backward()
    raw.remove()
    assert all(g.dtype == dtype for g in raw.g.values())  # autocast was in effect
    assert raw.x["4"].dtype == dtype and raw.x["0"].dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two-term clamping warnings are not the point
        assert pc.step()
    for layer, s in pc.layers.items():
        a, g = _as_stats(model, layer, raw.x[layer], raw.g[layer])
        ours, ref = _dense(name, s.curvature), _reference(name, a, g)
        assert ours.dtype == torch.float32 and ref.dtype == torch.float32
        assert _rel(ours, ref) <= TOL, (layer, _rel(ours, ref))
        # control: the batch scale applied in half precision (before the cast) is outside TOL
        _, g_bad = _as_stats(model, layer, raw.x[layer], (raw.g[layer] * B) / B)
        assert _rel(_reference(name, a, g_bad), ref) > CONTROL[dtype] * TOL
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


V, S = 7, 3  # vocabulary and sequence length of the token model


def _token_model():
    """Embedding → Linear → LayerNorm → tanh → Linear: under bfloat16 autocast the LayerNorm
    sees bfloat16 inputs and output gradients; the embedding's output is float32 (its
    weight's dtype), so its gradients are float32 carrying bfloat16 values (the Linear
    after it casts its input)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, 4), nn.Flatten(), nn.Linear(S * 4, 6),
                          nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():  # γ ≠ 1, β ≠ 0: x̂ and the output differ
        model[3].weight.add_(0.3 * torch.randn(6))
        model[3].bias.add_(0.3 * torch.randn(6))
    return model


def _layer_reference(name, kind, x, g):
    """The float32 curvature from a layer's statistics: the embedding's token ids ``x`` or
    the LayerNorm's x̂ ``x``, and its captured output gradients ``g`` (scaled by B here)."""
    g = g.float() * B
    if kind == "embedding":
        if name == "exact":
            J = per_example_gradients(F.one_hot(x, V).float(), g)  # the one-hot Linear's
            return J.mT @ J / B
        return approximate_embedding(x, g, V, name).to_dense()
    J = scale_shift_grads(x[:, None, :], g[:, None, :], True).stacked()  # (B, C, 2)
    if name == "exact":
        J = J.transpose(1, 2).reshape(B, -1)  # vec([γ β]): all γ, then all β
        return J.mT @ J / B
    return estimate_scale_shift(J, "full").to_dense()


@pytest.mark.parametrize("kind", ["embedding", "layernorm"])
@pytest.mark.parametrize("name", list(CLASSES))
def test_autocast_embedding_and_layernorm_curvature_equals_float32_curvature(name, kind):
    """bfloat16 autocast: an embedding's token ids stay integer, its curvature and a
    LayerNorm's (x̂ normalised in float32 from the captured bfloat16 input) equal the float32
    curvature of the captured values within TOL; the controls (x̂ normalised in bfloat16,
    g·B rounded to bfloat16) are outside it."""
    model = _token_model()
    layer = {"embedding": "0", "layernorm": "3"}[kind]
    pc = CLASSES[name](model, damping=1e-2)
    raw = RawStats(model)
    torch.manual_seed(1)
    t, y = torch.randint(0, V, (B, S)), torch.randn(B, 3)
    with pc.collect():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(t)
        _mse(out, y).backward()
    raw.remove()
    x, g = raw.x[layer], raw.g[layer]
    caps = pc.layers[layer].captures
    if kind == "embedding":
        assert x.dtype == torch.int64 and g.dtype == torch.float32
        assert all(c.a.dtype == torch.int64 and c.g.dtype == torch.float32 for c in caps)
    else:
        assert x.dtype == g.dtype == torch.bfloat16  # autocast was in effect
        assert all(c.a.dtype == c.g.dtype == torch.float32 for c in caps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two-term clamping warnings are not the point
        assert pc.step()
    module = dict(model.named_modules())[layer]
    stat = x if kind == "embedding" else normalized_input(module, x.float())  # x̂ in float32
    ours = _dense(name, pc.layers[layer].curvature)
    ref = _layer_reference(name, kind, stat, g)
    assert ours.dtype == ref.dtype == torch.float32
    assert _rel(ours, ref) <= TOL, _rel(ours, ref)
    if kind == "layernorm":  # controls: one bfloat16 rounding on the way is outside TOL
        bad = {"x̂ normalised in bfloat16": (normalized_input(module, x).float(), g),
               "g·B rounded to bfloat16": (stat, (g * B) / B)}
        for why, (xhat, grad) in bad.items():
            assert _rel(_layer_reference(name, kind, xhat, grad), ref) > CONTROL[
                torch.bfloat16] * TOL, why
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_factor_dtype_float64_keeps_autocast_statistics_and_curvature_in_float64():
    model = _model()
    pc = kf.KPSVD(model, conv_radius="all", factor_dtype=torch.float64)
    raw = RawStats(model)
    x, y = _data()
    with pc.collect():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        _mse(out, y).backward()
    raw.remove()
    assert all(c.a.dtype == c.g.dtype == torch.float64
               for s in pc.layers.values() for c in s.captures)
    assert pc.step()
    for layer, s in pc.layers.items():
        assert s.curvature.dtype == torch.float64
        a, g = _as_stats(model, layer, raw.x[layer], raw.g[layer], torch.float64)
        ref = kf.approximate(a, g, "kpsvd").to_dense()
        assert _rel(s.curvature.to_dense(), ref) <= 1e-9
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("name", ["kfac", "exact"])
def test_factor_dtype_float64_reaches_embedding_and_batchnorm_eval_blocks(name):
    """factor_dtype=float64 under bfloat16 autocast: token ids stay int64, every other
    statistic and every block's curvature is float64; a BatchNorm1d in eval mode (float32
    running statistics) normalises the float64 input, its curvature equals the float64
    reference from the captured input to 1e-12."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, 4), nn.Flatten(), nn.Linear(S * 4, 6),
                          nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        model[3].running_mean.copy_(0.3 * torch.randn(6))
        model[3].running_var.copy_(torch.rand(6) + 0.5)
    model.eval()
    pc = CLASSES[name](model, damping=1e-2, factor_dtype=torch.float64)
    raw = RawStats(model)
    torch.manual_seed(1)
    t, y = torch.randint(0, V, (B, S)), torch.randn(B, 3)
    with pc.collect():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(t)
        _mse(out, y).backward()
    raw.remove()
    for layer, s in pc.layers.items():
        assert all(c.a.dtype == (torch.int64 if layer == "0" else torch.float64)
                   and c.g.dtype == torch.float64 for c in s.captures), layer
    assert pc.step()
    for layer, s in pc.layers.items():
        assert _dense(name, s.curvature).dtype == torch.float64, layer
    bn = model[3]
    xhat = normalized_input(bn, raw.x["3"].double())[:, None, :]
    J = scale_shift_grads(xhat, raw.g["3"].double()[:, None, :] * B, True).stacked()
    if name == "exact":
        J = J.transpose(1, 2).reshape(B, -1)
        ref = J.mT @ J / B
    else:
        ref = estimate_scale_shift(J, "full").to_dense()
    assert _rel(_dense(name, pc.layers["3"].curvature), ref) <= 1e-12
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("bad", [torch.bfloat16, torch.float16, torch.int64, "float32"])
def test_factor_dtype_other_than_float32_or_float64_is_refused(bad):
    with pytest.raises(ValueError, match="factor_dtype"):
        kf.KFAC(_model(), factor_dtype=bad)


def test_grad_scaler_of_another_type_is_refused():
    with pytest.raises(TypeError, match="grad_scaler"):
        kf.KPSVD(_model(), grad_scaler=1024.0)


def test_model_double_between_collect_and_step_casts_statistics_and_curvature():
    """Captures recorded in float32, then model.double(): the batch is folded in float64."""
    model = _model()
    pc = kf.KFAC(model)
    x, y = _data()
    for _ in range(2):
        with pc.collect():
            _mse(model(x), y).backward()
        assert pc.step()
        model.zero_grad()
    with pc.collect():
        _mse(model(x), y).backward()
    old = {n: [t.double() for t in s.curvature.terms[0]] for n, s in pc.layers.items()}
    stats = {n: [torch.cat([getattr(c, k) for c in s.captures]).double() for k in "ag"]
             for n, s in pc.layers.items()}
    model.double()
    model.zero_grad()
    _mse(model(x.double()), y.double()).backward()
    assert pc.step()
    for n, s in pc.layers.items():  # the third batch: decay min(1 − 1/3, 0.95) = 2/3
        new = kf.approximate(*stats[n], "kfac").terms[0]
        for X, X0, X1 in zip(s.curvature.terms[0], old[n], new):
            assert X.dtype == torch.float64
            assert _rel(X, X0 * (2 / 3) + X1 / 3) <= 1e-12


# ----------------------------------------------------------------- GradScaler


def _scaled_loop(name, scaler, as_callable=False, iters=3):
    """float64 training in the documented order; returns Δ and the curvature of each step.

    ``as_callable``: the preconditioner is given ``scaler.get_scale`` instead of the scaler.
    """
    model = _model(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    given = scaler.get_scale if (as_callable and scaler is not None) else scaler
    pc = _make(name, model, kl_clip=1e-3, lr=0.1, grad_scaler=given)
    scale = (lambda loss: loss) if scaler is None else scaler.scale
    deltas, curvatures = [], []
    for it in range(iters):
        x, y = _data(torch.float64, seed=it)
        with pc.collect():
            scale(_mse(model(x), y)).backward()
        opt.zero_grad()
        scale(_mse(model(x), y)).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # two-term clamping warnings are not the point
            assert pc.step()
        deltas.append([p.grad.clone() for p in model.parameters()])
        curvatures.append([_dense(name, s.curvature).clone() for s in pc.layers.values()])
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return deltas, curvatures


@pytest.mark.parametrize(("k", "as_callable"), [(-3, False), (16, False), (40, True)])
@pytest.mark.parametrize("name", list(CLASSES))
def test_grad_scaler_power_of_two_gives_the_unscaled_preconditioned_gradients(
        name, k, as_callable):
    """Powers of two scale exactly: the captured g·(B/2^k) and the unscaled .grad are the
    unscaled values bit for bit, so Δ (KL clip included) matches to 1e-12 relative."""
    plain_d, plain_c = _scaled_loop(name, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** k)
    scaled_d, scaled_c = _scaled_loop(name, scaler, as_callable)
    assert scaler.get_scale() == 2.0 ** k  # no step was skipped, no growth in 3 steps
    for step in range(len(plain_d)):
        for p0, p1 in zip(plain_d[step], scaled_d[step]):
            assert _rel(p1, p0) <= 1e-12, (step, _rel(p1, p0))
        for c0, c1 in zip(plain_c[step], scaled_c[step]):
            assert _rel(c1, c0) <= 1e-12, (step, _rel(c1, c0))


def _amp_iteration(pc, model, opt, scaler, y, order="documented"):
    """One bfloat16-autocast step with a GradScaler: curvature pass, then the training pass.

    ``order``: "documented" (unscale_, precond.step, scaler.step), "no_unscale" (precond.step
    straight after the backward) or "after_step" (scaler.step before precond.step).
    Returns precond.step()'s result.
    """
    x, _ = _data()
    with pc.collect():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        scaler.scale(_mse(out, y)).backward()
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    scaler.scale(_mse(out, y)).backward()
    if order == "documented":
        scaler.unscale_(opt)
    elif order == "after_step":
        scaler.step(opt)
    ok = pc.step()
    scaler.step(opt)
    scaler.update()
    return ok


def _snapshot(pc):
    return {n: ([t.clone() for t in s.curvature] if isinstance(s.curvature, torch.Tensor)
                else [t.clone() for AG in s.curvature.terms for t in AG], s.updates)
            for n, s in pc.layers.items()}


@pytest.mark.parametrize("name", list(CLASSES))
def test_overflowing_scaler_steps_leave_the_curvature_unchanged_without_warnings(name):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    pc = _make(name, model, grad_scaler=scaler)
    y = torch.randn(B, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two-term clamping warnings are not the point
        assert _amp_iteration(pc, model, opt, scaler, y)
    kept = _snapshot(pc)
    params = [p.detach().clone() for p in model.parameters()]
    # 2·|out − y|/(B·3) ≈ 55 = 2^5.8 times the scale 2^127..2^125 exceeds float32's 2^128
    scaler.update(new_scale=2.0 ** 127)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all, let alone one per layer
        for k in range(3):
            assert not _amp_iteration(pc, model, opt, scaler, y + 1e3)
            assert scaler.get_scale() == 2.0 ** (126 - k)  # the scaler saw the overflow
    now = _snapshot(pc)
    for n, (tensors, updates) in kept.items():
        assert now[n][1] == updates
        assert all(torch.equal(t0, t1) for t0, t1 in zip(tensors, now[n][0]))  # bitwise
        assert pc.layers[n].captures == []
    assert all(torch.equal(p0, p) for p0, p in zip(params, model.parameters()))
    assert pc.overflow_steps == 3 and pc.skipped_steps == 3
    scaler.update(new_scale=2.0 ** 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _amp_iteration(pc, model, opt, scaler, y)  # and training goes on
    assert all(pc.layers[n].updates == kept[n][1] + 1 for n in kept)


@pytest.mark.parametrize(("order", "match"), [
    ("no_unscale", r"still multiplied by the GradScaler's loss scale.*scaler\.unscale_"),
    ("after_step", r"after scaler\.step\(optimizer\)")])
@pytest.mark.parametrize("overflow", [False, True])
def test_precond_step_out_of_order_is_a_clear_error_and_changes_nothing(order, match, overflow):
    """Also with an overflowing scale: the user sees this error, not torch's "No inf checks
    were recorded" (which a skipped step's cleared gradients used to cause)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    pc = _make("kpsvd", model, grad_scaler=scaler)
    y = torch.randn(B, 3)
    assert _amp_iteration(pc, model, opt, scaler, y)
    kept = _snapshot(pc)
    if overflow:
        scaler.update(new_scale=2.0 ** 127)
        y = y + 1e3
    x, _ = _data()
    with pc.collect():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        scaler.scale(_mse(out, y)).backward()
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    scaler.scale(_mse(out, y)).backward()
    if order == "after_step":
        scaler.step(opt)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=match) as err:
        pc.step()
    assert "scaler.unscale_(optimizer); precond.step(); scaler.step(optimizer)" in str(err.value)
    for g0, p in zip(grads, model.parameters()):  # untouched (NaN where it overflowed)
        torch.testing.assert_close(p.grad, g0, rtol=0, atol=0, equal_nan=True)
    assert all(pc.layers[n].captures for n in kept)  # the pending batch is still there
    assert all(pc.layers[n].updates == kept[n][1] for n in kept)
    if order == "no_unscale":  # the fix: the documented order goes on from here
        scaler.unscale_(opt)
        assert pc.step() is not overflow
        scaler.step(opt)
        scaler.update()


def test_disabled_grad_scaler_is_no_scaler():
    """GradScaler(enabled=False) scales nothing and records no stages: no order check, and
    non-finite gradients are the ordinary nonfinite="skip" case (with its warning)."""
    model = _model(torch.float64)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    pc = kf.KFAC(model, grad_scaler=scaler)
    x, y = _data(torch.float64)
    with pc.collect():
        scaler.scale(_mse(model(x), y)).backward()
    assert pc.step()  # no unscale_ needed
    ref = kf.KFAC(_model(torch.float64))
    with ref.collect():
        _mse(ref.model(x), y).backward()
    assert ref.step()
    for s, r in zip(pc.layers.values(), ref.layers.values()):
        assert torch.equal(s.curvature.to_dense(), r.curvature.to_dense())
    model.zero_grad()
    _mse(model(x), y * torch.inf).backward()
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        assert not pc.step()
    assert pc.overflow_steps == 0
