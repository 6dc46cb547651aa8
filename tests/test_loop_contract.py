"""Issue 16, items 4 and 6: the training-loop contract.

``skip_layers``; adapter errors inside hooks raised by ``collect()`` with nothing half
recorded; ``collect_due`` (and the runner's use of it); callable ``damping`` / ``lr`` and
``lr=optimizer`` for the KL clip; ``close()`` / ``with``; the state_dict's ``version`` and
method configuration. Float64, against dense solves.
"""

import copy
import math

import pytest
import torch
from torch import nn

import kronfisher as kf
from helpers import vec
from kronfisher.layers import UnsupportedLayerError

D = torch.float64
KRON = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation,
        "kfac_corrected": kf.KFACCorrected, "lanczos": kf.Lanczos}
ALL = {**KRON, "exact": kf.ExactNG}


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)


def batch(seed, m=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, 5, generator=gen, dtype=D), torch.randn(m, 3, generator=gen, dtype=D)


def loss_fn(out, y):
    return (out - y).square().sum(-1).mean()


def iterate(pc, model, seed, *, collect=True):
    """One iteration: curvature batch (when asked), fresh gradient, step. The raw grads."""
    x, y = batch(seed)
    if collect:
        with pc.collect():
            loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert pc.step()
    return raw


def wb(layer, grads=None, prefix=""):
    """[∇W ∇b] of a Linear layer (from ``grads`` by name, else its .grad)."""
    if grads is None:
        return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    return torch.cat([grads[f"{prefix}weight"], grads[f"{prefix}bias"][:, None]], 1)


def dense_delta(pc, layer, raw_wb):
    """Δ = M⁻¹ ∇ with M the damped matrix the layer's factorisation inverts (dense)."""
    s = pc.layers[next(n for n, st in pc.layers.items() if st.module is layer)]
    if isinstance(pc, kf.ExactNG):
        n = raw_wb.numel()
        M = pc.curvature(layer) + s.inverse_damping * torch.eye(n, dtype=D)
    else:
        M = pc.curvature(layer).factorize(s.inverse_damping, pc.damping_scheme).to_dense()
    d = torch.linalg.solve(M, vec(raw_wb))
    return d.reshape(raw_wb.shape[1], raw_wb.shape[0]).mT


# ------------------------------------------------------------------ skip_layers
@pytest.mark.parametrize("method", list(ALL))
def test_skip_layers_by_name_and_type_list_the_parameters_with_the_reason(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(),
                          nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))).to(D)
    pc = ALL[method](model, damping=1e-2, skip_layers=["2.1"])
    assert list(pc.layers) == ["0", "2.0"]
    assert pc.skipped == ["2.1.weight", "2.1.bias"]
    assert set(pc.skip_reasons.values()) == {"skipped by skip_layers"}
    raw = iterate(pc, model, 1)
    assert torch.equal(model[2][1].weight.grad, raw["2.1.weight"])  # left as it is
    assert not torch.equal(model[0].weight.grad, raw["0.weight"])
    by_container = ALL[method](model, damping=1e-2, skip_layers=["2"])  # covers 2.0 and 2.1
    assert list(by_container.layers) == ["0"] and len(by_container.skipped) == 4
    with pytest.raises(UnsupportedLayerError, match="no supported layer"):
        ALL[method](model, skip_layers=[nn.Linear])  # every Linear skipped: nothing left


def test_skip_layers_by_type_covers_instances():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)).to(D)
    pc = kf.KFAC(model, skip_layers=[nn.Conv2d])
    assert list(pc.layers) == ["2"] and pc.skipped == ["0.weight", "0.bias"]
    assert pc.skip_reasons["0.weight"] == "skipped by skip_layers"


def test_skip_layers_unknown_names_and_bad_entries_raise_at_construction():
    model = mlp()
    with pytest.raises(ValueError, match=r"\['fc3'\] are not modules of the model"):
        kf.KPSVD(model, skip_layers=["fc3"])
    with pytest.raises(ValueError, match="not modules"):
        kf.ExactNG(model, skip_layers=["0.weight"])  # a parameter, not a module
    with pytest.raises(TypeError, match="list of module names"):
        kf.KFAC(model, skip_layers="0")
    with pytest.raises(TypeError, match="entries must be"):
        kf.KFAC(model, skip_layers=[3])


