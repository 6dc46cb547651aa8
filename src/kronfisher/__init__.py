"""kronfisher: natural-gradient preconditioners with Kronecker-structured Fisher approximations.

Core objects: :class:`KroneckerSum` (a sum of Kronecker products with damped solves),
:func:`approximate` (the five approximations of one layer's Fisher block), and the
preconditioners :class:`KFAC`, :class:`KPSVD`, :class:`Deflation`, :class:`KFACCorrected`,
:class:`Lanczos` and :class:`ExactNG`.
"""

from . import optim
from .curvature import METHODS, approximate
from .layers import register_adapter
from .linalg import KroneckerSum, exact_fisher_block
from .losses import OutputHessian, curvature_propagation_loss, exact_ggn_loss, sampled_nll
from .preconditioner import (
    KFAC,
    KPSVD,
    Deflation,
    ExactNG,
    KFACCorrected,
    KroneckerPreconditioner,
    Lanczos,
    NonFiniteError,
    Preconditioner,
)

__version__ = "0.1.0"

__all__ = [
    "KroneckerSum",
    "approximate",
    "register_adapter",
    "exact_fisher_block",
    "METHODS",
    "sampled_nll",
    "curvature_propagation_loss",
    "exact_ggn_loss",
    "OutputHessian",
    "Preconditioner",
    "KroneckerPreconditioner",
    "KFAC",
    "KPSVD",
    "Deflation",
    "KFACCorrected",
    "Lanczos",
    "ExactNG",
    "NonFiniteError",
    "optim",
    "__version__",
]
