"""Removing a preconditioner's hooks: ``remove_hooks()``, ``close()`` and ``with``."""

from __future__ import annotations

from .hooks import ModelHooks

__all__ = ["LifecycleMixin"]


class LifecycleMixin:
    """``close()`` and context-manager use over the hooks the Preconditioner attaches."""

    _hooks: ModelHooks
    _hooks_removed: bool

    def remove_hooks(self) -> None:
        """Detach the hooks from the model; the preconditioner cannot be used after.

        Later :meth:`collect` and :meth:`step` calls raise ``RuntimeError`` (without hooks no
        curvature would be recorded and ``step()`` would keep using frozen curvature). A
        preconditioner that is no longer referenced is freed and its hooks removed without
        this call (the hooks hold it weakly). Idempotent; :meth:`close` is the same.
        """
        self._hooks.remove()
        self._hooks_removed = True

    def close(self) -> None:
        """Remove the hooks (:meth:`remove_hooks`); idempotent. ``state_dict()`` still works."""
        self.remove_hooks()

    def __enter__(self):
        """``with KPSVD(model) as precond:`` — the hooks are removed when the block ends."""
        return self

    def __exit__(self, *exc) -> None:
        """Remove the hooks (also when the block raised; the exception propagates)."""
        self.close()

    def _check_hooks(self, what: str) -> None:
        if self._hooks_removed:
            raise RuntimeError(
                f"{what} after remove_hooks(): this preconditioner no longer records curvature;"
                " build a new preconditioner (or load its state_dict into a new one) to go on"
            )