# ------------------------------------------------------------ errors in hooks
class ConvOnUnbatched(nn.Module):
    """A Linear that records fine, then a Conv2d called on an unbatched 3-D input."""

    def __init__(self):
        super().__init__()
        self.fc, self.conv, self.head = nn.Linear(5, 16), nn.Conv2d(1, 2, 3), nn.Linear(8, 3)

    def forward(self, x):  # x: (1, 5)
        h = self.conv(torch.tanh(self.fc(x)).reshape(1, 4, 4))  # (C, H, W): no batch dim
        return self.head(h.reshape(1, 8))


def test_adapter_error_in_a_hook_is_raised_by_collect_naming_the_layer_nothing_half_kept():
    torch.manual_seed(0)
    model = ConvOnUnbatched().to(D)
    pc = kf.KFAC(model, damping=1e-2)
    x = torch.randn(1, 5, dtype=D)
    with pc.collect():  # a good batch first: kept through the failing one
        loss_fn(model.head(torch.randn(1, 8, dtype=D)), torch.zeros(1, 3, dtype=D)).backward()
    pending = {n: len(s.captures) for n, s in pc.layers.items()}
    out = model(x)  # outside collect(): the forward itself works
    with pytest.raises(UnsupportedLayerError, match=r"layer 'conv': cannot record its forward"
                       r" pass.*Conv2d input must be \(N, C, H, W\)"):
        with pc.collect():
            out = model(x)
            loss_fn(out, torch.zeros(1, 3, dtype=D)).backward()
    assert {n: len(s.captures) for n, s in pc.layers.items()} == pending  # fc's is dropped
    assert pending == {"fc": 0, "conv": 0, "head": 1}
    # the body's own exception wins over a hook error
    with pytest.raises(KeyError, match="mine"), pc.collect():
        model(x)
        raise KeyError("mine")
    assert {n: len(s.captures) for n, s in pc.layers.items()} == pending


# ----------------------------------------------------------------- collect_due
def test_collect_due_follows_the_schedule_and_the_loop_using_it_matches_always_collecting():
    ref_model, model = mlp(), mlp()
    ref = kf.KPSVD(ref_model, damping=1e-2, cov_update_freq=3, inv_update_freq=3)
    pc = kf.KPSVD(model, damping=1e-2, cov_update_freq=3, inv_update_freq=3)
    dues = []
    for it in range(7):
        with ref.collect() as records:  # off schedule: runs the pass, records nothing
            x, y = batch(100 + it)
            loss_fn(ref_model(x), y).backward()
        assert records == (it % 3 == 0)
        iterate(ref, ref_model, it, collect=False)
        dues.append(pc.collect_due)
        if pc.collect_due:
            with pc.collect() as rec:
                assert rec
                loss_fn(model(x), y).backward()
        iterate(pc, model, it, collect=False)
        assert torch.equal(model[0].weight.grad, ref_model[0].weight.grad)
    assert dues == [True, False, False, True, False, False, True]
    assert pc.layers["0"].updates == ref.layers["0"].updates == 3


def test_runner_runs_the_curvature_pass_only_when_due(tiny_curves, monkeypatch):
    from kronfisher.bench import runner

    calls = []
    real = runner.collect_curvature_batch

    def counting(setup, x, **kw):
        calls.append(setup.preconditioner.steps)
        return real(setup, x, **kw)

    monkeypatch.setattr(runner, "collect_curvature_batch", counting)
    cfg = runner.RunConfig("curves", "kfac", iterations=11, cov_update_freq=4,
                           inv_update_freq=4, batch_size=32, eval_subset=32)
    rec = runner.train(cfg, tiny_curves["train"], tiny_curves["test"], progress=False)
    assert rec["status"] == "complete" and calls == [0, 4, 8]


