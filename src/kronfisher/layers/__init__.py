"""One small adapter per supported module type (exact type match; subclasses are skipped)."""

from __future__ import annotations

from torch import nn

from .base import LayerAdapter, UnsupportedLayerError, append_ones
from .conv2d import Conv2dAdapter
from .linear import LinearAdapter

ADAPTERS: dict[type, type[LayerAdapter]] = {nn.Linear: LinearAdapter, nn.Conv2d: Conv2dAdapter}


def adapter_for(module: nn.Module) -> type[LayerAdapter]:
    """The adapter of ``module``; raises :class:`UnsupportedLayerError` if there is none."""
    adapter = ADAPTERS.get(type(module))
    if adapter is None:
        raise UnsupportedLayerError(f"no adapter for {type(module).__name__}")
    adapter.check(module)
    return adapter


__all__ = [
    "ADAPTERS",
    "LayerAdapter",
    "LinearAdapter",
    "Conv2dAdapter",
    "UnsupportedLayerError",
    "adapter_for",
    "append_ones",
]
