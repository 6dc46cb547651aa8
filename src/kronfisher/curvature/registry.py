"""Which curvature block a layer gets: (layer kind, method) → block class.

After kfac-jax's ``block_diagonal.py``: a default map, overridable per preconditioner
without touching the global one. :func:`block_class` tries, in order, an override for the
layer's name, an override for its kind, the default map, and otherwise raises a clear
``ValueError``. A new layer kind registers its block in :data:`DEFAULT_BLOCKS` with
:func:`register_block` (next to its adapter in ``kronfisher.layers``).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..layers import SCALE_SHIFT_KIND
from .block import CurvatureBlock
from .dense_block import DenseKroneckerBlock
from .embedding_block import EmbeddingBlock
from .kronecker_block import KroneckerBlock
from .methods import METHODS
from .scale_shift_block import ScaleShiftBlock

__all__ = ["DEFAULT_BLOCKS", "register_block", "block_class", "check_overrides"]

DEFAULT_BLOCKS: dict[tuple[str, str], type[CurvatureBlock]] = {
    **{("dense", method): DenseKroneckerBlock for method in METHODS},
    **{("conv2d", method): KroneckerBlock for method in METHODS},
    **{("embedding", method): EmbeddingBlock for method in METHODS},
    **{(SCALE_SHIFT_KIND, method): ScaleShiftBlock for method in METHODS},
}
"""(layer kind, method) → block class. Scale-and-shift layers get the same exact
per-feature block under every method (:class:`ScaleShiftBlock`)."""


def register_block(kind: str, block: type[CurvatureBlock],
                   methods: tuple[str, ...] = METHODS) -> None:
    """Make ``block`` the default block of layer ``kind`` for ``methods``.

    Raises:
        TypeError: ``block`` is not a :class:`CurvatureBlock` subclass.
        ValueError: an unknown method.
    """
    if not (isinstance(block, type) and issubclass(block, CurvatureBlock)):
        raise TypeError(f"block must be a CurvatureBlock subclass, got {block!r}")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        DEFAULT_BLOCKS[(kind, method)] = block


def check_overrides(overrides: Mapping[str, type[CurvatureBlock]] | None
                    ) -> dict[str, type[CurvatureBlock]]:
    """A preconditioner's ``blocks=`` argument checked: layer name or kind → block class.

    Raises:
        TypeError: not a mapping of strings to :class:`CurvatureBlock` subclasses.
    """
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"blocks must be a mapping (layer name or kind → block class), got"
                        f" {type(overrides).__name__}")
    for key, block in overrides.items():
        if not isinstance(key, str) or not (isinstance(block, type)
                                            and issubclass(block, CurvatureBlock)):
            raise TypeError(f"blocks[{key!r}] must map a layer name or kind to a"
                            f" CurvatureBlock subclass, got {block!r}")
    return dict(overrides)


def block_class(name: str, kind: str, method: str,
                overrides: Mapping[str, type[CurvatureBlock]] | None = None
                ) -> type[CurvatureBlock]:
    """The block class of layer ``name`` of ``kind`` under ``method``.

    Raises:
        ValueError: no override and no default block for (kind, method).
    """
    overrides = overrides or {}
    if name in overrides:
        return overrides[name]
    if kind in overrides:
        return overrides[kind]
    block = DEFAULT_BLOCKS.get((kind, method))
    if block is None:
        known = sorted({k for k, _ in DEFAULT_BLOCKS})
        raise ValueError(f"layer {name!r}: no curvature block for layer kind {kind!r} with"
                         f" method {method!r} (kinds with blocks: {known}); register one with"
                         " kronfisher.curvature.register_block or pass blocks={...}")
    return block
