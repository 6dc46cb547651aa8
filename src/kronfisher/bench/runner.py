"""One training run of an auto-encoder problem with one optimizer, timed and evaluated."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor

from ..losses import sampled_nll
from ..preconditioner import KFAC, KPSVD, Deflation, KFACCorrected, Lanczos
from .problems import (
    OPTIMIZERS,
    PROBLEMS,
    SECOND_ORDER,
    Hyper,
    build_model,
    hyper,
    per_example_loss,
    per_pixel_loss,
)

__all__ = ["RunConfig", "train", "evaluate", "PRECONDITIONERS"]

PRECONDITIONERS = {"kfac": KFAC, "kpsvd": KPSVD, "deflation": Deflation,
                   "kfac_corrected": KFACCorrected, "lanczos": Lanczos}


@dataclass
class RunConfig:
    """Everything that defines a run; ``None`` fields take the preset's value."""

    problem: str
    optimizer: str
    preset: str = "paper"
    seed: int = 0
    epochs: float | None = None
    time_budget: float | None = None  # seconds of training (evaluation excluded)
    lr: float | None = None
    damping: float | None = None
    batch_size: int | None = None
    cov_update_freq: int | None = None
    inv_update_freq: int | None = None
    solver: str = "auto"
    train_subset: int | None = None  # use only the first n training examples
    eval_subset: int | None = None  # evaluate on the first n train (and test) examples

    def __post_init__(self):
        if self.problem not in PROBLEMS:
            raise ValueError(f"unknown problem {self.problem!r}; choose from {tuple(PROBLEMS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.epochs is None and self.time_budget is None:
            raise ValueError("give epochs or time_budget (or both)")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError("epochs must be > 0")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError("time_budget must be > 0 seconds")

    def resolved_hyper(self) -> Hyper:
        h = hyper(self.problem, self.optimizer, self.preset)
        over = {k: getattr(self, k) for k in ("lr", "damping", "batch_size", "cov_update_freq",
                                              "inv_update_freq") if getattr(self, k) is not None}
        return replace(h, **over)


@dataclass
class _Phases:
    forward_backward: float = 0.0
    curvature_batch: float = 0.0
    curvature: float = 0.0
    inverse: float = 0.0
    precondition: float = 0.0
    optimizer: float = 0.0
    steps: int = 0
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Tensor, likelihood: str, chunk: int = 4096
             ) -> tuple[float, float]:
    """(mean per-example loss, mean per-pixel loss) over ``data``."""
    tot, tot_px = 0.0, 0.0
    for i in range(0, len(data), chunk):
        x = data[i:i + chunk]
        out = model(x)
        tot += float(per_example_loss(out, x, likelihood).sum())
        tot_px += float(per_pixel_loss(out, x, likelihood).sum())
    return tot / len(data), tot_px / len(data)


def _progress(total_steps: int | None, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # plain-text fallback
        return None
    return tqdm(total=total_steps, file=sys.stderr, leave=False, dynamic_ncols=True,
                unit="step")


def train(cfg: RunConfig, train_data: Tensor, test_data: Tensor, *, progress: bool = True,
          log=None) -> dict:
    """Train per ``cfg``; returns a JSON-serialisable record (history, phase times, status).

    The training and test losses are evaluated on the whole sets (or their first
    ``eval_subset`` examples) after every epoch and at the end; ``wall_time`` counts
    training only, not evaluation.
    """
    h = cfg.resolved_hyper()
    p = PROBLEMS[cfg.problem]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.problem, cfg.preset, seed=cfg.seed)
    if cfg.train_subset:
        train_data = train_data[: cfg.train_subset]
    eval_train = train_data[: cfg.eval_subset] if cfg.eval_subset else train_data
    eval_test = test_data[: cfg.eval_subset] if cfg.eval_subset else test_data
    n = len(train_data)
    bs = min(h.batch_size, n)
    steps_per_epoch = max(n // bs, 1)

    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=h.lr, weight_decay=h.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=h.lr, momentum=h.momentum,
                              weight_decay=h.weight_decay)
    pc = None
    if cfg.optimizer in SECOND_ORDER:
        pc = PRECONDITIONERS[cfg.optimizer](
            model, damping=h.damping, ema_decay=h.ema_decay, cov_update_freq=h.cov_update_freq,
            inv_update_freq=h.inv_update_freq, kl_clip=h.kl_clip, lr=h.lr, solver=cfg.solver,
        )
    n_curv = max(1, int(round(bs * h.curvature_fraction)))

    history: list[dict] = []
    phases = _Phases()
    wall = 0.0
    status = "complete"
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    max_steps = None if cfg.epochs is None else int(math.ceil(cfg.epochs * steps_per_epoch))
    bar = _progress(max_steps, progress)
    step = 0

    def record(epoch: float) -> dict:
        tr, tr_px = evaluate(model, eval_train, p.likelihood)
        te, te_px = evaluate(model, eval_test, p.likelihood)
        row = {"epoch": round(epoch, 4), "step": step, "wall_time": wall, "train_loss": tr,
               "train_loss_pixel": tr_px, "test_loss": te, "test_loss_pixel": te_px}
        history.append(row)
        if log:
            log(row)
        return row

    record(0.0)
    done = False
    while not done:
        perm = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            x = train_data[perm[b * bs:(b + 1) * bs]]
            t0 = time.perf_counter()
            if pc is not None and pc.steps % h.cov_update_freq == 0:
                opt.zero_grad(set_to_none=True)
                with pc.collect():
                    (sampled_nll(model(x[:n_curv]), p.likelihood) * h.loss_scale).backward()
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = per_example_loss(model(x), x, p.likelihood).mean()
            (loss * h.loss_scale).backward()
            t2 = time.perf_counter()
            ok = True
            if not math.isfinite(loss.item()):
                ok = False
            elif pc is not None:
                ok = pc.step()
            t3 = time.perf_counter()
            if ok:
                opt.step()
            t4 = time.perf_counter()
            wall += t4 - t0
            phases.curvature_batch += t1 - t0
            phases.forward_backward += t2 - t1
            phases.optimizer += t4 - t3
            phases.steps += 1
            step += 1
            if not ok:
                status = "diverged"
                done = True
                break
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4g}",
                                    epoch=f"{step / steps_per_epoch:.2f}", elapsed=f"{wall:.0f}s")
            if (cfg.time_budget is not None and wall >= cfg.time_budget) or (
                max_steps is not None and step >= max_steps
            ):
                done = True
                break
        epoch = step / steps_per_epoch
        if status == "complete":
            record(epoch)
    if bar is not None:
        bar.close()
    if pc is not None:
        phases.curvature, phases.inverse, phases.precondition = (
            pc.timings["curvature"], pc.timings["inverse"], pc.timings["precondition"])
    else:
        phases.curvature_batch = 0.0
    ph = asdict(phases)
    ph.pop("extra")
    final = history[-1]
    return {
        "config": asdict(cfg),
        "hyper": asdict(h),
        "status": status,
        "history": history,
        "phase_seconds": ph,
        "final": final,
        "steps_per_epoch": steps_per_epoch,
        "torch_threads": torch.get_num_threads(),
    }
