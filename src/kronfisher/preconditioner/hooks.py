"""How a preconditioner hooks into a model without the model holding on to it.

Two kinds of hooks, both calling the preconditioner through a weak reference:

- one *global* module forward hook (``torch.nn.modules.module.register_module_forward_hook``)
  that ignores every module the preconditioner did not register. Nothing is added to the
  modules themselves, so ``torch.save(model)``, ``pickle`` and ``copy.deepcopy(model)`` see
  a model without any preconditioner: the file does not reference kronfisher, and a copy's
  modules are simply not registered;
- a post-accumulate-grad hook on each registered parameter (it tells which gradients a
  backward produced since the last ``step()``). Tensor hooks are never serialised or
  copied by torch (``Parameter.__reduce_ex__`` and ``__deepcopy__`` drop them).

A preconditioner that is no longer referenced is freed (the hooks do not keep it alive)
and its hooks are removed by a ``weakref.finalize``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["WeakHook", "ModelHooks", "inside_backward"]


class WeakHook:
    """A hook that calls a bound method of an object it holds weakly (no-op once it is gone).

    Marked ``__torch_unserializable__`` so that torch does not warn about it when a tensor
    carrying it is saved (torch drops tensor hooks on save anyway).
    """

    __torch_unserializable__ = True

    def __init__(self, method: Callable) -> None:
        self._method = weakref.WeakMethod(method)

    def __call__(self, *args):
        """Call the method with ``args`` if its object is alive; else do nothing (None)."""
        method = self._method()
        return None if method is None else method(*args)

    @property
    def target(self) -> object | None:
        """The object whose method this hook calls (None once it is gone)."""
        method = self._method()
        return None if method is None else getattr(method, "__self__", None)

    def __reduce__(self):
        raise TypeError("a kronfisher preconditioner's hook cannot be pickled; save the model's"
                        " and the preconditioner's state_dict() instead")


def _remove(handles: list[RemovableHandle]) -> None:
    for h in handles:
        h.remove()
    handles.clear()


class ModelHooks:
    """The hooks of one preconditioner: attached at construction, removed by :meth:`remove`.

    Args:
        owner: the preconditioner (held weakly).
        forward: its bound method ``(module, inputs, output)`` called for every module's
            forward; it must ignore modules it did not register.
        accumulated: its bound method ``(param)`` called after a backward accumulated a
            gradient into ``param.grad``.
        params: the registered parameters (those that do not require a gradient are
            skipped: torch refuses hooks on them, and they never get a gradient).
        forward_pre: its bound method ``(module, inputs)`` called before every module's
            forward (optional).
    """

    def __init__(self, owner: object, forward: Callable, accumulated: Callable,
                 params: Iterable[Tensor], forward_pre: Callable | None = None) -> None:
        self._handles: list[RemovableHandle] = [
            nn.modules.module.register_module_forward_hook(WeakHook(forward))]
        if forward_pre is not None:
            self._handles.append(
                nn.modules.module.register_module_forward_pre_hook(WeakHook(forward_pre)))
        hook = WeakHook(accumulated)
        for p in params:
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(hook))
        self._finalizer = weakref.finalize(owner, _remove, self._handles)

    def remove(self) -> None:
        """Detach every hook now (idempotent)."""
        self._finalizer()

    @property
    def attached(self) -> bool:
        """Whether the hooks are still attached."""
        return self._finalizer.alive


def inside_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread.

    A module forward during a backward is a recomputation (activation checkpointing):
    with ``use_reentrant=False`` its outputs never receive a gradient.
    """
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1
