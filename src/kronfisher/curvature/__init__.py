"""Curvature methods: turn a batch of layer statistics into a KroneckerSum."""

from .methods import METHODS, approximate, method_rank

__all__ = ["approximate", "METHODS", "method_rank"]
