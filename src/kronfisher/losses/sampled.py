"""Sampled targets: a loss whose backward inside ``collect()`` gives the true Fisher."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .scale import LIKELIHOODS, check_outputs, objective_scale

__all__ = ["sampled_nll", "LIKELIHOODS"]


def sampled_nll(outputs: Tensor, likelihood: str, *, generator: torch.Generator | None = None,
                reduction: str = "batchmean") -> Tensor:
    """√c × the mean over examples of −log p(ŷᵢ | outputsᵢ), ŷᵢ sampled from the model.

    Backward this inside ``precond.collect()`` (its default ``reduction="mean"``, which
    multiplies the captured gradients by the batch size m): the collected curvature is then
    an unbiased estimate of the Fisher of the training objective with ``reduction``, which
    is c × the "batchmean" Fisher:

    * "batchmean" (default, c = 1): the objective is the mean over examples of the NLL
      summed over outputs (DESIGN.md §2).
    * "mean" (c = 1/D): the mean over all elements, torch's default for
      ``binary_cross_entropy_with_logits`` and ``cross_entropy`` (D = the output elements
      per example; for "categorical" the positions ``outputs.shape[2:]``, 1 for (m, C)
      logits, as ``cross_entropy`` averages over positions, not classes). For "gaussian"
      it is the mean of ½(f − y)²; ``mse_loss`` has no ½, so its Fisher is 2/D × the
      "batchmean" one: multiply this loss by √2.
    * "sum" (c = m): the sum over examples.

    The curvature is quadratic in the captured gradient, so the loss carries √c, not c.
    Scaling the batchmean sampled loss by c, as the paper's code does with its per-pixel
    mean (and our ``paper`` preset, ``loss_scale`` = 1/D, to reproduce it), gives c²·F: a
    curvature D times smaller than the objective's own Fisher, so a damping λ there acts
    like D·λ on the objective's scale.

    Args:
        outputs: the network's last pre-activations, (m, ...). "gaussian": the mean of a
            unit-variance Gaussian; "bernoulli": logits of independent Bernoullis;
            "categorical": logits over classes along dim 1, (m, C) or (m, C, ...).
        likelihood: "gaussian", "bernoulli" or "categorical".
        generator: optional torch.Generator for the samples.
        reduction: "batchmean", "mean" or "sum" (above).

    Returns:
        A scalar whose value is √c × the sampled batchmean NLL (constants that do not
        depend on the outputs dropped).

    Raises:
        TypeError: ``outputs`` is not a floating-point torch.Tensor (numpy arrays, integer
            tensors).
        ValueError: unknown likelihood or reduction, empty batch, NaN/Inf outputs,
            categorical outputs without a class dimension.

    Targets are sampled without gradient, so the backward of this loss gives per-example
    gradients whose outer products average to the true Fisher.
    """
    check_outputs(outputs, likelihood, reduction, "sampled_nll")
    m = outputs.shape[0]
    with torch.no_grad():
        out = outputs.detach()
        if likelihood == "gaussian":
            y = out + torch.randn(out.shape, generator=generator, dtype=out.dtype,
                                  device=out.device)
        elif likelihood == "bernoulli":
            y = torch.bernoulli(torch.sigmoid(out), generator=generator)
        else:
            probs = torch.softmax(out, 1).movedim(1, -1).reshape(-1, out.shape[1])
            y = torch.multinomial(probs, 1, generator=generator).reshape(
                out.shape[:1] + out.shape[2:])
    if likelihood == "gaussian":
        nll = 0.5 * (outputs - y).square()
    elif likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(outputs, y, reduction="none")
    else:
        nll = F.cross_entropy(outputs, y, reduction="none")
    loss = nll.reshape(m, -1).sum(1).mean()
    c = objective_scale(tuple(outputs.shape), likelihood, reduction)
    return loss if c == 1.0 else loss * math.sqrt(c)
