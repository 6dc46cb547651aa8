"""``kronfisher curvature-scale``: the curvature-scale diagnostic on a benchmark run.

The run is built exactly as :func:`~kronfisher.bench.runner.train` builds it (same
preset, hyper-parameters and optimizers), optionally trained for a few steps with the
runner's own loop, then given one curvature batch exactly as the runner takes it
(:func:`~kronfisher.bench.runner.collect_curvature_batch`: the sampled NLL times the
preset's ``loss_scale``), folded in by one ``step()`` after the training loss's backward
(into the running average, or alone with ``fresh``: after training steps the average
also lags behind the current curvature).
The table compares that curvature with the exact GGN of the run's training objective
(``loss_scale`` × the mean per-example NLL) on the curvature batch
(:func:`~kronfisher.diagnostics.curvature_scale`).

Under ``paper`` the sampled loss carries ``loss_scale`` = c where √c was due, so the
curvature is c²F against the objective's cF: expect ratios near c (1/784 on CURVES and
MNIST, 2/625 on FACES). With ``loss_scale`` 1 expect ratios near 1, up to the Kronecker
approximation and the sampling noise of a small curvature batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..diagnostics import LayerScaleRow, curvature_scale, format_table
from .problems import per_example_loss
from .runner import RunConfig, collect_curvature_batch, prepare_run, train

__all__ = ["CurvatureScaleReport", "curvature_scale_report", "DIRECTION_SEED_OFFSET"]

DIRECTION_SEED_OFFSET = 2
"""The measured batch and the directions are drawn with seed + 2 (the runner uses seed for
the initialisation and seed + 1 for the batch order)."""


@dataclass(frozen=True)
class CurvatureScaleReport:
    """The diagnostic's table for one run, with what defines it.

    Attributes:
        config: the run (its ``iterations`` are the training steps before measuring).
        steps: training steps taken before the measured batch.
        loss_scale: the preset's factor on both the training and the curvature loss.
        curvature_examples: examples in the measured curvature batch.
        rows: one row per registered layer.
        fresh: F̂ is the measured batch's curvature alone (else the running average).
    """

    config: RunConfig
    steps: int
    loss_scale: float
    curvature_examples: int
    rows: list[LayerScaleRow]
    fresh: bool = False

    def text(self) -> str:
        """The table with a header saying what was measured and what to expect."""
        c = self.loss_scale
        expect = ("≈ 1 (curvature at the objective's scale)" if c == 1.0 else
                  f"≈ {c:.3g} if the curvature batch carries loss_scale = {c:.3g} where its"
                  f" square root was due (the `paper` preset, reproducing the authors)")
        if self.steps and not self.fresh:
            expect += ("; the running average after training steps reads lower where the"
                       " curvature grew (it lags; --fresh measures the new batch alone)")
        ratios = sorted(r.ratio for r in self.rows)
        median = ratios[len(ratios) // 2]
        return "\n".join([
            f"curvature scale: {self.config.problem}, preset {self.config.preset},"
            f" {self.config.optimizer}, after {self.steps} step(s), curvature batch of"
            f" {self.curvature_examples} (seed {self.config.seed})",
            "vᵀF̂v: the preconditioner's undamped curvature ("
            + ("this batch alone" if self.fresh else "its running average, this batch folded"
               " in") + "); vᵀJᵀHJv: the exact GGN of the"
            f" training objective (loss_scale {c:.4g} × mean per-example NLL); means over"
            f" {len(self.rows[0].ggn_quad) if self.rows else 0} random unit v per layer",
            format_table(self.rows),
            f"median ratio over layers {median:.4g}; expected {expect}",
        ])


def curvature_scale_report(cfg: RunConfig, train_data: Tensor, test_data: Tensor, *,
                           steps: int = 0, n_vectors: int = 4, fresh: bool = False
                           ) -> CurvatureScaleReport:
    """Build the run of ``cfg``, train ``steps`` steps, take one curvature batch, measure.

    Args:
        cfg: the run (problem, preset, optimizer, seed, overrides such as batch_size); its
            budget is replaced by ``steps`` iterations.
        train_data: the problem's training set (as for :func:`train`).
        test_data: its test set (evaluated by the training steps only).
        steps: training steps first, with the runner's loop (0: measure at the init).
        n_vectors: random directions per layer.
        fresh: measure the curvature of the measured batch alone (it replaces the running
            average) instead of the running average the preconditioner would use; after
            training steps this separates the scale from the average's lag.

    Raises:
        ValueError: the optimizer has no preconditioner (first-order methods), or
            ``steps`` < 0.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    setup = prepare_run(cfg, train_data, test_data)
    pc = setup.preconditioner
    if pc is None:
        raise ValueError(f"optimizer {cfg.optimizer!r} has no preconditioner, so no curvature"
                         " to measure; choose a second-order method")
    if steps:
        run = replace(cfg, iterations=steps, epochs=None, time_budget=None)
        train(run, train_data, test_data, progress=False, setup=setup)
    gen = torch.Generator().manual_seed(cfg.seed + DIRECTION_SEED_OFFSET)
    data = setup.train_data
    idx = torch.randperm(len(data), generator=gen)[: setup.batch_size].to(data.device)
    x = data[idx]
    h, model, lik = setup.hyper, setup.model, setup.problem.likelihood
    if fresh:
        pc.ema_decay = 0.0  # a throw-away run: the measured batch replaces the average
    collect_curvature_batch(setup, x, force=True)
    setup.optimizer.zero_grad(set_to_none=True)
    (per_example_loss(model(x), x, lik).mean() * h.loss_scale).backward()
    pc.step()  # folds the batch into the running average (the update itself is not applied)
    setup.optimizer.zero_grad(set_to_none=True)
    xc = x[: setup.curvature_examples]

    def objective(out: Tensor) -> Tensor:
        return per_example_loss(out, xc, lik).mean() * h.loss_scale

    rows = curvature_scale(pc, model, xc, objective, n_vectors=n_vectors, generator=gen)
    return CurvatureScaleReport(config=cfg, steps=steps, loss_scale=h.loss_scale,
                                curvature_examples=setup.curvature_examples, rows=rows,
                                fresh=fresh)
