"""Curvature losses, whose backward inside ``collect()`` records the objective's Fisher.

The preconditioner then holds the Fisher (GGN) of the training objective at the scale of
its reduction:

* :func:`sampled_nll`: targets sampled from the model (the true Fisher, Monte Carlo);
* :func:`curvature_propagation_loss`: Rademacher vectors times the output Hessian's square
  root (unbiased, one pass);
* :func:`exact_ggn_loss`: every column of that square root, the batch repeated D times
  (exact, for small outputs).

``reduction`` ("batchmean", "mean", "sum") says which objective's Fisher is recorded
(:mod:`~kronfisher.losses.scale`): the losses carry √c, because the curvature is
quadratic in the back-propagated gradient.
"""

from .estimators import EXACT_GGN_MAX_COLUMNS, curvature_propagation_loss, exact_ggn_loss
from .hessian import hessian_sqrt_apply
from .output_hessian import OutputHessian
from .sampled import sampled_nll
from .scale import LIKELIHOODS, REDUCTIONS, averaged_elements, objective_scale

__all__ = [
    "sampled_nll",
    "curvature_propagation_loss",
    "exact_ggn_loss",
    "hessian_sqrt_apply",
    "OutputHessian",
    "objective_scale",
    "averaged_elements",
    "LIKELIHOODS",
    "REDUCTIONS",
    "EXACT_GGN_MAX_COLUMNS",
]
