"""Which layers of a model a preconditioner registers, and why the others are skipped.

Everything is decided here, when the preconditioner is built: a layer is registered whole,
registered for its trainable part (a frozen bias: :mod:`.frozen`), or its trainable
parameters are listed in ``skipped`` with the reason. Nothing is half handled silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..layers import LayerAdapter, UnsupportedLayerError, resolve
from .frozen import trainable_adapter
from .layer_state import LayerState

__all__ = ["Registration", "register_layers", "refuse_shared_parameters", "SkipLayers",
           "SKIPPED_BY_USER", "NON_LEAF_REASON", "MHA_REASON"]

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
    return any(not isinstance(p, nn.Parameter) for p in adapter.params())


MHA_REASON = (
    "nn.MultiheadAttention computes its projections inside F.multi_head_attention_forward"
    " from these parameters directly (not through submodule forwards), so no hook sees the"
    " projections' inputs and output gradients; not preconditioned")


def _mha_submodule_reason(owner: str, sub: str) -> str:
    return (f"{sub!r} of nn.MultiheadAttention {owner!r}: its weight and bias are passed to"
            " F.multi_head_attention_forward and its own forward is never called, so no"
            " statistics would reach it; not preconditioned")


def register_layers(model: nn.Module, skip: SkipLayers | None = None,
                    adapters: Mapping[type[nn.Module], type[LayerAdapter]] | None = None
                    ) -> Registration:
    """Register every module that has an adapter (:func:`~kronfisher.layers.resolve`).

    Args:
        model: the network.
        skip: the modules the user leaves out (``skip_layers``).
        adapters: per-preconditioner overrides, module type → adapter class (they win over
            the global :data:`~kronfisher.layers.ADAPTERS`).

    Every other module with trainable parameters of its own is skipped, with the reason:
    covered by ``skip`` ("skipped by skip_layers"), unsupported configuration, a weight
    computed from other parameters, a frozen weight with a trainable bias, unsupported
    type, a subclass that overrides a supported type's forward, or a part of an
    ``nn.MultiheadAttention``, whose projections never run through module forwards. A
    supported layer with a frozen bias is registered for its weight only (:mod:`.frozen`);
    a fully frozen one is not registered.
    """
    skip = skip or SkipLayers()
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
        if skip.covers(name, module):
            reg.skip(name, own, SKIPPED_BY_USER)
            continue
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
            if _non_leaf(module, adapter):
                reg.skip(name, own, NON_LEAF_REASON)
                continue
            part, why = trainable_adapter(adapter)
            if part is not None:
                reg.layers[name] = LayerState(name, module, part)
            elif why is not None:
                reg.skip(name, own, why)
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
