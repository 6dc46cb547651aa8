"""A preconditioner refuses to be pickled or copied, and says what to do instead.

It is bound to the modules of its model (hooks, per-layer state): a pickled or deep-copied
one would be bound to a *copy* of the model, not to the model being trained, and a shallow
copy would share the per-layer state with the original. ``state_dict()`` and
``load_state_dict()`` give an exact resume instead (docs/reliability.md, class 8).
"""

from __future__ import annotations

__all__ = ["UncopyableMixin"]


class UncopyableMixin:
    """``pickle``, ``copy.copy``, ``copy.deepcopy`` and ``torch.save`` raise a TypeError."""

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled or copied: it is bound to the modules"
            " of its model (hooks, per-layer state). Save `precond.state_dict()` (with"
            " torch.save) and restore it into a new preconditioner built on the model with"
            " `load_state_dict()`"
        )

    def __deepcopy__(self, memo):
        self.__reduce_ex__(4)

    def __copy__(self):
        self.__reduce_ex__(4)
