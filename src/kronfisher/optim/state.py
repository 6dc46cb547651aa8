"""What AdaptiveNG records per step, and the checks of a state_dict before it is loaded."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .config import StepConfig

__all__ = ["StepRecord", "check_loadable"]


@dataclass(frozen=True)
class StepRecord:
    """What one :meth:`AdaptiveNG.step` did (for logging).

    Attributes:
        step: the index of the step (0 for the first).
        loss: the closure's loss.
        damping: λ this step used (the preconditioner used λ + η).
        next_damping: λ after the step (changed by the damping rule or a failure).
        alpha: α of δ = −α Δ + μ δ_prev (0 when skipped).
        momentum: μ (0 when skipped or without a previous step).
        q: q(δ), the model change: on damping-update steps the one ρ was computed with
            (``quad_model``), otherwise the exact model's when α is automatic; None if
            not computed.
        rho: the reduction ratio ρ (None on steps without a damping update).
        applied: False if the parameters were left unchanged (see ``reason``).
        fallback: the 2×2 solve was singular and μ = 0 was used.
        reason: why the update was skipped, or None.
    """

    step: int
    loss: float
    damping: float
    next_damping: float
    alpha: float
    momentum: float
    q: float | None
    rho: float | None
    applied: bool
    fallback: bool = False
    reason: str | None = None


def check_loadable(state_dict: dict, params: list[Tensor], names: dict[int, str]) -> None:
    """Raise ValueError unless ``state_dict`` is an AdaptiveNG state for these parameters.

    Args:
        state_dict: what :meth:`AdaptiveNG.state_dict` returned (maybe from another run).
        params: the optimizer's parameters, in its group's order.
        names: ``id(parameter)`` → its name in the model (for the messages).

    Raises:
        ValueError: not an AdaptiveNG state_dict, another number of parameters, a δ_prev of
            another shape or not finite, a hyper-parameter out of range, a bad step count
            or step record.
    """
    if not isinstance(state_dict, dict) or "adaptive" not in state_dict:
        raise ValueError("not an AdaptiveNG state_dict (no 'adaptive' entry)")
    extra = state_dict["adaptive"]
    if not isinstance(extra, dict):
        raise ValueError("state_dict 'adaptive' entry must be a dict")
    groups = state_dict.get("param_groups", [])
    if len(groups) != 1 or len(groups[0].get("params", [])) != len(params):
        raise ValueError(f"state_dict has {len(groups)} param group(s) with"
                         f" {[len(g.get('params', [])) for g in groups]} parameters; this"
                         f" optimizer has 1 with {len(params)}")
    StepConfig.from_group(groups[0])
    index = {i: p for i, p in zip(groups[0]["params"], params)}
    for i, st in state_dict.get("state", {}).items():
        d = st.get("delta_prev")
        p = index.get(i)
        if p is None or d is None:
            raise ValueError(f"state_dict state entry {i!r} is not a known parameter's")
        name = names[id(p)]
        if tuple(d.shape) != tuple(p.shape):
            raise ValueError(f"state_dict δ_prev of {name!r} has shape {tuple(d.shape)},"
                             f" the parameter {tuple(p.shape)}")
        if not bool(torch.isfinite(d).all()):
            raise ValueError(f"state_dict δ_prev of {name!r} is not finite")
    steps, last = extra.get("steps"), extra.get("last_step")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"state_dict step count must be an integer >= 0, got {steps!r}")
    keys = {f.name for f in fields(StepRecord)}
    if last is not None and set(last) != keys:
        raise ValueError(f"state_dict last_step has keys {sorted(last)}, expected"
                         f" {sorted(keys)}")