# ------------------------------------------------------- callable hyper-parameters
@pytest.mark.parametrize("method", ["kfac", "deflation", "exact"])
def test_callable_damping_is_read_at_each_step(method):
    model = mlp()
    sched = [1e-2, 1e-2, 1e-1, 3e-1]
    pc = ALL[method](model, damping=lambda k: sched[k])
    for k in range(4):
        raw = iterate(pc, model, k)
        assert pc.layers["2"].inverse_damping == sched[k]
        want = dense_delta(pc, model[2], wb(model[2], raw, "2."))
        torch.testing.assert_close(wb(model[2]), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad", [-1.0, math.nan, "x", True])
def test_callable_returning_a_bad_value_raises_at_that_step_and_writes_nothing(bad):
    model = mlp()
    pc = kf.KFAC(model, damping=lambda k: 1e-2 if k < 2 else bad)
    iterate(pc, model, 0)
    iterate(pc, model, 1)
    model.zero_grad(set_to_none=True)
    x, y = batch(5)
    loss_fn(model(x), y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"the damping schedule returned .* at step 2"):
        pc.step()
    assert pc.steps == 2
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    pc2 = kf.KFAC(mlp(), kl_clip=1e-3, lr=lambda k: -0.1)
    with pytest.raises(ValueError, match=r"the lr schedule returned -0.1 at step 0"):
        iterate(pc2, pc2.model, 0)


def kl_dots(pc, model, raw):
    """⟨Δ_p, ∇_p⟩ per parameter name, Δ from dense solves."""
    out = {}
    for i in (0, 2):
        d = dense_delta(pc, model[i], wb(model[i], raw, f"{i}."))
        out[f"{i}.weight"] = float((d[:, :-1] * raw[f"{i}.weight"]).sum())
        out[f"{i}.bias"] = float((d[:, -1] * raw[f"{i}.bias"]).sum())
    return out


def written_nu(pc, model, raw):
    """ν of the written gradient ν·Δ (checked to be a multiple of the dense Δ)."""
    d = dense_delta(pc, model[2], wb(model[2], raw, "2."))
    w = wb(model[2])
    nu = float((w * d).sum() / (d * d).sum())
    torch.testing.assert_close(w, nu * d, rtol=1e-9, atol=1e-13)
    return nu


def test_kl_clip_with_a_callable_lr_uses_its_value_at_each_step():
    model = mlp()
    lrs = [0.5, 0.1, 0.02]
    pc = kf.KFAC(model, damping=1e-2, kl_clip=1e-6, lr=lambda k: lrs[k])
    for k in range(3):
        raw = iterate(pc, model, k)
        vg = sum(kl_dots(pc, model, raw).values()) * lrs[k] ** 2
        nu = min(1.0, math.sqrt(1e-6 / vg))
        assert nu < 1.0  # the clip binds: the test sees the lr
        assert written_nu(pc, model, raw) == pytest.approx(nu, rel=1e-9)


def test_kl_clip_reads_the_optimizer_lr_so_a_scheduler_never_leaves_it_stale():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    pc = kf.KPSVD(model, damping=1e-2, kl_clip=1e-5, lr=opt)
    assert pc.lr is None
    for k in range(3):
        raw = iterate(pc, model, k)
        vg = sum(kl_dots(pc, model, raw).values()) * opt.param_groups[0]["lr"] ** 2
        nu = min(1.0, math.sqrt(1e-5 / vg))
        assert nu < 1.0
        assert written_nu(pc, model, raw) == pytest.approx(nu, rel=1e-9)
        opt.step()
        sched.step()


def test_kl_clip_with_param_groups_of_different_lrs_weighs_each_parameter_by_its_own():
    model = mlp()
    groups = [{"params": [model[0].weight, model[2].weight], "lr": 0.3},
              {"params": [model[0].bias], "lr": 0.03}]  # 2.bias in no group: counts 0
    opt = torch.optim.SGD(groups, lr=1.0)
    pc = kf.KFAC(model, damping=1e-2, kl_clip=1e-4, lr=opt)
    raw = iterate(pc, model, 0)
    dots = kl_dots(pc, model, raw)
    lr = {"0.weight": 0.3, "2.weight": 0.3, "0.bias": 0.03, "2.bias": 0.0}
    vg = sum(lr[n] ** 2 * dots[n] for n in dots)
    nu = min(1.0, math.sqrt(1e-4 / vg))
    assert nu < 1.0
    assert written_nu(pc, model, raw) == pytest.approx(nu, rel=1e-9)
    one = min(1.0, math.sqrt(1e-4 / (0.3**2 * sum(dots.values()))))
    assert abs(one - nu) > 1e-3 * nu  # a single lr would give another ν
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="param group 1"):
        iterate(pc, model, 1)


# ------------------------------------------------------------- close() / with
def test_close_and_context_manager_remove_the_hooks_idempotently():
    hooks = nn.modules.module._global_forward_hooks
    n0 = len(hooks)
    model = mlp()
    with kf.KFAC(model, damping=1e-2) as pc:
        assert len(hooks) == n0 + 1
        iterate(pc, model, 0)
    assert len(hooks) == n0
    pc.close()  # idempotent
    pc.remove_hooks()
    with pytest.raises(RuntimeError, match="after remove_hooks"), pc.collect():
        pass
    assert pc.state_dict()["steps"] == 1  # its state is still there
    with pytest.raises(KeyError, match="in the block"), kf.KPSVD(model) as pc2:
        assert len(hooks) == n0 + 1
        raise KeyError("in the block")
    assert len(hooks) == n0
    with pytest.raises(RuntimeError, match="after remove_hooks"):
        pc2.step()


