"""The deep auto-encoder problems (DESIGN.md §7) and their two presets.

* ``classic`` (Martens 2010): logistic hidden units, linear code layer, sparse
  initialisation (15 non-zero N(0, 1) incoming weights per unit, zero biases),
  weight cost 1e-5. The objective is the mean per-example loss (summed over pixels), as
  in DESIGN.md §2. No published lr grid exists for it: the second-order methods and Adam
  use the paper's numbers, SGD the paper's lr divided by the number of pixels (the
  gradient of this objective is that many times larger), T_cov = T_inv = 10.
* ``paper`` (the authors' code): ReLU hidden units (code layer included), Xavier-uniform
  weights, biases 0.01, SGD momentum 0.9, weight decay 1e-3, T_cov = T_inv = 100,
  KL clip 0.01, EMA ρ = min(1 − 1/k, 0.95), curvature on a random quarter of the batch
  with sampled targets, and their best (lr, damping) per method. Their objective is the
  mean over examples *and pixels* (PyTorch's default loss reduction), so the runner scales
  both the training loss and the sampled curvature loss by 1/pixels (``loss_scale``):
  their lr, damping and KL bound only mean what they meant on that scale (the Fisher of
  the scaled loss is 1/pixels² of DESIGN.md §2's).

The network's last layer is linear: its outputs are Bernoulli logits (CURVES, MNIST) or
Gaussian means (FACES). Per-example loss ℓᵢ = NLL summed over pixels (constants dropped:
½‖f − y‖² for FACES); the "per-pixel" loss the authors report is that NLL averaged over
pixels (binary cross-entropy; for FACES the mean squared error (f − y)²).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Problem", "PROBLEMS", "PRESETS", "Hyper", "build_model", "hyper", "per_example_loss",
           "per_pixel_loss", "OPTIMIZERS", "SECOND_ORDER"]

PRESETS = ("classic", "paper")
SECOND_ORDER = ("kfac", "kpsvd", "deflation", "kfac_corrected", "lanczos")
OPTIMIZERS = (*SECOND_ORDER, "adam", "sgd")


@dataclass(frozen=True)
class Problem:
    name: str
    encoder: tuple[int, ...]  # input, hidden..., code
    likelihood: str  # "bernoulli" or "gaussian"
    batch_size: int  # the paper's batch size

    @property
    def sizes(self) -> tuple[int, ...]:
        """All layer widths, encoder then mirrored decoder."""
        return self.encoder + tuple(reversed(self.encoder[:-1]))

    @property
    def n_linear(self) -> int:
        return len(self.sizes) - 1


PROBLEMS = {
    "curves": Problem("curves", (784, 400, 200, 100, 50, 25, 6), "bernoulli", 256),
    "mnist": Problem("mnist", (784, 1000, 500, 250, 30), "bernoulli", 512),
    "faces": Problem("faces", (625, 2000, 1000, 500, 30), "gaussian", 1024),
}

# The paper's best (lr, damping) per method; Adam and SGD: lr only (DESIGN.md §7).
_PAPER_LR_DAMPING = {
    "curves": {"kfac": (0.1, 3e-3), "kpsvd": (0.1, 3e-3), "deflation": (0.1, 0.1),
               "kfac_corrected": (0.1, 0.03), "lanczos": (1e-3, 1e-3), "adam": (1e-3, None),
               "sgd": (0.3, None)},
    "mnist": {"kfac": (0.01, 1e-4), "kpsvd": (0.01, 1e-4), "deflation": (3e-3, 1e-3),
              "kfac_corrected": (0.1, 0.01), "lanczos": (3e-3, 1e-3), "adam": (1e-3, None),
              "sgd": (0.3, None)},
    "faces": {"kfac": (0.1, 1e-3), "kpsvd": (0.1, 1e-3), "deflation": (3e-3, 1e-3),
              "kfac_corrected": (0.1, 0.03), "lanczos": (3e-3, 1e-3), "adam": (1e-3, None),
              "sgd": (0.3, None)},
}


@dataclass
class Hyper:
    """Optimiser settings of one run."""

    lr: float
    damping: float | None
    momentum: float
    weight_decay: float
    batch_size: int
    cov_update_freq: int
    inv_update_freq: int
    kl_clip: float | None
    ema_decay: float
    curvature_fraction: float
    loss_scale: float = 1.0  # the objective is loss_scale × mean per-example NLL


def hyper(problem: str, optimizer: str, preset: str = "paper") -> Hyper:
    """Default hyper-parameters of ``optimizer`` on ``problem`` under ``preset``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {OPTIMIZERS}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    p = PROBLEMS[problem]
    lr, damping = _PAPER_LR_DAMPING[problem][optimizer]
    pixels = p.encoder[0]
    if preset == "paper":
        return Hyper(lr=lr, damping=damping, momentum=0.9 if optimizer != "adam" else 0.0,
                     weight_decay=1e-3, batch_size=p.batch_size, cov_update_freq=100,
                     inv_update_freq=100, kl_clip=0.01, ema_decay=0.95,
                     curvature_fraction=0.25, loss_scale=1.0 / pixels)
    if optimizer == "sgd":
        lr = lr / pixels
    return Hyper(lr=lr, damping=damping, momentum=0.9 if optimizer != "adam" else 0.0,
                 weight_decay=1e-5, batch_size=p.batch_size, cov_update_freq=10,
                 inv_update_freq=10, kl_clip=0.01, ema_decay=0.95, curvature_fraction=0.25)


def build_model(problem: str, preset: str = "paper", *, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """The auto-encoder: Linear layers with the preset's activations and initialisation."""
    if problem not in PROBLEMS:
        raise ValueError(f"unknown problem {problem!r}; choose from {tuple(PROBLEMS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    p = PROBLEMS[problem]
    gen = torch.Generator().manual_seed(seed)
    code = len(p.encoder) - 2  # index of the Linear layer producing the code
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(p.sizes[:-1], p.sizes[1:])):
        lin = nn.Linear(d_in, d_out, dtype=dtype)
        _init(lin, preset, gen)
        layers.append(lin)
        last = i == p.n_linear - 1
        if last:
            continue
        if preset == "paper":
            layers.append(nn.ReLU())
        elif i != code:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


@torch.no_grad()
def _init(lin: nn.Linear, preset: str, gen: torch.Generator) -> None:
    d_out, d_in = lin.weight.shape
    if preset == "paper":
        bound = math.sqrt(6.0 / (d_in + d_out))
        lin.weight.copy_(torch.rand(d_out, d_in, generator=gen) * 2 * bound - bound)
        lin.bias.fill_(0.01)
        return
    k = min(15, d_in)
    w = torch.zeros(d_out, d_in)
    idx = torch.rand(d_out, d_in, generator=gen).argsort(1)[:, :k]
    w.scatter_(1, idx, torch.randn(d_out, k, generator=gen))
    lin.weight.copy_(w)
    lin.bias.zero_()


def per_example_loss(outputs: Tensor, x: Tensor, likelihood: str) -> Tensor:
    """ℓᵢ: NLL of the input x under the output distribution, summed over pixels. (m,)"""
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(outputs, x, reduction="none").sum(1)
    if likelihood == "gaussian":
        return 0.5 * (outputs - x).square().sum(1)
    raise ValueError(f"unknown likelihood {likelihood!r}")


def per_pixel_loss(outputs: Tensor, x: Tensor, likelihood: str) -> Tensor:
    """The authors' reported loss: BCE or squared error averaged over pixels. (m,)"""
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(outputs, x, reduction="none").mean(1)
    return (outputs - x).square().mean(1)
