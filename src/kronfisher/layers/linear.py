"""nn.Linear: a = [x; 1], g = ∂ℓ/∂s per position; inputs (batch, …, features).

A 2-D input (m, d_in) has one position per example. An input (B, …, d_in) has
T = prod(…) positions per example that share the weight (a sequence, a grid of tokens);
so do the calls of one module several times in one forward (:meth:`combine_calls`). How
the shared positions enter the Fisher block is the curvature block's weight-sharing mode.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .base import LayerAdapter, UnsupportedLayerError, append_ones, concat_calls
from .statistics import LayerStatistics, Pairing


class LinearAdapter(LayerAdapter):
    """Adapter of ``nn.Linear`` with inputs (batch, …, features) (kind "dense")."""

    kind: ClassVar[str] = "dense"
    weight_only_block: ClassVar[bool] = True
    shares_calls: ClassVar[bool] = True

    def inputs(self, x: Tensor) -> Tensor:
        """The inputs [x; 1] (1 only with a bias) as (B, T, d_a); T = 1 for a 2-D input."""
        if x.ndim < 2:
            raise UnsupportedLayerError(
                f"nn.Linear with {x.ndim}-D input {tuple(x.shape)}: the preconditioner needs"
                " a batch dimension first, (batch, …, features)")
        x = x.detach()
        a = append_ones(x) if self.bias is not None else x
        return a[:, None, :] if x.ndim == 2 else a.reshape(a.shape[0], -1, a.shape[-1])

    def output_grads(self, grad_out: Tensor) -> Tensor:
        """The output gradients as (B, T, d_g)."""
        g = grad_out.detach()
        return g[:, None, :] if g.ndim == 2 else g.reshape(g.shape[0], -1, g.shape[-1])

    def pairing(self, grad_out: Tensor) -> Pairing:
        """One position for a 2-D output; T = prod(…) shared positions otherwise."""
        if grad_out.ndim == 2:
            return Pairing()
        t = grad_out[0, ..., 0].numel()
        return Pairing("shared", (1, t))

    def combine_calls(self, calls: list[LayerStatistics]) -> LayerStatistics:
        """The calls of one forward as the positions of each example (:func:`concat_calls`)."""
        return concat_calls(calls, "nn.Linear")