# ------------------------------------------------------------------ state_dict
def test_state_dict_has_a_version_and_the_method_configuration():
    model = mlp()
    pc = kf.KPSVD(model, damping=1e-2, rank=2, solver="power", damping_scheme="factored")
    iterate(pc, model, 0)
    st = pc.state_dict()
    assert st["version"] == 1
    assert {k: st["extra"][k] for k in ("method", "solver", "rank", "conv_radius",
                                         "damping_scheme")} == {
        "method": "kpsvd", "solver": "power", "rank": 2, "conv_radius": 0,
        "damping_scheme": "factored"}
    ex = kf.ExactNG(mlp(), damping=1e-2)
    assert ex.state_dict()["version"] == 1


def test_state_without_version_loads_as_version_1_and_newer_versions_are_refused():
    model = mlp()
    pc = kf.KFAC(model, damping=1e-2)
    iterate(pc, model, 0)
    st = pc.state_dict()
    old = {k: v for k, v in st.items() if k != "version"}
    other_model = mlp()
    other = kf.KFAC(other_model, damping=1e-2)
    other.load_state_dict(old)
    assert other.steps == 1
    torch.testing.assert_close(other.curvature(other_model[0]).to_dense(),
                               pc.curvature(model[0]).to_dense(), rtol=0, atol=0)
    before = copy.deepcopy(other.state_dict())
    for version, match in [(2, "format version 2, newer than this kronfisher reads"),
                           (0, "'version' must be an integer >= 1"),
                           ("1", "'version' must be an integer >= 1")]:
        with pytest.raises(ValueError, match=match):
            other.load_state_dict(st | {"version": version})
    after = other.state_dict()
    assert after["steps"] == before["steps"] and torch.equal(
        after["layers"]["0"]["curvature"][0][0], before["layers"]["0"]["curvature"][0][0])


@pytest.mark.parametrize("method", ["kpsvd", "exact"])
def test_float32_state_loads_into_a_float64_model(method):
    m32 = mlp().float()
    pc32 = ALL[method](m32, damping=1e-2)
    x, y = batch(0)
    with pc32.collect():
        loss_fn(m32(x.float()), y.float()).backward()
    m32.zero_grad()
    loss_fn(m32(x.float()), y.float()).backward()
    assert pc32.step()
    m64 = mlp()
    pc64 = ALL[method](m64, damping=1e-2)
    pc64.load_state_dict(pc32.state_dict())
    c = pc64.curvature(m64[2])
    assert (c.dtype if isinstance(c, torch.Tensor) else c.terms[0][0].dtype) == D
    m64.zero_grad()
    loss_fn(m64(x), y).backward()
    raw = wb(m64[2]).clone()
    assert pc64.step()
    assert m64[2].weight.grad.dtype == D
    torch.testing.assert_close(wb(m64[2]), dense_delta(pc64, m64[2], raw), rtol=1e-9,
                               atol=1e-12)


def test_callable_damping_is_not_state_and_a_resume_with_the_same_callable_is_exact():
    def sched(k):
        return 1e-2 if k < 2 else 1e-1

    model = mlp()
    pc = kf.KFAC(model, damping=sched, inv_update_freq=2)
    for k in range(3):
        iterate(pc, model, k)
    st = pc.state_dict()
    assert "damping" not in st["hyper"]
    model2 = copy.deepcopy(model)
    pc2 = kf.KFAC(model2, damping=sched, inv_update_freq=2)
    pc2.load_state_dict(st)
    for k in range(3, 5):
        iterate(pc, model, k)
        iterate(pc2, model2, k)
        assert torch.equal(model[0].weight.grad, model2[0].weight.grad)
    const = kf.KFAC(mlp(), damping=0.5)
    const.load_state_dict(st)  # a state without damping: the constant stays
    assert const.damping == 0.5
    sched_pc = kf.KFAC(mlp(), damping=sched)
    sched_pc.load_state_dict(kf.KFAC(mlp(), damping=0.5).state_dict())
    assert sched_pc.damping == 1e-2  # the callable stays (at step 0)
