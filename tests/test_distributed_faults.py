"""Faults on 2 gloo processes: collective skip decisions, model mismatch, timeouts.

One rank raises, sees a non-finite gradient or has nothing to precondition: every rank
skips the same step (counted on every rank, gradients cleared) and the next step agrees
again; a model that differs on one rank is an error at construction on every rank; a
rank that never arrives makes the others' collective raise CollectiveTimeout.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

import kronfisher as kf
from dist_harness import run_ranks
from kronfisher.distributed import CollectiveTimeout, DistributedConfig

D = torch.float64


def mlp(width: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3)).to(D)


def one_step(model, pc, x, y, *, nan_stats=False, nan_grad=False, drop_grads=False,
             reduce=True):
    """Collect on x (NaN in it if asked), gradient of the clean batch all-reduced, step()."""
    model.zero_grad()
    with pc.collect():
        xc = x.clone()
        if nan_stats:
            xc[0, 0] = float("nan")
        (0.5 * ((model(xc) - y) ** 2).sum(-1).mean()).backward()
    model.zero_grad()
    (0.5 * ((model(x) - y) ** 2).sum(-1).mean()).backward()
    for p in model.parameters():
        if reduce:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        if nan_grad:
            p.grad[0] = float("nan")
        if drop_grads:
            p.grad = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ok = pc.step()
        except Exception as e:  # recorded, the test asserts on it
            return {"raised": type(e).__name__, "message": str(e)}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    return {"ok": ok, "warnings": [str(w.message) for w in caught],
            "grads_none": all(p.grad is None for p in model.parameters())}


def fault_worker(rank: int, world: int) -> dict:
    out: dict = {}
    # a model that differs on rank 1: an error at construction on every rank
    try:
        kf.KPSVD(mlp(6 if rank == 0 else 7), process_group=DistributedConfig(timeout=10.0))
        out["mismatch"] = "constructed"
    except ValueError as e:
        out["mismatch"] = str(e)
    model = mlp()
    pc = kf.KPSVD(model, damping=1e-2, nonfinite="raise",
                  process_group=DistributedConfig(timeout=10.0))
    g = torch.Generator().manual_seed(rank)
    def batch():
        return torch.randn(6, 5, generator=g, dtype=D), torch.randn(6, 3, generator=g, dtype=D)
    out["normal"] = one_step(model, pc, *batch())
    out["raises"] = one_step(model, pc, *batch(), nan_stats=rank == 1)
    pc.nonfinite = "skip"
    out["nan_grad"] = one_step(model, pc, *batch(), nan_grad=rank == 1)
    out["no_grads"] = one_step(model, pc, *batch(), drop_grads=rank == 1)
    out["after"] = one_step(model, pc, *batch())
    out["counts"] = [pc.steps, pc.skipped_steps]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    out["replicas_equal"] = all(torch.equal(gathered[0], t) for t in gathered)
    # a rank that never calls step(): the other's collective times out, it does not hang
    pc.sync.comm.timeout = 2.0
    if rank == 0:
        out["timeout"] = one_step(model, pc, *batch(), reduce=False)
    else:
        time.sleep(5.0)
    return out


def test_collective_faults(tmp_path):
    r0, r1 = run_ranks(fault_worker, 2, tmp_path)
    for d in (r0, r1):
        assert "error" not in d, d.get("error")
        assert "differs across ranks" in d["mismatch"] and "[1]" in d["mismatch"]
        assert d["normal"]["ok"] is True
        # every rank skipped the three faulty steps, then agreed again
        assert d["after"]["ok"] is True
        assert d["counts"] == [5, 3]
        assert d["replicas_equal"]
    # rank 1 raised (non-finite statistics with nonfinite="raise"); rank 0 skipped, naming it
    assert r1["raises"]["raised"] == "NonFiniteError"
    assert r0["raises"]["ok"] is False and r0["raises"]["grads_none"]
    assert any("rank 1" in w and "NonFiniteError" in w for w in r0["raises"]["warnings"])
    # a non-finite gradient on rank 1 only: both skip
    for d in (r0, r1):
        assert d["nan_grad"]["ok"] is False and d["nan_grad"]["grads_none"]
    assert any("non-finite gradient on rank(s) [1]" in w for w in r0["nan_grad"]["warnings"])
    # rank 1 has no gradient to precondition: both skip
    assert r0["no_grads"]["ok"] is False and r1["no_grads"]["ok"] is False
    assert any("rank 1" in w for w in r0["no_grads"]["warnings"])
    assert r0["timeout"]["raised"] == CollectiveTimeout.__name__
