"""The Levenberg–Marquardt rule that adapts the damping λ from the reduction ratio ρ."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LevenbergMarquardt", "reduction_ratio"]


def reduction_ratio(loss_before: float, loss_after: float, q: float) -> float:
    """ρ = (L(θ + δ) − L(θ)) / q(δ): the true change over the quadratic model's.

    Returns NaN when ``q`` is 0 or any input is not finite (the rule then raises λ).
    """
    change = loss_after - loss_before
    if q == 0.0 or not (math.isfinite(change) and math.isfinite(q)):
        return math.nan
    return change / q


@dataclass(frozen=True)
class LevenbergMarquardt:
    """λ ← ω·λ if ρ > ``upper``, λ/ω if ρ < ``lower``, else unchanged; clamped.

    A ρ that is NaN or ±Inf, or a model change q(δ) ≥ 0 (the model predicts no
    decrease: the step is not a descent step of the model), counts as a failure and
    raises λ. The result is clamped to [``min_damping``, ``max_damping``].

    Attributes:
        decay: ω in (0, 1) (kfac-jax and Martens & Grosse: 0.95 per step, applied every
            5 steps as 0.95⁵).
        min_damping: the floor, ≥ 0.
        max_damping: the ceiling, ≥ ``min_damping``.
        lower: ρ below it raises λ (¼).
        upper: ρ above it lowers λ (¾).

    Raises:
        ValueError: at construction, a value out of its range.
    """

    decay: float
    min_damping: float
    max_damping: float
    lower: float = 0.25
    upper: float = 0.75

    def __post_init__(self) -> None:
        if not (isinstance(self.decay, int | float) and 0.0 < self.decay < 1.0):
            raise ValueError(f"damping_decay must be in (0, 1), got {self.decay!r}")
        if not (math.isfinite(self.min_damping) and self.min_damping >= 0.0):
            raise ValueError(f"min_damping must be a finite number >= 0, got {self.min_damping!r}")
        if not (self.max_damping >= self.min_damping):  # inf is allowed
            raise ValueError(f"max_damping ({self.max_damping!r}) must be >= min_damping"
                             f" ({self.min_damping!r})")
        if not (self.lower <= self.upper):
            raise ValueError(f"lower ({self.lower}) must be <= upper ({self.upper})")

    def clamp(self, damping: float) -> float:
        """``damping`` clamped to [min_damping, max_damping]."""
        return min(max(damping, self.min_damping), self.max_damping)

    def increase(self, damping: float) -> float:
        """λ/ω, clamped (after a failed step or a model that predicts no decrease)."""
        return self.clamp(damping / self.decay)

    def update(self, damping: float, rho: float, q: float) -> float:
        """The next λ from the current one, the reduction ratio ρ and the model change q."""
        if not math.isfinite(rho) or not q < 0.0:
            return self.increase(damping)
        if rho > self.upper:
            return self.clamp(damping * self.decay)
        if rho < self.lower:
            return self.increase(damping)
        return self.clamp(damping)
