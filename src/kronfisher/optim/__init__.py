"""Optimizers above the preconditioners: adaptive damping and the quadratic-model step.

:class:`AdaptiveNG` takes any :class:`~kronfisher.Preconditioner` and adapts the damping
by the Levenberg–Marquardt rule and the learning rate and momentum from the exact
quadratic model (docs/design.md, "The adaptive optimizer"). The preconditioners stay
usable with any ``torch.optim`` optimizer.
"""

from .adaptive import AdaptiveNG, StepRecord
from .config import StepConfig
from .damping import LevenbergMarquardt, reduction_ratio
from .quadratic import (
    CurvatureGram,
    ModelSolution,
    QuadraticModel,
    approx_curvature_form,
    ggn_gram,
    layer_matrix,
    solve_model,
)

__all__ = [
    "AdaptiveNG",
    "StepRecord",
    "StepConfig",
    "LevenbergMarquardt",
    "reduction_ratio",
    "CurvatureGram",
    "QuadraticModel",
    "ModelSolution",
    "ggn_gram",
    "solve_model",
    "approx_curvature_form",
    "layer_matrix",
]
