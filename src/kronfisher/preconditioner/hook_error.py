"""An adapter error inside a hook, kept until ``collect()``'s block ends (then raised)."""

from __future__ import annotations

from ..layers import UnsupportedLayerError

__all__ = ["HookError"]


class HookError:
    """The first adapter error inside one ``collect()`` block, raised when the block ends.

    Attributes:
        layer: the registered layer's name.
        where: "forward" (its inputs) or "backward" (its output gradients).
        error: the adapter's exception.
    """

    def __init__(self, layer: str, where: str, error: Exception) -> None:
        self.layer, self.where, self.error = layer, where, error

    def raise_it(self) -> None:
        """Raise it naming the layer: UnsupportedLayerError stays one, others a RuntimeError."""
        msg = (f"layer {self.layer!r}: cannot record its {self.where} pass inside collect():"
               f" {self.error}; nothing this collect() recorded is kept, for any layer (the"
               " curvature is unchanged)")
        if isinstance(self.error, UnsupportedLayerError):
            raise UnsupportedLayerError(msg) from self.error
        raise RuntimeError(msg) from self.error
