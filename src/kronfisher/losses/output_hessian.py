"""The Hessian of an NLL objective with respect to the network's outputs, in closed form.

:func:`~kronfisher.optim.ggn_gram` (the adaptive optimizer's quadratic model) needs H u
for a few directions u in output space. Its generic route differentiates ``loss_fn``
twice (a VJP of its gradient), which on the auto-encoders costs as much as the JVP's
tangent pass itself; for the three likelihoods of :mod:`~kronfisher.losses.scale` H is
known (:mod:`~kronfisher.losses.hessian`: H = I, diag(σ(1 − σ)), diag(p) − ppᵀ per example
and position), so one elementwise pass gives it. H does not depend on the targets.

The objective is c·scale·(1/m) Σᵢ ℓᵢ with ℓᵢ the NLL summed over output elements and c the
reduction's factor (:func:`~kronfisher.losses.objective_scale`), so H = (c·scale/m) Hᵢ.
Writing a torch loss in these terms:

| loss | OutputHessian |
|---|---|
| ``F.binary_cross_entropy_with_logits(out, y)`` (mean) | ``("bernoulli", "mean")`` |
| ``F.binary_cross_entropy_with_logits(out, y, reduction="sum") / m`` | ``("bernoulli")`` |
| ``F.mse_loss(out, y)`` (mean of squares, no ½) | ``("gaussian", "mean", scale=2.0)`` |
| ``F.cross_entropy(logits, y)`` (mean over examples and positions) | ``("categorical", "mean")`` |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .scale import LIKELIHOODS, REDUCTIONS, objective_scale

__all__ = ["OutputHessian"]


@dataclass(frozen=True)
class OutputHessian:
    """u ↦ H u for the objective scale·(reduction of the NLL of ``likelihood``).

    Attributes:
        likelihood: "gaussian" (unit variance, ℓ = ½‖y − out‖²), "bernoulli" (logits) or
            "categorical" (logits, classes along dim 1 of the outputs).
        reduction: "batchmean" (mean over examples of the NLL summed over outputs),
            "mean" (over all elements; positions for "categorical") or "sum".
        scale: a constant factor on the objective (e.g. 2 for ``F.mse_loss``).

    Raises:
        ValueError: unknown likelihood or reduction, or a scale that is not finite and > 0.
    """

    likelihood: str
    reduction: str = "batchmean"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}; choose from"
                             f" {LIKELIHOODS}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduction!r}; choose from {REDUCTIONS}")
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0 < s < float("inf"):
            raise ValueError(f"scale must be a finite number > 0, got {s!r}")

    def __call__(self, outputs: Tensor, directions: Tensor) -> Tensor:
        """H u for each direction u.

        Args:
            outputs: the network's outputs (m, ...), where H is evaluated.
            directions: (k, *outputs.shape), k directions in output space.

        Returns:
            (k, *outputs.shape): H applied to each direction, in the directions' dtype.

        Raises:
            ValueError: ``directions`` is not (k, *outputs.shape), or categorical outputs
                without a class dimension.
        """
        if directions.shape[1:] != outputs.shape:
            raise ValueError(f"directions must be (k, *outputs.shape) = (k, "
                             f"{', '.join(map(str, outputs.shape))}), got"
                             f" {tuple(directions.shape)}")
        c = self.scale * objective_scale(tuple(outputs.shape), self.likelihood,
                                         self.reduction) / outputs.shape[0]
        with torch.no_grad():
            out = outputs.detach().to(directions.dtype)
            if self.likelihood == "gaussian":
                return directions * c
            if self.likelihood == "bernoulli":
                s = torch.sigmoid(out)
                return directions * (s * (1 - s) * c)
            if outputs.ndim < 2:
                raise ValueError("categorical outputs must be (m, C) or (m, C, ...) logits")
            p = torch.softmax(out, 1)
            pu = p * directions
            return (pu - p * pu.sum(2, keepdim=True)) * c
