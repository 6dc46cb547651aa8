"""Fault classes 2 and 3 (docs/reliability.md): NaN in skipped parameters, and misuse.

Every model parameter's gradient is checked before anything is written; a second step()
on the gradients it already preconditioned, use after remove_hooks(), bad solver options
and a state_dict of other widths raise clear errors instead of giving wrong gradients.
"""

import pytest
import torch
from torch import nn

import kronfisher as kf
from helpers import Affine


class Net(nn.Module):
    """Linear → Affine (a layer type the preconditioner skips) → Linear."""

    def __init__(self, width=5):
        super().__init__()
        self.fc1 = nn.Linear(6, width)
        self.ln = Affine(width)
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


def _setup(cls=kf.KFAC, seed=0, width=5, **kw):
    torch.manual_seed(seed)
    model = Net(width).double()
    pc = cls(model, damping=1e-2, **kw)
    x = torch.randn(32, 6, dtype=torch.float64)
    with pc.collect():
        kf.sampled_nll(model(x), "gaussian").backward()
    return model, pc, x


def _backward(model, x):
    model.zero_grad(set_to_none=True)
    (model(x) - 1).square().mean().backward()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_of_a_skipped_parameter_never_reaches_the_weights(bad):
    model, pc, x = _setup()
    assert "ln.weight" in pc.skipped
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _backward(model, x)
    model.ln.weight.grad[2] = bad
    before = {n: p.clone() for n, p in model.named_parameters()}
    msg = r"non-finite gradient in parameter\(s\) \['ln.weight'\]"
    with pytest.warns(RuntimeWarning, match=msg):
        assert pc.step() is False
    opt.step()
    for n, p in model.named_parameters():
        assert p.grad is None
        assert torch.equal(p, before[n]), n
    assert pc.skipped_steps == 1


def test_nonfinite_skipped_parameter_raises_in_raise_mode_and_touches_nothing():
    model, pc, x = _setup(nonfinite="raise")
    _backward(model, x)
    model.ln.bias.grad[0] = float("nan")
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(kf.NonFiniteError, match="ln.bias"):
        pc.step()
    for n, p in model.named_parameters():  # the gradients are left as they were
        assert torch.equal(p.grad.nan_to_num(), grads[n].nan_to_num()), n


def test_second_step_without_new_gradients_raises():
    model, pc, x = _setup()
    _backward(model, x)
    assert pc.step()
    pre = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="already preconditioned"):
        pc.step()
    for n, p in model.named_parameters():  # the failed call changed nothing
        assert torch.equal(p.grad, pre[n]), n
    _backward(model, x)  # a new backward: fine again, and the same result as before
    assert pc.step()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, pre[n], rtol=1e-12, atol=0), n


def test_zeroing_in_place_and_accumulating_count_as_new_gradients():
    model, pc, x = _setup()
    _backward(model, x)
    assert pc.step()
    model.zero_grad(set_to_none=False)  # in-place zero_: a new version of the same tensors
    (model(x) - 1).square().mean().backward()
    assert pc.step()


def test_stale_gradient_of_a_layer_left_out_of_the_next_backward_is_caught():
    model, pc, x = _setup()
    _backward(model, x)
    assert pc.step()
    # no zero_grad: fc2's .grad accumulates (in place), fc1 gets no gradient at all
    h = torch.tanh(model.ln(model.fc1(x))).detach()
    model.fc2(h).square().mean().backward()
    with pytest.raises(RuntimeError, match=r"\['fc1'\]"):
        pc.step()


def test_remove_hooks_makes_collect_and_step_raise():
    model, pc, x = _setup()
    _backward(model, x)
    pc.remove_hooks()
    with pytest.raises(RuntimeError, match="remove_hooks"):
        pc.step()
    with pytest.raises(RuntimeError, match="remove_hooks"):
        with pc.collect():
            pass


@pytest.mark.parametrize("kw, match", [
    ({"solver": "bogus"}, "unknown solver 'bogus'"),
    ({"tol": -1}, "tol must be"),
    ({"tol": 0}, "tol must be"),
    ({"tol": float("nan")}, "tol must be"),
    ({"max_iter": -3}, "max_iter must be"),
    ({"max_iter": 2.5}, "max_iter must be"),
    ({"rank": 0}, "rank must be"),
])
def test_bad_solver_options_fail_at_construction(kw, match):
    model = Net()
    with pytest.raises(ValueError, match=match):
        kf.KPSVD(model, **kw)


@pytest.mark.parametrize("cls", [kf.KPSVD, kf.Deflation, kf.ExactNG])
def test_state_dict_of_other_widths_is_refused_at_load(cls):
    model_a, pc_a, x = _setup(cls, width=5)
    _backward(model_a, x)
    assert pc_a.step()
    model_b, pc_b, x = _setup(cls, seed=1, width=7)
    _backward(model_b, x)
    assert pc_b.step()
    before = {n: s.curvature for n, s in pc_b.layers.items()}
    with pytest.raises(ValueError, match="state_dict layer 'fc1'.*other widths"):
        pc_b.load_state_dict(pc_a.state_dict())
    assert {n: s.curvature for n, s in pc_b.layers.items()} == before  # untouched
    assert pc_b.steps == 1


def test_state_dict_round_trip_still_loads():
    model, pc, x = _setup(kf.KPSVD)
    _backward(model, x)
    assert pc.step()
    other = kf.KPSVD(model, damping=1e-2)
    other.load_state_dict(pc.state_dict())
    _backward(model, x)
    assert other.step()


@pytest.mark.parametrize("outputs, match", [
    (lambda: __import__("numpy").zeros((4, 3)), "numpy.ndarray"),
    (lambda: torch.zeros(4, 3, dtype=torch.long), "floating-point logits.*int64"),
    (lambda: [[0.0, 1.0]], "list"),
])
def test_sampled_nll_rejects_non_tensor_and_integer_outputs(outputs, match):
    with pytest.raises(TypeError, match=match):
        kf.sampled_nll(outputs(), "categorical")


@pytest.mark.parametrize("cls", [kf.KFAC, kf.ExactNG])
def test_state_dict_with_nonfinite_curvature_is_refused_at_load(cls):
    model, pc, x = _setup(cls)
    _backward(model, x)
    assert pc.step()
    state = pc.state_dict()
    packed = state["layers"]["fc2"]["curvature"]
    (packed[0][1] if cls is kf.KFAC else packed)[0, 0] = float("nan")
    _, other, _ = _setup(cls, seed=1)
    before = {n: s.curvature for n, s in other.layers.items()}
    with pytest.raises(ValueError, match="state_dict layer 'fc2'.*NaN or Inf"):
        other.load_state_dict(state)
    assert {n: s.curvature for n, s in other.layers.items()} == before  # untouched
