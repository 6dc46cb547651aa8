"""Cheap checks the preconditioner runs on gradients, curvature and loaded state."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor

from ..linalg import KroneckerSum, all_finite

_LOW = (torch.float16, torch.bfloat16)

__all__ = ["nonfinite_names", "curvature_finite", "check_curvature_shape", "grad_matrix_shape",
           "typed_curvature"]

C = TypeVar("C")


def nonfinite_names(named: list[tuple[str, Tensor]]) -> list[str]:
    """Names of the tensors with a NaN or Inf entry, usually from one pass and one sync.

    A sum with a NaN or ±Inf term is never finite, so finite sums of all tensors prove
    every entry finite (float16/bfloat16 summed in float32). Only a tensor whose sum is
    not finite is then checked entrywise: its sum may just have overflowed. (On the CPU a
    sum is far cheaper than ``torch._foreach_norm(·, inf)``: 0.28 vs 20 ms on the MNIST
    auto-encoder, ``python benchmarks/check_cost.py --threads 1``, docs/reliability.md.)
    """
    if not named:
        return []
    sums = [t.sum(dtype=torch.float32) if t.dtype in _LOW else t.sum() for _, t in named]
    if len({s.device for s in sums}) == 1 and bool(torch.isfinite(torch.stack(sums)).all()):
        return []
    return [name for (name, t), s in zip(named, sums)
            if not bool(torch.isfinite(s)) and not bool(torch.isfinite(t).all())]


def curvature_finite(curvature) -> bool:
    """Whether a layer's curvature (a KroneckerSum or a dense tensor) is finite."""
    if isinstance(curvature, KroneckerSum):
        return all(all_finite(A) and all_finite(G) for A, G in curvature.terms)
    if isinstance(curvature, Tensor):
        return all_finite(curvature)
    return True


def check_curvature_shape(name: str, curvature, d_g: int, d_a: int) -> None:
    """Raise ValueError unless a loaded curvature fits a (d_g, d_a) gradient matrix."""
    if curvature is None:
        return
    if isinstance(curvature, KroneckerSum):
        got, want = tuple(curvature.shape), (d_g, d_a)
        what = "(d_g, d_a)"
    elif isinstance(curvature, Tensor):
        got, want = tuple(curvature.shape), (d_g * d_a, d_g * d_a)
        what = "dense block"
    else:
        return
    if got != want:
        raise ValueError(
            f"state_dict layer {name!r}: curvature {what} is {got}, this model's layer needs"
            f" {want} (same layer names but other widths?)"
        )


def grad_matrix_shape(s) -> tuple[int, int]:
    """(d_g, d_a) of a registered layer's gradient matrix [W b]."""
    w = s.module.weight
    bias = getattr(s.module, "bias", None)
    return w.shape[0], w[0].numel() + (1 if bias is not None else 0)


def typed_curvature(state, kind: type[C], owner: str, kind_name: str) -> C | None:
    """A layer's curvature (None before the first update), checked to be a ``kind``.

    Args:
        state: the layer's ``LayerState``.
        kind: the class this preconditioner keeps its curvature as.
        owner: who keeps the curvature, for the message, e.g. "ExactNG's".
        kind_name: the expected kind in words, for the message, e.g. "dense Tensor".

    Raises:
        TypeError: the state holds another kind of curvature (not one of ours).
    """
    c = state.curvature
    if c is not None and not isinstance(c, kind):
        raise TypeError(
            f"layer {state.name!r}: {owner} curvature must be a {kind_name}, got"
            f" {type(c).__name__}"
        )
    return c
