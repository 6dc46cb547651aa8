"""nn.Linear: aᵢ = [xᵢ; 1], gᵢ = ∂ℓᵢ/∂sᵢ, one position per example."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .base import LayerAdapter, UnsupportedLayerError, append_ones


class LinearAdapter(LayerAdapter):
    """Adapter of ``nn.Linear`` with 2-D (batch, features) inputs (kind "dense")."""

    kind: ClassVar[str] = "dense"

    def inputs(self, x: Tensor) -> Tensor:
        """aᵢ = [xᵢ; 1] (1 only with a bias) as (m, 1, d_a)."""
        if x.ndim != 2:
            raise UnsupportedLayerError(
                f"nn.Linear with {x.ndim}-D input {tuple(x.shape)}: only (batch, features)"
                " inputs are supported (weight sharing over extra dimensions is not a Linear"
                " layer's Fisher block in the sense of DESIGN.md §2)"
            )
        x = x.detach()
        return (append_ones(x) if self.module.bias is not None else x)[:, None, :]

    def output_grads(self, grad_out: Tensor) -> Tensor:
        """gᵢ as (m, 1, d_g)."""
        return grad_out.detach()[:, None, :]
