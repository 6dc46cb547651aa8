"""The curvature batch: every layer's recorded (a, g) pairs, taken and checked as a whole."""

from __future__ import annotations

import torch

from ..layers import LayerStatistics
from .layer_state import Capture, LayerState

__all__ = ["take_batch"]


def _units(s: LayerState, caps: list[Capture]) -> list[LayerStatistics]:
    """The layer's captures as blocks of examples, in recording order.

    Captures of one forward of the model and one backward are the calls of the module in
    that forward: the adapter combines them into positions of the same examples (a single
    call is taken as it is). Calls outside the model's forward are their own examples.

    Raises:
        ValueError: naming the layer, if one backward reached only some of the calls of
            a forward, or the adapter cannot combine the calls.
    """
    groups: dict[object, list[Capture]] = {}
    calls: dict[int, set[int]] = {}
    for c in caps:
        key: object = ("call", id(c)) if c.forward is None else (c.forward, c.backward)
        groups.setdefault(key, []).append(c)
        if c.forward is not None:
            calls.setdefault(c.forward, set()).add(c.call)
    out = []
    for group in groups.values():
        if len(group) == 1 and (group[0].forward is None or len(calls[group[0].forward]) == 1):
            c = group[0]
            if c.g is not None:  # always: caps is filtered
                out.append(LayerStatistics(c.a, c.g, c.pairing))
            continue
        forward = group[0].forward
        if forward is None:  # a group of several captures always has a forward
            raise RuntimeError("captures outside a forward are never grouped")
        group.sort(key=lambda c: c.call)
        seen = [c.call for c in group]
        want = sorted(calls[forward])
        if seen != want:
            raise ValueError(
                f"layer {s.name!r} was called {len(want)} times in one forward inside"
                f" collect(), but one backward reached only its call(s) {seen}: each backward"
                " must go through every call (they are positions of the same examples)."
                " This curvature batch is dropped for every layer (the curvature is unchanged)")
        try:
            out.append(s.adapter.combine_calls(
                [LayerStatistics(c.a, c.g, c.pairing) for c in group if c.g is not None]))
        except ValueError as e:
            raise ValueError(f"layer {s.name!r}: {e}. This curvature batch is dropped for every"
                             " layer (the curvature is unchanged)") from e
    return out


def take_batch(layers: list[LayerState]) -> dict[LayerState, LayerStatistics]:
    """Remove every layer's complete captures and return them as one batch per layer.

    Each layer's batch is its blocks of examples (see :func:`_units`) concatenated along
    the examples: ``a`` (M, T, d_a), ``g`` (M, T, d_g), one row per (example, backward)
    pair.

    The captures of *all* layers are taken before anything is checked, so that a refused
    batch leaves nothing pending for the next step.

    Raises:
        ValueError: a layer recorded outputs of different spatial sizes or numbers of
            positions (e.g. two image sizes in one ``collect()``), its batch has no
            examples, or a module called several times in one forward cannot be combined;
            nothing is returned for any layer then (the whole curvature batch is dropped).
    """
    taken = {}
    for s in layers:
        caps, s.captures = [c for c in s.captures if c.g is not None], []
        if caps:
            taken[s] = caps
    units = {s: _units(s, caps) for s, caps in taken.items()}
    sizes = {s.name: sorted({u.pairing.grid for u in us}) for s, us in units.items()
             if len({u.pairing for u in us}) > 1}
    if sizes:
        raise ValueError(
            f"collect() recorded outputs of different spatial sizes in layer(s) {sizes}"
            " (e.g. two image sizes, or sequences of different lengths): one curvature batch"
            " needs one output size per layer; record each size in its own collect() and"
            " step(). This curvature batch is dropped for every layer (the curvature is"
            " unchanged)"
        )
    empty = [s.name for s, us in units.items() if sum(u.m for u in us) == 0]
    if empty:
        raise ValueError(
            f"the curvature batch recorded inside collect() has no examples for layer(s)"
            f" {empty} (a forward of an empty batch): cannot estimate a Fisher from 0"
            " examples. This curvature batch is dropped for every layer (the curvature is"
            " unchanged)"
        )
    # always concatenated (a copy): the captured inputs may be views of the user's tensors
    return {s: LayerStatistics(torch.cat([u.a for u in us]), torch.cat([u.g for u in us]),
                               us[0].pairing) for s, us in units.items()}
