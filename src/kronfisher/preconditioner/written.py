"""The ``.grad`` tensors the last ``step()`` wrote, to refuse preconditioning them twice."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import Tensor

__all__ = ["WrittenGrads"]


@dataclass(frozen=True)
class WrittenGrad:
    """One written ``.grad``: a weak reference to the tensor and its ``_version`` then."""

    ref: weakref.ref
    version: int


class WrittenGrads:
    """The gradients one ``step()`` wrote, by parameter identity (no strong references)."""

    def __init__(self) -> None:
        self._by_param: dict[int, WrittenGrad] = {}

    def __bool__(self) -> bool:
        return bool(self._by_param)

    def clear(self) -> None:
        """Forget every recorded gradient (a new step, a skipped step or a load)."""
        self._by_param = {}

    def record(self, p: Tensor) -> None:
        """Remember ``p.grad`` as written now (nothing if it is None)."""
        g: Tensor | None = p.grad
        if g is not None:
            self._by_param[id(p)] = WrittenGrad(weakref.ref(g), g._version)

    def unchanged(self, p: Tensor) -> bool:
        """Whether ``p.grad`` is still the very tensor recorded, not modified in place since."""
        rec = self._by_param.get(id(p))
        g = p.grad
        return rec is not None and g is not None and g._version == rec.version and (
            g is rec.ref())
