"""The preconditioner's ``damping`` and ``lr``: numbers, callables of the step count, an optimizer.

:class:`HyperMixin` gives :class:`~kronfisher.preconditioner.Preconditioner` its ``damping``
and ``lr`` properties (see :mod:`.schedule`) and the KL-clip factor of a step, which reads
the lr from an optimizer's param groups when one was given as ``lr``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .kl_clip import kl_clip_factor
from .schedule import OptimizerLR, Scheduled, group_lrs, scheduled_damping, scheduled_lr

__all__ = ["HyperMixin"]


class HyperMixin:
    """``damping`` / ``lr`` over the attributes declared below (set by the Preconditioner)."""

    steps: int
    kl_clip: float | None
    kl_clip_mode: str
    _damping: Scheduled
    _lr: Scheduled | OptimizerLR | None


    @property
    def damping(self) -> float:
        """λ now: the number given, or the ``damping`` callable's value at :attr:`steps`.

        Assigning a number or a callable replaces it (``kronfisher.optim`` assigns λ).

        Raises:
            ValueError: (reading) the callable returned a bad value at this step.
        """
        return self._damping.at(self.steps)

    @damping.setter
    def damping(self, value: float | Callable[[int], float]) -> None:
        self._damping = scheduled_damping(value)

    @property
    def lr(self) -> float | None:
        """The lr of the KL clip now (None without one, or when it is read from an optimizer).

        Assigning a number, a callable, an optimizer or None replaces it (``kl_clip`` in
        mode "lr2" needs one).
        """
        return self._lr.at(self.steps) if isinstance(self._lr, Scheduled) else None

    @lr.setter
    def lr(self, value: float | Callable[[int], float] | torch.optim.Optimizer | None) -> None:
        lr = scheduled_lr(value)
        if lr is None and self.kl_clip is not None and self.kl_clip_mode == "lr2":
            raise ValueError("kl_clip in mode 'lr2' needs the optimizer's lr > 0")
        self._lr = lr

    def _lr_for_checks(self) -> float | None:
        """A stand-in number for the option checks (1.0 for a callable or an optimizer)."""
        if isinstance(self._lr, Scheduled) and not self._lr.is_schedule:
            return self._lr.constant
        return None if self._lr is None else 1.0

    def _scheduled_hyper(self) -> set[str]:
        """The hyper-parameters given as callables or an optimizer (not in a state_dict)."""
        out = {"damping"} if self._damping.is_schedule else set()
        if isinstance(self._lr, OptimizerLR) or (
                isinstance(self._lr, Scheduled) and self._lr.is_schedule):
            out.add("lr")
        return out

    def _current_lrs(self) -> dict[int, float] | float | None:
        """What the KL clip uses this step: per-parameter lrs (an optimizer), one lr, None."""
        if self.kl_clip is None or self.kl_clip_mode != "lr2":
            return None
        if isinstance(self._lr, OptimizerLR):
            return group_lrs(self._lr.optimizer)
        return self.lr

    def _kl_scale(self, out: dict, grads: dict, lrs: dict[int, float] | float | None
                  ) -> float:
        if self.kl_clip is None:
            return 1.0
        if not isinstance(lrs, dict):
            dots = [(X * grads[s.name]).sum() for s, X in out.items()]
            return kl_clip_factor(dots, self.kl_clip, self.kl_clip_mode, lrs)
        dots = []  # Σ_p lr_p² ⟨Δ_p, ∇_p⟩, each layer split into its parameters
        for s, X in out.items():
            parts = s.adapter.split_matrix(X * grads[s.name])
            for p, part in zip(s.adapter.params(), parts):
                dots.append(part.sum() * lrs.get(id(p), 0.0) ** 2)
        return kl_clip_factor(dots, self.kl_clip, self.kl_clip_mode, 1.0)
