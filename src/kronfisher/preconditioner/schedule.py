"""Hyper-parameters given as a number or as a callable of the step count; the lr of an optimizer.

``damping`` and ``lr`` of every preconditioner accept a ``Callable[[int], float]``: it is
called with :attr:`Preconditioner.steps` (the ``step()`` calls made before, skipped ones
included; 0 at the first step) — the count a ``torch.optim.lr_scheduler.LambdaLR`` stepped
once per iteration passes to its lambda — once per step, and its value is checked then
(a bad value raises ``ValueError`` naming the step before anything is written). ``lr`` also
accepts a ``torch.optim.Optimizer``: the KL clip then reads each parameter's lr from the
optimizer's param groups at every step, so a scheduler never leaves it stale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._checks import as_float, check_damping

__all__ = ["Scheduled", "OptimizerLR", "scheduled_damping", "scheduled_lr", "group_lrs"]

Schedule = Callable[[int], float]


@dataclass
class Scheduled:
    """A number, or a callable of the step count checked each time it gives a new value.

    Attributes:
        name: the hyper-parameter's name, for messages.
        check: maps a value to a Python float or raises ``ValueError`` (the constructor's
            check of this hyper-parameter).
        constant: the value, when given as a number (else None).
        schedule: the callable, when given as one (else None).
    """

    name: str
    check: Callable[[object], float]
    constant: float | None = None
    schedule: Schedule | None = None
    _memo: tuple[int, float] | None = field(default=None, repr=False)

    @property
    def is_schedule(self) -> bool:
        """Whether the value comes from a callable."""
        return self.schedule is not None

    def at(self, step: int) -> float:
        """The value at ``step`` (the callable is called at most once per step count).

        Raises:
            ValueError: the callable returned a value the constructor would refuse.
        """
        if self.schedule is None:
            if self.constant is None:  # built by scheduled_*, which always sets one
                raise RuntimeError(f"{self.name} has neither a value nor a schedule")
            return self.constant
        if self._memo is not None and self._memo[0] == step:
            return self._memo[1]
        v = self.schedule(step)
        try:
            value = self.check(v)
        except ValueError as e:
            raise ValueError(f"the {self.name} schedule returned {v!r} at step {step}: {e}"
                             ) from None
        self._memo = (step, value)
        return value


def _positive_lr(v: object) -> float:
    return as_float("lr", v, low_open=True)


def scheduled_damping(damping: object) -> Scheduled:
    """``damping`` (a number >= 0 or a callable of the step count) as a :class:`Scheduled`.

    Raises:
        ValueError: a number that is not finite and >= 0 (flags refused).
    """
    if callable(damping):
        return Scheduled("damping", check_damping, schedule=damping)
    return Scheduled("damping", check_damping, constant=check_damping(damping))


@dataclass(frozen=True)
class OptimizerLR:
    """The lr read from an optimizer's param groups at every step.

    Attributes:
        optimizer: the optimizer whose groups' ``lr`` the KL clip uses.
    """

    optimizer: torch.optim.Optimizer


def scheduled_lr(lr: object) -> Scheduled | OptimizerLR | None:
    """``lr`` (None, a number > 0, a callable of the step count or an optimizer), checked.

    Raises:
        ValueError: a number that is not finite and > 0 (flags refused).
    """
    if lr is None:
        return None
    if isinstance(lr, torch.optim.Optimizer):
        return OptimizerLR(lr)
    if callable(lr):
        return Scheduled("lr", _positive_lr, schedule=lr)
    return Scheduled("lr", _positive_lr, constant=as_float("lr (or None)", lr, low_open=True))


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """Each parameter's current lr, by ``id``, from the optimizer's param groups.

    Raises:
        ValueError: a group's lr is not a finite number >= 0 (naming the group).
    """
    out: dict[int, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if isinstance(lr, Tensor) and lr.numel() == 1:
            lr = float(lr)
        value = as_float(f"the lr of the optimizer's param group {i}", lr)
        for p in group["params"]:
            out.setdefault(id(p), value)
    return out
