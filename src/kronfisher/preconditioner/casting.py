"""A layer's curvature dtype: ``factor_dtype``, else its module's (``model.double()``, ``.cuda()``).

The curvature of a layer, and every statistic it is built from, is kept in one dtype on
the module's device: the preconditioner's ``factor_dtype`` if given (float32 or float64),
otherwise float32 for a float16/bfloat16 module (LAPACK has no half-precision eigh) and
the module's dtype for any other. Under ``torch.autocast`` the module stays float32, so the
half-precision statistics it captures are kept in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import KroneckerSum
from .layer_state import LayerState

__all__ = ["FACTOR_DTYPES", "checked_factor_dtype", "curvature_dtype", "as_factor_dtype",
           "cast_curvature", "follow_module"]

_LOW = (torch.float16, torch.bfloat16)
FACTOR_DTYPES = (torch.float32, torch.float64)
"""The dtypes ``factor_dtype`` accepts (those LAPACK decomposes)."""


def checked_factor_dtype(value: object) -> torch.dtype | None:
    """``value`` if it is None, torch.float32 or torch.float64.

    Raises:
        ValueError: any other value (float16/bfloat16 included: statistics accumulated with
            an 11- or 8-bit significand, and no LAPACK decomposition in that dtype).
    """
    if value is None or (isinstance(value, torch.dtype) and value in FACTOR_DTYPES):
        return value
    raise ValueError(f"factor_dtype must be None, torch.float32 or torch.float64, got {value!r}"
                     " (half precision cannot be decomposed: under autocast the default"
                     " keeps the statistics in float32)")


def curvature_dtype(state: LayerState, factor_dtype: torch.dtype | None = None
                    ) -> tuple[torch.dtype, torch.device]:
    """The (dtype, device) a registered layer's curvature and statistics should have now."""
    w = state.module.weight
    if not isinstance(w, Tensor):  # registration only accepts modules with a weight tensor
        raise TypeError(f"layer {state.name!r} has no weight tensor")
    if factor_dtype is not None:
        return factor_dtype, w.device
    return (torch.float32 if w.dtype in _LOW else w.dtype), w.device


def as_factor_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A floating statistic in ``dtype`` (itself if it is); others (token ids) as they are."""
    return x.to(dtype) if x.is_floating_point() else x


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


def follow_module(state: LayerState, factor_dtype: torch.dtype | None = None) -> bool:
    """Cast the layer's curvature to :func:`curvature_dtype` if it differs.

    The factorisation is then dropped (``step()`` refactorises). ``inverse_source`` stays
    the same object as ``curvature`` when it was. Returns whether anything was cast.
    """
    dtype, device = curvature_dtype(state, factor_dtype)
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
