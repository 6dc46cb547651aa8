"""The seam between estimating and averaging: what a preconditioner asks its sync object.

A preconditioner holds one sync object. :class:`LocalSync` (single process) answers every
question with the single-process behaviour; :class:`DataParallelSync` makes the answers
collective (module docstring of :mod:`kronfisher.distributed`). The preconditioner calls,
in one ``step()``:

1. ``step_guard(skip)`` around the whole step (a context manager);
2. ``reduce_batch(...)`` with this rank's curvature batch, layer → LayerStatistics (the
   step's agreement; the layers the predicate names are all-gathered);
3. ``estimate(...)`` / ``kfac_fallback(...)`` per layer, from a Kronecker block's
   estimate (:class:`~kronfisher.curvature.KroneckerBlock`, given the sync in its
   ``BlockOptions``);
4. ``agreed_reason(...)`` where it decides to skip on a non-finite gradient;
5. ``owns(...)`` / ``mark_remote(...)`` / ``share(...)`` around preconditioning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..layers import LayerStatistics
from ..linalg import KroneckerSum

__all__ = ["LocalSync", "RemoteFactorization", "StepGuard"]

Batch = dict[Any, LayerStatistics]  # LayerState → its statistics


@dataclass
class RemoteFactorization:
    """Stands for a layer's factorisation held by its owner rank (``step()`` receives Δ).

    Attributes:
        owner: the rank that factorises and preconditions the layer.
        damping: the damping it was built with there.
    """

    owner: int
    damping: float

    def solve(self, G: Tensor) -> Tensor:
        """Not available here: the owner computes the solve and broadcasts it."""
        raise RuntimeError(f"this layer is preconditioned by rank {self.owner}; with"
                           " DistributedConfig(assignment='replicated') every rank can solve")


class StepGuard:
    """Single-process step guard: lets everything through (``skipped`` stays False)."""

    skipped = False

    def __enter__(self) -> StepGuard:
        return self

    def __exit__(self, *exc) -> None:
        return None


class LocalSync:
    """Single process: nothing is communicated; every method is the identity."""

    active = False
    rank = 0
    world = 1

    def step_guard(self, skip: Callable[..., bool]) -> StepGuard:
        """A guard that changes nothing."""
        return StepGuard()

    def reduce_batch(self, batch: Batch, nonfinite: Callable[[], list[str]],
                     gather: Callable[[Any], bool]) -> Batch:
        """The batch as it is."""
        return batch

    def estimate(self, name: str, estimator, a: Tensor, g: Tensor, mask: Tensor | None,
                 previous: KroneckerSum | None) -> KroneckerSum:
        """The estimator's own estimate of this batch (``mask``: the position pairs kept)."""
        return estimator.estimate_masked(a, g, mask, previous)

    def kfac_fallback(self, name: str, estimator, a: Tensor, g: Tensor) -> KroneckerSum:
        """The estimator's own KFAC fallback."""
        return estimator.kfac_fallback(a, g)

    def adjust(self, name: str, hook: Callable[[KroneckerSum, Tensor], KroneckerSum],
               new: KroneckerSum, a: Tensor) -> KroneckerSum:
        """``hook(new, a)``: a subclass's adjustment of each new estimate, on this batch."""
        return hook(new, a)

    def agreed_reason(self, reason: str | None) -> str | None:
        """This process's reason to skip the step."""
        return reason

    def owns(self, name: str) -> bool:
        """Every layer is preconditioned here."""
        return True

    def mark_remote(self, state, damping: float) -> None:
        """Never called: this process owns every layer."""
        raise RuntimeError("a single-process preconditioner owns every layer")

    def share(self, out: dict, grads: dict[str, Tensor], layers: dict) -> dict:
        """The preconditioned gradients as they are."""
        return out

    def mean_over_ranks(self, values: Tensor, purpose: str) -> Tensor:
        """``values`` as they are (one process: its batch is the whole batch)."""
        return values


def warn_dropped(dropped: dict[str, str]) -> None:
    """One warning per layer left out of this step's curvature on every rank."""
    for name, why in dropped.items():
        warnings.warn(f"layer {name!r}: {why}: curvature update skipped for this layer on"
                      " every rank (the running average keeps its previous value)",
                      RuntimeWarning, stacklevel=6)
