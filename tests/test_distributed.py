"""Data parallel on gloo: W ranks give the single-process result on the concatenated batch.

Each worker builds the same model and data (seeded), runs the single-process preconditioner
on the whole batch (``process_group="local"``) and the data-parallel one on its shard of a
``DistributedDataParallel`` model, two training steps each, and records the largest
relative difference of the preconditioned gradients and of the parameters. The test
process asserts ≤ 1e-8 (float64, empirical Fisher, so the check is deterministic).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import kronfisher as kf
from dist_harness import run_ranks
from kronfisher.distributed import DistributedConfig, shard_generator

D = torch.float64
METHODS = ("kfac", "kpsvd", "deflation", "kfac_corrected", "lanczos", "exact", "exact_full")
CONFIGS = {  # name → (assignment, strategy)
    "owner-auto": ("owner", "auto"),
    "replicated-gather": ("replicated", "gather"),
    "owner-krylov": ("owner", "krylov"),
    "local": (None, None),  # negative control: each rank keeps its own shard's curvature
}
TOL = 1e-8


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Sigmoid(),
                             nn.Linear(4, 3)).to(D)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3)).to(D)


def make_batch(kind: str, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (m, 5) if kind == "mlp" else (m, 2, 4, 4)
    return (torch.randn(shape, generator=g, dtype=D),
            torch.randn(m, 3, generator=g, dtype=D))


def make_precond(method: str, model, group, radius=0):
    opts = dict(damping=1e-2, ema_decay=0.95, process_group=group)
    if method == "exact":
        return kf.ExactNG(model, max_params=20_000, **opts)
    if method == "exact_full":
        return kf.ExactNG(model, block_diagonal=False, max_params=20_000, **opts)
    cls = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation,
           "kfac_corrected": kf.KFACCorrected, "lanczos": kf.Lanczos}[method]
    extra = {} if method == "kfac" else {"tol": 1e-12, "conv_radius": radius}
    return cls(model, **opts, **extra)


def loss_fn(out, y):
    return 0.5 * ((out - y) ** 2).sum(-1).mean()


def train_step(model, net, precond, opt, x, y) -> tuple[bool, list[torch.Tensor]]:
    """One collect/step/optimizer step; the preconditioned gradient matrices."""
    opt.zero_grad()
    with precond.collect():
        loss_fn(net(x), y).backward()
    ok = precond.step()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for p in model.parameters()]
    opt.step()
    return ok, grads


@torch.no_grad()
def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm().clamp_min(1e-300)) for x, y in zip(a, b))


def two_steps_against_reference(rank, world, ref_model, model, ref, pc, ddp, batch, shard,
                                seed) -> dict:
    """Two training steps of the single process on the whole batch and of this rank on its
    shard; the largest relative error of the preconditioned gradients and parameters."""
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    errs, oks = [], []
    for step in range(2):
        x, y = batch(shard * world, seed=seed + step)
        lo = rank * shard
        ok_ref, g_ref = train_step(ref_model, ref_model, ref, ref_opt, x, y)
        ok, g = train_step(model, ddp, pc, opt, x[lo:lo + shard], y[lo:lo + shard])
        oks += [ok_ref, ok]
        errs.append(rel(g, g_ref))
    errs.append(rel(list(model.parameters()), list(ref_model.parameters())))
    return {"err": max(errs), "ok": all(oks)}


def exactness_worker(rank: int, world: int, scenarios: list) -> dict:
    out: dict = {}
    shard = 6
    for method, kind, cfg, radius in scenarios:
        key = f"{method}/{kind}/{cfg}/r{radius}"
        assignment, strategy = CONFIGS[cfg]
        ref_model = make_model(kind)
        model = copy.deepcopy(ref_model)
        ref = make_precond(method, ref_model, "local", radius)
        ddp = DDP(model)
        group = "local" if assignment is None else DistributedConfig(
            assignment=assignment, strategy=strategy, timeout=20.0)
        pc = make_precond(method, ddp, group, radius)
        res = two_steps_against_reference(
            rank, world, ref_model, model, ref, pc, ddp,
            functools.partial(make_batch, kind), shard, 100)
        out[key] = {**res,
                    "strategies": dict(getattr(pc.sync, "strategies", {})),
                    "ledger": {k: e.payload for k, e in pc.sync.comm.ledger.entries.items()}
                    if pc.sync.active else {}}
    return out


def _scenarios():
    s = []
    for kind in ("mlp", "conv"):
        for method in METHODS:
            cfgs = ["owner-auto"] if method in ("kfac", "exact", "exact_full") else list(CONFIGS)
            s += [(method, kind, c, 0) for c in cfgs]
    s += [("kpsvd", "conv", c, 1) for c in ("replicated-gather", "owner-krylov")]
    s += [("kfac", "mlp", "replicated-gather", 0)]
    s += [(m, "mlp", "local", 0) for m in ("kfac", "kpsvd")]
    return s


@pytest.fixture(scope="module")
def exactness(tmp_path_factory):
    got = {}
    for world in (2, 3):
        res = run_ranks(exactness_worker, world, tmp_path_factory.mktemp(f"w{world}"),
                        _scenarios())
        for r, d in enumerate(res):
            assert "error" not in d, f"rank {r} of {world}: {d.get('error')}"
        got[world] = res
    return got


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_every_rank_gets_the_single_process_result(exactness, world, method):
    for rank, d in enumerate(exactness[world]):
        mine = {k: v for k, v in d.items()
                if k.split("/")[0] == method and k.split("/")[2] != "local"}
        assert mine, "no scenario ran"
        for key, v in mine.items():
            assert v["ok"], f"{key}: a step was skipped"
            assert v["err"] <= TOL, f"rank {rank}/{world} {key}: relative error {v['err']:.3g}"


def test_the_strategies_named_are_the_ones_run(exactness):
    d = exactness[2][0]
    assert set(d["kpsvd/mlp/owner-krylov/r0"]["strategies"].values()) == {"krylov"}
    assert set(d["kpsvd/mlp/replicated-gather/r0"]["strategies"].values()) == {"gather"}
    assert set(d["kfac/mlp/owner-auto/r0"]["strategies"].values()) == {"allreduce"}
    # krylov moves product vectors, gather moves tokens, KFAC only its factor sums
    assert "krylov_products" in d["kpsvd/mlp/owner-krylov/r0"]["ledger"]
    assert "krylov_products" not in d["kpsvd/mlp/replicated-gather/r0"]["ledger"]
    assert "gather_stats" in d["kpsvd/mlp/replicated-gather/r0"]["ledger"]


def test_kfac_bytes_are_its_factor_sums(exactness):
    # two curvature updates of three layers: (d_a² + d_g²) float64 numbers each
    dims = [(6, 6), (7, 4), (5, 3)]  # (d_a, d_g) with the bias column
    want = 2 * sum(8 * (da * da + dg * dg) for da, dg in dims)
    for world in (2, 3):
        for d in exactness[world]:
            led = d["kfac/mlp/replicated-gather/r0"]["ledger"]
            assert led["kfac_factors"] == want
            assert "gather_stats" not in led and "broadcast_preconditioned" not in led


@pytest.mark.parametrize("method", ["kfac", "kpsvd"])
def test_the_check_can_fail_without_communication(exactness, method):
    # each rank preconditioning with its own shard's curvature is far from the contract
    for world in (2, 3):
        for d in exactness[world]:
            assert d[f"{method}/mlp/local/r0"]["err"] > 1e-3


# ------------------------------------------------------------------------------------------
# An unwrapped model (the user all-reduces the gradients), unequal shards, sampled targets
SHARDS = {2: [4, 7], 3: [4, 7, 5]}


def sampled_worker(rank: int, world: int, methods: list) -> dict:
    sizes = SHARDS[world]
    m, lo = sum(sizes), sum(sizes[:rank])
    out = {}
    for method, cfg in methods:
        assignment, strategy = CONFIGS[cfg]
        ref_model = make_model("mlp", seed=3)
        model = copy.deepcopy(ref_model)
        ref = make_precond(method, ref_model, "local")
        pc = make_precond(method, model, DistributedConfig(assignment=assignment,
                                                           strategy=strategy, timeout=20.0))
        errs = []
        for step in range(2):
            x, y = make_batch("mlp", m, seed=200 + step)
            # reference: one process, shard w's targets from shard_generator(seed, w)
            ref_model.zero_grad()
            with ref.collect():
                outs = ref_model(x)
                loss = sum(len_w / m * kf.sampled_nll(
                    outs[sum(sizes[:w]):sum(sizes[:w + 1])], "gaussian",
                    generator=shard_generator(step, w)) for w, len_w in enumerate(sizes))
                loss.backward()
            ref_model.zero_grad()
            loss_fn(ref_model(x), y).backward()
            assert ref.step()
            g_ref = [p.grad.clone() for p in ref_model.parameters()]
            # rank: its shard, its generator; gradient Σ_w Σ_i∈w ∇ℓᵢ / m by all_reduce
            model.zero_grad()
            xs, ys = x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]]
            with pc.collect():
                kf.sampled_nll(model(xs), "gaussian",
                               generator=shard_generator(step, rank)).backward()
            model.zero_grad()
            (0.5 * ((model(xs) - ys) ** 2).sum() / m).backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
            assert pc.step()
            errs.append(rel([p.grad for p in model.parameters()], g_ref))
        out[f"{method}/{cfg}"] = max(errs)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_unwrapped_model_unequal_shards_and_sampled_targets(tmp_path, world):
    methods = [("kfac", "owner-auto"), ("kpsvd", "owner-krylov"),
               ("kfac_corrected", "owner-auto"), ("exact", "owner-auto")]
    res = run_ranks(sampled_worker, world, tmp_path, methods)
    for r, d in enumerate(res):
        assert "error" not in d, d.get("error")
        for key, err in d.items():
            assert err <= TOL, f"rank {r}/{world} {key}: relative error {err:.3g}"


# ------------------------------------------------------------------------------------------
# The newer layer kinds: Linear on (B, S, d) with each weight-sharing mode, nn.Embedding,
# LayerNorm, BatchNorm in eval mode. BatchNorm in training mode normalises with each rank's
# own batch statistics (DDP does not synchronise them), so its forward is not the
# concatenated batch's and there is no single-process reference to match; it is not tested.
SEQ, VOCAB = 3, 7


def make_kind_model(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "seq":  # both Linear layers see (B, S, ·) inputs
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    if kind == "embed":  # Embedding → Linear on (B, S, 4) → LayerNorm over the last dim
        model = nn.Sequential(nn.Embedding(VOCAB, 4), nn.Linear(4, 4), nn.LayerNorm(4),
                              nn.Tanh(), nn.Flatten(), nn.Linear(SEQ * 4, 3)).to(D)
        with torch.no_grad():  # γ ≠ 1, β ≠ 0 so that the scale-and-shift blocks are generic
            model[2].weight.add_(0.5 * torch.randn(4, dtype=D))
            model[2].bias.add_(0.3 * torch.randn(4, dtype=D))
        return model
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    with torch.no_grad():
        model[1].weight.add_(0.5 * torch.randn(4, dtype=D))
        model[1].bias.add_(0.3 * torch.randn(4, dtype=D))
        model[1].running_mean.copy_(0.3 * torch.randn(4, dtype=D))
        model[1].running_var.copy_(torch.rand(4, dtype=D) + 0.5)
    return model.eval()  # running statistics: the same normalisation on every rank


def make_kind_batch(kind: str, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "seq":
        return (torch.randn(m, SEQ, 5, generator=g, dtype=D),
                torch.randn(m, SEQ, 3, generator=g, dtype=D))
    if kind == "embed":
        return (torch.randint(0, VOCAB, (m, SEQ), generator=g),
                torch.randn(m, 3, generator=g, dtype=D))
    return torch.randn(m, 5, generator=g, dtype=D), torch.randn(m, 3, generator=g, dtype=D)


def make_kind_precond(method: str, model, group, sharing: str):
    if method == "exact":  # ExactNG's blocks are the exact per-example Fisher: no sharing mode
        return make_precond(method, model, group)
    cls = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation}[method]
    extra = {} if method == "kfac" else {"tol": 1e-12}
    return cls(model, damping=1e-2, ema_decay=0.95, process_group=group,
               weight_sharing=sharing, **extra)


def kinds_worker(rank: int, world: int, scenarios: list) -> dict:
    out: dict = {}
    shard = 5
    for method, kind, sharing, cfg in scenarios:
        assignment, strategy = CONFIGS[cfg]
        ref_model = make_kind_model(kind)
        model = copy.deepcopy(ref_model)
        ref = make_kind_precond(method, ref_model, "local", sharing)
        ddp = DDP(model)
        group = "local" if assignment is None else DistributedConfig(
            assignment=assignment, strategy=strategy, timeout=20.0)
        pc = make_kind_precond(method, ddp, group, sharing)
        res = two_steps_against_reference(
            rank, world, ref_model, model, ref, pc, ddp,
            functools.partial(make_kind_batch, kind), shard, 300)
        out[f"{method}/{kind}/{sharing}/{cfg}"] = {
            **res,
            "kinds": sorted({s.adapter.kind for s in pc.layers.values()})}
    return out


def _kind_scenarios():
    s = []
    for kind, modes in (("seq", ("expand", "reduce", "exact")), ("embed", ("expand",)),
                        ("bn", ("expand",))):
        for sharing in modes:
            s += [("kfac", kind, sharing, "owner-auto"), ("kpsvd", kind, sharing, "owner-auto"),
                  ("kpsvd", kind, sharing, "owner-krylov"),
                  ("deflation", kind, sharing, "replicated-gather")]
            if sharing == "expand":
                s.append(("exact", kind, sharing, "owner-auto"))
    s += [("kpsvd", "embed", "expand", "local"), ("kfac", "seq", "reduce", "local")]
    return s


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    res = run_ranks(kinds_worker, 2, tmp_path_factory.mktemp("kinds"), _kind_scenarios())
    for r, d in enumerate(res):
        assert "error" not in d, f"rank {r}: {d.get('error')}"
    return res


@pytest.mark.parametrize("kind", ["seq", "embed", "bn"])
def test_newer_layer_kinds_give_the_single_process_result(kinds, kind):
    for rank, d in enumerate(kinds):
        mine = {k: v for k, v in d.items() if k.split("/")[1] == kind and not k.endswith("local")}
        assert len(mine) >= 5, f"only {sorted(mine)} ran"
        if kind != "seq":  # the new blocks are registered, not skipped
            want = {"embedding", "scale_shift"} if kind == "embed" else {"scale_shift"}
            assert all(want <= set(v["kinds"]) for v in mine.values()), mine
        for key, v in mine.items():
            assert v["ok"], f"{key}: a step was skipped"
            assert v["err"] <= TOL, f"rank {rank} {key}: relative error {v['err']:.3g}"


def test_newer_layer_kinds_check_can_fail_without_communication(kinds):
    for d in kinds:
        assert d["kpsvd/embed/expand/local"]["err"] > 1e-3
        assert d["kfac/seq/reduce/local"]["err"] > 1e-3
