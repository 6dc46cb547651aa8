"""nn.Embedding through the preconditioners: the same curvature and the same preconditioned
gradient as nn.Linear(V, d, bias=False) on one-hot inputs, for all five methods and ExactNG.

The one-hot model's statistics are taken by torch.func (per-position output gradients) and
by autograd (per-example weight gradients); its Kronecker approximations come from the
library's dense-layer code (``kronfisher.approximate`` on one-hot inputs, positions paired
with themselves only: the "expand" block) or from dense SVDs of R(F).
"""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronfisher as kf
from embedding_reference import (
    D,
    EmbeddingModel,
    OneHotModel,
    best_rank,
    expand_block,
    method_optimum,
    per_position_grads,
    token_batch,
    unvec,
    vec,
)
from kronfisher.curvature import EmbeddingBlock
from kronfisher.linalg import KroneckerSum
from kronfisher.linalg.diagonal_kronecker import DiagonalKroneckerSum

B, S, V, d, C = 4, 5, 9, 3, 4
LAM = 0.05
CLASSES = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation,
           "lanczos": kf.Lanczos, "kfac_corrected": kf.KFACCorrected}
SCHEMES = ("tikhonov", "factored", "factored_pi1", "authors")


def rel(x, y):
    return float((x - y).norm() / y.norm())


def objective(out, y):
    """Mean over sequences of the per-sequence loss ℓ_b = Σ_s CE (a "mean" loss)."""
    return F.cross_entropy(out.reshape(-1, C), y.reshape(-1), reduction="sum") / out.shape[0]


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    onehot = OneHotModel(V, d, C)
    t = token_batch(B, S, V)
    y = torch.randint(0, C, (B, S))
    return onehot, t, y


def step_once(model, precond, t, y):
    model.zero_grad()
    with precond.collect():
        objective(model(t), y).backward()
    raw = model.emb.weight.grad.T.clone()  # Θ = weightᵀ (d × V)
    with quiet_clamping():
        assert precond.step()
    return raw, model.emb.weight.grad.T.clone()


