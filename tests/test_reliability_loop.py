"""Issue 17, items 1, 3, 4, 5 (docs/reliability.md, class 8): a real training loop.

Whole-model checkpoints and copies see no preconditioner; gradient accumulation gives the
full batch's curvature; a gradient no new backward produced is never preconditioned again.
"""

import copy
import gc
import io
import pickle
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks
from torch.utils.checkpoint import checkpoint

import kronfisher as kf

D = torch.float64
CLASSES = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation,
           "kfac_corrected": kf.KFACCorrected, "lanczos": kf.Lanczos,
           "exact": lambda m, **kw: kf.ExactNG(m, **kw),
           "exact_full": lambda m, **kw: kf.ExactNG(m, block_diagonal=False, **kw)}


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def nll(out, y):
    """Per-example loss ½‖out − y‖² (its Fisher is the GGN)."""
    return 0.5 * (out - y).square().sum(-1)


def trained(cls=kf.KFAC, seed=0, **kw):
    model = mlp(seed)
    pc = cls(model, damping=1e-2, **kw)
    x, y = torch.randn(16, 5, dtype=D), torch.randn(16, 3, dtype=D)
    with pc.collect():
        nll(model(x), y).mean().backward()
    assert pc.step()
    return model, pc, x, y


def curvature_dense(pc, model, lam=0.0):
    out = []
    for m in (model[0], model[2]):
        c = pc.curvature(m)
        out.append(c if isinstance(c, torch.Tensor) else c.to_dense(lam))
    return out


# ------------------------------------------------------- 1: checkpoints and pickling
@pytest.mark.parametrize("after_step", [False, True])
def test_torch_save_of_the_model_leaves_the_preconditioner_out(after_step, tmp_path):
    model = mlp()
    pc = kf.KPSVD(model, damping=1e-2)
    x, y = torch.randn(16, 5, dtype=D), torch.randn(16, 3, dtype=D)
    if after_step:
        with pc.collect():
            nll(model(x), y).mean().backward()
        assert pc.step()
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "backward hook ... will not be serialized"
        torch.save(model, path)
    assert b"kronfisher" not in path.read_bytes()  # nothing of ours went into the file
    loaded = torch.load(path, weights_only=False)
    assert all(not m._forward_hooks for m in loaded.modules())
    assert all(not p._post_accumulate_grad_hooks for p in loaded.parameters())
    loaded.zero_grad()
    nll(loaded(x), y).mean().backward()  # runs without a preconditioner
    for p, q in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(p, q)
    want = torch.func.grad(lambda ps: nll(torch.func.functional_call(model, ps, (x,)),
                                          y).mean())(dict(model.named_parameters()))
    for (n, p) in loaded.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-12, atol=1e-14)


def test_pickling_or_copying_the_preconditioner_is_refused_pointing_at_state_dict():
    model, pc, _, _ = trained()
    for do in (pickle.dumps, copy.deepcopy, copy.copy, lambda p: torch.save(p, io.BytesIO())):
        with pytest.raises(TypeError, match=r"cannot be pickled or copied.*state_dict\(\)"):
            do(pc)
    # the supported way: a new preconditioner and load_state_dict, through a file
    buf = io.BytesIO()
    torch.save(pc.state_dict(), buf)
    buf.seek(0)
    other = kf.KFAC(model, damping=1.0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.damping == pc.damping and other.steps == pc.steps


def test_a_dropped_preconditioner_is_freed_and_its_hooks_removed():
    from kronfisher.preconditioner.hooks import WeakHook

    model = mlp()
    first = kf.KFAC(model)
    ref = weakref.ref(first)
    second = kf.KFAC(model)  # a second one on the same model
    del first
    gc.collect()
    assert ref() is None
    targets = [h.target for h in _global_forward_hooks.values() if isinstance(h, WeakHook)]
    assert second in targets and None not in targets  # no dead hook of ours is left
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())
    x, y = torch.randn(8, 5, dtype=D), torch.randn(8, 3, dtype=D)
    with second.collect():
        nll(model(x), y).mean().backward()
    assert second.step()


