"""One small adapter per supported module type (exact type match; subclasses are skipped).

An adapter is built per registered module (:func:`adapter_for`); it declares the layer's
kind, produces typed :class:`LayerStatistics` and reads/writes the gradient matrix through
the layer's :class:`ParamLayout` (the one home of the [W b] layout).
"""

from __future__ import annotations

from torch import nn

from .base import LayerAdapter, UnsupportedLayerError, append_ones, per_example_gradients
from .conv2d import Conv2dAdapter
from .linear import LinearAdapter
from .param_layout import ParamLayout
from .scale_shift import SCALE_SHIFT_KIND, SCALE_SHIFT_TYPES, ScaleShiftAdapter
from .statistics import PAIRINGS, LayerStatistics, Pairing

ADAPTERS: dict[type, type[LayerAdapter]] = {nn.Linear: LinearAdapter, nn.Conv2d: Conv2dAdapter}
ADAPTERS.update({t: ScaleShiftAdapter for t in SCALE_SHIFT_TYPES})


def adapter_for(module: nn.Module) -> LayerAdapter:
    """The adapter of ``module`` (a new instance bound to it).

    Raises:
        UnsupportedLayerError: no adapter for the module's exact type, or an unsupported
            configuration.
    """
    adapter = ADAPTERS.get(type(module))
    if adapter is None:
        raise UnsupportedLayerError(f"no adapter for {type(module).__name__}")
    return adapter(module)


__all__ = [
    "ADAPTERS",
    "LayerAdapter",
    "LinearAdapter",
    "Conv2dAdapter",
    "ScaleShiftAdapter",
    "SCALE_SHIFT_KIND",
    "SCALE_SHIFT_TYPES",
    "per_example_gradients",
    "UnsupportedLayerError",
    "adapter_for",
    "append_ones",
    "ParamLayout",
    "LayerStatistics",
    "Pairing",
    "PAIRINGS",
]
