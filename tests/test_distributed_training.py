"""The data-parallel training loop (the CLI's torchrun path) on 2 gloo processes.

Rank 0 alone returns (and so writes) the record; a run stopped after 2 steps and resumed
from rank 0's checkpoint ends exactly where the uninterrupted 4-step run ends.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_harness import run_ranks


def training_worker(rank: int, world: int, tmp: str) -> dict:
    from kronfisher.bench.runner import RunConfig
    from kronfisher.data import make_curves
    from kronfisher.distributed.training import train_data_parallel

    train, test = make_curves(48, seed=1), make_curves(16, seed=2)

    def cfg(iters):
        return RunConfig(problem="curves", optimizer="kpsvd", iterations=iters, batch_size=16,
                         cov_update_freq=1, inv_update_freq=1, train_subset=48,
                         eval_subset=16)

    full = train_data_parallel(cfg(4), train, test)
    ck = Path(tmp) / "ck.pt"
    first = train_data_parallel(cfg(2), train, test, checkpoint=ck)
    resumed = train_data_parallel(cfg(4), train, test, checkpoint=ck)
    if rank != 0:
        return {"records": [full, first, resumed]}
    return {"records": [r is not None for r in (full, first, resumed)],
            "full": full["final"]["train_loss"], "resumed": resumed["final"]["train_loss"],
            "full_losses": full["minibatch_losses"][2:],
            "resumed_losses": resumed["minibatch_losses"], "steps": resumed["steps"],
            "status": [full["status"], resumed["status"]],
            "gradient_bytes": full["bytes"]["gradients"]["payload"],
            "n_params": sum(p.numel() for p in __import__("kronfisher.bench.problems",
                            fromlist=["build_model"]).build_model("curves", "paper").parameters())}


def test_rank_zero_records_and_resume_from_its_checkpoint(tmp_path):
    r0, r1 = run_ranks(training_worker, 2, tmp_path, str(tmp_path), deadline=150.0)
    assert "error" not in r0, r0.get("error")
    assert "error" not in r1, r1.get("error")
    assert r0["records"] == [True, True, True] and r1["records"] == [None, None, None]
    assert r0["status"] == ["complete", "complete"] and r0["steps"] == 4
    assert r0["resumed_losses"] == r0["full_losses"]  # steps 3 and 4, bit for bit
    assert r0["resumed"] == r0["full"]
    # one all-reduce per step of every gradient and the loss sum, float32
    assert r0["gradient_bytes"] == 4 * 4 * (r0["n_params"] + 1)
    assert torch.isfinite(torch.tensor(r0["full"]))