# -------------------------------------------------------- 3: gradient accumulation
@pytest.mark.parametrize("method", list(CLASSES))
def test_accumulated_micro_batches_give_the_full_batch_curvature(method):
    """4 micro-batches with loss/4 inside collect(batch_size=N) ≡ one backward of the batch."""
    x, y = torch.randn(12, 5, dtype=D), torch.randn(12, 3, dtype=D)
    ref_model = mlp()
    ref = CLASSES[method](ref_model, damping=1e-2, ema_decay=0.0)
    with ref.collect():
        nll(ref_model(x), y).mean().backward()
    assert ref.step()
    model = mlp()
    pc = CLASSES[method](model, damping=1e-2, ema_decay=0.0)
    with pc.collect(batch_size=12):
        for xb, yb in zip(x.split(3), y.split(3)):
            (nll(model(xb), yb).mean() / 4).backward()
    assert pc.step()
    for got, want in zip(curvature_dense(pc, model), curvature_dense(ref, ref_model)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    for p, q in zip(model.parameters(), ref_model.parameters()):  # the update, too
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", ["kfac", "lanczos", "exact"])
def test_each_backward_through_one_forward_is_a_pass_over_its_examples(method):
    """Two backward calls of one graph ≡ the batch repeated with each backward's targets."""
    x = torch.randn(8, 5, dtype=D)
    y1, y2 = torch.randn(8, 3, dtype=D), torch.randn(8, 3, dtype=D)
    ref_model = mlp()
    ref = CLASSES[method](ref_model, damping=1e-2, ema_decay=0.0)
    with ref.collect():
        nll(ref_model(torch.cat([x, x])), torch.cat([y1, y2])).mean().backward()
    assert ref.step()
    model = mlp()
    pc = CLASSES[method](model, damping=1e-2, ema_decay=0.0)
    with pc.collect():
        out = model(x)
        nll(out, y1).mean().backward(retain_graph=True)
        nll(out, y2).mean().backward()
    model.zero_grad()
    nll(model(x), y1).mean().backward()
    assert pc.step()
    for got, want in zip(curvature_dense(pc, model), curvature_dense(ref, ref_model)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_collect_batch_size_is_checked():
    model, pc, _, _ = trained()
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            with pc.collect(batch_size=bad):
                pass
    with pytest.raises(ValueError, match="reduction='mean' only"):
        with pc.collect(reduction="sum", batch_size=4):
            pass


# ------------------------------------------- 4: gradients no new backward produced
def test_parameters_outside_the_optimizer_are_not_preconditioned_again():
    """Fine-tune the head (model[2]); the body (model[0]) keeps requires_grad=True."""
    torch.manual_seed(0)
    model = mlp()
    pc = kf.KFAC(model, damping=1e-2, kl_clip=1e-4, lr=0.1)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    xs = [torch.randn(16, 5, dtype=D) for _ in range(4)]
    ys = [torch.randn(16, 3, dtype=D) for _ in range(4)]
    caught = []
    for k, (x, y) in enumerate(zip(xs, ys)):
        opt.zero_grad()
        with pc.collect():
            nll(model(x), y).mean().backward()
        opt.zero_grad()
        body_before = model[0].weight.grad.clone()
        nll(model(x), y).mean().backward()
        raw = {i: torch.cat([model[i].weight.grad, model[i].bias.grad[:, None]], 1)
               for i in (0, 2)}
        body_now = model[0].weight.grad.clone()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert pc.step()
        caught += [str(m.message) for m in w]
        if k > 0:  # the body's .grad: what it held plus raw gradients, left exactly as it was
            assert torch.equal(model[0].weight.grad, body_now)
            assert not torch.equal(body_now, body_before)
        # the head's update: its own solve, KL-clipped over the layers preconditioned now
        # (both at the first step, when the body's gradient is new; the head alone after)
        delta = {i: pc.curvature(model[i]).solve(raw[i], 1e-2) for i in (0, 2)}
        dots = sum(float((delta[i] * raw[i]).sum()) for i in ((0, 2) if k == 0 else (2,)))
        nu = min(1.0, (1e-4 / (0.1 ** 2 * dots)) ** 0.5)
        assert nu < 1.0  # the clip is active, so the body would change it
        got = torch.cat([model[2].weight.grad, model[2].bias.grad[:, None]], 1)
        torch.testing.assert_close(got, nu * delta[2], rtol=1e-10, atol=1e-14)
        opt.step()
    body = [m for m in caught if "['0']" in m]
    assert len(body) == 1 and "outside the optimizer" in body[0]  # warned once, named


def test_a_layer_left_out_of_the_backward_keeps_its_gradient():
    model, pc, x, y = trained()
    h = torch.tanh(model[0](x)).detach()
    model[2].zero_grad()
    nll(model[2](h), y).mean().backward()  # only the head gets a new gradient
    body = model[0].weight.grad.clone()
    with pytest.warns(RuntimeWarning, match=r"\['0'\] still hold the .grad"):
        assert pc.step()
    assert torch.equal(model[0].weight.grad, body)


def test_zeroing_in_place_then_backward_is_a_new_gradient():
    model, pc, x, y = trained()
    model.zero_grad(set_to_none=False)
    nll(model(x), y).mean().backward()
    raw = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pc.step()
    got = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
    torch.testing.assert_close(got, pc.curvature(model[0]).solve(raw, 1e-2), rtol=1e-10,
                               atol=1e-14)


def test_backward_without_zero_grad_everywhere_skips_the_step_and_says_so():
    model, pc, x, y = trained()
    nll(model(x), y).mean().backward()  # onto the preconditioned gradients
    with pytest.warns(RuntimeWarning, match=r"got a backward added onto.*step skipped, all"
                                            r" gradients cleared"):
        assert pc.step() is False
    assert all(p.grad is None for p in model.parameters())  # optimizer.step() does nothing
    assert pc.skipped_steps == 1
    nll(model(x), y).mean().backward()  # the next backward gives new gradients again
    assert pc.step()


# ----------------------------------------------------------------- 5: copies
def test_training_a_deepcopy_of_the_model_is_reported():
    model = mlp()
    pc = kf.KFAC(model, damping=1e-2)
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 5, dtype=D), torch.randn(8, 3, dtype=D)
    with pc.collect():
        nll(twin(x), y).mean().backward()
    assert all(not s.captures for s in pc.layers.values())
    with pytest.warns(RuntimeWarning, match=r"no \.grad.*copy\.deepcopy\(model\).*step"
                                            r" skipped"):
        assert pc.step() is False
    own = kf.KFAC(twin, damping=1e-2)  # the way: a preconditioner of the copy
    with own.collect():
        nll(twin(x), y).mean().backward()
    assert own.step()


def test_deepcopy_of_the_model_after_training_copies_no_hook():
    model, pc, x, y = trained()
    twin = copy.deepcopy(model)  # carries no hook, hence no copy of the preconditioner
    assert all(not m._forward_hooks for m in twin.modules())
    assert all(not p._post_accumulate_grad_hooks for p in twin.parameters())
    twin.zero_grad()
    with pc.collect():
        nll(twin(x), y).mean().backward()  # not registered: nothing recorded
    assert all(not s.captures for s in pc.layers.values())


# --------------------------------------------------- 8: activation checkpointing
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_records_the_batch_without_a_warning(reentrant):
    x, y = torch.randn(8, 5, dtype=D), torch.randn(8, 3, dtype=D)
    ref_model = mlp()
    ref = kf.KFAC(ref_model, damping=1e-2, ema_decay=0.0)
    with ref.collect():
        nll(ref_model(x), y).mean().backward()
    ref.step()
    model = mlp()
    pc = kf.KFAC(model, damping=1e-2, ema_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            model.zero_grad()
            with pc.collect():  # the first Linear is recomputed during the backward
                h = checkpoint(model[:2], x.clone().requires_grad_(), use_reentrant=reentrant)
                nll(model[2](h), y).mean().backward()
            assert pc.step()
    for got, want in zip(curvature_dense(pc, model), curvature_dense(ref, ref_model)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
