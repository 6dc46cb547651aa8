"""The curvature-block shape: one [W b] layout, per-module adapters, the block registry."""

import pytest
import torch
from torch import nn

from helpers import D
from kronfisher import KFAC, KPSVD, ExactNG
from kronfisher.curvature import DEFAULT_BLOCKS, DenseKroneckerBlock, KroneckerBlock, block_class
from kronfisher.layers import LayerStatistics, Pairing, ParamLayout, adapter_for
from kronfisher.linalg import KroneckerSum


@pytest.mark.parametrize("module", [nn.Linear(4, 3), nn.Linear(4, 3, bias=False),
                                    nn.Conv2d(2, 3, 3), nn.Conv2d(2, 3, 2, bias=False)])
def test_layout_maps_are_inverse_and_match_the_column_order(module):
    module = module.double()
    layout = adapter_for(module).layout
    w, b = module.weight, module.bias
    d_g, d_a = layout.shape
    assert d_g == w.shape[0] and d_a == w[0].numel() + (b is not None)
    assert layout.n_params == sum(p.numel() for p in module.parameters())
    M = torch.randn(d_g, d_a, dtype=D)
    parts = layout.from_matrix(M)
    assert [tuple(p.shape) for p in parts] == [tuple(p.shape) for p in adapter_for(module).params()]
    torch.testing.assert_close(layout.to_matrix(parts), M, rtol=0, atol=0)
    # column j < d_a − bias is the flattened weight's column j; the last one the bias
    torch.testing.assert_close(parts[0].reshape(d_g, -1), M[:, : w[0].numel()], rtol=0, atol=0)
    if b is not None:
        torch.testing.assert_close(parts[1], M[:, -1], rtol=0, atol=0)
        # a bias without a gradient is zeros in Θ
        assert bool((layout.to_matrix([parts[0], None])[:, -1] == 0).all())


def test_transposed_layout_is_the_weight_transpose():
    layout = ParamLayout((7, 3), has_bias=False, transposed=True)
    assert layout.shape == (3, 7)
    W = torch.randn(7, 3, dtype=D)
    torch.testing.assert_close(layout.to_matrix([W]), W.T, rtol=0, atol=0)
    torch.testing.assert_close(layout.from_matrix(W.T)[0], W, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no bias"):
        ParamLayout((7, 3), has_bias=True, transposed=True)
    with pytest.raises(ValueError, match="shape"):
        layout.from_matrix(W)


def test_adapters_are_per_module_and_declare_their_kind():
    lin, conv = nn.Linear(4, 3), nn.Conv2d(2, 3, 3)
    a1, a2 = adapter_for(lin), adapter_for(lin)
    assert a1 is not a2 and a1.module is lin
    assert a1.kind == "dense" and adapter_for(conv).kind == "conv2d"
    g = torch.randn(5, 3, 4, 6)
    assert adapter_for(conv).pairing(g) == Pairing("grid", (4, 6))
    assert a1.pairing(torch.randn(5, 3)) == Pairing()


def test_every_kronecker_layer_gets_a_block_and_overrides_win_by_name_then_kind():
    class Marked(KroneckerBlock):
        pass

    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    pc = KPSVD(model)
    assert all(type(s.block) is DenseKroneckerBlock for s in pc.layers.values())
    conv = KPSVD(nn.Sequential(nn.Conv2d(2, 2, 3)))
    assert type(conv.layers["0"].block) is KroneckerBlock
    pc = KPSVD(model, blocks={"dense": Marked})
    assert all(type(s.block) is Marked for s in pc.layers.values())
    pc = KPSVD(model, blocks={"2": Marked})
    assert type(pc.layers["2"].block) is Marked
    assert type(pc.layers["0"].block) is DenseKroneckerBlock
    assert block_class("x", "dense", "kfac", {"x": Marked, "dense": KroneckerBlock}) is Marked
    # the global map is untouched by per-preconditioner overrides
    assert DEFAULT_BLOCKS[("dense", "kpsvd")] is DenseKroneckerBlock
    with pytest.raises(ValueError, match="no curvature block for layer kind 'no_such_kind'"):
        block_class("e", "no_such_kind", "kfac")
    with pytest.raises(TypeError, match="CurvatureBlock subclass"):
        KFAC(model, blocks={"dense": object})


def test_block_checks_refuse_other_curvature_kinds_and_bad_saved_state():
    model = nn.Sequential(nn.Linear(4, 3)).double()
    block = KFAC(model).layers["0"].block
    assert block is not None
    with pytest.raises(TypeError, match="must be a KroneckerSum, got Tensor"):
        block.finite(torch.eye(3))
    ks = KroneckerSum([(torch.eye(5, dtype=D), torch.eye(3, dtype=D))])
    assert block.finite(ks)
    bad = KroneckerSum([(torch.eye(5, dtype=D), torch.full((3, 3), float("nan"), dtype=D))])
    assert not block.finite(bad)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="NaN or Inf"):
        block.unpack(block.pack(bad), "saved", D, cpu)
    with pytest.raises(ValueError, match=r"needs A \(5, 5\), G \(3, 3\)"):
        block.unpack([(torch.eye(4, dtype=D), torch.eye(3, dtype=D))], "saved", D, cpu)
    back = block.unpack(block.pack(ks), "saved", torch.float32, cpu)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back.to_dense().double(), ks.to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize("method,terms", [("kfac", 1), ("kpsvd", 1), ("kfac_corrected", 2)])
def test_cost_memory_is_the_numbers_the_packed_curvature_holds(method, terms):
    from kronfisher.preconditioner.kronecker import KroneckerPreconditioner

    model = nn.Sequential(nn.Linear(4, 3)).double()
    pc = KroneckerPreconditioner(model, method=method)
    s = pc.layers["0"]
    x = torch.randn(8, 4, dtype=D)
    with pc.collect():
        model(x).square().sum().backward()
    pc.step()
    assert s.block is not None
    packed = s.block.pack(s.curvature)
    assert len(packed) == terms
    assert s.block.cost(8).memory == sum(A.numel() + G.numel() for A, G in packed)


def test_kronecker_block_update_is_the_estimators_method_on_typed_statistics():
    model = nn.Sequential(nn.Linear(4, 3)).double()
    pc = KPSVD(model)
    block = pc.layers["0"].block
    assert block is not None
    a = torch.cat([torch.randn(9, 1, 4, dtype=D), torch.ones(9, 1, 1, dtype=D)], -1)
    g = torch.randn(9, 1, 3, dtype=D)
    got = block.update(None, LayerStatistics(a, g), 0.0)
    want = pc.estimator.estimate(a, g, (1, 1), None)
    torch.testing.assert_close(got.to_dense(), want.to_dense(), rtol=0, atol=0)


def test_exact_ng_offsets_follow_the_layout():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2, bias=False)).double()
    pc = ExactNG(model, block_diagonal=False)
    assert pc._offsets == {"0": (0, 15), "2": (15, 21)}
