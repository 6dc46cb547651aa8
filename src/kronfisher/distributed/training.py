"""Data-parallel training of the benchmark auto-encoders (the CLI's ``torchrun`` path).

``torchrun --nproc_per_node=W -m kronfisher.cli train ...`` runs :func:`train_data_parallel`
on every rank: gloo on the CPU (NCCL with ``--device cuda``), the same model, optimizer and
minibatch order on every rank (:func:`~kronfisher.bench.runner.prepare_run` seeds them
alike), each rank taking its contiguous share (``torch.tensor_split``) of every minibatch
and of its curvature batch. Gradients: Σ over the rank's examples of ∇ℓᵢ / (global
minibatch size), all-reduced, i.e. the single-process gradient of the whole minibatch; the
preconditioner (``process_group`` by default) makes the curvature that of the whole
curvature batch. Sampled targets: before each curvature batch torch's global generator is
seeded with ``shard_generator``'s rule on (seed · 10⁶ + step, rank), so a resumed run draws
the same targets as an uninterrupted one. Only rank 0 evaluates, logs and writes
checkpoints; every rank resumes from rank 0's checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..bench.problems import per_example_loss
from ..bench.runner import RunConfig, collect_curvature_batch, evaluate, prepare_run
from .comm import Communicator
from .config import DEFAULT_TIMEOUT
from .parallel import DataParallelSync
from .seeding import SHARD_STRIDE

__all__ = ["init_from_env", "train_data_parallel", "launched_by_torchrun"]


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> None:
    """Join the group torchrun describes (env://): NCCL for a CUDA device, gloo otherwise."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=DEFAULT_TIMEOUT))


def _save(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint


def train_data_parallel(cfg: RunConfig, train_data: Tensor, test_data: Tensor, *,
                        checkpoint: Path | None = None, checkpoint_every: int = 0,
                        log=None) -> dict | None:
    """Train per ``cfg`` on every rank of the default group; rank 0's record, None elsewhere.

    Args:
        cfg: the run (the adaptive step rule is not supported data parallel).
        train_data: the full training set (every rank loads it).
        test_data: the full test set.
        checkpoint: a file: resumed from if it exists (every rank reads rank 0's), written
            by rank 0 every ``checkpoint_every`` steps and at the end.
        checkpoint_every: steps between checkpoints (0: only at the end).
        log: called on rank 0 with each evaluation row.

    Raises:
        ValueError: the adaptive step rule; a checkpoint of another configuration.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    run = prepare_run(cfg, train_data, test_data)
    h, p, model, opt, pc = run.hyper, run.problem, run.model, run.optimizer, run.preconditioner
    if h.step_rule == "adaptive":
        raise ValueError("the CLI's adaptive step rule does not run data parallel yet (its"
                         " loop is not wired to shard the quadratic model's batch; AdaptiveNG"
                         " itself does, see docs/distributed.md); use the paper or classic"
                         " preset")
    sync = pc.sync if pc is not None else None
    comm = sync.comm if isinstance(sync, DataParallelSync) else Communicator(None,
                                                                             DEFAULT_TIMEOUT)
    n, bs, spe = len(run.train_data), run.batch_size, run.steps_per_epoch
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    limits = [s for s in (None if cfg.epochs is None else int(math.ceil(cfg.epochs * spe)),
                          cfg.iterations) if s is not None]
    max_steps = min(limits) if limits else spe
    step, wall, history, perm = 0, 0.0, [], None
    # the run's identity without its length: a resumed run may go on for longer
    ident = repr({k: v for k, v in asdict(cfg).items()
                  if k not in ("epochs", "iterations", "time_budget")})
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state["config"] != ident:
            raise ValueError(f"checkpoint {checkpoint} is of another run: {state['config']}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if pc is not None:
            pc.load_state_dict(state["preconditioner"])
        gen.set_state(state["generator"])
        step, wall, history, perm = state["step"], state["wall"], state["history"], state["perm"]

    def record() -> None:
        if rank != 0:
            return
        tr, tr_px = evaluate(model, run.eval_train, p.likelihood)
        te, te_px = evaluate(model, run.eval_test, p.likelihood)
        row = {"epoch": round(step / spe, 4), "step": step, "wall_time": wall,
               "train_loss": tr, "train_loss_pixel": tr_px, "test_loss": te,
               "test_loss_pixel": te_px}
        history.append(row)
        if log:
            log(row)

    def save() -> None:
        if rank == 0 and checkpoint is not None:
            _save(checkpoint, {"config": ident, "model": model.state_dict(),
                               "optimizer": opt.state_dict(), "generator": gen.get_state(),
                               "preconditioner": pc.state_dict() if pc is not None else None,
                               "step": step, "wall": wall, "history": history, "perm": perm})

    if step == 0:
        record()
    status, losses = "complete", []
    while step < max_steps and status == "complete":
        b = step % spe
        if b == 0 or perm is None:
            perm = torch.randperm(n, generator=gen)
        x = run.train_data[perm[b * bs:(b + 1) * bs].to(run.device)]
        t0 = time.perf_counter()
        if pc is not None and pc.steps % h.cov_update_freq == 0:
            xc = torch.tensor_split(x[:run.curvature_examples], world)[rank]
            torch.manual_seed((cfg.seed * 1_000_000 + step) * SHARD_STRIDE + rank)
            collect_curvature_batch(replace(run, curvature_examples=len(xc)), xc)
        opt.zero_grad(set_to_none=True)
        xs = torch.tensor_split(x, world)[rank]
        per_ex = per_example_loss(model(xs), xs, p.likelihood)
        (per_ex.sum() / len(x) * h.loss_scale).backward()
        params = [q for q in model.parameters() if q.grad is not None]
        flat = torch.cat([q.grad.reshape(-1) for q in params if q.grad is not None]
                         + [per_ex.detach().sum().reshape(1)])
        flat = comm.all_reduce(flat, "gradients")
        off = 0
        for q in params:
            q.grad = flat[off:off + q.numel()].view_as(q).clone()
            off += q.numel()
        loss_value = float(flat[-1]) / len(x)
        ok = math.isfinite(loss_value) and (pc is None or pc.step())
        if ok:
            opt.step()
        wall += time.perf_counter() - t0
        losses.append(loss_value)
        step += 1
        if not ok:
            status = "diverged"
        elif step % spe == 0 or step == max_steps:
            record()
        if checkpoint_every and step % checkpoint_every == 0:
            save()
    save()
    if rank != 0:
        return None
    return {"config": repr(cfg), "status": status, "history": history, "world_size": world,
            "steps": step, "minibatch_losses": losses, "torch_threads": torch.get_num_threads(),
            "final": history[-1] if history else None,
            "bytes": {k: {"calls": e.calls, "payload": e.payload, "wire": e.wire}
                      for k, e in comm.ledger.entries.items()}}
