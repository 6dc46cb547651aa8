"""The adapter contract: how one module type yields (a, g) and exposes its gradient matrix."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _weight(module: nn.Module) -> Tensor:
    w = module.weight
    if not isinstance(w, Tensor):
        raise UnsupportedLayerError(f"{type(module).__name__} has no weight tensor")
    return w


def _bias(module: nn.Module) -> Tensor | None:
    b = getattr(module, "bias", None)
    return b if isinstance(b, Tensor) else None


class UnsupportedLayerError(ValueError):
    """A module (or a module configuration) no adapter can handle correctly."""


class LayerAdapter:
    """Per-module-type glue between hooks and the curvature code (DESIGN.md §2, §6).

    Statistics are returned as ``a`` (m, T, d_a) and ``g`` (m, T, d_g) with T = 1 for
    Linear layers; the gradient matrix is [W b] of shape (d_g, d_a).
    """

    @staticmethod
    def check(module: nn.Module) -> None:
        """Raise :class:`UnsupportedLayerError` if the configuration is not supported."""

    @staticmethod
    def inputs(module: nn.Module, x: Tensor) -> Tensor:
        """The layer inputs ``a`` (m, T, d_a) from the module's input ``x``."""
        raise NotImplementedError

    @staticmethod
    def output_grads(module: nn.Module, grad_out: Tensor) -> Tensor:
        """The output gradients ``g`` (m, T, d_g) from the gradient of the module's output."""
        raise NotImplementedError

    @staticmethod
    def spatial_shape(module: nn.Module, grad_out: Tensor) -> tuple[int, int]:
        """The (height, width) grid of output locations; (1, 1) for non-convolutions."""
        return (1, 1)

    @staticmethod
    def params(module: nn.Module) -> list[Tensor]:
        """The weight and (if present) the bias, in gradient-matrix column order."""
        b = _bias(module)
        return [_weight(module)] + ([b] if b is not None else [])

    @staticmethod
    def grad_matrix(module: nn.Module) -> Tensor | None:
        """[∇W ∇b] as (d_g, d_a), or None if the layer has no gradient this step."""
        w, b = _weight(module), _bias(module)
        if w.grad is None:
            return None
        gw = w.grad.reshape(w.shape[0], -1)
        if b is None:
            return gw
        gb = b.grad
        if gb is None:
            gb = gw.new_zeros(w.shape[0])
        return _cat_bias(gw, gb)

    @staticmethod
    def split_matrix(module: nn.Module, M: Tensor) -> list[Tensor]:
        """A (d_g, d_a) matrix [W b] as tensors shaped like :meth:`params` (same order)."""
        w, b = _weight(module), _bias(module)
        n = w[0].numel()
        parts = [M[:, :n].reshape(w.shape)]
        if b is not None:
            parts.append(M[:, n])
        return parts

    @classmethod
    def set_grad_matrix(cls, module: nn.Module, M: Tensor) -> None:
        """Write the (d_g, d_a) matrix ``M`` back as the weight's and bias's ``.grad``."""
        for p, part in zip(cls.params(module), cls.split_matrix(module, M)):
            p.grad = _own(part.to(p.dtype).contiguous(), M)


def _own(t: Tensor, M: Tensor) -> Tensor:
    """``t``, or a copy of it if it is a view of ``M``'s memory.

    The weight's and the bias's ``.grad`` must not share memory: views share one version
    counter, and the preconditioner reads a ``.grad``'s version to tell a new backward's
    addition from other in-place changes.
    """
    if t.untyped_storage().data_ptr() == M.untyped_storage().data_ptr():
        return t.clone()
    return t


def _cat_bias(gw: Tensor, gb: Tensor) -> Tensor:
    return torch.cat([gw, gb[:, None]], 1)


def append_ones(x: Tensor) -> Tensor:
    """Append the bias coordinate 1 along the last dimension."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)
