"""Which layers of a model a preconditioner registers, and why the others are skipped."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from ..layers import LayerAdapter, UnsupportedLayerError, resolve
from .layer_state import LayerState

__all__ = ["Registration", "register_layers", "refuse_shared_parameters", "MHA_REASON"]


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


MHA_REASON = (
    "nn.MultiheadAttention computes its projections inside F.multi_head_attention_forward"
    " from these parameters directly (not through submodule forwards), so no hook sees the"
    " projections' inputs and output gradients; not preconditioned")


def _mha_submodule_reason(owner: str, sub: str) -> str:
    return (f"{sub!r} of nn.MultiheadAttention {owner!r}: its weight and bias are passed to"
            " F.multi_head_attention_forward and its own forward is never called, so no"
            " statistics would reach it; not preconditioned")


def register_layers(model: nn.Module,
                    adapters: Mapping[type[nn.Module], type[LayerAdapter]] | None = None
                    ) -> Registration:
    """Register every module that has an adapter (:func:`~kronfisher.layers.resolve`).

    Args:
        model: the network.
        adapters: per-preconditioner overrides, module type → adapter class (they win over
            the global :data:`~kronfisher.layers.ADAPTERS`).

    Every other module with trainable parameters of its own is skipped, with the reason
    (unsupported configuration, unsupported type, a subclass that overrides a supported
    type's forward, or a part of an ``nn.MultiheadAttention``, whose projections never
    run through module forwards).
    """
    reg = Registration()
    inside_mha: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for sub_name, sub in module.named_modules():
                if sub is not module:
                    inside_mha[id(sub)] = _mha_submodule_reason(
                        name, f"{name}.{sub_name}" if name else sub_name)
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if id(module) in inside_mha:
            reg.skip(name, own, inside_mha[id(module)])
            continue
        choice = resolve(module, adapters)
        if choice.adapter is not None:
            try:
                adapter = choice.adapter(module)  # one adapter object per registered module
            except UnsupportedLayerError as e:
                reg.skip(name, own, str(e))
                continue
            reg.layers[name] = LayerState(name, module, adapter)
        elif own:
            why = choice.reason
            if why is None and isinstance(module, nn.MultiheadAttention):
                why = MHA_REASON
            reg.skip(name, own, why or f"{type(module).__name__} is not a supported layer type")
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
