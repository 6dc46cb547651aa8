"""The preconditioner's state_dict: packing per layer, and a load that checks everything first.

:class:`StateDictMixin` gives :class:`~kronfisher.preconditioner.Preconditioner` its
``state_dict`` / ``load_state_dict`` methods; a subclass supplies the hooks ``_pack``,
``_finite``, ``_factorize``, ``_check_packed``, ``_check_extra_state`` and optionally
``_extra_state`` / ``_load_extra_state`` / ``_factorize_loaded``.

``load_state_dict`` validates the whole state — kind of preconditioner and its settings
(method, ExactNG mode, rank, conv radius, damping scheme), hyper-parameters (the
constructor's checks), step counts, every layer's curvature (kind, terms, shapes,
finiteness) — and factorises the saved inverses before it changes anything, so a refused
state leaves the preconditioner exactly as it was. Saved tensors are cast to each layer's
curvature dtype and device (its module's, float32 for half-precision modules).

Format version: ``state["version"]`` is :data:`STATE_VERSION` (1). A state without the
key (written before it existed) has the same layout and is read as version 1; a newer
version is refused with a clear ``ValueError`` (it may hold what this code cannot read).
Hyper-parameters given as callables (``damping``, ``lr``) or an optimizer (``lr``) are
code, not state: they are left out of ``"hyper"``, and a preconditioner built with one
keeps it when it loads a state (the restored :attr:`steps` puts the schedule where it was).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._checks import as_int, check_damping, checked_options
from .layer_state import Factorization, LayerState
from .written import WrittenGrads

__all__ = ["StateDictMixin", "HYPER", "STATE_VERSION", "state_kind"]

STATE_VERSION = 1
"""The state_dict format this code writes (and the newest it reads)."""

# the hyper-parameters a state_dict carries (attribute names of the preconditioner)
HYPER = ("damping", "ema_decay", "cov_update_freq", "inv_update_freq", "kl_clip",
         "kl_clip_mode", "lr", "ema_counter")
_KEYS = ("steps", "hyper", "layers", "extra")
_LAYER_KEYS = ("updates", "curvature", "inverse_source", "inverse_is_curvature",
               "inverse_damping")


def state_kind(extra: dict) -> str | None:
    """"kronecker" or "exact": which family wrote a state (None if it cannot be told)."""
    kind = extra.get("kind")
    if kind is None:  # written before "kind" existed
        kind = "kronecker" if "method" in extra else "exact" if "block_diagonal" in extra else None
    return kind if kind in ("kronecker", "exact") else None


@dataclass
class LayerLoad:
    """One layer's checked state, ready to be installed."""

    updates: int
    curvature: Any
    inverse_source: Any
    inverse: Factorization | None
    inverse_damping: float | None


@dataclass
class LoadPlan:
    """A checked state_dict, ready to be installed (see ``load_state_dict``)."""

    hyper: dict[str, object]
    steps: int
    skipped_steps: int
    layers: dict[str, LayerLoad]
    extra: dict


