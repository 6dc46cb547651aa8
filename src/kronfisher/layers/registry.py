"""Which adapter a module gets: module type → adapter class, overridable per preconditioner.

After kfac-jax's tag registry: a default map :data:`ADAPTERS`, extended globally with
:func:`register_adapter`, and a preconditioner's ``adapters={type: adapter}`` that wins over
it for that preconditioner only (nothing global changes). :func:`resolve` looks up the
module's exact type first, then its base classes in method-resolution order: a subclass
of a supported layer gets the parent's adapter only when it does not override ``forward``
(``type(m).forward is nn.Linear.forward``), since the adapter reads the parent's inputs
and outputs; otherwise it is skipped with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from .base import LayerAdapter, UnsupportedLayerError
from .conv2d import Conv2dAdapter
from .embedding import EmbeddingAdapter
from .linear import LinearAdapter
from .scale_shift import SCALE_SHIFT_TYPES, ScaleShiftAdapter

__all__ = ["ADAPTERS", "AdapterChoice", "register_adapter", "check_adapters", "resolve",
           "adapter_for"]

ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {
    nn.Linear: LinearAdapter, nn.Conv2d: Conv2dAdapter, nn.Embedding: EmbeddingAdapter,
    **{t: ScaleShiftAdapter for t in SCALE_SHIFT_TYPES}}
"""The global map: module type → adapter class (see :func:`register_adapter`)."""


def _check_pair(module_type: object, adapter: object, where: str) -> None:
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"{where}: the module type must be an nn.Module subclass, got"
                        f" {module_type!r}")
    if not (isinstance(adapter, type) and issubclass(adapter, LayerAdapter)):
        raise TypeError(f"{where}: the adapter for {module_type.__name__} must be a"
                        f" LayerAdapter subclass, got {adapter!r}")
    if not isinstance(adapter.kind, str) or not adapter.kind:
        raise ValueError(f"{where}: adapter {adapter.__name__} declares no kind (set the class"
                         " attribute `kind`; the curvature block is chosen by it)")


def register_adapter(module_type: type[nn.Module], adapter: type[LayerAdapter], *,
                     replace: bool = False) -> None:
    """Make ``adapter`` the adapter of ``module_type`` for every preconditioner built later.

    The layer's curvature block is chosen by ``adapter.kind`` and the method
    (``kronfisher.curvature.register_block`` for a new kind). To change one preconditioner
    only, pass ``adapters={module_type: adapter}`` to it instead.

    Args:
        module_type: an ``nn.Module`` subclass (subclasses of it that keep its ``forward``
            get the adapter too).
        adapter: a :class:`LayerAdapter` subclass with a non-empty ``kind``.
        replace: allow replacing an adapter already registered for ``module_type``.

    Raises:
        TypeError: not a module type / not an adapter class.
        ValueError: the adapter declares no kind, or ``module_type`` already has another
            adapter and ``replace`` is False.
    """
    _check_pair(module_type, adapter, "register_adapter")
    old = ADAPTERS.get(module_type)
    if old is not None and old is not adapter and not replace:
        raise ValueError(f"register_adapter: {module_type.__name__} already has the adapter"
                         f" {old.__name__}; pass replace=True to replace it")
    ADAPTERS[module_type] = adapter


def check_adapters(overrides: Mapping[type[nn.Module], type[LayerAdapter]] | None
                   ) -> dict[type[nn.Module], type[LayerAdapter]]:
    """A preconditioner's ``adapters=`` argument, checked (a new dict; None gives {}).

    Raises:
        TypeError: not a mapping of module types to adapter classes.
        ValueError: an adapter without a kind.
    """
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"adapters must be a mapping (module type → adapter class), got"
                        f" {type(overrides).__name__}")
    for module_type, adapter in overrides.items():
        _check_pair(module_type, adapter, "adapters")
    return dict(overrides)


@dataclass(frozen=True)
class AdapterChoice:
    """The outcome of :func:`resolve` for one module.

    Attributes:
        adapter: the adapter class, or None when the module is not supported.
        matched: the type whose entry was used (the module's own type or a base class).
        reason: why there is no adapter (None when there is one, or when no entry matched
            at all: an unsupported type).
    """

    adapter: type[LayerAdapter] | None
    matched: type | None = None
    reason: str | None = None


def resolve(module: nn.Module,
            overrides: Mapping[type[nn.Module], type[LayerAdapter]] | None = None
            ) -> AdapterChoice:
    """The adapter class of ``module``: exact type, then base classes keeping ``forward``.

    ``overrides`` (a preconditioner's ``adapters=``) win over :data:`ADAPTERS`.
    """
    table = {**ADAPTERS, **(overrides or {})}
    cls = type(module)
    if cls in table:
        return AdapterChoice(table[cls], cls)
    for base in cls.__mro__[1:]:
        if base in table:
            if getattr(cls, "forward", None) is getattr(base, "forward", None):
                return AdapterChoice(table[base], base)
            return AdapterChoice(None, base, (
                f"{cls.__name__} is a subclass of {base.__name__} that overrides forward, so"
                f" {table[base].__name__} cannot assume its inputs and outputs are"
                f" {base.__name__}'s; register an adapter for {cls.__name__}"
                " (kronfisher.register_adapter or adapters={...})"))
    return AdapterChoice(None)


def adapter_for(module: nn.Module,
                overrides: Mapping[type[nn.Module], type[LayerAdapter]] | None = None
                ) -> LayerAdapter:
    """The adapter of ``module`` (a new instance bound to it), per :func:`resolve`.

    Raises:
        UnsupportedLayerError: no adapter for the module, or an unsupported configuration.
    """
    choice = resolve(module, overrides)
    if choice.adapter is None:
        raise UnsupportedLayerError(choice.reason or f"no adapter for {type(module).__name__}")
    return choice.adapter(module)
