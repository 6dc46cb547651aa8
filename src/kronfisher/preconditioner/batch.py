"""The curvature batch: every layer's recorded (a, g) pairs, taken and checked as a whole."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layer_state import LayerState

__all__ = ["LayerBatch", "take_batch"]


@dataclass
class LayerBatch:
    """One layer's curvature batch: all its recorded pairs, concatenated.

    Attributes:
        a: (M, T, d_a) inputs, one row per (example, backward) pair.
        g: (M, T, d_g) output gradients, scaled per ``collect()``'s contract.
        spatial: the output grid (1, 1 for a linear layer).
    """

    a: Tensor
    g: Tensor
    spatial: tuple[int, int]


def take_batch(layers: list[LayerState]) -> dict[LayerState, LayerBatch]:
    """Remove every layer's complete captures and return them as one batch per layer.

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
    sizes = {s.name: sorted({c.spatial for c in caps}) for s, caps in taken.items()
             if len({c.spatial for c in caps}) > 1}
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
        out[s] = LayerBatch(torch.cat([c.a for c in caps]), torch.cat(gs), caps[0].spatial)
    return out
