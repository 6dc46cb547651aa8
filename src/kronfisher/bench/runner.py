"""One training run of an auto-encoder problem with one optimizer, timed and evaluated."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor, nn

from ..preconditioner import Preconditioner
from .adaptive_step import adaptive_step, curvature_loss, trace_row
from .optimizers import PRECONDITIONERS, make_optimizers
from .problems import (
    ALL_OPTIMIZERS,
    PROBLEMS,
    Hyper,
    Problem,
    build_model,
    hyper,
    per_example_loss,
    per_pixel_loss,
    pixel_factor,
)

__all__ = ["RunConfig", "RunSetup", "prepare_run", "collect_curvature_batch", "train",
           "evaluate", "split_train", "PRECONDITIONERS", "ITERATION_FIELDS"]

ITERATION_FIELDS = ("iteration", "wall_time", "minibatch_loss_pixel")
SPLIT_SEED = 0  # the train/validation split is the same for every run seed


@dataclass
class RunConfig:
    """Everything that defines a run; ``None`` fields take the preset's value."""

    problem: str
    optimizer: str
    preset: str = "paper"
    seed: int = 0
    epochs: float | None = None
    time_budget: float | None = None  # seconds of training (evaluation excluded)
    iterations: int | None = None  # stop after this many optimizer steps
    lr: float | None = None
    damping: float | None = None
    batch_size: int | None = None
    cov_update_freq: int | None = None
    inv_update_freq: int | None = None
    solver: str = "auto"
    train_subset: int | None = None  # use only the first n training examples
    eval_subset: int | None = None  # evaluate on the first n train (and test) examples
    reseed_layers: bool | None = None  # None: the preset's choice
    device: str = "cpu"
    damping_scheme: str | None = None  # None: the preset's choice
    factor_balance: str | None = None  # None: the preset's choice
    weight_decay: float | None = None  # None: the preset's choice
    ema_counter: str | None = None  # None: the preset's choice
    label: str | None = None  # the run's name in a comparison (None: the optimizer's)

    def __post_init__(self):
        if self.problem not in PROBLEMS:
            raise ValueError(f"unknown problem {self.problem!r}; choose from {tuple(PROBLEMS)}")
        if self.optimizer not in ALL_OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from"
                             f" {ALL_OPTIMIZERS}")
        if self.epochs is None and self.time_budget is None and self.iterations is None:
            raise ValueError("give epochs, time_budget or iterations")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError("iterations must be >= 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError("epochs must be > 0")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError("time_budget must be > 0 seconds")

    @property
    def name(self) -> str:
        """The run's name in a comparison: ``label``, else the optimizer."""
        return self.label or self.optimizer

    def resolved_hyper(self) -> Hyper:
        """The preset's hyper-parameters with this config's overrides applied."""
        h = hyper(self.problem, self.optimizer, self.preset)
        over = {k: getattr(self, k) for k in ("lr", "damping", "batch_size", "cov_update_freq",
                                              "inv_update_freq", "reseed_layers",
                                              "damping_scheme", "factor_balance",
                                              "weight_decay", "ema_counter")
                if getattr(self, k) is not None}
        return replace(h, **over)


def split_train(train_data: Tensor, size: int | None) -> Tensor:
    """The preset's training split: ``size`` images drawn by a fixed-seed permutation.

    The rest is the authors' validation set; all images are kept when ``size`` is None or at
    least the set's length (small stand-in data).
    """
    if size is None or size >= len(train_data):
        return train_data
    perm = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return train_data[perm[:size].sort().values]


@dataclass
class RunSetup:
    """What :func:`train` builds before its first step (:func:`prepare_run`).

    Attributes:
        hyper: the resolved hyper-parameters.
        problem: the auto-encoder problem.
        device: the run's device.
        model: the initialised model (trained in place by :func:`train`).
        optimizer: the torch optimizer.
        preconditioner: the second-order methods' preconditioner (None for first-order).
        train_data, eval_train, eval_test: the run's training split and evaluation sets.
        batch_size: the minibatch size.
        steps_per_epoch: optimizer steps per epoch.
        curvature_examples: examples of each minibatch in the curvature batch.
    """

    hyper: Hyper
    problem: Problem
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    preconditioner: Preconditioner | None
    train_data: Tensor
    eval_train: Tensor
    eval_test: Tensor
    batch_size: int
    steps_per_epoch: int
    curvature_examples: int


def prepare_run(cfg: RunConfig, train_data: Tensor, test_data: Tensor) -> RunSetup:
    """Seed, build the model and optimizers and split the data exactly as :func:`train` does."""
    h = cfg.resolved_hyper()
    p = PROBLEMS[cfg.problem]
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.problem, cfg.preset, seed=cfg.seed,
                        reseed_layers=h.reseed_layers).to(device)
    if cfg.train_subset:
        train_data = train_data[: cfg.train_subset]
    else:
        train_data = split_train(train_data, h.train_size)
    eval_train = train_data[: cfg.eval_subset] if cfg.eval_subset else train_data
    eval_test = test_data[: cfg.eval_subset] if cfg.eval_subset else test_data
    train_data, eval_train, eval_test = (t.to(device) for t in (train_data, eval_train,
                                                                eval_test))
    n = len(train_data)
    bs = min(h.batch_size, n)
    steps_per_epoch = math.ceil(n / bs) if h.partial_last_batch else max(n // bs, 1)
    built = make_optimizers(cfg.optimizer, model, h, solver=cfg.solver)
    n_curv = max(1, int(round(bs * h.curvature_fraction)))
    return RunSetup(hyper=h, problem=p, device=device, model=model, optimizer=built.optimizer,
                    preconditioner=built.preconditioner, train_data=train_data,
                    eval_train=eval_train, eval_test=eval_test, batch_size=bs,
                    steps_per_epoch=steps_per_epoch, curvature_examples=n_curv)


def collect_curvature_batch(setup: RunSetup, x: Tensor, *, force: bool = False) -> None:
    """The run's curvature batch from the minibatch ``x``, as every training step takes it.

    The curvature loss (``hyper.curvature_estimator``: sampled NLL or curvature
    propagation) of the first ``curvature_examples`` images, times the preset's
    ``loss_scale`` (like the training loss), backward inside ``collect()``; the gradients
    are cleared first. ``force`` records off the ``cov_update_freq`` schedule.

    Raises:
        ValueError: the run has no preconditioner.
    """
    pc = setup.preconditioner
    if pc is None:
        raise ValueError("this run's optimizer has no preconditioner (no curvature to collect)")
    setup.optimizer.zero_grad(set_to_none=True)
    with pc.collect(force=force):
        (curvature_loss(setup.model(x[: setup.curvature_examples]), setup.problem.likelihood,
                        setup.hyper.curvature_estimator) * setup.hyper.loss_scale).backward()


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
          log=None, setup: RunSetup | None = None) -> dict:
    """Train per ``cfg``; returns a JSON-serialisable record (history, phase times, status).

    ``setup``: a :func:`prepare_run` of the same ``cfg`` and data, whose model is then
    trained in place (default: prepared here).

    The training and test losses are evaluated on the whole sets (or their first
    ``eval_subset`` examples) after every epoch and at the end; ``wall_time`` counts
    training only, not evaluation. Each history row also has
    ``train_loss_pixel_minibatch_mean``: the mean of the per-pixel minibatch losses of the
    steps since the previous row (the authors' reported "training loss"; None at epoch 0).
    ``record["iterations"]`` has one row per step (``ITERATION_FIELDS``): iteration
    (from 1), training wall time after the step, and the per-pixel loss of that step's
    minibatch before the update.
    """
    run = setup if setup is not None else prepare_run(cfg, train_data, test_data)
    h, p, device, model = run.hyper, run.problem, run.device, run.model
    train_data, eval_train, eval_test = run.train_data, run.eval_train, run.eval_test
    n, bs, steps_per_epoch = len(train_data), run.batch_size, run.steps_per_epoch
    opt, pc = run.optimizer, run.preconditioner
    adaptive = h.step_rule == "adaptive"
    n_jvp = max(1, int(round(bs * h.jvp_fraction)))
    trace: list[dict] = []  # adaptive step rule: λ, α, μ, ρ per step
    px = pixel_factor(cfg.problem)

    history: list[dict] = []
    iterations: list[dict] = []
    phases = _Phases()
    wall = 0.0
    status = "complete"
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    limits = [s for s in (None if cfg.epochs is None
                          else int(math.ceil(cfg.epochs * steps_per_epoch)), cfg.iterations)
              if s is not None]
    max_steps = min(limits) if limits else None
    bar = _progress(max_steps, progress)
    step = 0
    since_record: list[float] = []

    def record(epoch: float) -> dict:
        tr, tr_px = evaluate(model, eval_train, p.likelihood)
        te, te_px = evaluate(model, eval_test, p.likelihood)
        mb = sum(since_record) / len(since_record) if since_record else None
        since_record.clear()
        row = {"epoch": round(epoch, 4), "step": step, "wall_time": wall, "train_loss": tr,
               "train_loss_pixel": tr_px, "train_loss_pixel_minibatch_mean": mb,
               "test_loss": te, "test_loss_pixel": te_px}
        history.append(row)
        if log:
            log(row)
        return row

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    record(0.0)
    done = False
    while not done:
        perm = torch.randperm(n, generator=gen).to(device)
        for b in range(steps_per_epoch):
            x = train_data[perm[b * bs:(b + 1) * bs]]
            sync()
            t0 = time.perf_counter()
            if pc is not None and pc.collect_due:  # the sampled pass only when it records
                collect_curvature_batch(run, x)
            sync()
            t1 = time.perf_counter()
            if adaptive:
                loss_value, ok, t2, t3 = adaptive_step(opt, model, x, p.likelihood, h, n_jvp,
                                                        sync)
                trace.append(trace_row(step + 1, opt))
            else:
                opt.zero_grad(set_to_none=True)
                loss = per_example_loss(model(x), x, p.likelihood).mean()
                (loss * h.loss_scale).backward()
                loss_value = loss.item()
                t2 = time.perf_counter()
                ok = True
                if not math.isfinite(loss_value):
                    ok = False
                elif pc is not None:
                    ok = pc.step()
                sync()
                t3 = time.perf_counter()
                if ok:
                    opt.step()
            sync()
            t4 = time.perf_counter()
            wall += t4 - t0
            phases.curvature_batch += t1 - t0
            phases.forward_backward += t2 - t1
            phases.optimizer += t4 - t3
            phases.steps += 1
            step += 1
            iterations.append({"iteration": step, "wall_time": wall,
                               "minibatch_loss_pixel": loss_value * px})
            since_record.append(loss_value * px)
            if not ok:
                status = "diverged"
                done = True
                break
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss_value:.4g}",
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
        "iterations": iterations,
        "phase_seconds": ph,
        "final": final,
        "steps_per_epoch": steps_per_epoch,
        "train_examples": n,
        "torch_threads": torch.get_num_threads(),
        "adaptive_trace": trace,
    }
