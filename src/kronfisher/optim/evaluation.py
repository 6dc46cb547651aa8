"""What AdaptiveNG evaluates on the step's batch: GGN Gram matrices, the loss, q(δ) for ρ."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..preconditioner import Preconditioner
from .config import StepConfig
from .quadratic import (
    CurvatureGram,
    OutputHessianFn,
    approx_curvature_form,
    ggn_gram,
    inner,
    mean_gram,
)

__all__ = ["StepBatch", "LossFn", "linear_terms", "check_approx_available"]

LossFn = Callable[[Tensor], Tensor]


def check_approx_available(preconditioner: Preconditioner, quad_model: str) -> None:
    """Refuse "approx" where the curvature product lives on the layers' owner ranks.

    Raises:
        ValueError: ``quad_model="approx"`` with a data-parallel preconditioner that
            factorises each layer on one owner rank.
    """
    if quad_model == "approx" and getattr(preconditioner.sync, "owners", None):
        raise ValueError(
            "quad_model='approx' needs the preconditioner's curvature on every rank, but"
            " this data-parallel preconditioner factorises each layer on its owner rank"
            " only: use quad_model='ggn', or process_group=DistributedConfig("
            "assignment='replicated')")


def linear_terms(cfg: StepConfig, V: list[dict[str, Tensor]], grads: dict[str, Tensor],
                 named: dict[str, Tensor], gram: CurvatureGram) -> Tensor:
    """Vᵀ∇ (k,) float64: ∇ of the closure, or of loss_fn on inputs (``cfg.model_grad``).

    With "inputs" the weight decay's ηθ is added to the Gram's gradient products.
    """
    if cfg.model_grad == "closure":
        return torch.stack([inner(v, grads) for v in V]).cpu()
    l2 = [inner(v, named) * cfg.weight_decay for v in V] if cfg.weight_decay else None
    return gram.grad + (torch.stack(l2).cpu() if l2 else 0.0)


@dataclass(frozen=True)
class StepBatch:
    """The batch of the quadratic model and ρ: ``loss_fn(model(*inputs))``.

    Every value is averaged over the ranks when the preconditioner is data parallel, so
    that all ranks decide alike.

    Attributes:
        preconditioner: the optimizer's preconditioner (its model and its sync).
        names: ``id(parameter)`` → its name in the model.
        inputs: the model's positional arguments.
        loss_fn: outputs → the loss on the batch (no weight decay).
        output_hessian: the closed-form Hessian of ``loss_fn`` wrt the outputs, or None.
    """

    preconditioner: Preconditioner
    names: dict[int, str]
    inputs: tuple
    loss_fn: LossFn
    output_hessian: OutputHessianFn | None

    def gram(self, named: dict[str, Tensor], V: list[dict[str, Tensor]]) -> CurvatureGram:
        """:func:`~kronfisher.optim.quadratic.ggn_gram` of the directions ``V``."""
        gram = ggn_gram(self.preconditioner.model, named, self.inputs, self.loss_fn, V,
                        output_hessian=self.output_hessian)
        return mean_gram(gram, self.preconditioner.sync.mean_over_ranks)

    def loss(self) -> float:
        """``loss_fn(model(*inputs))`` at the current parameters (no weight decay)."""
        value = self.loss_fn(self.preconditioner.model(*self.inputs)).detach().double()
        return float(self.preconditioner.sync.mean_over_ranks(value.reshape(1),
                                                              "model_loss")[0])

    def model_change(self, cfg: StepConfig, named: dict[str, Tensor],
                     grads: dict[str, Tensor], delta: dict[str, Tensor]
                     ) -> tuple[float, float | None]:
        """(q(δ), L(θ) if the JVP gave it) for ρ, with ``cfg.quad_model``'s curvature."""
        d = cfg.damping + cfg.weight_decay
        if cfg.quad_model == "approx":  # the closure's ∇: no JVP gives another one here
            check_approx_available(self.preconditioner, cfg.quad_model)  # groups may change
            form = approx_curvature_form(self.preconditioner, self.names, delta, d)
            return float(inner(delta, grads)) + 0.5 * form, None
        gram = self.gram(named, [delta])
        linear = float(linear_terms(cfg, [delta], grads, named, gram)[0])
        form = float(gram.curvature[0, 0]) + d * float(inner(delta, delta))
        return linear + 0.5 * form, gram.loss
