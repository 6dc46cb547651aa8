"""AdaptiveNG data parallel: every rank takes the α, μ, λ of one process on the whole batch.

Each worker runs AdaptiveNG over a single-process preconditioner on the concatenated
batch and over a data-parallel one on its shard of a ``DistributedDataParallel`` model,
for several steps (the 2×2 model with δ_prev from step 2 on, ρ and λ updated every
step), and records the largest relative difference of α, μ, q, ρ, λ, the closure's loss
and the parameters. float64, empirical Fisher (deterministic), 2 gloo processes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import kronfisher as kf
from dist_harness import run_ranks
from kronfisher.distributed import DistributedConfig
from test_distributed import loss_fn, make_batch, make_model, make_precond

TOL = 1e-8
STEPS = 4
SCENARIOS = {  # name → (method, assignment, AdaptiveNG options)
    "kfac-ggn": ("kfac", "owner", {}),
    "kpsvd-ggn-inputs": ("kpsvd", "owner", {"model_grad": "inputs", "weight_decay": 1e-3}),
    "deflation-approx": ("deflation", "replicated", {"quad_model": "approx"}),
    "exact-fixed-mu": ("exact", "owner", {"momentum": 0.5}),
    "kpsvd-lr-kl": ("kpsvd", "owner", {"lr": 0.3, "momentum": 0.9, "kl_clip": 1e-2}),
}
FIELDS = ("alpha", "momentum", "q", "rho", "damping", "next_damping", "loss")


def run_adaptive(model, net, opt, pc, x, y) -> list[dict]:
    records = []
    for _ in range(STEPS):
        with pc.collect():
            loss_fn(net(x), y).backward()

        def closure():
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            return loss

        opt.step(closure, inputs=x, loss_fn=lambda out: loss_fn(out, y))
        rec = opt.last_step
        assert rec is not None and rec.applied, rec
        records.append({f: getattr(rec, f) for f in FIELDS})
    return records


def close(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    return abs(a - b) / max(abs(b), 1e-300)


def adaptive_worker(rank: int, world: int, names: list[str], control: bool) -> dict:
    out: dict = {}
    shard = 6
    x, y = make_batch("mlp", shard * world, seed=7)
    lo = rank * shard
    xs, ys = x[lo:lo + shard], y[lo:lo + shard]
    for name in names:
        method, assignment, opts = SCENARIOS[name]
        opts = dict(damping=1e-1, damping_update_freq=1, **opts)
        ref_model = make_model("mlp", seed=5)
        model = copy.deepcopy(ref_model)
        ref = make_precond(method, ref_model, "local")
        ref_opt = kf.optim.AdaptiveNG(ref, **opts)
        ddp = DDP(model)
        pc = make_precond(method, ddp, DistributedConfig(assignment=assignment, timeout=20.0))
        if control:  # negative control: the model's batch quantities stay the shard's
            pc.sync.mean_over_ranks = lambda values, purpose: values
        opt = kf.optim.AdaptiveNG(pc, **opts)
        want = run_adaptive(ref_model, ref_model, ref_opt, ref, x, y)
        got = run_adaptive(model, ddp, opt, pc, xs, ys)
        errs = {f: max(close(g[f], w[f]) for g, w in zip(got, want)) for f in FIELDS}
        with torch.no_grad():
            errs["params"] = max(float((p - q).norm() / q.norm())
                                 for p, q in zip(model.parameters(), ref_model.parameters()))
        # the ranks agree bit for bit (the decisions were taken alike)
        mine = torch.tensor([[r[f] if r[f] is not None else math.nan for f in FIELDS]
                             for r in got], dtype=torch.float64)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        out[name] = {"errs": errs, "ranks_equal": all(
            torch.equal(e.nan_to_num(7.0), mine.nan_to_num(7.0)) for e in every),
            "momenta": [r["momentum"] for r in got], "rhos": [r["rho"] for r in got]}
    return out


@pytest.fixture(scope="module")
def adaptive(tmp_path_factory):
    res = run_ranks(adaptive_worker, 2, tmp_path_factory.mktemp("adaptive"),
                    list(SCENARIOS), False)
    ctl = run_ranks(adaptive_worker, 2, tmp_path_factory.mktemp("control"),
                    ["kfac-ggn"], True)
    for r, d in enumerate(res + ctl):
        assert "error" not in d, f"rank {r % 2}: {d.get('error')}"
    return res, ctl


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rank_takes_the_single_process_step(adaptive, name):
    res, _ = adaptive
    for rank, d in enumerate(res):
        v = d[name]
        assert v["ranks_equal"], f"{name}: the ranks' records differ"
        for field, err in v["errs"].items():
            assert err <= TOL, f"rank {rank} {name}: {field} off by {err:.3g} (relative)"
        assert all(r is not None for r in v["rhos"]), "ρ was not computed every step"
    if SCENARIOS[name][2].get("momentum") is None and "lr" not in SCENARIOS[name][2]:
        # the 2×2 solve ran (μ from the model from step 2 on)
        assert any(m != 0.0 for m in res[0][name]["momenta"][1:])


def test_the_check_can_fail_without_averaging_the_model(adaptive):
    _, ctl = adaptive
    for d in ctl:  # the shard's quadratic model gives another α and ρ
        assert d["kfac-ggn"]["errs"]["alpha"] > 1e-3
        assert d["kfac-ggn"]["errs"]["rho"] > 1e-3
        assert not d["kfac-ggn"]["ranks_equal"]  # and the replicas diverge


def owner_approx_worker(rank: int, world: int) -> dict:
    pc = make_precond("kfac", DDP(make_model("mlp")), DistributedConfig(assignment="owner"))
    try:
        kf.optim.AdaptiveNG(pc, quad_model="approx")
    except ValueError as e:
        return {"error_text": str(e)}
    return {"error_text": ""}


def test_approx_model_with_owner_assignment_is_refused(tmp_path):
    for d in run_ranks(owner_approx_worker, 2, tmp_path):
        assert "error" not in d, d.get("error")
        assert "quad_model='approx'" in d["error_text"]
        assert "assignment='replicated'" in d["error_text"]
