"""The KL-clipping factor ν that scales all preconditioned gradients of one step."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["kl_clip_factor"]


def kl_clip_factor(dots: list[Tensor], kl_clip: float, mode: str, lr: float | None) -> float:
    """ν ≤ 1 from the per-layer inner products ⟨Δ, ∇⟩ of preconditioned and raw gradients.

    Args:
        dots: one 0-d tensor ⟨Δ, ∇⟩ per preconditioned layer.
        kl_clip: the KL bound (> 0).
        mode: "lr2": ν = min(1, sqrt(kl_clip / (lr² Σ ⟨Δ, ∇⟩))); "authors":
            ν = min(1, sqrt(kl_clip / Σ |⟨Δ, ∇⟩|)).
        lr: the optimizer's learning rate (mode "lr2" only).

    Returns:
        ν, or 1.0 when the denominator is not > 0.

    Raises:
        RuntimeError: mode "lr2" without ``lr``.
    """
    if mode == "authors":
        vg = float(torch.stack(dots).abs().sum())
    else:
        if lr is None:  # Preconditioner.__init__ refuses kl_clip in mode "lr2" without lr
            raise RuntimeError("kl_clip in mode 'lr2' needs the optimizer's lr")
        vg = float(torch.stack(dots).sum()) * lr**2
    if not vg > 0:
        return 1.0
    return min(1.0, math.sqrt(kl_clip / vg))
