"""Cheap checks the preconditioner runs on gradients, curvature and loaded state."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..linalg import KroneckerSum
from ..linalg.kronecker import all_finite

__all__ = ["nonfinite_names", "curvature_finite", "check_curvature_shape", "grad_matrix_shape"]


def nonfinite_names(named: list[tuple[str, Tensor]]) -> list[str]:
    """Names of the tensors with a NaN or Inf entry, from one fused max-abs pass over all.

    ``torch._foreach_norm(·, inf)`` is finite exactly when every entry is (NaN propagates,
    and a max of finite values cannot overflow, unlike a sum or a 2-norm)."""
    if not named:
        return []
    tensors = [t for _, t in named]
    try:
        norms = torch._foreach_norm(tensors, math.inf)
    except (RuntimeError, TypeError, AttributeError):  # sparse grads, old builds
        norms = [torch.linalg.vector_norm(t.to_dense() if t.is_sparse else t, math.inf)
                 for t in tensors]
    if len({n.device for n in norms}) == 1 and bool(
            torch.stack([torch.isfinite(n) for n in norms]).all()):
        return []
    return [name for (name, _), n in zip(named, norms) if not bool(torch.isfinite(n))]


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
