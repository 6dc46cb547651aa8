"""Square roots of the per-example output Hessian of the NLL: S with S Sᵀ = H.

For the per-example loss ℓᵢ (NLL summed over output elements, DESIGN.md §2) the Hessian
with respect to the outputs does not depend on the targets:

* "gaussian" (unit variance): H = I, S = I;
* "bernoulli": H = diag(σ(1 − σ)), S = diag(√(σ(1 − σ)));
* "categorical" (per position, classes along dim 1): H = diag(p) − p pᵀ and
  S = diag(√p) − p √pᵀ. Then S Sᵀ = diag(p) − 2 p pᵀ + p (√pᵀ√p) pᵀ = H since Σ p = 1.

S is applied without forming it (cost of one softmax). With ℓᵢ's GGN block
Jᵢᵀ Hᵢ Jᵢ = (Jᵢᵀ Sᵢ)(Jᵢᵀ Sᵢ)ᵀ, a backward of ⟨outputsᵢ, Sᵢ r⟩ gives Jᵢᵀ Sᵢ r: with
E[r rᵀ] = I (Rademacher r) or summed over the columns r = e_k, the outer products add up
to the GGN.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hessian_sqrt_apply"]


def hessian_sqrt_apply(outputs: Tensor, likelihood: str, r: Tensor) -> Tensor:
    """S r per example, S Sᵀ = H the output Hessian of the NLL (module docstring).

    Args:
        outputs: the network outputs (detached or not; read without gradient), (m, ...);
            "categorical": logits with classes along dim 1.
        likelihood: "gaussian", "bernoulli" or "categorical".
        r: vectors of the outputs' shape, one per example (any leading layout that
            broadcasts with ``outputs``).

    Returns:
        S r with ``r``'s broadcast shape, no gradient.

    Raises:
        ValueError: unknown likelihood.
    """
    with torch.no_grad():
        out = outputs.detach()
        if likelihood == "gaussian":
            return r * torch.ones_like(out)  # S = I, broadcast like the others
        if likelihood == "bernoulli":
            s = torch.sigmoid(out)
            return (s * (1 - s)).sqrt() * r
        if likelihood == "categorical":
            p = torch.softmax(out, 1)
            sq = p.sqrt()
            classes = 1 - out.ndim  # dim 1 of the outputs, counted from the end of r's
            return sq * r - p * (sq * r).sum(classes, keepdim=True)
    raise ValueError(f"unknown likelihood {likelihood!r}")
