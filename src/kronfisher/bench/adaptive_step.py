"""The benchmark runner's pieces for the ``adaptive`` preset: curvature loss and one step.

:func:`adaptive_step` runs one :class:`~kronfisher.optim.AdaptiveNG` step with the
training objective as its closure; :func:`curvature_loss` is the curvature batch's loss
(sampled targets or curvature propagation) for every preset.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

from torch import Tensor, nn

from ..losses import OutputHessian, curvature_propagation_loss, sampled_nll
from .problems import Hyper, per_example_loss

__all__ = ["CURVATURE_ESTIMATORS", "curvature_loss", "adaptive_step", "trace_row"]

CURVATURE_ESTIMATORS = ("sampled", "propagation")


def curvature_loss(outputs: Tensor, likelihood: str, estimator: str) -> Tensor:
    """The curvature batch's loss: sampled targets, or curvature propagation."""
    if estimator == "sampled":
        return sampled_nll(outputs, likelihood)
    if estimator == "propagation":
        return curvature_propagation_loss(outputs, likelihood)
    raise ValueError(f"curvature_estimator must be one of {CURVATURE_ESTIMATORS},"
                     f" got {estimator!r}")


def adaptive_step(opt, model: nn.Module, x: Tensor, likelihood: str, h: Hyper,
                   n_jvp: int, sync) -> tuple[float, bool, float, float]:
    """One :class:`~kronfisher.optim.AdaptiveNG` step on minibatch ``x``.

    The closure is the training objective (``h.loss_scale`` × mean per-example NLL) on the
    whole minibatch; the quadratic model's JVPs and ρ use its first ``n_jvp`` examples,
    with that objective's output Hessian in closed form (:class:`OutputHessian`).

    Returns:
        (per-example loss before the update, whether that loss is finite, time after the
        closure, time after the step).
    """
    seen: dict[str, float] = {}

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = per_example_loss(model(x), x, likelihood).mean()
        seen["loss"] = loss.item()
        scaled = loss * h.loss_scale
        scaled.backward()
        sync()
        seen["t"] = time.perf_counter()
        return scaled.detach()

    xj = x[:n_jvp]

    def loss_fn(out: Tensor) -> Tensor:
        return per_example_loss(out, xj, likelihood).mean() * h.loss_scale

    opt.step(closure, inputs=xj, loss_fn=loss_fn,
             output_hessian=OutputHessian(likelihood, "batchmean", h.loss_scale))
    sync()
    t3 = time.perf_counter()
    # a step the optimizer declined (non-finite model, damping raised) is not a divergence:
    # the parameters are unchanged and the trace records it
    return seen["loss"], math.isfinite(seen["loss"]), seen["t"], t3


def trace_row(iteration: int, opt) -> dict:
    """The adaptive step's λ, α, μ, ρ (``opt.last_step``) as a JSON row."""
    last = opt.last_step
    row: dict = {"iteration": iteration}
    if last is not None:
        for k, v in asdict(last).items():
            row[k] = v if isinstance(v, bool | int | float | str) or v is None else float(v)
    return row
