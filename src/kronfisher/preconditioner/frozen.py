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

from torch import Tensor

from ..layers import LayerAdapter, UnsupportedLayerError
from .layer_state import LayerState

__all__ = ["trainable_adapter", "frozen_changed", "BIAS_ONLY_REASON"]

BIAS_ONLY_REASON = ("its module's weight is frozen (requires_grad=False) and a bias-only"
                    " block is not implemented: the bias keeps its raw gradient")


def trainable_adapter(adapter: LayerAdapter) -> tuple[LayerAdapter | None, str | None]:
    """The adapter for its module's trainable part, or None and the reason it is skipped.

    Args:
        adapter: the module's adapter (built for the whole [W b] layout).

    Returns:
        (adapter, None) to register the layer (switched to the weight-only block,
        :meth:`~kronfisher.layers.LayerAdapter.without_bias`, when only the bias is
        frozen); (None, reason) to skip its trainable parameters with that reason;
        (None, None) when nothing is trainable.
    """
    w = adapter.params()[0]
    b = adapter.bias
    if w.requires_grad:
        if isinstance(b, Tensor) and not b.requires_grad:
            try:
                return adapter.without_bias(), None
            except UnsupportedLayerError as e:
                return None, f"its bias is frozen (requires_grad=False): {e}"
        return adapter, None
    if isinstance(b, Tensor) and b.requires_grad:
        return None, BIAS_ONLY_REASON
    return None, None


def frozen_changed(state: LayerState) -> list[str]:
    """Names of the layer's weight/bias whose ``requires_grad`` changed since registration.

    The layer preconditions ``state.adapter.params()``; every other one of its
    weight and bias was frozen then. Empty when nothing changed, and when neither has a
    ``.grad`` (a layer frozen whole since, with its gradients cleared, is simply left out).
    """
    used = {id(p) for p in state.adapter.params()}
    pairs = [(n, p) for n in ("weight", "bias")
             if isinstance(p := getattr(state.module, n, None), Tensor)]
    if all(p.grad is None for _, p in pairs):
        return []
    return [f"{state.name}.{n}" if state.name else n for n, p in pairs
            if p.requires_grad != (id(p) in used)]
