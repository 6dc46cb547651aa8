"""A layer's curvature follows its module's dtype and device (``model.double()``, ``.cuda()``).

The curvature of a float16/bfloat16 module is kept in float32 (LAPACK has no half-precision
eigh), of any other module in the module's dtype, on the module's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import KroneckerSum
from .layer_state import LayerState

__all__ = ["curvature_dtype", "cast_curvature", "follow_module"]

_LOW = (torch.float16, torch.bfloat16)


def curvature_dtype(state: LayerState) -> tuple[torch.dtype, torch.device]:
    """The (dtype, device) a registered layer's curvature should have now."""
    w = state.module.weight
    if not isinstance(w, Tensor):  # registration only accepts modules with a weight tensor
        raise TypeError(f"layer {state.name!r} has no weight tensor")
    return (torch.float32 if w.dtype in _LOW else w.dtype), w.device


def _where(c) -> tuple[torch.dtype, torch.device] | None:
    if isinstance(c, KroneckerSum):
        A = c.terms[0][0]
        return A.dtype, A.device
    if isinstance(c, Tensor):
        return c.dtype, c.device
    return None  # not a curvature ExactNG keeps: its own typed check refuses it


def cast_curvature(c, dtype: torch.dtype, device: torch.device):
    """A KroneckerSum or dense tensor cast to ``dtype`` on ``device`` (itself if it is)."""
    if _where(c) in (None, (dtype, device)):
        return c
    if isinstance(c, KroneckerSum):
        out = KroneckerSum([(A.to(device, dtype), G.to(device, dtype)) for A, G in c.terms])
        out.info = dict(c.info)
        return out
    return c.to(device, dtype)


def follow_module(state: LayerState) -> bool:
    """Cast the layer's curvature to its module's dtype/device if it differs.

    The factorisation is then dropped (``step()`` refactorises). ``inverse_source`` stays
    the same object as ``curvature`` when it was. Returns whether anything was cast.
    """
    dtype, device = curvature_dtype(state)
    block = state.block  # a layer's block knows its curvature's type; ExactNG has none
    if state.curvature is None:
        return False
    where = block.placement(state.curvature) if block is not None else _where(state.curvature)
    if where == (dtype, device):
        return False

    def cast(c):
        if c is None:
            return None
        return block.cast(c, dtype, device) if block is not None else cast_curvature(
            c, dtype, device)

    same = state.inverse_source is state.curvature
    state.curvature = cast(state.curvature)
    state.inverse_source = state.curvature if same else cast(state.inverse_source)
    state.inverse, state.inverse_damping = None, None
    return True
