"""Which layers of a model a preconditioner registers, and why the others are skipped."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..layers import ADAPTERS, UnsupportedLayerError, adapter_for
from .layer_state import LayerState

__all__ = ["Registration", "register_layers", "refuse_shared_parameters"]


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


def register_layers(model: nn.Module) -> Registration:
    """Register every module whose exact type has an adapter in a supported configuration.

    Every other module with trainable parameters of its own is skipped, with the reason
    (unsupported configuration, unsupported type, or a subclass of a supported type).
    """
    reg = Registration()
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if type(module) in ADAPTERS:
            try:
                adapter = adapter_for(module)  # one adapter object per registered module
            except UnsupportedLayerError as e:
                reg.skip(name, own, str(e))
                continue
            reg.layers[name] = LayerState(name, module, adapter)
        elif own:
            why = f"{type(module).__name__} is not a supported layer type"
            if isinstance(module, tuple(ADAPTERS)):
                why += " (subclasses of supported layers are not assumed to behave alike)"
            reg.skip(name, own, why)
    refuse_shared_parameters(model, reg)
    return reg


def refuse_shared_parameters(model: nn.Module, reg: Registration) -> None:
    """Raise if a registered layer's parameter is also held by another module.

    One Parameter in two modules (tied weights) has one ``.grad``, the sum of both uses'
    gradients: preconditioning it with one layer's curvature (or twice, once per layer,
    the second write overwriting the first) is not natural gradient of either.

    Raises:
        UnsupportedLayerError: naming the parameter's modules.
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    for s in reg.layers.values():
        for p in s.adapter.params():
            held = owners.get(id(p), [])
            if len(held) > 1:
                raise UnsupportedLayerError(
                    f"one Parameter is shared by modules {held} (tied weights): the"
                    " preconditioner cannot precondition a parameter that several modules"
                    " use with one layer's curvature; untie the weights or leave the"
                    " modules out of the model given to the preconditioner")
