"""The adapter contract: how one registered module yields statistics and exposes Θ = [W b]."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from .param_layout import ParamLayout
from .statistics import LayerStatistics, Pairing


class UnsupportedLayerError(ValueError):
    """A module (or a module configuration) no adapter can handle correctly."""


def _weight(module: nn.Module) -> Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        raise UnsupportedLayerError(f"{type(module).__name__} has no weight tensor")
    return w


def _bias(module: nn.Module) -> Tensor | None:
    b = getattr(module, "bias", None)
    return b if isinstance(b, Tensor) else None


class LayerAdapter:
    """Glue between one registered module, its hooks and its curvature block (DESIGN.md §6).

    One instance per registered module. It declares the layer's :attr:`kind` (the curvature
    side picks the block by kind and method, see :mod:`kronfisher.curvature.registry`),
    turns hook data into statistics ``a`` (m, T, d_a), ``g`` (m, T, d_g) and a
    :class:`~kronfisher.layers.statistics.Pairing`, and reads and writes the gradient
    matrix Θ through the layer's :class:`~kronfisher.layers.param_layout.ParamLayout`.

    Args:
        module: the module.

    Raises:
        UnsupportedLayerError: the module's configuration is not supported (:meth:`check`).
    """

    kind: ClassVar[str] = ""
    inputs_rescalable: ClassVar[bool] = True
    """:meth:`per_example_gradients` is linear in ``a`` (ExactNG may divide ``a`` by a power
    of two before it, exactly); False when it is not (then only ``g`` is rescaled)."""
    shares_calls: ClassVar[bool] = False
    """Whether several calls in one forward are positions of the same examples
    (:meth:`combine_calls`); if not, such a module is refused inside ``collect()``."""
    weight_only_block: ClassVar[bool] = False
    """Whether :meth:`without_bias` is supported: the statistics and Θ without the bias
    (the weight-only block of a layer whose bias is frozen)."""

    def __init__(self, module: nn.Module) -> None:
        self.check(module)
        _weight(module)
        self.module = module
        self.uses_bias = True

    def without_bias(self) -> LayerAdapter:
        """This adapter, switched to the weight-only block (the module's bias is frozen).

        The statistics are taken without the bias coordinate 1, Θ is the weight's
        (d_g, d_a − 1) and no ``.grad`` is written to the bias.

        Raises:
            UnsupportedLayerError: the adapter has no weight-only block.
        """
        if not self.weight_only_block:
            raise UnsupportedLayerError(
                f"{type(self).__name__} has no weight-only block (its module's bias is frozen,"
                " its weight trainable)")
        self.uses_bias = False
        return self

    @property
    def bias(self) -> Tensor | None:
        """The bias that is part of Θ: the module's, or None (none, or :meth:`without_bias`)."""
        return _bias(self.module) if self.uses_bias else None

    @classmethod
    def check(cls, module: nn.Module) -> None:
        """Raise :class:`UnsupportedLayerError` if the configuration is not supported."""

    @property
    def layout(self) -> ParamLayout:
        """The layer's [W b] layout (read from the module's current weight and bias)."""
        return ParamLayout.of(_weight(self.module), self.bias)

    def inputs(self, x: Tensor) -> Tensor:
        """The layer inputs ``a`` (m, T, d_a) from the module's input ``x``."""
        raise NotImplementedError

    def output_grads(self, grad_out: Tensor) -> Tensor:
        """The output gradients ``g`` (m, T, d_g) from the gradient of the module's output."""
        raise NotImplementedError

    def pairing(self, grad_out: Tensor) -> Pairing:
        """How the T positions of one example pair (one position by default)."""
        return Pairing()

    def per_example_gradients(self, a: Tensor, g: Tensor) -> Tensor:
        """vec(Θ's gradient) of each example, (m, d_g·d_a), column stacking (ExactNG).

        Default: vec(Σ_t g_t a_tᵀ) (:func:`per_example_gradients`).

        Args:
            a: the statistics' inputs as :meth:`inputs` returns them (possibly rescaled,
                see :attr:`inputs_rescalable`).
            g: (m, T, d_g) output gradients.
        """
        return per_example_gradients(a, g)

    def combine_calls(self, calls: list[LayerStatistics]) -> LayerStatistics:
        """The statistics of several calls in one forward, as positions of each example.

        Raises:
            ValueError: this kind of layer does not share its weight across calls.
        """
        raise ValueError(f"{type(self.module).__name__} was called {len(calls)} times in one"
                         " forward: weight sharing across calls is handled for nn.Linear only")

    def params(self) -> list[Tensor]:
        """The weight and (if present) the bias, in gradient-matrix column order."""
        b = self.bias
        return [_weight(self.module)] + ([b] if b is not None else [])

    def grad_matrix(self) -> Tensor | None:
        """Θ's gradient as (d_g, d_a), or None if the weight has no gradient this step.

        A bias without a gradient counts as zeros.
        """
        ps = self.params()
        if ps[0].grad is None:
            return None
        return self.to_matrix([p.grad for p in ps])

    def to_matrix(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """Θ (d_g, d_a) from tensors shaped like :meth:`params` (a None bias: zeros).

        The inverse of :meth:`split_matrix`; by default the layout's ``to_matrix``.
        """
        return self.layout.to_matrix(tensors)

    def split_matrix(self, M: Tensor) -> list[Tensor]:
        """A (d_g, d_a) matrix Θ as tensors shaped like :meth:`params` (same order)."""
        return self.layout.from_matrix(M)

    def set_grad_matrix(self, M: Tensor) -> None:
        """Write the (d_g, d_a) matrix ``M`` back as the weight's and bias's ``.grad``."""
        for p, part in zip(self.params(), self.split_matrix(M)):
            p.grad = _own(part.to(p.dtype).contiguous(), M)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.module).__name__}, kind={self.kind!r})"


def _own(t: Tensor, M: Tensor) -> Tensor:
    """``t``, or a copy of it if it is a view of ``M``'s memory.

    The weight's and the bias's ``.grad`` must not share memory: views share one version
    counter, and the preconditioner reads a ``.grad``'s version to tell a new backward's
    addition from other in-place changes.
    """
    if t.untyped_storage().data_ptr() == M.untyped_storage().data_ptr():
        return t.clone()
    return t


def per_example_gradients(a: Tensor, g: Tensor) -> Tensor:
    """vec(Σ_t g_{it} a_{it}ᵀ) for each example: (m, d_a·d_g), column-stacking vec."""
    return torch.einsum("ita,itg->iag", a, g).reshape(a.shape[0], -1)


def append_ones(x: Tensor) -> Tensor:
    """Append the bias coordinate 1 along the last dimension."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


def concat_calls(calls: list[LayerStatistics], what: str) -> LayerStatistics:
    """Several calls of one weight-sharing layer in one forward as positions of each example.

    The calls' positions are concatenated (pairing "shared", (1, T_total)).

    Args:
        calls: each call's statistics, a and g of shape (m, T_call, ·).
        what: the layer type, for the error ("nn.Linear").

    Raises:
        ValueError: the calls saw different numbers of examples.
    """
    sizes = sorted({c.m for c in calls})
    if len(sizes) > 1:
        raise ValueError(
            f"{what} called {len(calls)} times in one forward with batches of {sizes}"
            " examples: its calls are positions of the same examples, so they must see the"
            " same batch")
    a = torch.cat([c.a for c in calls], 1)
    g = torch.cat([c.g for c in calls], 1)
    return LayerStatistics(a, g, Pairing("shared", (1, int(a.shape[1]))))
