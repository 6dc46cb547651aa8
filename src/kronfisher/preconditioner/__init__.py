"""Preconditioners: the shared base, the Kronecker family and exact natural gradient."""

from .base import LayerState, NonFiniteError, Preconditioner
from .exact import ExactNG, per_example_gradients
from .kronecker import KFAC, KPSVD, Deflation, KFACCorrected, KroneckerPreconditioner, Lanczos

__all__ = [
    "Preconditioner",
    "LayerState",
    "NonFiniteError",
    "KroneckerPreconditioner",
    "KFAC",
    "KPSVD",
    "Deflation",
    "KFACCorrected",
    "Lanczos",
    "ExactNG",
    "per_example_gradients",
]
