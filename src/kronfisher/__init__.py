"""kronfisher: natural-gradient preconditioners with Kronecker-structured Fisher approximations."""

from .curvature import METHODS, approximate
from .linalg import KroneckerSum, exact_fisher_block

__version__ = "0.1.0"

__all__ = ["KroneckerSum", "approximate", "exact_fisher_block", "METHODS", "__version__"]
