"""The preconditioner's state_dict: packing per layer, and checks of a state before loading.

:class:`StateDictMixin` gives :class:`~kronfisher.preconditioner.Preconditioner` its
``state_dict`` / ``load_state_dict`` methods; a subclass supplies the hooks ``_pack``,
``_unpack``, ``_factorize`` and optionally ``_extra_state`` / ``_load_extra_state``.
"""

from __future__ import annotations

from ._checks import check_curvature_shape, curvature_finite, grad_matrix_shape
from .layer_state import LayerState
from .written import WrittenGrads

__all__ = ["StateDictMixin", "HYPER"]

# the hyper-parameters a state_dict carries (attribute names of the preconditioner)
HYPER = ("damping", "ema_decay", "cov_update_freq", "inv_update_freq", "kl_clip",
         "kl_clip_mode", "lr", "ema_counter")


class StateDictMixin:
    """``state_dict`` / ``load_state_dict`` over the attributes declared below."""

    _HYPER = HYPER
    layers: dict[str, LayerState]
    steps: int
    skipped_steps: int
    _written: WrittenGrads

    def state_dict(self) -> dict:
        """Everything needed for a resumed run to produce the same preconditioned gradients."""
        layers = {}
        for name, s in self.layers.items():
            layers[name] = {
                "updates": s.updates,
                "curvature": self._pack(s.curvature),
                "inverse_source": None
                if s.inverse_source is s.curvature
                else self._pack(s.inverse_source),
                "inverse_is_curvature": s.inverse_source is s.curvature,
                "inverse_damping": s.inverse_damping,
            }
        return {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "hyper": {k: getattr(self, k) for k in self._HYPER},
            "layers": layers,
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            ValueError: other layer names, or a layer whose saved curvature does not fit
                this model's layer or is not finite (checked for every layer before
                anything is changed).
        """
        self._check_loadable(state)
        for k, v in state["hyper"].items():
            setattr(self, k, v)
        self.steps = state["steps"]
        self.skipped_steps = state.get("skipped_steps", 0)
        for name, d in state["layers"].items():
            s = self.layers[name]
            s.updates = d["updates"]
            s.curvature = self._unpack(d["curvature"])
            s.inverse_source = (
                s.curvature if d["inverse_is_curvature"] else self._unpack(d["inverse_source"])
            )
            s.inverse, s.inverse_damping = None, None
            if s.inverse_source is not None and d["inverse_damping"] is not None:
                self._factorize(s, s.inverse_source, d["inverse_damping"])
        self._load_extra_state(state.get("extra", {}))
        self._written.clear()

    def _check_loadable(self, state: dict) -> None:
        """Raise ValueError unless every layer of ``state`` fits this model and is finite."""
        names = set(state["layers"])
        if names != set(self.layers):
            raise ValueError(
                f"state_dict layers {sorted(names)} do not match this model's {sorted(self.layers)}"
            )
        for name, d in state["layers"].items():
            s = self.layers[name]
            d_g, d_a = grad_matrix_shape(s)
            for key in ("curvature", "inverse_source"):
                if d.get(key) is None:
                    continue
                c = self._unpack(d[key])
                if key == "curvature":  # ExactNG's full-Fisher inverse source spans all layers
                    check_curvature_shape(name, c, d_g, d_a)
                if not curvature_finite(c):
                    raise ValueError(f"state_dict layer {name!r}: the saved {key} has NaN or"
                                     " Inf entries (saved from a diverged run?)")

    def _pack(self, curvature):
        raise NotImplementedError

    def _unpack(self, packed):
        raise NotImplementedError

    def _factorize(self, state: LayerState, source, damping: float) -> None:
        raise NotImplementedError

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass
