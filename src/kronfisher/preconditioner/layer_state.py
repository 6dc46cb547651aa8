"""What the preconditioner keeps per registered layer: captures, curvature, factorisation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from ..curvature import CurvatureBlock
from ..layers import LayerAdapter, Pairing

__all__ = ["Capture", "Factorization", "LayerState"]


@dataclass
class Capture:
    """One (a, g) pair recorded inside ``collect()``: a forward's inputs, a backward's grads.

    A second backward through the same forward (``retain_graph=True``) adds another
    Capture sharing ``a``: each backward is one pass over that forward's examples.

    Attributes:
        a: the adapter's input matrix (m, T, d_a).
        pairing: how the output's positions pair (one position for a linear layer).
        g: the scaled output gradients, None until the backward reaches the layer.
        during_backward: the forward ran inside a backward (activation checkpointing
            recomputes it there; without reentrant checkpointing its output never gets a
            gradient, and such a capture is dropped without a warning).
        forward: which forward of the model (counted inside ``collect()``) made the call;
            None for a call outside the model's forward (a submodule called directly).
        call: the call's index among the module's calls in that forward (0, 1, …): calls
            of one forward are positions of the same examples (weight sharing).
        backward: the autograd backward pass that produced ``g`` (-1 before).
    """

    a: Tensor
    pairing: Pairing = field(default_factory=Pairing)
    g: Tensor | None = None
    during_backward: bool = False
    forward: int | None = None
    call: int = 0
    backward: int = -1


class Factorization(Protocol):
    """What a preconditioner keeps per layer to precondition with.

    For example a :class:`~kronfisher.linalg.KroneckerFactorization`: built once per
    refresh, used by every :meth:`Preconditioner.step` until the next one.
    """

    damping: float  # the damping it was actually built with


@dataclass(eq=False)  # identity semantics: states are dict keys
class LayerState:
    """Everything the preconditioner keeps for one registered layer.

    ``curvature`` and ``inverse_source`` hold what the layer's curvature block keeps
    (a KroneckerSum for the Kronecker blocks; a dense block for ExactNG, which has no
    per-layer block: ``block`` is None there).
    """

    name: str
    module: nn.Module
    adapter: LayerAdapter
    block: CurvatureBlock | None = None
    curvature: Any = None
    updates: int = 0  # number of curvature batches folded in
    # the curvature the current inverse was built from
    inverse_source: Any = None
    inverse: Factorization | None = None  # its factorisation, used by step()
    inverse_damping: float | None = None
    captures: list[Capture] = field(default_factory=list)
