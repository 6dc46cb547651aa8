"""Scale-and-shift layers: the affine parameters of LayerNorm, BatchNorm1d/2d and GroupNorm.

Each of these modules computes y = γ ⊙ x̂ + β from its normalised input x̂. Per feature j
(a channel for BatchNorm/GroupNorm, an element of ``normalized_shape`` for LayerNorm) and
example b, with s the positions sharing γ_j and β_j (spatial locations, sequence
positions) and g the output gradient of example b scaled like every other layer's
(``collect()``'s convention, DESIGN.md §2):

    dγ_bj = Σ_s g_bsj x̂_bsj,    dβ_bj = Σ_s g_bsj.

x̂ is always recomputed from the module's input with the module's own normalisation
(:func:`normalized_input`), never as (y − β)/γ, which is undefined where γ_j = 0 and loses
precision where γ_j is small. Statistics use the (m, T, C) layout of the other layers:
m examples, T positions, C features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerAdapter, UnsupportedLayerError
from .param_layout import ParamLayout
from .statistics import Pairing

__all__ = ["SCALE_SHIFT_TYPES", "SCALE_SHIFT_KIND", "ScaleShiftAdapter", "ScaleShiftGrads",
           "check_scale_shift", "normalized_input", "uses_batch_statistics",
           "to_feature_layout", "scale_shift_grads", "scale_shift_params",
           "scale_shift_features"]

SCALE_SHIFT_KIND = "scale_shift"
"""The layer kind of every scale-and-shift adapter (the curvature registry's key)."""

SCALE_SHIFT_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)
"""The module types whose affine parameters form a scale-and-shift layer."""
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class ScaleShiftGrads:
    """Per-example gradients of one scale-and-shift layer.

    Attributes:
        scale: dγ as (m, C), one row per example.
        shift: dβ as (m, C), or None when the module has no shift (``bias=False``).
    """

    scale: Tensor
    shift: Tensor | None

    def stacked(self) -> Tensor:
        """(m, C, k): [dγ, dβ] per example and feature (k = 2), or [dγ] (k = 1)."""
        parts = [self.scale] if self.shift is None else [self.scale, self.shift]
        return torch.stack(parts, -1)


def _affine(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm):
        return bool(module.elementwise_affine)
    return bool(getattr(module, "affine", False))


