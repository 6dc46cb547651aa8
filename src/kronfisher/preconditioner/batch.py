"""The curvature batch: every layer's recorded (a, g) pairs, taken and checked as a whole."""

from __future__ import annotations

import torch

from ..layers import LayerStatistics
from .layer_state import LayerState

__all__ = ["take_batch"]


def take_batch(layers: list[LayerState]) -> dict[LayerState, LayerStatistics]:
    """Remove every layer's complete captures and return them as one batch per layer.

    Each layer's batch is its captures concatenated along the examples: ``a`` (M, T, d_a),
    ``g`` (M, T, d_g), one row per (example, backward) pair.

    The captures of *all* layers are taken before anything is checked, so that a refused
    batch leaves nothing pending for the next step.

    Raises:
        ValueError: a layer recorded outputs of different spatial sizes (e.g. two image
            sizes in one ``collect()``), or its batch has no examples; nothing is returned
            for any layer then (the whole curvature batch is dropped).
    """
    taken = {}
    for s in layers:
        caps, s.captures = [c for c in s.captures if c.g is not None], []
        if caps:
            taken[s] = caps
    sizes = {s.name: sorted({c.pairing.grid for c in caps}) for s, caps in taken.items()
             if len({c.pairing for c in caps}) > 1}
    if sizes:
        raise ValueError(
            f"collect() recorded outputs of different spatial sizes in layer(s) {sizes}"
            " (e.g. two image sizes): one curvature batch needs one output size per layer;"
            " record each size in its own collect() and step(). This curvature batch is"
            " dropped for every layer (the curvature is unchanged)"
        )
    empty = [s.name for s, caps in taken.items() if sum(c.a.shape[0] for c in caps) == 0]
    if empty:
        raise ValueError(
            f"the curvature batch recorded inside collect() has no examples for layer(s)"
            f" {empty} (a forward of an empty batch): cannot estimate a Fisher from 0"
            " examples. This curvature batch is dropped for every layer (the curvature is"
            " unchanged)"
        )
    out = {}
    for s, caps in taken.items():
        gs = [c.g for c in caps if c.g is not None]  # all: caps is filtered
        out[s] = LayerStatistics(torch.cat([c.a for c in caps]), torch.cat(gs), caps[0].pairing)
    return out
