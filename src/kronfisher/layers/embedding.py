"""nn.Embedding: ``nn.Linear(V, d, bias=False)`` on one-hot inputs, Θ = weightᵀ (d × V).

The statistics' ``a`` are the token ids themselves, (m, T) int64 — the one-hot inputs in
index form, never expanded — and ``g`` the output gradients (m, T, d) at the T positions
that share the table (weight sharing, "expand": each position is one token of the
block, see :mod:`kronfisher.curvature.embedding`); several calls of one embedding in one
forward are more positions of the same examples. Positions holding ``padding_idx`` are
dropped by the curvature (that row gets no gradient from ``nn.Embedding``'s backward, so
it is no parameter of the Fisher; its preconditioned gradient stays 0).
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from .base import LayerAdapter, UnsupportedLayerError, concat_calls
from .param_layout import ParamLayout
from .statistics import LayerStatistics, Pairing

__all__ = ["EmbeddingAdapter"]


class EmbeddingAdapter(LayerAdapter):
    """Adapter of ``nn.Embedding`` (kind "embedding"), any (batch, …) integer input.

    Refused at construction (:class:`UnsupportedLayerError`, with the reason):
    ``max_norm`` (the forward renormalises rows of the table in place, so the output is
    not the linear function of the weight this Fisher is of), ``sparse=True`` (the
    gradient is a sparse tensor; a preconditioned gradient is dense and the sparse
    optimizers that need ``sparse=True`` cannot take it) and ``scale_grad_by_freq=True``
    (the gradient is rescaled by in-batch token frequencies: it is not the gradient of the
    loss whose Fisher is computed).
    """

    kind: ClassVar[str] = "embedding"
    shares_calls: ClassVar[bool] = True

    @classmethod
    def check(cls, module: nn.Module) -> None:
        """Raise :class:`UnsupportedLayerError` for max_norm, sparse or scale_grad_by_freq."""
        module = cast(nn.Embedding, module)
        if module.max_norm is not None:
            raise UnsupportedLayerError(
                f"nn.Embedding with max_norm={module.max_norm}: its forward renormalises the"
                " looked-up rows of the weight in place, so the output is not linear in the"
                " weight and the one-hot Linear Fisher does not apply; use max_norm=None")
        if module.sparse:
            raise UnsupportedLayerError(
                "nn.Embedding with sparse=True: its gradient is a sparse tensor, while the"
                " preconditioned gradient is dense (and the sparse optimizers that need"
                " sparse=True cannot take a dense one); use sparse=False")
        if module.scale_grad_by_freq:
            raise UnsupportedLayerError(
                "nn.Embedding with scale_grad_by_freq=True: its gradient is rescaled by the"
                " tokens' in-batch frequencies, so it is not the gradient of the loss whose"
                " Fisher the curvature is; use scale_grad_by_freq=False")

    @property
    def layout(self) -> ParamLayout:
        """Θ = weightᵀ (d × V), no bias."""
        return ParamLayout.of(cast(nn.Embedding, self.module).weight, None, transposed=True)

    @property
    def vocab_size(self) -> int:
        """V, the number of rows of the table."""
        return int(cast(nn.Embedding, self.module).num_embeddings)

    @property
    def padding_idx(self) -> int | None:
        """The module's padding index (its row gets no gradient), or None."""
        return cast(nn.Embedding, self.module).padding_idx

    def inputs(self, x: Tensor) -> Tensor:
        """The token ids as (m, T) int64: m = ``x.shape[0]``, T = the other dimensions."""
        if x.ndim == 0:
            raise UnsupportedLayerError("nn.Embedding with a 0-D input: the first dimension"
                                        " must index the examples")
        return x.detach().reshape(x.shape[0], -1).to(torch.int64)

    def output_grads(self, grad_out: Tensor) -> Tensor:
        """G at every position as (m, T, d)."""
        g = grad_out.detach()
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def pairing(self, grad_out: Tensor) -> Pairing:
        """Positions share the table ("shared", (1, T)); one position for (batch,) inputs."""
        T = grad_out[0].numel() // grad_out.shape[-1] if grad_out.shape[0] else 1
        return Pairing("shared", (1, T)) if T > 1 else Pairing()

    def combine_calls(self, calls: list[LayerStatistics]) -> LayerStatistics:
        """The calls of one forward as the positions of each example (:func:`concat_calls`)."""
        return concat_calls(calls, "nn.Embedding")

    def per_example_gradients(self, a: Tensor, g: Tensor) -> Tensor:
        """vec(Σ_t g_t e_{token t}ᵀ) per example (m, V·d) by scattering, never one-hot.

        Positions holding ``padding_idx`` add nothing (that row's gradient is 0).
        """
        m, T, d = g.shape
        if self.padding_idx is not None:
            g = g * (a != self.padding_idx)[..., None].to(g.dtype)
        J = g.new_zeros(m, self.vocab_size, d)
        rows = torch.arange(m, device=g.device)[:, None].expand(m, T)
        J.index_put_((rows, a), g, accumulate=True)  # J[i, v] = Σ_{t: token v} g_t
        return J.reshape(m, -1)  # vec of the d × V matrix: column v is J[i, v]