@contextlib.contextmanager
def quiet_clamping():
    """Two-term approximations clamp indefinite directions with a warning; expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the two-term|two-term Kronecker", RuntimeWarning)
        yield


def one_hot_gradient(onehot, t, y):
    onehot.zero_grad()
    objective(onehot(t), y).backward()
    return onehot.lin.weight.grad.clone()


def dense_library_sum(method: str, t, g) -> KroneckerSum:
    """The dense-layer code on one-hot inputs: a (B, S, V), positions paired with themselves.

    KFAC's factors come split as KFC's (A·S, G/S); the Linear "expand" split is (A, G).
    """
    a, T = F.one_hot(t, V).to(g.dtype), t.shape[1]
    ks = kf.approximate(a, g, method, solver="gram", pair_mask=torch.eye(T, dtype=g.dtype))
    terms = ks.terms
    if method in ("kfac", "kfac_corrected"):
        A, G = terms[0]
        terms[0] = (A / T, G * T)
    return KroneckerSum(terms)


def test_the_gradient_matrix_is_the_one_hot_linear_gradient(data):
    onehot, t, y = data
    emb = EmbeddingModel(onehot)
    emb.zero_grad()
    objective(emb(t), y).backward()
    torch.testing.assert_close(emb.emb.weight.grad.T, one_hot_gradient(onehot, t, y),
                               rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("method", sorted(CLASSES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_curvature_and_preconditioned_gradient_equal_the_one_hot_linear_model(
        data, method, scheme):
    onehot, t, y = data
    emb = EmbeddingModel(onehot)
    pc = CLASSES[method](emb, damping=LAM, damping_scheme=scheme)
    assert list(pc.layers) == ["emb"] and pc.skipped == ["head.weight", "head.bias"]
    raw, out = step_once(emb, pc, t, y)
    g = per_position_grads(onehot, t, y)
    curv = pc.curvature(emb.emb)
    assert isinstance(curv, DiagonalKroneckerSum)
    # the method's optimum of the one-hot model's expand block (dense SVD of R(F))
    assert rel(curv.to_dense(), method_optimum(method, t, g, V)) < 1e-10
    # the preconditioned gradient of the one-hot Linear through the dense-layer code
    torch.testing.assert_close(raw, one_hot_gradient(onehot, t, y), rtol=1e-13, atol=1e-15)
    with quiet_clamping():
        ref = dense_library_sum(method, t, g).solve(raw, LAM, scheme)
    assert rel(out, ref) < 1e-8


def test_exact_ng_is_the_exact_block_of_the_one_hot_model(data):
    onehot, t, y = data
    emb = EmbeddingModel(onehot)
    pc = kf.ExactNG(emb, damping=LAM)
    raw, out = step_once(emb, pc, t, y)
    J = []
    for b in range(B):  # per-example gradients of ℓ_b of the one-hot model, by autograd
        onehot.zero_grad()
        F.cross_entropy(onehot(t[b:b + 1])[0], y[b], reduction="sum").backward()
        J.append(vec(onehot.lin.weight.grad))
    Jm = torch.stack(J)
    Fx = Jm.mT @ Jm / B  # all position pairs of a sequence: not the expand block
    assert rel(pc.curvature(emb.emb), Fx) < 1e-12
    assert rel(Fx, expand_block(t, per_position_grads(onehot, t, y), V)) > 1e-2
    ref = torch.linalg.solve(Fx + LAM * torch.eye(d * V, dtype=D), vec(raw))
    assert rel(out, unvec(ref, d, V)) < 1e-10


def test_storage_is_o_v_plus_d_squared_per_term(data):
    onehot, t, y = data
    emb = EmbeddingModel(onehot)
    pc = kf.KPSVD(emb, rank=3, damping=LAM)
    step_once(emb, pc, t, y)
    block = pc.layers["emb"].block
    assert isinstance(block, EmbeddingBlock)
    terms = pc.curvature(emb.emb).terms
    assert len(terms) == 3 and all(a.shape == (V,) and G.shape == (d, d) for a, G in terms)
    assert block.cost(B * S).memory == 3 * (V + d * d)


def test_padding_row_gets_no_curvature_and_keeps_a_zero_gradient(data):
    onehot, t, y = data
    pad = int(t[0, 0])  # present, repeated inside sequence 0
    emb = EmbeddingModel(onehot, padding_idx=pad)
    pc = kf.KPSVD(emb, damping=LAM, damping_scheme="factored")
    raw, out = step_once(emb, pc, t, y)
    assert torch.equal(raw[:, pad], torch.zeros(d, dtype=D))
    assert torch.equal(out[:, pad], torch.zeros(d, dtype=D))
    a, _ = pc.curvature(emb.emb).terms[0]
    assert float(a[pad]) == 0.0
    # the optimum of the expand block of the positions that are not padding
    g = per_position_grads(onehot, t, y) * (t != pad)[..., None].to(D)
    assert rel(pc.curvature(emb.emb).to_dense(), best_rank(expand_block(t, g, V), V, d, 1)) < 1e-10


def test_kfac_with_padding_averages_over_the_kept_positions(data):
    onehot, t, y = data
    pad = int(t[0, 0])
    emb = EmbeddingModel(onehot, padding_idx=pad)
    pc = kf.KFAC(emb, damping=LAM)
    step_once(emb, pc, t, y)
    keep = (t != pad).reshape(-1)
    g = per_position_grads(onehot, t, y).reshape(-1, d)[keep]
    counts = torch.bincount(t.reshape(-1)[keep], minlength=V).to(D)
    a, G = pc.curvature(emb.emb).terms[0]
    torch.testing.assert_close(a, counts / keep.sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(G, g.mT @ g / B, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("kwargs, why", [
    ({"max_norm": 1.0}, "max_norm=1.0: its forward renormalises"),
    ({"sparse": True}, "sparse=True: its gradient is a sparse tensor"),
    ({"scale_grad_by_freq": True}, "scale_grad_by_freq=True"),
])
def test_unsupported_embedding_configurations_are_refused_at_construction(kwargs, why):
    model = nn.Sequential(nn.Embedding(V, d, **kwargs), nn.Flatten(), nn.Linear(2 * d, 2))
    pc = kf.KFAC(model)
    assert list(pc.layers) == ["2"]
    assert why in pc.skip_reasons["0.weight"]
    with pytest.raises(kf.layers.UnsupportedLayerError, match="no supported layer"):
        kf.KFAC(nn.Sequential(nn.Embedding(V, d, **kwargs)))


def test_batch_of_single_tokens_and_float32(data):
    onehot, t, y = data
    emb = EmbeddingModel(onehot).float()
    pc = kf.KFACCorrected(emb, damping=LAM)
    tok = t[:, 0]  # (B,) inputs: one position per example
    emb.zero_grad()
    with pc.collect():
        F.cross_entropy(emb(tok), y[:, 0]).backward()
    raw = emb.emb.weight.grad.T.clone()
    assert pc.step()
    g = per_position_grads(onehot, tok[:, None], y[:, :1])
    ref = dense_library_sum("kfac_corrected", tok[:, None], g)
    assert rel(pc.curvature(emb.emb).to_dense().double(), ref.to_dense()) < 1e-5
    assert pc.curvature(emb.emb).dtype == torch.float32
    with quiet_clamping():
        want = ref.solve(raw.double(), LAM, "tikhonov")
    assert rel(emb.emb.weight.grad.T.double(), want) < 1e-4


def test_state_dict_round_trip_and_curvature_product(data):
    onehot, t, y = data
    emb = EmbeddingModel(onehot)
    pc = kf.Deflation(emb, damping=LAM)
    raw, out = step_once(emb, pc, t, y)
    prod = pc.curvature_product({"emb": out})["emb"]
    assert rel(prod, raw) < 1e-12  # M Δ = ∇
    state = pc.state_dict()
    emb2 = EmbeddingModel(onehot)
    pc2 = kf.Deflation(emb2, damping=LAM)
    pc2.load_state_dict(state)
    emb2.zero_grad()
    objective(emb2(t), y).backward()
    with quiet_clamping():
        assert pc2.step()
    assert rel(emb2.emb.weight.grad.T, out) < 1e-14
    bad = pc.state_dict()
    bad["layers"]["emb"]["curvature"] = [(torch.zeros(V + 1, dtype=D), torch.eye(d, dtype=D))] * 2
    with pytest.raises(ValueError, match=r"needs a \(9,\)"):
        kf.Deflation(EmbeddingModel(onehot), damping=LAM).load_state_dict(bad)


def test_a_batch_of_padding_only_keeps_the_curvature(data):
    onehot, t, y = data
    emb = EmbeddingModel(onehot, padding_idx=0)
    pc = kf.KFAC(emb, damping=LAM)
    step_once(emb, pc, t, y)
    before = pc.curvature(emb.emb)
    pads = torch.zeros_like(t)
    emb.zero_grad()
    with pc.collect():
        objective(emb(pads), y).backward()
    with pytest.warns(RuntimeWarning, match="padding tokens only"):
        assert pc.step()
    assert pc.curvature(emb.emb) is before
    assert pc.warning_counts[("emb", "only_padding")] == 1


def test_a_lapack_failure_falls_back_to_power_iteration_then_to_kfac(data, monkeypatch):
    import kronfisher.curvature.embedding_block as eb

    onehot, t, y = data
    real = eb.approximate_embedding
    g = per_position_grads(onehot, t, y)

    def failing(*args, solver="auto", **kw):
        if args[3] != "kfac" and (solver != "power" or fail_power):
            raise torch.linalg.LinAlgError("simulated: the eigh did not converge")
        return real(*args, solver=solver, **kw)

    monkeypatch.setattr(eb, "approximate_embedding", failing)
    fail_power = False
    emb = EmbeddingModel(onehot)
    pc = kf.Lanczos(emb, damping=LAM)
    with pytest.warns(RuntimeWarning, match="used the 'power' solver instead"):
        step_once(emb, pc, t, y)
    assert rel(pc.curvature(emb.emb).to_dense(), method_optimum("lanczos", t, g, V)) < 1e-9
    fail_power = True  # every solver fails, no previous curvature: KFAC's factors
    emb = EmbeddingModel(onehot)
    pc = kf.Lanczos(emb, damping=LAM)
    with pytest.warns(RuntimeWarning, match="uses KFAC's factors"):
        step_once(emb, pc, t, y)
    c = pc.curvature(emb.emb)
    assert len(c) == 2 and float(c.terms[1][0].abs().sum()) == 0.0
    assert rel(c.to_dense(), method_optimum("kfac", t, g, V)) < 1e-13


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_the_library_gives_the_one_hot_linear_model_the_same_update(data, method):
    """The one-hot nn.Linear on (B, S, V) inputs, through the dense block's "expand"."""
    onehot, t, y = data
    lin_model, emb = OneHotModel(V, d, C), EmbeddingModel(onehot)
    lin_model.load_state_dict(onehot.state_dict())
    pl = CLASSES[method](lin_model, damping=LAM, damping_scheme="factored_pi1")
    pe = CLASSES[method](emb, damping=LAM, damping_scheme="factored_pi1")
    assert list(pl.layers) == ["lin"] and list(pe.layers) == ["emb"]
    _, out = step_once(emb, pe, t, y)
    lin_model.zero_grad()
    with pl.collect():
        objective(lin_model(t), y).backward()
    with quiet_clamping():
        assert pl.step()
    assert rel(pe.curvature(emb.emb).to_dense(), pl.curvature(lin_model.lin).to_dense()) < 1e-9
    assert rel(out, lin_model.lin.weight.grad) < 1e-8


