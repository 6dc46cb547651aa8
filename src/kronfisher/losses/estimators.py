"""Curvature estimators besides sampled targets: pseudo-losses built on the Hessian's root.

Both return a scalar whose *gradient* is what matters: backward it inside
``precond.collect()`` (default ``reduction="mean"``) and the captured output gradients
have E[g gᵀ] (curvature propagation) or Σ g gᵀ (exact) equal to the GGN of the objective
with the given reduction (see :mod:`~kronfisher.losses.scale` for c). For the three
likelihoods here the GGN equals the true Fisher. The value itself is not a loss.

With S Sᵀ = H (:func:`~kronfisher.losses.hessian.hessian_sqrt_apply`):

* :func:`curvature_propagation_loss`: (√c/m) Σᵢ ⟨outputsᵢ, stopgrad(Sᵢ rᵢ)⟩ with Rademacher
  rᵢ (E[r rᵀ] = I). The captured gᵢ = √c Jᵢᵀ Sᵢ rᵢ, so E[(1/m) Σ g gᵀ] = c·(1/m) Σ JᵢᵀHᵢJᵢ,
  unbiased, with less variance than sampled targets for near-deterministic outputs.
* :func:`exact_ggn_loss`: the batch is repeated D times (D = output elements per
  example), replica k carrying column k of S: (√(c/D)/m) Σ_{i,k} ⟨outputs_{ik}, S_i e_k⟩.
  ``collect()`` multiplies by the replicated batch size mD, so the captured
  g_{ik} = √(cD) Jᵢᵀ Sᵢ e_k and (1/(mD)) Σ_{i,k} g gᵀ = c·(1/m) Σᵢ JᵢᵀSᵢSᵢᵀJᵢ: the exact GGN,
  in one forward and backward of D× the batch (cost and memory D× a sampled pass).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .hessian import hessian_sqrt_apply
from .scale import check_outputs, objective_scale

__all__ = ["curvature_propagation_loss", "exact_ggn_loss", "EXACT_GGN_MAX_COLUMNS"]

EXACT_GGN_MAX_COLUMNS = 64
"""Default limit on D (output elements per example) of :func:`exact_ggn_loss`: its pass
costs D× a sampled pass in time and activation memory, so 64 keeps it below ~64 sampled
passes; an auto-encoder's 784 pixels are far above it (use the estimators with one pass)."""


def curvature_propagation_loss(outputs: Tensor, likelihood: str, *,
                               generator: torch.Generator | None = None,
                               reduction: str = "batchmean") -> Tensor:
    """Curvature propagation (Martens, Sutskever & Swersky 2012; kfac-jax's default).

    Backward it inside ``precond.collect()``: the collected curvature is an unbiased
    estimate of the GGN (= Fisher) of the objective with ``reduction`` (module docstring).

    Args:
        outputs: the network outputs, (m, ...) ("categorical": logits, classes along
            dim 1).
        likelihood: "gaussian", "bernoulli" or "categorical".
        generator: optional torch.Generator for the Rademacher vectors.
        reduction: "batchmean", "mean" or "sum" (see :func:`~kronfisher.sampled_nll`).

    Returns:
        The scalar (√c/m) Σᵢ ⟨outputsᵢ, stopgrad(Sᵢ rᵢ)⟩; only its gradient is meaningful.

    Raises:
        TypeError: ``outputs`` is not a floating-point tensor.
        ValueError: unknown likelihood or reduction, empty batch, NaN/Inf outputs.
    """
    check_outputs(outputs, likelihood, reduction, "curvature_propagation_loss")
    m = outputs.shape[0]
    with torch.no_grad():
        r = torch.empty(outputs.shape, dtype=outputs.dtype, device=outputs.device)
        r = r.bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
        v = hessian_sqrt_apply(outputs, likelihood, r)
    c = objective_scale(tuple(outputs.shape), likelihood, reduction)
    return (outputs * v).sum() * (math.sqrt(c) / m)


def exact_ggn_loss(model: nn.Module, inputs: Tensor, likelihood: str, *,
                   reduction: str = "batchmean",
                   max_columns: int = EXACT_GGN_MAX_COLUMNS) -> Tensor:
    """The exact GGN in one pass: ``inputs`` repeated D times, one column of S per replica.

    Backward it inside ``precond.collect()``: the collected curvature is then exactly the
    GGN of the objective with ``reduction`` on ``inputs`` (ExactNG: the exact block
    Σ-over-examples JᵀHJ, scaled per ``reduction``; KFAC: A and G built from it). Runs the
    model twice: on ``inputs[:1]`` without gradient (to learn D; no hook records it), then
    on the D·m replicated examples. Cost: D× a sampled pass in time and memory. The model
    should be deterministic (eval-mode dropout/batch norm): each replica's S is taken from
    its own outputs.

    Args:
        model: maps a batch (m, ...) to outputs (m, ...) ("categorical": logits, classes
            along dim 1).
        inputs: the examples, (m, ...).
        likelihood: "gaussian", "bernoulli" or "categorical".
        reduction: "batchmean", "mean" or "sum" (see :func:`~kronfisher.sampled_nll`).
        max_columns: refuse outputs with more than this many elements per example.

    Returns:
        The scalar (√(c/D)/m) Σ_{i,k} ⟨outputs_{ik}, stopgrad(Sᵢ e_k)⟩; only its gradient is
        meaningful.

    Raises:
        TypeError: ``inputs`` or the outputs are not floating-point tensors.
        ValueError: D > ``max_columns``, empty batch, a model that does not map m examples
            to m outputs, unknown likelihood or reduction, NaN/Inf outputs.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"exact_ggn_loss: inputs must be a tensor, got {type(inputs).__name__}")
    m = inputs.shape[0] if inputs.ndim else 0
    if m == 0:
        raise ValueError(f"exact_ggn_loss: inputs must have a non-empty batch dimension, got"
                         f" {tuple(inputs.shape)}")
    with torch.no_grad():
        probe = model(inputs[:1])
    check_outputs(probe, likelihood, reduction, "exact_ggn_loss")
    cols = math.prod(probe.shape[1:])
    if cols > max_columns:
        raise ValueError(
            f"exact_ggn_loss: the outputs have D = {cols} elements per example, above"
            f" max_columns={max_columns}; the exact pass costs D× a sampled one (the batch is"
            " repeated D times). Use curvature_propagation_loss or sampled_nll, or raise"
            " max_columns"
        )
    out = model(inputs.repeat(cols, *([1] * (inputs.ndim - 1))))
    check_outputs(out, likelihood, reduction, "exact_ggn_loss")
    if out.shape[0] != cols * m or tuple(out.shape[1:]) != tuple(probe.shape[1:]):
        raise ValueError(
            f"exact_ggn_loss: the model mapped {cols * m} examples to outputs"
            f" {tuple(out.shape)}; expected ({cols * m}, {', '.join(map(str, probe.shape[1:]))})"
        )
    with torch.no_grad():  # replica k (rows k·m … k·m + m − 1) gets the basis vector e_k
        eye = torch.eye(cols, dtype=out.dtype, device=out.device)
        r = eye[:, None, :].expand(cols, m, cols).reshape(out.shape)
        v = hessian_sqrt_apply(out, likelihood, r)
    c = objective_scale((m, *out.shape[1:]), likelihood, reduction)
    return (out * v).sum() * (math.sqrt(c / cols) / m)
