"""Which modules get an adapter: the global registry, per-preconditioner overrides,
subclasses of supported layers, and nn.MultiheadAttention (skipped with its reasons)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronfisher as kf
from kronfisher.layers import ADAPTERS, LinearAdapter, resolve

D = torch.float64


class KeepsForward(nn.Linear):
    """A Linear subclass that adds nothing to forward (registered like nn.Linear)."""


class OverridesForward(nn.Linear):
    def forward(self, x):
        return super().forward(2 * x)


class Scaled(nn.Module):
    """A custom layer: y = W x (a Linear in all but type)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, dtype=D) / n_in**0.5)
        self.bias = None

    def forward(self, x):
        return F.linear(x, self.weight)


class ScaledAdapter(LinearAdapter):
    """Scaled is a bias-free Linear: the Linear adapter's statistics apply."""


class NoKind(LinearAdapter):
    kind = ""


def train_step(model, precond, x, y):
    model.zero_grad()
    with precond.collect():
        F.mse_loss(model(x), y).backward()
    assert precond.step()
    return [p.grad.clone() for p in model.parameters()]


def test_a_subclass_keeping_forward_is_preconditioned_exactly_like_its_parent():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    sub = nn.Sequential(KeepsForward(4, 3), nn.Tanh(), KeepsForward(3, 2)).double()
    sub.load_state_dict(plain.state_dict())
    x, y = torch.randn(16, 4, dtype=D), torch.randn(16, 2, dtype=D)
    pa, pb = kf.KPSVD(plain, damping=0.1), kf.KPSVD(sub, damping=0.1)
    assert list(pb.layers) == ["0", "2"] and pb.skipped == []
    assert resolve(sub[0]).matched is nn.Linear
    for ga, gb in zip(train_step(plain, pa, x, y), train_step(sub, pb, x, y)):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


def test_a_subclass_overriding_forward_is_skipped_with_the_reason():
    model = nn.Sequential(OverridesForward(4, 3), nn.Linear(3, 2))
    pc = kf.KFAC(model)
    assert list(pc.layers) == ["1"] and pc.skipped == ["0.weight", "0.bias"]
    why = pc.skip_reasons["0.weight"]
    assert "OverridesForward is a subclass of Linear that overrides forward" in why
    assert "register_adapter" in why
    # an adapter for exactly that type (per preconditioner) registers it
    pc = kf.KFAC(model, adapters={OverridesForward: LinearAdapter})
    assert list(pc.layers) == ["0", "1"]


def test_per_preconditioner_adapters_touch_nothing_global():
    torch.manual_seed(0)
    model = nn.Sequential(Scaled(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    before = dict(ADAPTERS)
    pc = kf.KFAC(model, damping=0.1, adapters={Scaled: ScaledAdapter})
    assert list(pc.layers) == ["0", "2"] and isinstance(pc.layers["0"].adapter, ScaledAdapter)
    assert dict(ADAPTERS) == before
    other = kf.KFAC(model)
    assert list(other.layers) == ["2"]
    assert other.skip_reasons["0.weight"] == "Scaled is not a supported layer type"
    # Scaled with the Linear adapter is the bias-free Linear it computes: same update
    ref = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 2)).double()
    ref[0].weight.data.copy_(model[0].weight.data)
    ref[2].load_state_dict(model[2].state_dict())
    x, y = torch.randn(16, 4, dtype=D), torch.randn(16, 2, dtype=D)
    want = train_step(ref, kf.KFAC(ref, damping=0.1), x, y)
    for ga, gb in zip(train_step(model, pc, x, y), want):
        torch.testing.assert_close(ga, gb, rtol=1e-14, atol=0)


def test_register_adapter_is_global_and_checked():
    model = nn.Sequential(Scaled(4, 3))
    try:
        kf.register_adapter(Scaled, ScaledAdapter)
        assert list(kf.KFAC(model).layers) == ["0"]
        assert list(kf.ExactNG(model).layers) == ["0"]
        kf.register_adapter(Scaled, ScaledAdapter)  # the same pair again: no change
        with pytest.raises(ValueError, match="already has the adapter ScaledAdapter"):
            kf.register_adapter(Scaled, LinearAdapter)
        kf.register_adapter(Scaled, LinearAdapter, replace=True)
        assert type(kf.KFAC(model).layers["0"].adapter) is LinearAdapter
    finally:
        ADAPTERS.pop(Scaled, None)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        kf.register_adapter(int, LinearAdapter)
    with pytest.raises(TypeError, match="LayerAdapter subclass"):
        kf.register_adapter(Scaled, object)
    with pytest.raises(ValueError, match="declares no kind"):
        kf.register_adapter(Scaled, NoKind)
    with pytest.raises(TypeError, match="adapters must be a mapping"):
        kf.KFAC(model, adapters=[Scaled])
    assert Scaled not in ADAPTERS


def test_an_adapter_kind_without_a_block_is_refused_at_construction():
    class Odd(LinearAdapter):
        kind = "odd"

    with pytest.raises(ValueError, match="no curvature block for layer kind 'odd'"):
        kf.KFAC(nn.Sequential(Scaled(4, 3)), adapters={Scaled: Odd})


class Attention(nn.Module):
    def __init__(self, E=8, kdim=None):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, 2, kdim=kdim, vdim=kdim, batch_first=True)
        self.head = nn.Linear(E, 2)

    def forward(self, x, kv):
        h, _ = self.mha(x, kv, kv)
        return self.head(h.mean(1))


@pytest.mark.parametrize("kdim", [None, 6])
def test_multihead_attention_is_skipped_with_precise_reasons(kdim):
    torch.manual_seed(0)
    model = Attention(kdim=kdim)
    pc = kf.KPSVD(model, damping=0.1)
    assert list(pc.layers) == ["head"]  # out_proj (a Linear subclass) is not registered
    own = [n for n, _ in model.mha.named_parameters(recurse=False)]
    assert ("in_proj_weight" in own) == (kdim is None)
    assert sorted(pc.skipped) == sorted([f"mha.{n}" for n in own] + ["mha.out_proj.weight",
                                                                     "mha.out_proj.bias"])
    for n in own:
        assert "F.multi_head_attention_forward" in pc.skip_reasons[f"mha.{n}"]
    why = pc.skip_reasons["mha.out_proj.weight"]
    assert "'mha.out_proj' of nn.MultiheadAttention 'mha'" in why
    assert "its own forward is never called" in why
    # out_proj would pass the subclass rule on its own: the attention is why it is skipped
    assert resolve(model.mha.out_proj).adapter is LinearAdapter
    # and training steps work: the head is preconditioned, the attention keeps raw gradients
    x, kv = torch.randn(5, 3, 8), torch.randn(5, 4, kdim or 8)
    model.zero_grad()
    with pc.collect():
        F.mse_loss(model(x, kv), torch.randn(5, 2)).backward()
    raw = model.mha.out_proj.weight.grad.clone()
    assert pc.step()
    assert torch.equal(model.mha.out_proj.weight.grad, raw)
