"""Curvature methods: turn a batch of layer statistics into a KroneckerSum."""

from .estimator import KroneckerEstimator
from .methods import METHODS, approximate, method_rank

__all__ = ["approximate", "METHODS", "method_rank", "KroneckerEstimator"]
