"""Which registered layers have a gradient from a new backward, and what to say about the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

from .layer_state import LayerState
from .written import GradState, WrittenGrads

__all__ = ["GradFreshness", "classify_grads"]


@dataclass
class GradFreshness:
    """The registered layers sorted by where their ``.grad`` came from (see :mod:`.written`).

    Attributes:
        fresh: the layers to precondition.
        stale: names of the layers whose ``.grad`` is still the one the last step left.
        mixed: names of the layers that got a backward added onto it (no ``zero_grad``).
        none: names of the layers without a gradient.
    """

    fresh: list[LayerState] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    mixed: list[str] = field(default_factory=list)
    none: list[str] = field(default_factory=list)

    def why_left(self) -> str:
        """The stale and mixed layers and why, for a message (starts with a space)."""
        parts = []
        if self.stale:
            parts.append(f" {self.stale} still hold the .grad the previous step() wrote (no"
                         " backward since)")
        if self.mixed:
            parts.append(f" {self.mixed} got a backward added onto the .grad the previous"
                         " step() wrote (no zero_grad of their parameters in between: are"
                         " they outside the optimizer?)")
        return ";".join(parts)

    def nothing_fresh(self) -> str:
        """The warning of a step skipped because no layer has a new gradient."""
        msg = "no registered layer has a gradient from a new backward"
        if self.mixed:
            msg += f"; layer(s){self.why_left()}"
        if self.none:
            msg += (f"; layer(s) {self.none} have no .grad (is the model you ran the one this"
                    " preconditioner was built on? A copy, e.g. copy.deepcopy(model), is not"
                    " registered: build a preconditioner on it)")
        return msg


def classify_grads(layers: list[LayerState], written: WrittenGrads) -> GradFreshness:
    """Sort ``layers`` by their gradients' :class:`GradState` (a layer is as its worst param).

    A layer without a weight gradient counts as having none (it has no gradient matrix).
    """
    out = GradFreshness()
    for s in layers:
        if s.module.weight.grad is None:
            out.none.append(s.name)
            continue
        states = {written.state(p) for p in s.adapter.params()}
        if GradState.MIXED in states:
            out.mixed.append(s.name)
        elif GradState.STALE in states:
            out.stale.append(s.name)
        else:
            out.fresh.append(s)
    return out
