"""The objective's scale c per reduction, and the checks every curvature loss shares.

The preconditioners' curvature is (1/m) Σᵢ gᵢ gᵢᵀ over captured output gradients
(DESIGN.md §2): with the default ``collect()`` these are m × the hook's gradients. The
per-example loss ℓᵢ is the NLL summed over output elements; the objective "batchmean" is
L = (1/m) Σᵢ ℓᵢ, and the other reductions are c·L:

| reduction | objective | c |
|---|---|---|
| "batchmean" | (1/m) Σᵢ ℓᵢ | 1 |
| "mean" | mean over all elements (torch's default for BCE; ½ × MSE for "gaussian") | 1/D |
| "sum" | Σᵢ ℓᵢ | m |

D is the number of output elements one example's loss is averaged over: every element for
"gaussian" and "bernoulli", the positions (``outputs.shape[2:]``, 1 for (m, C) logits)
for "categorical", since ``cross_entropy``'s mean runs over positions, not classes.

The Fisher (and GGN) of c·L is c times that of L. It is quadratic in the captured g, so a
curvature loss carries √c: its gradients are √c × the batchmean ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LIKELIHOODS", "REDUCTIONS", "check_outputs", "averaged_elements",
           "objective_scale"]

LIKELIHOODS = ("gaussian", "bernoulli", "categorical")
REDUCTIONS = ("batchmean", "mean", "sum")
_WHAT = {"gaussian": "means", "bernoulli": "logits", "categorical": "logits"}


def check_outputs(outputs: Tensor, likelihood: str, reduction: str, who: str) -> None:
    """Raise a clear error for outputs no curvature loss can use.

    Args:
        outputs: the network's outputs, (m, ...); "categorical": (m, C) or (m, C, ...).
        likelihood: one of :data:`LIKELIHOODS`.
        reduction: one of :data:`REDUCTIONS`.
        who: the calling function's name, for the messages.

    Raises:
        TypeError: ``outputs`` is not a floating-point torch.Tensor.
        ValueError: unknown likelihood or reduction, empty batch, NaN/Inf outputs,
            categorical outputs without a class dimension.
    """
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"{who}: outputs must be the network's output tensor (part of the autograd"
            f" graph), got {type(outputs).__module__}.{type(outputs).__name__}"
        )
    if not outputs.is_floating_point():
        raise TypeError(
            f"{who}: outputs must be floating-point {_WHAT.get(likelihood, 'outputs')},"
            f" got dtype {outputs.dtype} (integer tensors carry no gradient)"
        )
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose from {LIKELIHOODS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{who}: unknown reduction {reduction!r}; choose from {REDUCTIONS}")
    if outputs.ndim < 1 or outputs.shape[0] == 0:
        raise ValueError(
            f"outputs must have a non-empty batch dimension, got {tuple(outputs.shape)}"
        )
    if likelihood == "categorical" and outputs.ndim < 2:
        raise ValueError("categorical outputs must be (m, C) or (m, C, ...) logits")
    if not bool(torch.isfinite(outputs.detach()).all()):
        raise ValueError(f"{who}: the network outputs contain NaN or Inf (has training"
                         " diverged?); no curvature can be estimated from them")


def averaged_elements(shape: tuple[int, ...], likelihood: str) -> int:
    """D: the output elements per example that ``reduction="mean"`` averages over.

    Args:
        shape: the outputs' shape (m, ...).
        likelihood: one of :data:`LIKELIHOODS`.
    """
    rest = shape[2:] if likelihood == "categorical" else shape[1:]
    return math.prod(rest)


def objective_scale(shape: tuple[int, ...], likelihood: str, reduction: str) -> float:
    """c: the objective with ``reduction`` is c × the "batchmean" objective (module table).

    Args:
        shape: the outputs' shape (m, ...).
        likelihood: one of :data:`LIKELIHOODS`.
        reduction: one of :data:`REDUCTIONS`.

    Raises:
        ValueError: unknown reduction.
    """
    if reduction == "batchmean":
        return 1.0
    if reduction == "mean":
        return 1.0 / averaged_elements(shape, likelihood)
    if reduction == "sum":
        return float(shape[0])
    raise ValueError(f"unknown reduction {reduction!r}; choose from {REDUCTIONS}")
