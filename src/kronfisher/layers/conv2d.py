"""nn.Conv2d (groups = 1, zero padding): unfolded patches and per-location gradients."""

from __future__ import annotations

from typing import ClassVar, cast

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerAdapter, UnsupportedLayerError, append_ones
from .statistics import Pairing


class Conv2dAdapter(LayerAdapter):
    """Adapter of ``nn.Conv2d`` (groups = 1, zero integer padding; any stride, dilation).

    Kind "conv2d"; its positions are the output grid's locations.
    """

    kind: ClassVar[str] = "conv2d"
    weight_only_block: ClassVar[bool] = True

    @classmethod
    def check(cls, module: nn.Module) -> None:
        """Raise :class:`UnsupportedLayerError` for groups ≠ 1, non-zero or string padding."""
        module = cast(nn.Conv2d, module)
        if module.groups != 1:
            raise UnsupportedLayerError(f"Conv2d with groups={module.groups} (only groups=1)")
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"Conv2d with padding_mode={module.padding_mode!r} (only 'zeros')"
            )
        if isinstance(module.padding, str):
            raise UnsupportedLayerError(
                f"Conv2d with padding={module.padding!r}; give explicit integer padding"
            )

    def inputs(self, x: Tensor) -> Tensor:
        """Unfolded input patches (with 1 for the bias) as (m, T, d_a)."""
        module = cast(nn.Conv2d, self.module)
        if x.ndim != 4:
            raise UnsupportedLayerError(f"Conv2d input must be (N, C, H, W), got {tuple(x.shape)}")
        padding = cast(tuple[int, int], module.padding)  # string padding refused by check()
        cols = F.unfold(
            x.detach(), module.kernel_size, dilation=module.dilation, padding=padding,
            stride=module.stride,
        )  # (m, C·kh·kw, T), channel-major like weight.reshape(out, -1)
        cols = cols.transpose(1, 2)
        return append_ones(cols) if self.bias is not None else cols

    def output_grads(self, grad_out: Tensor) -> Tensor:
        """Per-location output gradients as (m, T, d_g)."""
        return grad_out.detach().flatten(2).transpose(1, 2)  # (m, T, out)

    def pairing(self, grad_out: Tensor) -> Pairing:
        """The output grid (height, width)."""
        return Pairing("grid", (int(grad_out.shape[-2]), int(grad_out.shape[-1])))
