"""What the preconditioner keeps per registered layer: captures, curvature, factorisation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor, nn

from ..layers import LayerAdapter
from ..linalg import KroneckerSum

__all__ = ["Capture", "Factorization", "LayerState"]


@dataclass
class Capture:
    """One (a, g) pair recorded inside ``collect()``: a forward's inputs, a backward's grads.

    A second backward through the same forward (``retain_graph=True``) adds another
    Capture sharing ``a``: each backward is one pass over that forward's examples.

    Attributes:
        a: the adapter's input matrix, rows are examples (or positions).
        spatial: the output's spatial size (1, 1 for a linear layer).
        g: the scaled output gradients, None until the backward reaches the layer.
        during_backward: the forward ran inside a backward (activation checkpointing
            recomputes it there; without reentrant checkpointing its output never gets a
            gradient, and such a capture is dropped without a warning).
    """

    a: Tensor
    spatial: tuple[int, int] = (1, 1)
    g: Tensor | None = None
    during_backward: bool = False


class Factorization(Protocol):
    """What a preconditioner keeps per layer to precondition with.

    For example a :class:`~kronfisher.linalg.KroneckerFactorization`: built once per
    refresh, used by every :meth:`Preconditioner.step` until the next one.
    """

    damping: float  # the damping it was actually built with


@dataclass(eq=False)  # identity semantics: states are dict keys
class LayerState:
    """Everything the preconditioner keeps for one registered layer."""

    name: str
    module: nn.Module
    adapter: type[LayerAdapter]
    curvature: KroneckerSum | Tensor | None = None  # a dense block for ExactNG
    updates: int = 0  # number of curvature batches folded in
    # the curvature the current inverse was built from
    inverse_source: KroneckerSum | Tensor | None = None
    inverse: Factorization | None = None  # its factorisation, used by step()
    inverse_damping: float | None = None
    captures: list[Capture] = field(default_factory=list)
