"""Which layers of a model a preconditioner registers, and why the others are skipped.

Everything is decided here, when the preconditioner is built: a layer is registered whole,
registered for its trainable part (a frozen bias: :mod:`.frozen`), or its trainable
parameters are listed in ``skipped`` with the reason. Nothing is half handled silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from ..layers import ADAPTERS, UnsupportedLayerError, adapter_for
from .frozen import trainable_adapter
from .layer_state import LayerState

__all__ = ["Registration", "register_layers", "SkipLayers", "SKIPPED_BY_USER",
           "NON_LEAF_REASON"]

SKIPPED_BY_USER = "skipped by skip_layers"
NON_LEAF_REASON = ("its weight or bias is not a leaf nn.Parameter but computed from other"
                   " parameters (e.g. torch.nn.utils.weight_norm / spectral_norm): the"
                   " Fisher block of the computed weight is not the one of the parameters"
                   " the optimizer trains")


@dataclass
class Registration:
    """The outcome of :func:`register_layers`.

    Attributes:
        layers: one state per registered layer, by module name (``named_modules`` order).
        skipped: full names of the trainable parameters left untouched.
        skip_reasons: for each skipped parameter, why its module was not registered.
    """

    layers: dict[str, LayerState] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    skip_reasons: dict[str, str] = field(default_factory=dict)

    def skip(self, name: str, params: list[tuple[str, nn.Parameter]], reason: str) -> None:
        """Record module ``name``'s own ``(param name, param)`` pairs as skipped for ``reason``."""
        for pname, _ in params:
            full = f"{name}.{pname}" if name else pname
            self.skipped.append(full)
            self.skip_reasons[full] = reason


@dataclass
class SkipLayers:
    """The modules a user asked to leave out (``skip_layers``), checked against the model.

    Attributes:
        names: module names (as in ``model.named_modules()``); a name also covers the
            modules below it.
        types: module classes; a module is covered if it is an instance of one.
    """

    names: tuple[str, ...] = ()
    types: tuple[type, ...] = ()

    @classmethod
    def checked(cls, model: nn.Module, skip: Iterable[str | type] | None) -> SkipLayers:
        """``skip`` (None, or names and ``nn.Module`` subclasses) checked against ``model``.

        Raises:
            TypeError: an entry that is neither a string nor an ``nn.Module`` subclass (or
                ``skip`` is a single string instead of a list of them).
            ValueError: a name that is no module of ``model`` (the message lists them).
        """
        if skip is None:
            return cls()
        if isinstance(skip, str | type):
            raise TypeError(f"skip_layers must be a list of module names or types, got"
                            f" {skip!r} (write [{skip!r}])")
        names, types = [], []
        for item in skip:
            if isinstance(item, str):
                names.append(item)
            elif isinstance(item, type) and issubclass(item, nn.Module):
                types.append(item)
            else:
                raise TypeError(f"skip_layers entries must be module names (str) or"
                                f" nn.Module subclasses, got {item!r}")
        known = {n for n, _ in model.named_modules()}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"skip_layers names {unknown} are not modules of the model (its"
                             f" module names: {sorted(known - {''})}; a parameter name such"
                             " as 'fc.bias' is not a module name)")
        return cls(tuple(names), tuple(types))

    def covers(self, name: str, module: nn.Module) -> bool:
        """Whether the module ``name`` is left out."""
        if self.types and isinstance(module, self.types):
            return True
        return any(name == n or name.startswith(n + ".") or n == "" for n in self.names)


def _non_leaf(module: nn.Module, adapter) -> bool:
    return any(not isinstance(p, nn.Parameter) for p in adapter.params(module))


def register_layers(model: nn.Module, skip: SkipLayers | None = None) -> Registration:
    """Register every module whose exact type has an adapter in a supported configuration.

    Every other module with trainable parameters of its own is skipped, with the reason:
    covered by ``skip`` ("skipped by skip_layers"), unsupported configuration, a weight
    computed from other parameters, a frozen weight with a trainable bias, unsupported
    type, or a subclass of a supported type. A supported layer with a frozen bias is
    registered for its weight only (:mod:`.frozen`); a fully frozen one is not registered.
    """
    skip = skip or SkipLayers()
    reg = Registration()
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if skip.covers(name, module):
            reg.skip(name, own, SKIPPED_BY_USER)
        elif type(module) in ADAPTERS:
            try:
                adapter = adapter_for(module)
            except UnsupportedLayerError as e:
                reg.skip(name, own, str(e))
                continue
            if _non_leaf(module, adapter):
                reg.skip(name, own, NON_LEAF_REASON)
                continue
            part, why = trainable_adapter(module, adapter)
            if part is not None:
                reg.layers[name] = LayerState(name, module, part)
            elif why is not None:
                reg.skip(name, own, why)
        elif own:
            why = f"{type(module).__name__} is not a supported layer type"
            if isinstance(module, tuple(ADAPTERS)):
                why += " (subclasses of supported layers are not assumed to behave alike)"
            reg.skip(name, own, why)
    return reg
