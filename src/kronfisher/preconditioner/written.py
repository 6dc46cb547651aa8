"""Which ``.grad`` tensors a new backward produced since the last ``step()``.

``step()`` records every registered parameter's ``.grad`` when it finishes (the gradients it
wrote, and those it left alone); a post-accumulate-grad hook on each parameter reports every
backward that adds into a ``.grad``. At the next ``step()`` each parameter's gradient is then

- NONE: no ``.grad``;
- STALE: still the tensor recorded at the last step and no backward since (preconditioning
  it again would apply the curvature twice);
- MIXED: the first backward since the last step added onto that recorded tensor unmodified
  (no ``zero_grad`` in between, e.g. a parameter left out of the optimizer): it holds an
  already-preconditioned gradient plus a raw one. Further backwards keep it MIXED; setting
  it to None or zeroing it in place ends that;
- FRESH: anything else — set to None or zeroed (in place) and then accumulated, or assigned.

Known limit: a recorded gradient modified in place (``clip_grad_norm_``) and then
accumulated into without ``zero_grad`` is taken as FRESH: an in-place change is
indistinguishable from ``zero_grad(set_to_none=False)`` without reading the values.
"""

from __future__ import annotations

import enum
import weakref
from dataclasses import dataclass

from torch import Tensor

__all__ = ["WrittenGrads", "GradState"]


class GradState(enum.Enum):
    """Where a parameter's ``.grad`` came from (see the module docstring)."""

    NONE = "none"
    FRESH = "fresh"
    STALE = "stale"
    MIXED = "mixed"


@dataclass(frozen=True)
class WrittenGrad:
    """One recorded ``.grad``: a weak reference to the tensor and its ``_version`` then."""

    ref: weakref.ref
    version: int


class WrittenGrads:
    """The gradients recorded at the last ``step()``, by parameter identity (weakly)."""

    def __init__(self) -> None:
        self._by_param: dict[int, WrittenGrad] = {}
        self._last: dict[int, WrittenGrad] = {}  # each .grad right after its last backward
        self._mixed: set[int] = set()  # holds a recorded gradient plus backwards since

    def __bool__(self) -> bool:
        return bool(self._by_param)

    def clear(self) -> None:
        """Forget every recorded gradient (a skipped step or a load)."""
        self._by_param, self._last, self._mixed = {}, {}, set()

    def record(self, p: Tensor) -> None:
        """Remember ``p.grad`` as it is now (nothing if it is None)."""
        g: Tensor | None = p.grad
        if g is not None:
            self._by_param[id(p)] = WrittenGrad(weakref.ref(g), g._version)

    def new_interval(self, params: list[Tensor]) -> None:
        """End of a step: forget what backwards did and record ``params``' gradients now."""
        self.clear()
        for p in params:
            self.record(p)

    def unchanged(self, p: Tensor) -> bool:
        """Whether ``p.grad`` is still the very tensor recorded, not modified in place since."""
        return _same(p.grad, self._by_param.get(id(p)), 0)

    def accumulated(self, p: Tensor) -> None:
        """A backward has just added into ``p.grad`` (the post-accumulate-grad hook).

        It is MIXED if this addition went onto the recorded tensor left unmodified, or onto
        a MIXED gradient left unmodified since its last backward (one in-place addition
        bumps a tensor's version by exactly 1).
        """
        key = id(p)
        g: Tensor | None = p.grad
        if g is None:
            return
        before = self._last.get(key)
        if before is None:  # the first backward since the last step
            mixed = _same(g, self._by_param.get(key), 1)
        else:
            mixed = key in self._mixed and _same(g, before, 1)
        if mixed:
            self._mixed.add(key)
        else:
            self._mixed.discard(key)
        self._last[key] = WrittenGrad(weakref.ref(g), g._version)

    def state(self, p: Tensor) -> GradState:
        """Where ``p.grad`` came from (see the module docstring)."""
        g: Tensor | None = p.grad
        key = id(p)
        if g is None:
            return GradState.NONE
        last = self._last.get(key)
        if last is None:  # no backward since the last step
            rec = self._by_param.get(key)
            return GradState.STALE if rec is not None and g is rec.ref() else GradState.FRESH
        return GradState.MIXED if key in self._mixed and _same(g, last, 0) else GradState.FRESH


def _same(g: Tensor | None, rec: WrittenGrad | None, additions: int) -> bool:
    """Whether ``g`` is ``rec``'s tensor with exactly ``additions`` in-place changes since."""
    return (rec is not None and g is not None and g._version == rec.version + additions
            and g is rec.ref())