def check_scale_shift(module: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` unless ``module`` is an affine scale-and-shift layer.

    Raises:
        UnsupportedLayerError: not one of :data:`SCALE_SHIFT_TYPES` (or a subclass), or
            without affine parameters (``elementwise_affine=False`` / ``affine=False``:
            nothing to precondition).
    """
    if not isinstance(module, SCALE_SHIFT_TYPES):
        raise UnsupportedLayerError(f"{type(module).__name__} is not a scale-and-shift layer")
    if not _affine(module) or not isinstance(getattr(module, "weight", None), Tensor):
        raise UnsupportedLayerError(
            f"{type(module).__name__} without affine parameters has nothing to precondition")


def scale_shift_params(module: nn.Module) -> list[Tensor]:
    """[γ] or [γ, β]: the scale and (if present) the shift, in gradient-matrix column order."""
    w, b = module.weight, getattr(module, "bias", None)
    if not isinstance(w, Tensor):
        raise UnsupportedLayerError(f"{type(module).__name__} has no scale (weight) tensor")
    return [w] + ([b] if isinstance(b, Tensor) else [])


def scale_shift_features(module: nn.Module) -> int:
    """C, the number of features (entries of γ)."""
    return scale_shift_params(module)[0].numel()


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether a BatchNorm normalises with the batch's statistics (torch's own rule).

    True in training mode, and in eval mode when the module tracks no running statistics;
    False for other module types.
    """
    if not isinstance(module, _BATCH_NORMS):
        return False
    return module.training or (module.running_mean is None and module.running_var is None)


def _check_input(module: nn.Module, x: Tensor) -> None:
    if isinstance(module, nn.LayerNorm):
        ns = tuple(module.normalized_shape)
        if x.ndim <= len(ns) or tuple(x.shape[x.ndim - len(ns):]) != ns:
            raise UnsupportedLayerError(
                f"LayerNorm{ns} needs input (batch, ..., {', '.join(map(str, ns))}) with the"
                f" batch first, got {tuple(x.shape)}")
    elif x.ndim < 2 or x.shape[1] != scale_shift_features(module):
        raise UnsupportedLayerError(
            f"{type(module).__name__} needs input (batch, {scale_shift_features(module)}, ...),"
            f" got {tuple(x.shape)}")


def normalized_input(module: nn.Module, x: Tensor) -> Tensor:
    """x̂, the module's input normalised exactly as its forward normalises it (x's shape).

    LayerNorm and GroupNorm use their own ``eps``; BatchNorm uses the batch's statistics
    when :func:`uses_batch_statistics` (its forward's rule) and the running statistics
    otherwise. The running statistics are never updated here.

    Raises:
        UnsupportedLayerError: ``x`` does not have the layout the module normalises
            (batch first).
    """
    check_scale_shift(module)
    _check_input(module, x)
    x = x.detach()
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, tuple(module.normalized_shape), None, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    if not isinstance(module, _BATCH_NORMS):  # check_scale_shift passed
        raise UnsupportedLayerError(f"{type(module).__name__} is not a scale-and-shift layer")
    if uses_batch_statistics(module):
        return F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
    return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0,
                        module.eps)


def to_feature_layout(module: nn.Module, t: Tensor) -> Tensor:
    """A tensor shaped like the module's input or output, as (m, T, C).

    LayerNorm: the ``normalized_shape`` dimensions flattened into C (row-major, like
    ``weight.reshape(-1)``), every dimension between the batch and them into T.
    BatchNorm/GroupNorm: channels (dim 1) are C, the dimensions after them T.
    """
    m = t.shape[0]
    if isinstance(module, nn.LayerNorm):
        c = math.prod(module.normalized_shape)
        return t.reshape(m, -1, c)
    return t.reshape(m, t.shape[1], -1).transpose(1, 2)


def scale_shift_grads(xhat: Tensor, g: Tensor, has_shift: bool) -> ScaleShiftGrads:
    """dγ_bj = Σ_s g_bsj x̂_bsj and dβ_bj = Σ_s g_bsj from (m, T, C) statistics.

    Args:
        xhat: the normalised inputs x̂ as (m, T, C).
        g: the scaled output gradients as (m, T, C).
        has_shift: whether the module has a shift β (else ``shift`` is None).

    Of two dtypes, both are promoted to the wider one.

    Raises:
        ValueError: ``xhat`` and ``g`` are not both (m, T, C) of one shape.
    """
    if xhat.ndim != 3 or xhat.shape != g.shape:
        raise ValueError(f"x̂ and g must both be (m, T, C) of one shape, got"
                         f" {tuple(xhat.shape)} and {tuple(g.shape)}")
    if xhat.dtype != g.dtype:  # e.g. autocast: a float32 normalisation, bfloat16 gradients
        dtype = torch.promote_types(xhat.dtype, g.dtype)
        xhat, g = xhat.to(dtype), g.to(dtype)
    return ScaleShiftGrads(scale=torch.einsum("mtc,mtc->mc", xhat, g),
                           shift=g.sum(1) if has_shift else None)


class ScaleShiftAdapter(LayerAdapter):
    """Adapter of an affine LayerNorm, BatchNorm1d/2d or GroupNorm (kind "scale_shift").

    Statistics: ``a`` = x̂ and ``g`` = output gradients, both (m, T, C) (see the module
    docstring), paired as T positions sharing the parameters. Θ = [γ β] of shape (C, k),
    k = 2 (k = 1 with ``bias=False``): a "layer" whose weight is diagonal, γ flattened in
    ``weight.reshape(-1)`` order (LayerNorm's multi-dimensional ``normalized_shape`` too).
    The batch must be the input's first dimension (``batch_first=True`` in transformers).
    """

    kind: ClassVar[str] = SCALE_SHIFT_KIND
    inputs_rescalable: ClassVar[bool] = False  # dβ = Σ g does not scale with x̂

    @classmethod
    def check(cls, module: nn.Module) -> None:
        """Raise :class:`UnsupportedLayerError` unless affine (see :func:`check_scale_shift`)."""
        check_scale_shift(module)

    @property
    def layout(self) -> ParamLayout:
        """Θ = [γ β] as (C, 2), or [γ] as (C, 1): γ and β flattened to (C,)."""
        ps = scale_shift_params(self.module)
        return ParamLayout((ps[0].numel(),), len(ps) == 2)

    def inputs(self, x: Tensor) -> Tensor:
        """x̂ (the module's own normalisation of ``x``) as (m, T, C)."""
        return to_feature_layout(self.module, normalized_input(self.module, x))

    def output_grads(self, grad_out: Tensor) -> Tensor:
        """The output gradients as (m, T, C)."""
        return to_feature_layout(self.module, grad_out.detach())

    def pairing(self, grad_out: Tensor) -> Pairing:
        """T positions sharing γ, β (one capture size per curvature batch)."""
        t = to_feature_layout(self.module, grad_out).shape[1]
        return Pairing("shared", (1, t)) if t > 1 else Pairing()

    def to_matrix(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """[γ β] as (C, k) from tensors shaped like γ and β (a None β: zeros)."""
        return self.layout.to_matrix([None if t is None else t.reshape(-1) for t in tensors])

    def split_matrix(self, M: Tensor) -> list[Tensor]:
        """A (C, k) matrix as tensors shaped like γ and β (same order)."""
        return [part.reshape(p.shape)
                for part, p in zip(self.layout.from_matrix(M), self.params())]

    def per_example_gradients(self, a: Tensor, g: Tensor) -> Tensor:
        """vec([dγ_b dβ_b]) = [dγ_b; dβ_b] for each example, (m, C·k)."""
        grads = scale_shift_grads(a, g, self.layout.has_bias)
        return grads.stacked().transpose(1, 2).reshape(a.shape[0], -1)
