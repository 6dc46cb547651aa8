"""Optimizers of a benchmark run: the preconditioners, their identity controls, the baselines.

``identity_<method>`` is the control that shows whether the curvature matters: the same
preconditioner pipeline (lr, damping scheme, momentum, KL clip) with every layer's
curvature replaced by the identity, I_{d_a} ⊗ I_{d_g} (two-term methods: that plus a zero
second term, so the two-term damping formula applies). Under the authors' damping the
update is then ∇ / (1 + √λ)² (one term) or ∇ / (1 + λ)² (two terms), clipped like the
method's: clipped momentum SGD with the method's hyper-parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import LayerStatistics
from ..linalg import KroneckerSum
from ..preconditioner import KFAC, KPSVD, Deflation, KFACCorrected, Lanczos
from ..preconditioner.base import LayerState, Preconditioner
from ..preconditioner.kronecker import KroneckerPreconditioner
from .problems import SECOND_ORDER, Hyper, base_method

__all__ = ["PRECONDITIONERS", "IdentityCurvature", "Optimizers", "make_optimizers",
           "FACTOR_BALANCES", "STEP_RULES", "kfac_trace_split"]

FACTOR_BALANCES = ("sqrt_sigma", "kfac_trace")
STEP_RULES = ("sgd", "adaptive")

PRECONDITIONERS = {"kfac": KFAC, "kpsvd": KPSVD, "deflation": Deflation,
                   "kfac_corrected": KFACCorrected, "lanczos": Lanczos}
_TERMS = {"kfac": 1, "kpsvd": 1, "deflation": 2, "kfac_corrected": 2, "lanczos": 2}


class IdentityCurvature(KroneckerPreconditioner):
    """A Kronecker preconditioner whose curvature is the identity (see module docstring).

    Args: those of :class:`KroneckerPreconditioner`; ``method`` only fixes the number of
    terms (1 for kfac/kpsvd, 2 for the others) and hence the damping formula.
    """

    def _update_curvature(self, batch: dict[LayerState, LayerStatistics]) -> None:
        for s, stats in batch.items():
            if s.curvature is None:
                a, g = stats.a, stats.g
                da, dg = a.shape[-1], g.shape[-1]
                eye_a = torch.eye(da, dtype=a.dtype, device=a.device)
                eye_g = torch.eye(dg, dtype=g.dtype, device=g.device)
                terms = [(eye_a, eye_g)]
                terms += [(torch.zeros_like(eye_a), torch.zeros_like(eye_g))] * (
                    _TERMS[self.method] - 1)
                s.curvature = KroneckerSum(terms)
            s.updates += 1


def kfac_trace_split(curvature: KroneckerSum, a: Tensor) -> KroneckerSum:
    """Re-split σ between the first term's factors so that tr(A₁) = tr(A_KFAC) = E‖aᵢ‖².

    (A₁, G₁) → (c A₁, G₁ / c), c = E‖aᵢ‖² / tr(A₁) > 0: the Kronecker product, hence the
    approximation, is unchanged; only what "√λ (or λ) per factor" adds to each factor
    changes. ``a``: the curvature batch's layer inputs, (m, d_a) or (m, T, d_a).
    """
    A, G = curvature.terms[0]
    ta = float(A.diagonal().sum())
    target = float(a.reshape(-1, a.shape[-1]).square().sum(1).mean()) * (
        a.shape[1] if a.dim() == 3 else 1)
    if not (ta > 0 and target > 0):
        return curvature
    c = target / ta
    out = KroneckerSum([(A * c, G / c), *curvature.terms[1:]])
    out.info = getattr(curvature, "info", {})
    return out


class _KFACTraceSplit:
    """Mixin for SVD-based preconditioners: re-split every new estimate.

    Each estimate goes through :func:`kfac_trace_split` before it enters the running average.
    """

    def _adjust_estimate(self, new: KroneckerSum, a: Tensor) -> KroneckerSum:
        return kfac_trace_split(new, a)


@dataclass
class Optimizers:
    """The torch optimizer of a run and, for second-order methods, its preconditioner."""

    optimizer: torch.optim.Optimizer
    preconditioner: Preconditioner | None


def make_optimizers(name: str, model: nn.Module, h: Hyper, *, solver: str = "auto"
                    ) -> Optimizers:
    """Build the optimizer ``name`` (see ``problems.ALL_OPTIMIZERS``) for ``model``.

    Second-order methods and their identity controls: SGD (momentum ``h.momentum``,
    Nesterov per ``h.nesterov``) on the preconditioned gradients. ``h.factor_balance``:
    "sqrt_sigma" (‖A₁‖ = ‖G₁‖ = √σ₁, ours and the authors' power SVD) or "kfac_trace"
    (KPSVD, Deflation, Lanczos: tr(A₁) = tr(A_KFAC), see :func:`kfac_trace_split`).
    "soap" and "shampoo" are pytorch-optimizer's SOAP and Shampoo (the ``bench`` extra).

    Raises:
        ValueError: unknown optimizer.
        ImportError: "soap"/"shampoo" without pytorch-optimizer installed.
    """
    method = base_method(name)
    params = model.parameters()
    if method == "adam":
        return Optimizers(torch.optim.Adam(params, lr=h.lr, weight_decay=h.weight_decay), None)
    if method in ("soap", "shampoo"):
        try:
            import pytorch_optimizer as po
        except ImportError as e:
            raise ImportError(f"optimizer {name!r} needs pytorch-optimizer: pip install"
                              " 'kronfisher[bench]'") from e
        if method == "soap":
            return Optimizers(po.SOAP(params, lr=h.lr, weight_decay=h.weight_decay), None)
        # matrix roots every 10 steps (the default, every step, costs ~5 s a step on MNIST)
        return Optimizers(po.Shampoo(params, lr=h.lr, weight_decay=h.weight_decay,
                                     preconditioning_compute_steps=10), None)
    if method != "sgd" and method not in SECOND_ORDER:
        raise ValueError(f"unknown optimizer {name!r}")
    opt = torch.optim.SGD(params, lr=h.lr, momentum=h.momentum, nesterov=h.nesterov,
                          weight_decay=h.weight_decay)
    if method == "sgd":
        return Optimizers(opt, None)
    if h.damping is None:
        raise ValueError(f"optimizer {name!r} needs a damping value")
    if h.step_rule not in STEP_RULES:
        raise ValueError(f"step_rule must be one of {STEP_RULES}, got {h.step_rule!r}")
    kw: dict[str, Any] = dict(
        damping=h.damping, ema_decay=h.ema_decay, cov_update_freq=h.cov_update_freq,
        inv_update_freq=h.inv_update_freq,
        # the adaptive step rule applies the norm constraint itself
        kl_clip=None if h.step_rule == "adaptive" else h.kl_clip, lr=h.lr,
        damping_scheme=h.damping_scheme, kl_clip_mode=h.kl_clip_mode,
        ema_counter=h.ema_counter)
    if h.factor_balance not in FACTOR_BALANCES:
        raise ValueError(f"factor_balance must be one of {FACTOR_BALANCES},"
                         f" got {h.factor_balance!r}")
    pc: Preconditioner
    if name.startswith("identity_"):
        pc = IdentityCurvature(model, method=method, **kw)
    elif h.factor_balance == "kfac_trace" and method in ("kpsvd", "deflation", "lanczos"):
        cls = PRECONDITIONERS[method]
        split_cls = type(f"{cls.__name__}KFACTrace", (_KFACTraceSplit, cls), {})
        pc = split_cls(model, solver=solver, **kw)
    else:
        pc = PRECONDITIONERS[method](model, solver=solver, **kw)
    if h.step_rule == "adaptive":
        return Optimizers(_adaptive(pc, h, h.damping), pc)
    return Optimizers(opt, pc)


def _adaptive(pc: Preconditioner, h: Hyper, damping: float) -> torch.optim.Optimizer:
    """The ``adaptive`` step rule: :class:`kronfisher.optim.AdaptiveNG` over ``pc``.

    Weight decay enters the quadratic model as η (not the torch optimizer); ``damping``
    (``h.damping``, checked by the caller) is the initial λ.
    """
    from ..optim import AdaptiveNG

    return AdaptiveNG(pc, lr=None if h.auto_lr else h.lr,
                      momentum=None if h.auto_momentum else h.momentum,
                      momentum_range=h.momentum_range,
                      damping=damping, damping_update_freq=h.damping_update_freq,
                      min_damping=h.min_damping,
                      weight_decay=h.weight_decay, quad_model=h.quad_model,
                      kl_clip=h.kl_clip, model_grad=h.model_grad)
