"""The curvature-block contract: what the preconditioner asks of each layer's curvature.

After kfac-jax's ``CurvatureBlock``: a block is built once per registered layer from its
adapter (kind, [W b] layout) and the preconditioner's method options; it keeps no running
state of its own (the layer's ``LayerState`` holds the curvature and the factorisation),
so every method takes the value it works on. A block, not the preconditioner, knows its
curvature's type: finiteness, shape and kind checks, casting and packing for the
state_dict are the block's methods, so no curvature kind passes a check unchecked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from ..layers import LayerAdapter, LayerStatistics
from .estimator import KroneckerEstimator

__all__ = ["CurvatureBlock", "BlockOptions", "BlockCost", "Reporter", "StatisticsSync",
           "WEIGHT_SHARING"]

WEIGHT_SHARING = ("expand", "reduce", "exact")
"""How a layer's positions that share the weight enter its Fisher block (see
:class:`~kronfisher.curvature.dense_block.DenseKroneckerBlock`)."""


class Reporter(Protocol):
    """Where a block reports repeated conditions (a preconditioner's ``WarningLog``)."""

    def report(self, layer: str, kind: str, message: str, stacklevel: int = 2) -> None:
        """Count one occurrence of ``kind`` for ``layer``; warn the first time."""


class StatisticsSync(Protocol):
    """Where a Kronecker block's numerics run: data parallel, over every rank's batch.

    ``kronfisher.distributed``'s sync objects implement it; without one (None) the block
    calls its estimator directly.
    """

    def estimate(self, name: str, estimator: KroneckerEstimator, a: Tensor, g: Tensor,
                 mask: Tensor | None, previous: Any) -> Any:
        """The estimator's ``estimate_masked`` of the batch (over every rank's examples)."""

    def kfac_fallback(self, name: str, estimator: KroneckerEstimator, a: Tensor, g: Tensor
                      ) -> Any:
        """The estimator's ``kfac_fallback`` of the batch (over every rank's examples)."""


@dataclass(frozen=True)
class BlockOptions:
    """What every block of one preconditioner shares.

    Attributes:
        estimator: the method and its options (validated at construction), with the
            pair-mask cache; see :class:`~kronfisher.curvature.KroneckerEstimator`.
        log: where repeated conditions are reported.
        weight_sharing: one of :data:`WEIGHT_SHARING`.
        scale_shift: "full" (the 2×2 block per feature) or "diagonal" (its diagonal), for
            scale-and-shift layers (:class:`~kronfisher.curvature.ScaleShiftBlock`).
        sync: data parallel, where the Kronecker blocks' estimates run (a preconditioner's
            ``sync``); None: the estimator, on this process's batch.

    Raises:
        ValueError: an unknown ``weight_sharing``.
    """

    estimator: KroneckerEstimator
    log: Reporter
    weight_sharing: str = "expand"
    scale_shift: str = "full"
    sync: StatisticsSync | None = None

    def __post_init__(self) -> None:
        if self.weight_sharing not in WEIGHT_SHARING:
            raise ValueError(f"weight_sharing must be one of {WEIGHT_SHARING}, got"
                             f" {self.weight_sharing!r}")

    @property
    def method(self) -> str:
        """The preconditioner's method."""
        return self.estimator.method


@dataclass(frozen=True)
class BlockCost:
    """Rough operation and memory counts of one block (floating-point numbers, not bytes).

    Attributes:
        update: multiply-adds to fold in a batch of ``n_tokens`` positions.
        factorize: multiply-adds of one factorisation.
        precondition: multiply-adds of one preconditioned gradient.
        memory: numbers the curvature holds.
    """

    update: int
    factorize: int
    precondition: int
    memory: int


class CurvatureBlock(ABC):
    """One layer's curvature: update, finite check, factorise, precondition, pack, cost.

    Subclasses set :attr:`curvature_type` (what the layer's ``LayerState.curvature``
    holds) and implement the abstract methods. Methods that take a curvature check its
    type first (:meth:`typed`): a curvature of another kind raises ``TypeError``.

    Args:
        name: the layer's name (for messages).
        adapter: the layer's adapter (its kind and [W b] layout).
        options: the preconditioner's shared options.
    """

    curvature_type: ClassVar[type] = object
    kind_name: ClassVar[str] = "curvature"

    def __init__(self, name: str, adapter: LayerAdapter, options: BlockOptions) -> None:
        self.name, self.adapter, self.options = name, adapter, options

    # ---------------------------------------------------------------- types
    def typed(self, curvature: Any) -> Any:
        """``curvature`` if it is this block's type (or None).

        Raises:
            TypeError: another kind of curvature.
        """
        if curvature is not None and not isinstance(curvature, self.curvature_type):
            raise TypeError(
                f"layer {self.name!r}: {type(self).__name__}'s curvature must be a"
                f" {self.kind_name}, got {type(curvature).__name__}")
        return curvature

    @property
    def shape(self) -> tuple[int, int]:
        """(d_g, d_a): the layer's gradient matrix."""
        return self.adapter.layout.shape

    # --------------------------------------------------------------- update
    @abstractmethod
    def estimate(self, stats: LayerStatistics, previous: Any) -> Any:
        """This batch's curvature (warm-started from ``previous``), or None to keep it."""

    @abstractmethod
    def average(self, old: Any, new: Any, decay: float) -> Any:
        """The running average: decay·old + (1 − decay)·new in the block's own sense."""

    def update(self, old: Any, stats: LayerStatistics, decay: float) -> Any:
        """:meth:`average` of ``old`` and this batch's :meth:`estimate` (None: keep old)."""
        new = self.estimate(stats, old)
        return None if new is None else self.average(old, new, decay)

    @abstractmethod
    def finite(self, curvature: Any) -> bool:
        """Whether every number of ``curvature`` is finite (TypeError for another type)."""

    # ---------------------------------------------------------- factorise
    @abstractmethod
    def factorize(self, curvature: Any, damping: float, scheme: str) -> Any:
        """The damped curvature, factorised; it records the damping actually used."""

    @abstractmethod
    def precondition(self, inverse: Any, G: Tensor) -> Tensor:
        """M⁻¹ vec(G) as a (d_g, d_a) matrix in G's dtype (M: what ``inverse`` inverts)."""

    @abstractmethod
    def curvature_product(self, inverse: Any, V: Tensor) -> Tensor:
        """M vec(V) as a (d_g, d_a) matrix in V's dtype (the inverse of :meth:`precondition`)."""

    # -------------------------------------------------------------- state
    @abstractmethod
    def pack(self, curvature: Any) -> Any:
        """Plain values and tensors for a state_dict (None stays None); copies, not views."""

    @abstractmethod
    def unpack(self, packed: Any, where: str, dtype: torch.dtype, device: torch.device) -> Any:
        """A saved :meth:`pack` output, checked to fit this layer and cast.

        Raises:
            ValueError: starting with ``where``: not this block's packing, a shape that does
                not fit the layer, or NaN/Inf entries.
        """

    @abstractmethod
    def placement(self, curvature: Any) -> tuple[torch.dtype, torch.device]:
        """(dtype, device) of a curvature."""

    @abstractmethod
    def cast(self, curvature: Any, dtype: torch.dtype, device: torch.device) -> Any:
        """The curvature in ``dtype`` on ``device`` (itself if it is already)."""

    @abstractmethod
    def cost(self, n_tokens: int) -> BlockCost:
        """Rough counts for a batch of ``n_tokens`` positions (see :class:`BlockCost`)."""
