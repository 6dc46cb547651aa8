"""The one home of the [W b] layout: a layer's parameters ↔ its gradient matrix Θ.

Θ has shape (d_g, d_a) (DESIGN.md §2): for Linear and Conv2d the weight reshaped to
(out, ·) with the bias (if any) as the last column; for a transposed layout (an embedding,
whose weight is (V, d) and Θ = weightᵀ) Θ is the weight's transpose and has no bias
column. Every piece of code that turns parameters (or their gradients) into Θ or back
goes through :class:`ParamLayout`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ParamLayout"]


@dataclass(frozen=True)
class ParamLayout:
    """How a weight (and optional bias) form the gradient matrix Θ of shape (d_g, d_a).

    Attributes:
        weight_shape: the weight's shape.
        has_bias: whether a bias vector of length d_g is Θ's last column.
        transposed: Θ = weightᵀ (a 2-D weight, no bias), e.g. an embedding's (V, d) table.
    """

    weight_shape: tuple[int, ...]
    has_bias: bool
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.transposed and (len(self.weight_shape) != 2 or self.has_bias):
            raise ValueError("a transposed layout needs a 2-D weight and no bias, got"
                             f" weight {self.weight_shape}, bias {self.has_bias}")
        if not self.weight_shape:
            raise ValueError("a layout needs a weight with at least one dimension")

    @classmethod
    def of(cls, weight: Tensor, bias: Tensor | None, *, transposed: bool = False
           ) -> ParamLayout:
        """The layout of a module's ``weight`` and ``bias`` tensors."""
        return cls(tuple(weight.shape), bias is not None, transposed)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_g, d_a) of Θ."""
        if self.transposed:
            return self.weight_shape[1], self.weight_shape[0]
        d_g = self.weight_shape[0]
        return d_g, math.prod(self.weight_shape[1:]) + (1 if self.has_bias else 0)

    @property
    def n_params(self) -> int:
        """d_g · d_a: the number of entries of Θ (= the layer's parameter count)."""
        d_g, d_a = self.shape
        return d_g * d_a

    def to_matrix(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """Θ from the weight and the bias (or their gradients), in :meth:`params` order.

        Args:
            tensors: ``[weight]`` or ``[weight, bias]``; a bias of ``None`` (e.g. a bias
                without a gradient this step) is taken as zeros.

        Raises:
            ValueError: the number of tensors or a shape does not fit the layout.
        """
        n = 2 if self.has_bias else 1
        if len(tensors) != n or tensors[0] is None:
            raise ValueError(f"the layout takes {n} tensor(s) (weight{', bias' if n == 2 else ''}),"
                             f" got {len(tensors)}")
        w = tensors[0]
        if tuple(w.shape) != self.weight_shape:
            raise ValueError(f"weight of shape {tuple(w.shape)}, the layout has"
                             f" {self.weight_shape}")
        if self.transposed:
            return w.mT
        gw = w.reshape(self.weight_shape[0], -1)
        if not self.has_bias:
            return gw
        gb = tensors[1]
        if gb is None:
            gb = gw.new_zeros(self.weight_shape[0])
        return torch.cat([gw, gb[:, None]], 1)

    def from_matrix(self, M: Tensor) -> list[Tensor]:
        """Θ of shape (d_g, d_a) as tensors shaped like the weight and the bias (same order).

        The parts are views of ``M`` where possible.

        Raises:
            ValueError: ``M`` does not have the shape (d_g, d_a).
        """
        if tuple(M.shape) != self.shape:
            raise ValueError(f"matrix of shape {tuple(M.shape)}, the layer's Θ is {self.shape}")
        if self.transposed:
            return [M.mT]
        n = M.shape[1] - (1 if self.has_bias else 0)
        parts = [M[:, :n].reshape(self.weight_shape)]
        if self.has_bias:
            parts.append(M[:, n])
        return parts
