"""Layers with frozen parameters (``requires_grad=False``): what is preconditioned, and how.

Decided when the preconditioner is built, from each supported layer's weight and bias:

- both trainable: the layer's [W b] block, as always;
- bias frozen, weight trainable: the **weight-only block**: the layer is treated as if it
  had no bias, i.e. aᵢ = xᵢ without the trailing 1 (conv: the unfolded patches without the
  1). Its Fisher block F_WW = (1/m) Σᵢ vec(gᵢxᵢᵀ) vec(gᵢxᵢᵀ)ᵀ is the principal submatrix of
  the [W b] block on the weight's coordinates (not the Schur complement), and each method
  approximates F_WW (KFAC: A = E[x xᵀ] ⊗ G, the [W] corner of the [W b] A). No ``.grad`` is
  ever written to the bias;
- weight frozen, bias trainable: not registered; the bias is listed in ``skipped`` with
  the reason (it keeps its raw gradient);
- both frozen: nothing to precondition, not registered and not listed (``skipped`` lists
  trainable parameters).

Freezing or unfreezing a registered layer's weight or bias after construction changes which
block is right: ``step()`` then raises (:func:`frozen_changed`) instead of writing a
``.grad`` to a frozen parameter or leaving a trainable one half handled.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..layers import LayerAdapter
from .layer_state import LayerState

__all__ = ["weight_only", "trainable_adapter", "frozen_changed", "BIAS_ONLY_REASON"]

BIAS_ONLY_REASON = ("its module's weight is frozen (requires_grad=False) and a bias-only"
                    " block is not implemented: the bias keeps its raw gradient")

_WEIGHT_ONLY: dict[type[LayerAdapter], type[LayerAdapter]] = {}


def _w_inputs(adapter: type[LayerAdapter]):
    def inputs(module: nn.Module, x: Tensor) -> Tensor:
        return adapter.inputs(module, x)[..., :-1]  # drop the bias coordinate 1 (last)
    return staticmethod(inputs)


def _w(module: nn.Module) -> Tensor:
    w = module.weight
    if not isinstance(w, Tensor):  # registration checked it is a Parameter
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w


def _w_params(module: nn.Module) -> list[Tensor]:
    return [_w(module)]


def _w_grad_matrix(module: nn.Module) -> Tensor | None:
    w = _w(module)
    return None if w.grad is None else w.grad.reshape(w.shape[0], -1)


def _w_split(module: nn.Module, M: Tensor) -> list[Tensor]:
    return [M.reshape(_w(module).shape)]


def weight_only(adapter: type[LayerAdapter]) -> type[LayerAdapter]:
    """``adapter`` for a module whose bias is frozen: statistics and [W] without the bias.

    Its gradient matrix is the weight's (d_g, d_a − 1) and ``set_grad_matrix`` writes only
    ``weight.grad``.
    """
    out = _WEIGHT_ONLY.get(adapter)
    if out is None:
        out = type(f"WeightOnly{adapter.__name__}", (adapter,), {
            "__doc__": f"{adapter.__name__} with the bias frozen: the weight-only block.",
            "inputs": _w_inputs(adapter), "params": staticmethod(_w_params),
            "grad_matrix": staticmethod(_w_grad_matrix),
            "split_matrix": staticmethod(_w_split)})
        _WEIGHT_ONLY[adapter] = out
    return out


def trainable_adapter(module: nn.Module, adapter: type[LayerAdapter]
                      ) -> tuple[type[LayerAdapter] | None, str | None]:
    """The adapter for ``module``'s trainable part, or None and the reason it is skipped.

    Returns:
        (adapter, None) to register the layer (``weight_only(adapter)`` when only the bias
        is frozen); (None, reason) to skip its trainable parameters with that reason;
        (None, None) when nothing is trainable.
    """
    w = module.weight
    b = getattr(module, "bias", None)
    if w.requires_grad:
        if isinstance(b, Tensor) and not b.requires_grad:
            return weight_only(adapter), None
        return adapter, None
    if isinstance(b, Tensor) and b.requires_grad:
        return None, BIAS_ONLY_REASON
    return None, None


def frozen_changed(state: LayerState) -> list[str]:
    """Names of the layer's weight/bias whose ``requires_grad`` changed since registration.

    The layer preconditions ``state.adapter.params(module)``; every other one of its
    weight and bias was frozen then. Empty when nothing changed, and when neither has a
    ``.grad`` (a layer frozen whole since, with its gradients cleared, is simply left out).
    """
    used = {id(p) for p in state.adapter.params(state.module)}
    pairs = [(n, p) for n in ("weight", "bias")
             if isinstance(p := getattr(state.module, n, None), Tensor)]
    if all(p.grad is None for _, p in pairs):
        return []
    return [f"{state.name}.{n}" if state.name else n for n, p in pairs
            if p.requires_grad != (id(p) in used)]
