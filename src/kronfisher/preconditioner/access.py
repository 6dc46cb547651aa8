"""Looking up a preconditioner's registered layers and asking for their curvature."""

from __future__ import annotations

from torch import Tensor, nn

from .layer_state import LayerState

__all__ = ["LayerAccessMixin"]


class LayerAccessMixin:
    """Layer look-ups by module or name, ``curvature`` and ``curvature_product``."""

    layers: dict[str, LayerState]
    _by_module: dict[int, LayerState]

    def _state_of(self, module: nn.Module) -> LayerState:
        s = self._by_module.get(id(module))
        if s is None:
            raise KeyError(
                f"{type(module).__name__} module is not registered with this preconditioner"
            )
        return s

    def _registered(self, name: str) -> LayerState:
        s = self.layers.get(name)
        if s is None:
            raise KeyError(f"{name!r} is not a registered layer (registered:"
                           f" {sorted(self.layers)})")
        return s

    def curvature(self, module: nn.Module):
        """The layer's current curvature (after the running average)."""
        return self._state_of(module).curvature

    def curvature_product(self, mats: dict[str, Tensor]) -> dict[str, Tensor]:
        """M vec(V) for each layer, M the damped curvature the current factorisation inverts.

        So that the preconditioned gradient :meth:`step` writes is Δ = M⁻¹ ∇ (before any
        KL clipping); ``kronfisher.optim`` uses it for the quadratic model of its damping
        rule.

        Args:
            mats: layer name (a key of :attr:`layers`) → V of the layer's gradient-matrix
                shape (d_g, d_a) (weight reshaped to (d_g, ·), bias last column).

        Returns:
            layer name → M vec(V) in the same matrix form and dtype.

        Raises:
            KeyError: a name that is not a registered layer.
            RuntimeError: a layer without a factorisation yet (before the first
                :meth:`step`).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement curvature_product")
