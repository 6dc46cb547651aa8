"""The optimizer's hyper-parameters (its param group) as one checked, typed value."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .damping import LevenbergMarquardt

__all__ = ["StepConfig", "QUAD_MODELS", "MODEL_GRADS", "GROUP_KEYS"]

QUAD_MODELS = ("ggn", "approx")
MODEL_GRADS = ("closure", "inputs")
GROUP_KEYS = ("lr", "momentum", "damping", "adapt_damping", "damping_update_freq",
              "damping_decay", "min_damping", "max_damping", "weight_decay", "quad_model",
              "kl_clip", "model_grad", "loss_lower_bound")


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _range(name: str, v: Any) -> tuple[float, float] | None:
    if v is None:
        return None
    if not isinstance(v, tuple | list) or len(v) != 2:
        raise ValueError(f"{name} must be None or a pair (lo, hi), got {v!r}")
    lo, hi = _number(f"{name}[0]", v[0]), _number(f"{name}[1]", v[1])
    if not lo <= hi:
        raise ValueError(f"{name} must have lo <= hi, got {v!r}")
    return lo, hi


def _optional(name: str, v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number or None, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class StepConfig:
    """The param group's hyper-parameters, checked (see :class:`~kronfisher.optim.AdaptiveNG`).

    Attributes:
        lr: fixed learning rate, or None for α from the exact quadratic model.
        momentum: fixed μ, or None (μ from the model when ``lr`` is None, else 0).
        momentum_range: (lo, hi) bounding the automatic μ, or None (unbounded). An
            optional key of the group: state_dicts saved before it existed load as None.
        damping: the current λ.
        adapt_damping: whether the Levenberg–Marquardt rule adapts λ.
        damping_update_freq: steps between two damping updates.
        weight_decay: η (its gradient ηθ is added to ∇, its η/2‖θ‖² to the loss).
        quad_model: "ggn" or "approx": the curvature of q(δ) in ρ.
        kl_clip: κ of the norm constraint (fixed ``lr`` only), or None.
        model_grad: "closure" or "inputs": whose gradient the exact model's linear term uses.
        loss_lower_bound: a bound the automatic step's model prediction must respect.
        rule: the Levenberg–Marquardt rule (decay ω and the clamp).
    """

    lr: float | None
    momentum: float | None
    momentum_range: tuple[float, float] | None
    damping: float
    adapt_damping: bool
    damping_update_freq: int
    weight_decay: float
    quad_model: str
    kl_clip: float | None
    model_grad: str
    loss_lower_bound: float | None
    rule: LevenbergMarquardt

    @property
    def automatic(self) -> bool:
        """Whether α (and μ unless fixed) come from the quadratic model."""
        return self.lr is None

    @staticmethod
    def from_group(group: dict) -> StepConfig:
        """Check a param group and return its typed view.

        Raises:
            ValueError: naming the first hyper-parameter out of its range.
        """
        missing = [k for k in GROUP_KEYS if k not in group]
        if missing:
            raise ValueError(f"param group lacks the AdaptiveNG hyper-parameter(s) {missing}")
        lr = _optional("lr", group["lr"])
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0 (or None for the automatic step), got {lr!r}")
        momentum = _optional("momentum", group["momentum"])
        if momentum is not None and momentum < 0:
            raise ValueError(f"momentum must be >= 0 (or None), got {momentum!r}")
        momentum_range = _range("momentum_range", group.get("momentum_range"))
        if momentum_range is not None and (lr is not None or momentum is not None):
            raise ValueError("momentum_range bounds the automatic momentum: it needs lr=None"
                             " and momentum=None")
        rule = LevenbergMarquardt(
            decay=_number("damping_decay", group["damping_decay"]),
            min_damping=_number("min_damping", group["min_damping"]),
            max_damping=_number("max_damping", group["max_damping"]),
        )
        damping = _number("damping", group["damping"])
        if not rule.min_damping <= damping <= rule.max_damping:
            raise ValueError(f"damping must be in [min_damping, max_damping] ="
                             f" [{rule.min_damping:g}, {rule.max_damping:g}], got {damping!r}")
        freq = group["damping_update_freq"]
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise ValueError(f"damping_update_freq must be an integer >= 1, got {freq!r}")
        wd = _number("weight_decay", group["weight_decay"])
        if wd < 0:
            raise ValueError(f"weight_decay must be >= 0, got {wd!r}")
        if group["quad_model"] not in QUAD_MODELS:
            raise ValueError(f"quad_model must be one of {QUAD_MODELS}, got"
                             f" {group['quad_model']!r}")
        kl_clip = _optional("kl_clip", group["kl_clip"])
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"kl_clip must be > 0 (or None), got {kl_clip!r}")
        if kl_clip is not None and lr is None:
            raise ValueError("kl_clip (the norm constraint) needs a fixed lr: with lr=None the"
                             " step length comes from the quadratic model")
        if group["model_grad"] not in MODEL_GRADS:
            raise ValueError(f"model_grad must be one of {MODEL_GRADS}, got"
                             f" {group['model_grad']!r}")
        if not isinstance(group["adapt_damping"], bool):
            raise ValueError(f"adapt_damping must be a bool, got {group['adapt_damping']!r}")
        return StepConfig(lr=lr, momentum=momentum, momentum_range=momentum_range,
                          damping=damping,
                          adapt_damping=group["adapt_damping"], damping_update_freq=freq,
                          weight_decay=wd, quad_model=group["quad_model"], kl_clip=kl_clip,
                          model_grad=group["model_grad"],
                          loss_lower_bound=_optional("loss_lower_bound",
                                                     group["loss_lower_bound"]),
                          rule=rule)
