"""Pure linear algebra: Kronecker sums, factorisations, R(F) and nearest-Kronecker solvers.

One idea per module: ``kronecker`` (the sum and its dense form), ``damping`` (the schemes),
``factorization`` (the factorised damped matrices and their solves), ``factorize`` (how
they are computed), ``support`` (splitting off exactly-zero coordinates), ``numerics``
(symmetrising, finiteness, the eigh fallback), ``stats`` (layer statistics and the R(F)
products), ``rearrangement`` (dense references, the conv pair mask), ``spaces`` /
``krylov`` / ``nearest`` (the truncated SVD of R(F) and the driver that picks a solver).
"""

from .damping import SCHEMES, first_term_shifts, pi_factor
from .factorization import (
    ConjugateGradientSolve,
    EigenFactorization,
    FactorInverses,
    KroneckerFactorization,
    SingularFactorError,
)
from .kronecker import KroneckerSum
from .nearest import SOLVERS, NearestKroneckerResult, nearest_kronecker, product_costs
from .numerics import all_finite
from .rearrangement import exact_fisher_block, rearrange, relative_error, spatial_pair_mask
from .stats import LayerStats, as_stats

__all__ = [
    "KroneckerSum",
    "KroneckerFactorization",
    "FactorInverses",
    "EigenFactorization",
    "ConjugateGradientSolve",
    "SingularFactorError",
    "SCHEMES",
    "first_term_shifts",
    "pi_factor",
    "all_finite",
    "LayerStats",
    "as_stats",
    "exact_fisher_block",
    "rearrange",
    "relative_error",
    "spatial_pair_mask",
    "nearest_kronecker",
    "product_costs",
    "NearestKroneckerResult",
    "SOLVERS",
]
