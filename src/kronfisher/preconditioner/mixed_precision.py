"""Mixed precision: statistics in the factor dtype, and a GradScaler's loss scale.

Under ``torch.autocast`` a layer's output gradients (and the inputs of every layer after
the first) are float16/bfloat16. The hooks cast each statistic to the layer's factor dtype
(:func:`~.casting.curvature_dtype`: float32 unless ``factor_dtype`` says float64) *before*
any arithmetic, so the batch scale (× B for a mean loss) and the division by the loss
scale never round in half precision; the module's input and output gradient are cast
before the adapter forms a and g, so a normalisation layer's x̂ is normalised in that
dtype too (an embedding's token ids stay integer). Every block kind (Kronecker, embedding,
scale-and-shift, ExactNG's) then accumulates and decomposes its curvature in that dtype,
and ``step()`` writes each preconditioned gradient in its parameter's dtype.

With ``grad_scaler=`` (a ``torch.amp.GradScaler``, or a callable returning the scale) every
backward recorded inside ``collect()`` is taken to be of a loss multiplied by the scale the
scaler has when that ``collect()`` starts (``scaler.scale(loss).backward()``; a GradScaler
changes its scale only in ``update()``): the captured output gradients are divided by it
(as kfac-pytorch does in its hook). A power-of-two scale makes this exact. The order of a
step is :data:`LOOP_ORDER`; ``step()`` checks it against the GradScaler's state and raises
``RuntimeError`` before changing anything when the gradients are still multiplied by the
scale (no ``scaler.unscale_(optimizer)`` since the last ``update()``) or when
``scaler.step(optimizer)`` already ran. A step whose gradients are not finite is the
scaler's overflow step: ``step()`` drops the pending curvature batch, clears the gradients
and returns False, without a warning (the scaler skips ``optimizer.step()`` and lowers
the scale); :attr:`MixedPrecisionMixin.overflow_steps` counts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.amp import GradScaler
from torch.amp.grad_scaler import OptState

from .casting import as_factor_dtype, checked_factor_dtype, curvature_dtype
from .layer_state import LayerState

__all__ = ["LOOP_ORDER", "GradScalerLike", "LossScale", "MixedPrecisionMixin"]

LOOP_ORDER = ("scaler.scale(loss).backward(); scaler.unscale_(optimizer); precond.step();"
              " scaler.step(optimizer); scaler.update()")
"""The order of one training step with a GradScaler."""

GradScalerLike = GradScaler | Callable[[], float]


@dataclass(frozen=True)
class LossScale:
    """Where the loss scale of the recorded backward passes comes from (none: 1).

    Attributes:
        scaler: a ``torch.amp.GradScaler`` (its ``get_scale()``; its state tells the order).
        getter: or a callable returning the scale (no order check possible).
    """

    scaler: GradScaler | None = None
    getter: Callable[[], float] | None = None

    @classmethod
    def of(cls, grad_scaler: GradScalerLike | None) -> LossScale:
        """The loss scale of a ``grad_scaler`` argument.

        Raises:
            TypeError: neither None, a GradScaler nor a callable.
        """
        if grad_scaler is None:
            return cls()
        if isinstance(grad_scaler, GradScaler):
            return cls(scaler=grad_scaler)
        if callable(grad_scaler):
            return cls(getter=grad_scaler)
        raise TypeError("grad_scaler must be a torch.amp.GradScaler or a callable returning the"
                        f" loss scale, got {type(grad_scaler).__name__}")

    @property
    def active(self) -> bool:
        """Whether recorded gradients are scaled (an enabled GradScaler, or a callable)."""
        if self.scaler is not None:
            return self.scaler.is_enabled()
        return self.getter is not None

    def value(self) -> float:
        """The current loss scale (1.0 without a scaler or with a disabled one).

        Raises:
            ValueError: the scale is not a finite number > 0.
        """
        if self.scaler is not None:
            s = self.scaler.get_scale()
        elif self.getter is not None:
            s = self.getter()
        else:
            return 1.0
        try:
            s = float(s)
        except (TypeError, ValueError):
            s = math.nan
        if not (math.isfinite(s) and s > 0.0):
            raise ValueError(f"the grad_scaler's loss scale must be a finite number > 0, got"
                             f" {s!r}: the captured gradients cannot be divided by it")
        return s

    def check_order(self, who: str) -> None:
        """Raise if a GradScaler's gradients are not unscaled now (see the module docstring).

        Reads the scaler's per-optimizer stages (torch keeps them in a private attribute;
        a torch without it is not checked).

        Raises:
            RuntimeError: no optimizer was unscaled since the last ``update()``, or
                ``scaler.step()`` already ran.
        """
        if self.scaler is None or not self.scaler.is_enabled():
            return
        states = getattr(self.scaler, "_per_optimizer_states", None)
        if not isinstance(states, Mapping):
            return
        stages = [st.get("stage") for st in states.values() if isinstance(st, Mapping)]
        if any(s is OptState.UNSCALED for s in stages):
            return
        if any(s is OptState.STEPPED for s in stages):
            why = ("after scaler.step(optimizer): the optimizer has already applied these"
                   " gradients")
        else:
            why = ("on gradients still multiplied by the GradScaler's loss scale (no"
                   " scaler.unscale_(optimizer) since the last scaler.update())")
        raise RuntimeError(f"{who}.step() called {why}; nothing was changed. Call, in this"
                           f" order: {LOOP_ORDER}")


class MixedPrecisionMixin:
    """``factor_dtype`` and ``grad_scaler`` over the attributes declared below."""

    layers: dict[str, LayerState]
    model: nn.Module
    factor_dtype: torch.dtype | None
    grad_scaler: GradScalerLike | None
    overflow_steps: int
    _loss_scale: LossScale

    def _skip(self, msg: str | None, stacklevel: int = 4) -> bool:
        raise NotImplementedError

    def _nonfinite_grads(self) -> list[str]:
        raise NotImplementedError

    def _init_mixed_precision(self, factor_dtype: torch.dtype | None,
                              grad_scaler: GradScalerLike | None) -> None:
        """Check and keep the two options (before any hook can run)."""
        self.factor_dtype = checked_factor_dtype(factor_dtype)
        self._loss_scale = LossScale.of(grad_scaler)
        self.grad_scaler = grad_scaler
        self.overflow_steps = 0

    def _statistic(self, state: LayerState, compute: Callable[[Tensor], Tensor],
                   x: Tensor) -> Tensor:
        """``compute(x)`` (an adapter's ``inputs`` or ``output_grads``) in the factor dtype.

        ``x`` is cast first, so the adapter's own arithmetic (a normalisation layer's x̂)
        is done in the factor dtype too, not in the autocast dtype; token ids stay integer.
        """
        dtype = curvature_dtype(state, self.factor_dtype)[0]
        return as_factor_dtype(compute(as_factor_dtype(x, dtype)), dtype)

    def _scaler_overflow(self) -> bool:
        """With an active loss scale and a non-finite gradient: the scaler's overflow step.

        Drops every layer's pending curvature batch, clears the gradients (no warning) and
        counts the step; returns whether it did.
        """
        if not self._loss_scale.active or not self._nonfinite_grads():
            return False
        for s in self.layers.values():
            s.captures = []
        self.overflow_steps += 1
        self._skip(None)
        return True