def test_reduce_and_exact_weight_sharing_are_refused_for_embeddings(data):
    onehot, _, _ = data
    for mode, why in (("reduce", "is not one-hot"), ("exact", "pairs different tokens")):
        with pytest.raises(ValueError, match=f"weight_sharing='{mode}' is not supported for"
                                             f" nn.Embedding: .*{why}"):
            kf.KFAC(EmbeddingModel(onehot), weight_sharing=mode)


def test_two_calls_in_one_forward_are_positions_of_the_same_examples(data):
    onehot, t, y = data

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = EmbeddingModel(onehot)

        def forward(self, t):  # the table read at two token sequences of each example
            e = self.inner.emb
            return self.inner.head(torch.tanh(torch.cat([e(t[:, :2]), e(t[:, 2:])], 1)))

    twice, once = Twice(), EmbeddingModel(onehot)
    pt, po = kf.KFACCorrected(twice, damping=LAM), kf.KFACCorrected(once, damping=LAM)
    twice.zero_grad()
    with pt.collect():
        objective(twice(t), y).backward()
    with quiet_clamping():
        assert pt.step()
    _, out = step_once(once, po, t, y)
    assert rel(pt.curvature(twice.inner.emb).to_dense(), po.curvature(once.emb).to_dense()) < 1e-13
    assert rel(twice.inner.emb.weight.grad.T, out) < 1e-12
