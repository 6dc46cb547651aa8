"""Issue 17, item 6 (docs/reliability.md, class 9): load_state_dict checks everything first.

A state of another method, mode, rank or kind, or with bad entries, is refused with a clear
ValueError and leaves the preconditioner exactly as it was (compared through state_dict());
a state of another dtype is cast to the module's, and so is the curvature after
``model.double()`` mid-run.
"""

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import kronfisher as kf

D = torch.float64
KRON = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation,
        "kfac_corrected": kf.KFACCorrected, "lanczos": kf.Lanczos}


def mlp(dtype=D, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def run(pc, model, steps=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 5, generator=gen, dtype=D).to(dtype)
        y = torch.randn(16, 3, generator=gen, dtype=D).to(dtype)
        model.zero_grad()
        with pc.collect():
            (model(x) - y).square().sum(-1).mean().backward()
        assert pc.step()
    return pc


def made(cls, dtype=D, seed=0, steps=2, **kw):
    model = mlp(dtype, seed)
    return model, run(cls(model, damping=1e-2, **kw), model, steps, seed + 1)


def equal(a, b) -> bool:
    """Deep equality of two state_dicts (tensors bitwise, with dtype)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return (isinstance(b, list | tuple) and len(a) == len(b)
                and all(equal(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and a == b


def refused(pc, state, match):
    before = copy.deepcopy(pc.state_dict())
    with pytest.raises(ValueError, match=match):
        pc.load_state_dict(state)
    assert equal(pc.state_dict(), before)  # nothing was changed


@pytest.mark.parametrize("src, dst", list(itertools.permutations(KRON, 2)))
def test_state_of_another_kronecker_method_is_refused_before_any_change(src, dst):
    _, a = made(KRON[src])
    _, b = made(KRON[dst], seed=3, steps=1, ema_decay=0.5, cov_update_freq=1)
    refused(b, a.state_dict(), f"state_dict is from method '{src}', this is '{dst}'")


@pytest.mark.parametrize("src, dst", [(True, False), (False, True)])
def test_state_of_the_other_exact_ng_mode_is_refused(src, dst):
    _, a = made(kf.ExactNG, block_diagonal=src)
    _, b = made(kf.ExactNG, seed=3, block_diagonal=dst)
    refused(b, a.state_dict(), "block_diagonal")


@pytest.mark.parametrize("src, dst", [("kfac", "exact"), ("exact", "kfac"),
                                      ("lanczos", "exact_full"), ("exact_full", "kpsvd")])
def test_state_of_kronecker_into_exact_ng_and_back_is_refused(src, dst):
    cls = {"exact": kf.ExactNG, "exact_full": lambda m, **kw: kf.ExactNG(
        m, block_diagonal=False, **kw), **KRON}
    _, a = made(cls[src])
    model_b, b = made(cls[dst], seed=3)
    refused(b, a.state_dict(), "state_dict is from (ExactNG|the Kronecker method)")
    run(b, model_b, 1)  # and it still works


@pytest.mark.parametrize("src, dst", [(2, 1), (1, 2)])
def test_kpsvd_state_of_another_rank_is_refused(src, dst):
    _, a = made(kf.KPSVD, rank=src)
    _, b = made(kf.KPSVD, seed=3, rank=dst)
    refused(b, a.state_dict(), f"rank={src}")
    state = a.state_dict()  # a state written before the rank was recorded: term counts
    del state["extra"]["rank"]
    refused(b, state, f"has {src} Kronecker term")


def test_saved_damping_scheme_is_restored_and_used():
    model, a = made(kf.KPSVD, damping_scheme="factored")
    model_b, b = made(kf.KPSVD, seed=3, damping_scheme="tikhonov")
    b.load_state_dict(a.state_dict())
    assert b.damping_scheme == "factored"
    x, y = torch.randn(16, 5, dtype=D), torch.randn(16, 3, dtype=D)
    for m, pc in ((model, a), (model_b, b)):
        m.zero_grad()
        (m(x) - y).square().sum(-1).mean().backward()
        raw = torch.cat([m[0].weight.grad, m[0].bias.grad[:, None]], 1)
        assert pc.step()
        want = pc.curvature(m[0]).solve(raw, 1e-2, "factored")
        got = torch.cat([m[0].weight.grad, m[0].bias.grad[:, None]], 1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.clear(), r"missing \['steps', 'hyper', 'layers', 'extra'\]"),
    (lambda s: s.pop("hyper"), r"missing \['hyper'\]"),
    (lambda s: s["hyper"].update(cov_update_freq=0), "cov_update_freq must be an integer >= 1"),
    (lambda s: s["hyper"].update(damping=-1), "damping must be a finite number >= 0"),
    (lambda s: s["hyper"].update(damping=True), "damping must be a finite number >= 0"),
    (lambda s: s["hyper"].update(ema_decay=1.5), "ema_decay must be"),
    (lambda s: s["hyper"].update(kl_clip_mode="bogus"), "kl_clip_mode must be one of"),
    (lambda s: s["hyper"].update(bogus=1), r"unknown entries \['bogus'\]"),
    (lambda s: s.update(steps=-2), "'steps' must be an integer >= 0"),
    (lambda s: s["layers"]["0"].update(updates="x"), "layer '0' 'updates'"),
    (lambda s: s["layers"]["2"].pop("curvature"), "layer '2' must be a dict with"),
    (lambda s: s["layers"]["2"].update(curvature=torch.eye(3)), "not a list of .A, G."),
    (lambda s: s["layers"]["0"].update(inverse_damping=float("nan")), "damping must be a"),
    (lambda s: s["extra"].update(damping_scheme="bogus"), "damping_scheme must be one of"),
    (lambda s: s["extra"].update(conv_radius=2), "conv_radius=2"),
    (lambda s: s.update(layers={}), "do not match this model's"),
])
def test_bad_entries_are_refused_naming_them(edit, match):
    _, a = made(kf.KFAC)
    _, b = made(kf.KFAC, seed=3)
    state = copy.deepcopy(a.state_dict())
    edit(state)
    refused(b, state, match)


def test_state_that_is_not_a_dict_is_refused():
    _, b = made(kf.KFAC)
    refused(b, [1, 2], "must be the dict state_dict.. returns")


@pytest.mark.parametrize("cls", [kf.KFAC, kf.Deflation, kf.ExactNG])
def test_float32_state_into_a_float64_model_is_cast(cls):
    _, a = made(cls, dtype=torch.float32)
    model, b = made(cls, seed=3)
    b.load_state_dict(a.state_dict())
    for name, s in b.layers.items():
        c32 = a.layers[name].curvature
        terms = c32.terms if isinstance(c32, kf.KroneckerSum) else [(c32, c32)]
        got = s.curvature.terms if isinstance(s.curvature, kf.KroneckerSum) else [
            (s.curvature, s.curvature)]
        for (A32, G32), (A, G) in zip(terms, got):
            assert A.dtype == D and torch.equal(A, A32.double()) and torch.equal(G, G32.double())
    run(b, model, 1)  # no dtype error at the next update


@pytest.mark.parametrize("cls", [kf.KFAC, kf.KPSVD, kf.ExactNG,
                                 lambda m, **kw: kf.ExactNG(m, block_diagonal=False, **kw)])
def test_model_double_mid_run_casts_the_curvature(cls):
    model, pc = made(cls, dtype=torch.float32)
    old = {n: s.curvature for n, s in pc.layers.items()}
    model.double()
    x, y = torch.randn(16, 5, dtype=D), torch.randn(16, 3, dtype=D)
    model.zero_grad()
    (model(x) - y).square().sum(-1).mean().backward()  # no new curvature batch this step
    raw = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
    assert pc.step()
    c = pc.curvature(model[0])
    new_t = [(c, c)] if isinstance(c, torch.Tensor) else c.terms
    old_t = [(old["0"], old["0"])] if isinstance(c, torch.Tensor) else old["0"].terms
    for (A, G), (A32, G32) in zip(new_t, old_t):  # the same curvature, cast
        assert A.dtype == D and torch.equal(A, A32.double()) and torch.equal(G, G32.double())
    if isinstance(c, kf.KroneckerSum):
        want = c.solve(raw, 1e-2)
        got = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
        assert got.dtype == D
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    run(pc, model, 2)  # and the running average goes on in float64


def test_numpy_scalars_are_accepted_and_flags_refused():
    model = mlp()
    pc = kf.KPSVD(model, damping=np.float32(0.01), cov_update_freq=np.int64(2),
                  inv_update_freq=np.int32(2), ema_decay=np.float64(0.5),
                  kl_clip=np.float32(1e-3), lr=np.float32(0.1), rank=np.int64(2),
                  tol=np.float32(1e-6), max_iter=np.int64(50), conv_radius=np.int64(0))
    hyper = pc.state_dict()["hyper"]
    assert type(hyper["damping"]) is float and type(hyper["cov_update_freq"]) is int
    assert pc.estimator.rank == 2 and type(pc.estimator.rank) is int
    run(pc, model, 1)
    for kw, match in [({"damping": True}, "damping"), ({"ema_decay": False}, "ema_decay"),
                      ({"kl_clip": True, "lr": 0.1}, "kl_clip"), ({"lr": True}, "lr"),
                      ({"cov_update_freq": True}, "cov_update_freq"), ({"rank": True}, "rank"),
                      ({"conv_radius": True}, "conv_radius")]:
        with pytest.raises(ValueError, match=match):
            kf.KPSVD(mlp(), **kw)
    with pytest.raises(ValueError, match="block_diagonal must be True or False"):
        kf.ExactNG(mlp(), block_diagonal="yes")