class StateDictMixin:
    """``state_dict`` / ``load_state_dict`` over the attributes declared below."""

    _HYPER = HYPER
    layers: dict[str, LayerState]
    steps: int
    skipped_steps: int
    nonfinite: str
    _written: WrittenGrads

    def _scheduled_hyper(self) -> set[str]:
        """Hyper-parameters given as callables or an optimizer (left out of the state)."""
        return set()

    def state_dict(self) -> dict:
        """Everything needed for a resumed run to produce the same preconditioned gradients.

        Plain Python values and tensors only (``torch.load(..., weights_only=True)`` reads it):
        ``version`` (:data:`STATE_VERSION`), step counts, the hyper-parameters given as
        numbers, per-layer curvature and inverse source, and under ``extra`` the method's
        configuration (Kronecker: method, solver, rank, conv_radius, damping_scheme).
        """
        layers = {}
        for name, s in self.layers.items():
            layers[name] = {
                "updates": s.updates,
                "curvature": self._pack(s, s.curvature),
                "inverse_source": None
                if s.inverse_source is s.curvature
                else self._pack(s, s.inverse_source),
                "inverse_is_curvature": s.inverse_source is s.curvature,
                "inverse_damping": s.inverse_damping,
            }
        sched = self._scheduled_hyper()
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "hyper": {k: getattr(self, k) for k in self._HYPER if k not in sched},
            "layers": layers,
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (validated in full before anything changes).

        Raises:
            ValueError: the state is not a state_dict of this kind of preconditioner with
                these settings (another method, ExactNG mode, rank or conv radius), is of a
                newer format version than :data:`STATE_VERSION`, has
                missing entries, hyper-parameters the constructor would refuse, other layer
                names, or a layer whose saved curvature does not fit this model's layer or
                is not finite. The preconditioner is unchanged then.
        """
        plan = self._plan_load(state)
        for k, v in plan.hyper.items():
            setattr(self, k, v)
        self.steps, self.skipped_steps = plan.steps, plan.skipped_steps
        for name, ld in plan.layers.items():
            s = self.layers[name]
            s.updates, s.inverse_damping = ld.updates, ld.inverse_damping
            s.curvature, s.inverse_source, s.inverse = ld.curvature, ld.inverse_source, ld.inverse
            s.captures = []
        self._load_extra_state(plan.extra)
        self._written.clear()

    def _plan_load(self, state) -> LoadPlan:
        if not isinstance(state, dict):
            raise ValueError(f"state_dict must be the dict state_dict() returns, got"
                             f" {type(state).__name__}")
        missing = [k for k in _KEYS if k not in state]
        if missing:
            raise ValueError(f"state_dict is missing {missing} (not a kronfisher preconditioner"
                             " state_dict?)")
        version = as_int("state_dict 'version'", state.get("version", 1))
        if version > STATE_VERSION:
            raise ValueError(f"state_dict is of format version {version}, newer than this"
                             f" kronfisher reads ({STATE_VERSION}): load it with the kronfisher"
                             " version that wrote it, or a newer one")
        if not isinstance(state["extra"], dict):
            raise ValueError("state_dict 'extra' must be a dict")
        extra = self._check_extra_state(state["extra"])
        hyper = self._checked_hyper(state["hyper"])
        steps = as_int("state_dict 'steps'", state["steps"], 0)
        skipped = as_int("state_dict 'skipped_steps'", state.get("skipped_steps", 0), 0)
        saved = state["layers"]
        if not isinstance(saved, dict) or set(saved) != set(self.layers):
            names = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(
                f"state_dict layers {names} do not match this model's {sorted(self.layers)}")
        layers = {name: self._check_layer(self.layers[name], saved[name], extra)
                  for name in self.layers}
        return LoadPlan(hyper, steps, skipped, layers, extra)

    def _checked_hyper(self, hyper) -> dict[str, object]:
        if not isinstance(hyper, dict):
            raise ValueError(f"state_dict 'hyper' must be a dict, got {type(hyper).__name__}")
        unknown = sorted(set(hyper) - set(self._HYPER))
        if unknown:
            raise ValueError(f"state_dict 'hyper' has unknown entries {unknown}")
        sched = self._scheduled_hyper()  # kept as they are; a saved value is only checked
        merged = {k: getattr(self, k) for k in self._HYPER if k not in sched} | hyper
        merged.setdefault("damping", 0.0)  # stand-ins where this preconditioner has a schedule
        if "lr" in sched and merged.get("lr") is None:
            merged["lr"] = 1.0
        try:
            out: dict[str, object] = {"damping": check_damping(merged["damping"])}
            out |= checked_options(**{k: merged[k] for k in self._HYPER if k != "damping"},
                                   nonfinite=self.nonfinite)
        except ValueError as e:
            raise ValueError(f"state_dict hyper-parameters: {e}") from e
        return {k: out[k] for k in self._HYPER if k not in sched}

    def _check_layer(self, s: LayerState, d, extra: dict) -> LayerLoad:
        where = f"state_dict layer {s.name!r}"
        if not isinstance(d, dict) or any(k not in d for k in _LAYER_KEYS):
            raise ValueError(f"{where} must be a dict with {list(_LAYER_KEYS)}")
        if not isinstance(d["inverse_is_curvature"], bool):
            raise ValueError(f"{where}: 'inverse_is_curvature' must be True or False")
        loaded: dict[str, Any] = {}
        for key in ("curvature", "inverse_source"):
            if d[key] is None:
                loaded[key] = None
                continue
            c = self._check_packed(s, key, d[key])
            if not self._finite(s, c):
                raise ValueError(f"{where}: the saved {key} has NaN or Inf entries (saved from a"
                                 " diverged run?)")
            loaded[key] = c
        source = loaded["curvature"] if d["inverse_is_curvature"] else loaded["inverse_source"]
        damping = None if d["inverse_damping"] is None else check_damping(d["inverse_damping"])
        scratch = LayerState(s.name, s.module, s.adapter, s.block)
        if source is not None and damping is not None:
            self._factorize_loaded(scratch, source, damping, extra)
        return LayerLoad(as_int(f"{where} 'updates'", d["updates"], 0), loaded["curvature"],
                         source, scratch.inverse, scratch.inverse_damping)

    # ---------------------------------------------------------- subclass hooks
    def _pack(self, state: LayerState, curvature):
        """``state``'s curvature as plain values and tensors (copies; None stays None)."""
        raise NotImplementedError

    def _finite(self, state: LayerState, curvature) -> bool:
        raise NotImplementedError

    def _check_packed(self, state: LayerState, key: str, packed):
        """The unpacked curvature, checked to fit ``state``'s layer and cast to its dtype.

        Raises:
            ValueError: naming the layer, ``key`` and what does not fit.
        """
        raise NotImplementedError

    def _factorize(self, state: LayerState, source, damping: float) -> None:
        raise NotImplementedError

    def _factorize_loaded(self, state: LayerState, source, damping: float, extra: dict) -> None:
        """Factorise a loaded inverse source into the scratch ``state`` (with ``extra``)."""
        self._factorize(state, source, damping)

    def _extra_state(self) -> dict:
        return {}

    def _check_extra_state(self, extra: dict) -> dict:
        """The checked subclass part of a state (what :meth:`_load_extra_state` installs).

        Raises:
            ValueError: it is another kind of preconditioner's, or has other settings.
        """
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass
