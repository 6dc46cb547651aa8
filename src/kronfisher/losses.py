"""Losses whose backward inside ``collect()`` gives the true Fisher (sampled targets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sampled_nll", "LIKELIHOODS"]

LIKELIHOODS = ("gaussian", "bernoulli", "categorical")
_WHAT = {"gaussian": "means", "bernoulli": "logits", "categorical": "logits"}


def sampled_nll(outputs: Tensor, likelihood: str, *, generator: torch.Generator | None = None
                ) -> Tensor:
    """Mean over examples of −log p(ŷᵢ | outputsᵢ), ŷᵢ sampled from the model.

    Args:
        outputs: the network's last pre-activations, (m, ...). "gaussian": the mean of a
            unit-variance Gaussian; "bernoulli": logits of independent Bernoullis;
            "categorical": logits over classes along dim 1, (m, C) or (m, C, ...).
        likelihood: "gaussian", "bernoulli" or "categorical".
        generator: optional torch.Generator for the samples.

    Raises:
        TypeError: ``outputs`` is not a floating-point torch.Tensor (numpy arrays, integer
            tensors).
        ValueError: unknown likelihood, empty batch, NaN/Inf outputs, categorical outputs
            without a class dimension.

    The per-example NLL is summed over output dimensions (DESIGN.md §2); constants that
    do not depend on the outputs are dropped. Targets are sampled without gradient, so
    the backward of this loss gives per-example gradients whose outer products average
    to the true Fisher.
    """
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"sampled_nll: outputs must be the network's output tensor (part of the autograd"
            f" graph), got {type(outputs).__module__}.{type(outputs).__name__}"
        )
    if not outputs.is_floating_point():
        raise TypeError(
            f"sampled_nll: outputs must be floating-point {_WHAT.get(likelihood, 'outputs')},"
            f" got dtype {outputs.dtype} (integer tensors carry no gradient)"
        )
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose from {LIKELIHOODS}")
    if outputs.ndim < 1 or outputs.shape[0] == 0:
        raise ValueError(
            f"outputs must have a non-empty batch dimension, got {tuple(outputs.shape)}"
        )
    m = outputs.shape[0]
    if not bool(torch.isfinite(outputs.detach()).all()):
        raise ValueError("sampled_nll: the network outputs contain NaN or Inf (has training"
                         " diverged?); no targets can be sampled from them")
    with torch.no_grad():
        out = outputs.detach()
        if likelihood == "gaussian":
            y = out + torch.randn(out.shape, generator=generator, dtype=out.dtype,
                                  device=out.device)
        elif likelihood == "bernoulli":
            y = torch.bernoulli(torch.sigmoid(out), generator=generator)
        elif likelihood == "categorical":
            if out.ndim < 2:
                raise ValueError("categorical outputs must be (m, C) or (m, C, ...) logits")
            probs = torch.softmax(out, 1).movedim(1, -1).reshape(-1, out.shape[1])
            y = torch.multinomial(probs, 1, generator=generator).reshape(
                out.shape[:1] + out.shape[2:])
        else:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose from {LIKELIHOODS}")
    if likelihood == "gaussian":
        nll = 0.5 * (outputs - y).square()
    elif likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(outputs, y, reduction="none")
    else:
        nll = F.cross_entropy(outputs, y, reduction="none")
    return nll.reshape(m, -1).sum(1).mean()
