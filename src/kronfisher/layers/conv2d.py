"""nn.Conv2d (groups = 1, zero padding): unfolded patches and per-location gradients."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerAdapter, UnsupportedLayerError, append_ones


class Conv2dAdapter(LayerAdapter):
    @staticmethod
    def check(module: nn.Conv2d) -> None:
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

    @staticmethod
    def inputs(module: nn.Conv2d, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise UnsupportedLayerError(f"Conv2d input must be (N, C, H, W), got {tuple(x.shape)}")
        cols = F.unfold(
            x.detach(), module.kernel_size, dilation=module.dilation, padding=module.padding,
            stride=module.stride,
        )  # (m, C·kh·kw, T), channel-major like weight.reshape(out, -1)
        cols = cols.transpose(1, 2)
        return append_ones(cols) if module.bias is not None else cols

    @staticmethod
    def output_grads(module: nn.Conv2d, grad_out: Tensor) -> Tensor:
        return grad_out.detach().flatten(2).transpose(1, 2)  # (m, T, out)

    @staticmethod
    def spatial_shape(module: nn.Conv2d, grad_out: Tensor) -> tuple[int, int]:
        return int(grad_out.shape[-2]), int(grad_out.shape[-1])
