"""One small adapter per supported module type (subclasses that keep the parent's forward too).

An adapter is built per registered module (:func:`adapter_for`); it declares the layer's
kind, produces typed :class:`LayerStatistics` and reads/writes the gradient matrix through
the layer's :class:`ParamLayout` (the one home of the [W b] layout).
"""

from __future__ import annotations

from .base import LayerAdapter, UnsupportedLayerError, append_ones, per_example_gradients
from .conv2d import Conv2dAdapter
from .embedding import EmbeddingAdapter
from .linear import LinearAdapter
from .param_layout import ParamLayout
from .registry import (
    ADAPTERS,
    AdapterChoice,
    adapter_for,
    check_adapters,
    register_adapter,
    resolve,
)
from .scale_shift import SCALE_SHIFT_KIND, SCALE_SHIFT_TYPES, ScaleShiftAdapter
from .statistics import PAIRINGS, LayerStatistics, Pairing

__all__ = [
    "ADAPTERS",
    "LayerAdapter",
    "LinearAdapter",
    "Conv2dAdapter",
    "EmbeddingAdapter",
    "AdapterChoice",
    "register_adapter",
    "check_adapters",
    "resolve",
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
