"""Pure linear algebra: Kronecker sums, the rearranged Fisher and nearest-Kronecker solvers."""

from .kronecker import KroneckerFactorization, KroneckerSum, SingularFactorError, pi_factor
from .nearest import SOLVERS, NearestKroneckerResult, nearest_kronecker
from .rearrangement import (
    LayerStats,
    as_stats,
    exact_fisher_block,
    rearrange,
    relative_error,
    spatial_pair_mask,
)

__all__ = [
    "KroneckerSum",
    "KroneckerFactorization",
    "SingularFactorError",
    "pi_factor",
    "LayerStats",
    "as_stats",
    "exact_fisher_block",
    "rearrange",
    "relative_error",
    "spatial_pair_mask",
    "nearest_kronecker",
    "NearestKroneckerResult",
    "SOLVERS",
]
