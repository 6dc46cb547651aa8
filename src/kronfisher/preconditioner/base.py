"""The preconditioner: hooks, ``collect()`` and ``step()`` with schedules and damping.

It knows no specific curvature method: a subclass supplies three operations
(:meth:`Preconditioner._update_curvature`, :meth:`~Preconditioner._refresh_inverse`,
:meth:`~Preconditioner._precondition`); :class:`KroneckerPreconditioner` implements them
with a :class:`~kronfisher.curvature.KroneckerEstimator`.

Training-loop contract::

    with precond.collect():          # this forward/backward is the curvature batch
        loss = loss_fn(model(x), y)  # a mean over examples
        loss.backward()
    precond.step()                   # .grad of each registered layer ← preconditioned
    optimizer.step()

Guarantees (docs/reliability.md): :meth:`Preconditioner.step` checks the ``.grad`` of every
model parameter (registered or skipped) for NaN/Inf in one pass (one sum each) before it writes
anything; a curvature update whose statistics or resulting factors are not finite is
dropped for that layer (warning naming the layer) and the running average keeps its
previous value; calling ``step()`` again on gradients it already preconditioned, or using
the preconditioner after :meth:`~Preconditioner.remove_hooks`, raises ``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..layers import UnsupportedLayerError
from ..linalg import all_finite as _all_finite
from ._checks import KL_CLIP_MODES, check_damping, check_options, curvature_finite, nonfinite_names
from .kl_clip import kl_clip_factor
from .layer_state import Capture, LayerState
from .registration import register_layers
from .state import StateDictMixin
from .written import WrittenGrads

__all__ = ["Preconditioner", "LayerState", "NonFiniteError", "KL_CLIP_MODES"]


class NonFiniteError(FloatingPointError):
    """A gradient or statistic contained NaN or Inf (raised when ``nonfinite="raise"``)."""


class Preconditioner(StateDictMixin):
    """Base class of all natural-gradient preconditioners (see module docstring).

    Args:
        model: the network; every ``nn.Linear`` and ``nn.Conv2d`` (exact type, supported
            configuration) is registered, all other parameters are left untouched and
            listed in :attr:`skipped` with the reason in :attr:`skip_reasons`.
        damping: λ added to the curvature (see the method's damping scheme).
        ema_decay: running-average decay ρ; a curvature batch is folded in with decay
            min(1 − 1/k, ρ), k per ``ema_counter``. 0 uses only the latest batch.
        ema_counter: what k counts: "updates" (default): k-th curvature batch, so the
            first ~1/(1 − ρ) batches are averaged equally (Martens & Grosse's warm-up);
            "steps": the optimizer steps taken before this batch (the paper's code), so
            with ``cov_update_freq`` ≥ 1/(1 − ρ) every batch after the first gets ρ.
        cov_update_freq: :meth:`collect` records statistics on steps that are a multiple
            of this (others run hook-free); ``collect(force=True)`` always records.
        inv_update_freq: the damped curvature is refactorised every this many steps (and
            whenever the damping changes or no factorisation exists yet).
        kl_clip: if not None, scale all preconditioned gradients Δ (∇: the raw gradients)
            by ν, with ``kl_clip_mode``:
            "lr2" (default): ν = min(1, sqrt(kl_clip / (lr² Σ_layers ⟨Δ, ∇⟩))) (Ba et al.;
            kfac-pytorch's convention);
            "authors": ν = min(1, sqrt(kl_clip / Σ_layers |⟨Δ, ∇⟩|)) (the paper's code:
            no lr², absolute value per layer).
        kl_clip_mode: "lr2" or "authors" (see ``kl_clip``).
        lr: the optimizer's learning rate, needed by ``kl_clip`` in mode "lr2" only.
        nonfinite: "skip" (default): a NaN/Inf gradient of any model parameter (also the
            skipped ones) makes :meth:`step` warn, set every model parameter's ``.grad`` to
            None (so ``optimizer.step()`` changes nothing) and return False; NaN/Inf
            statistics, or curvature factors that overflow, skip that layer's curvature
            update with a warning naming it. "raise": raise :class:`NonFiniteError` instead
            (parameters and curvature untouched either way).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: float = 1e-3,
        ema_decay: float = 0.95,
        cov_update_freq: int = 1,
        inv_update_freq: int = 1,
        kl_clip: float | None = None,
        lr: float | None = None,
        nonfinite: str = "skip",
        kl_clip_mode: str = "lr2",
        ema_counter: str = "updates",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError("model must be a torch.nn.Module")
        check_options(ema_decay=ema_decay, cov_update_freq=cov_update_freq,
                      inv_update_freq=inv_update_freq, kl_clip=kl_clip,
                      kl_clip_mode=kl_clip_mode, lr=lr, nonfinite=nonfinite,
                      ema_counter=ema_counter)
        self.model = model
        self.damping = check_damping(damping)
        self.ema_decay = ema_decay
        self.ema_counter = ema_counter
        self.cov_update_freq = cov_update_freq
        self.inv_update_freq = inv_update_freq
        self.kl_clip = kl_clip
        self.kl_clip_mode = kl_clip_mode
        self.lr = lr
        self.nonfinite = nonfinite
        self.steps = 0
        self.skipped_steps = 0
        # wall-clock seconds spent in each phase of step(), accumulated (for benchmarks)
        self.timings = {"curvature": 0.0, "inverse": 0.0, "precondition": 0.0}
        reg = register_layers(model)
        self.layers: dict[str, LayerState] = reg.layers
        self.skipped: list[str] = reg.skipped
        self.skip_reasons: dict[str, str] = reg.skip_reasons
        if not self.layers:
            raise UnsupportedLayerError(
                "the model has no supported layer (nn.Linear, nn.Conv2d) to precondition"
            )
        self._by_module = {id(s.module): s for s in self.layers.values()}
        self._collecting = False
        self._reduction = "mean"
        self._hooks_removed = False
        # the .grad tensors the last step() wrote (to refuse preconditioning them twice)
        self._written = WrittenGrads()
        self._handles = [
            s.module.register_forward_hook(self._forward_hook) for s in self.layers.values()
        ]

    def remove_hooks(self) -> None:
        """Detach the forward hooks from the model; the preconditioner cannot be used after.

        Later :meth:`collect` and :meth:`step` calls raise ``RuntimeError`` (without hooks no
        curvature would be recorded and ``step()`` would keep using frozen curvature).
        """
        for h in self._handles:
            h.remove()
        self._handles = []
        self._hooks_removed = True

    def _check_hooks(self, what: str) -> None:
        if self._hooks_removed:
            raise RuntimeError(
                f"{what} after remove_hooks(): this preconditioner no longer records curvature;"
                " build a new preconditioner (or load its state_dict into a new one) to go on"
            )

    # ------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def collect(self, reduction: str = "mean", *, force: bool = False) -> Iterator[bool]:
        """Record the curvature batch from the forward and backward run inside.

        ``reduction`` says how the loss combines per-example losses: "mean" (captured
        output gradients are multiplied by the batch size) or "sum". Yields whether this
        step records (see ``cov_update_freq``).
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self._check_hooks("collect()")
        active = force or self.steps % self.cov_update_freq == 0
        if self._collecting:
            raise RuntimeError("collect() contexts cannot be nested")
        self._collecting, self._reduction = active, reduction
        try:
            yield active
        finally:
            self._collecting = False
            for s in self.layers.values():
                missing = [c for c in s.captures if c.g is None]
                if missing:
                    warnings.warn(
                        f"layer {s.name!r}: {len(missing)} forward pass(es) inside collect()"
                        " had no backward inside it; they are dropped from the curvature batch",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    s.captures = [c for c in s.captures if c.g is not None]

    @property
    def collecting(self) -> bool:
        """True inside :meth:`collect` while statistics are recorded."""
        return self._collecting

    def _forward_hook(self, module: nn.Module, inputs, output) -> None:
        if not self._collecting or not torch.is_grad_enabled() or not output.requires_grad:
            return
        state = self._by_module[id(module)]
        cap = Capture(a=state.adapter.inputs(module, inputs[0]))
        state.captures.append(cap)
        scale = float(inputs[0].shape[0]) if self._reduction == "mean" else 1.0

        def grad_hook(grad: Tensor) -> None:
            if self._collecting:
                cap.g = state.adapter.output_grads(module, grad) * scale
                cap.spatial = state.adapter.spatial_shape(module, grad)

        output.register_hook(grad_hook)

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> bool:
        """Update curvature/inverses as scheduled and precondition the layers' gradients.

        Returns True if the gradients were preconditioned, False if the step was skipped
        because of a non-finite gradient (see ``nonfinite``).

        Raises:
            RuntimeError: a registered layer's ``.grad`` is still the one the previous
                ``step()`` wrote (no backward in between: preconditioning it again would
                apply the curvature twice); no curvature yet; called after
                :meth:`remove_hooks`.
            NonFiniteError: with ``nonfinite="raise"``, a NaN/Inf gradient or statistic.
        """
        self._check_hooks("step()")
        self._check_fresh_grads()
        t0 = time.perf_counter()
        self._fold_in_captures()
        t1 = time.perf_counter()
        self.timings["curvature"] += t1 - t0
        bad = nonfinite_names(
            [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None])
        if bad:
            return self._reject(f"non-finite gradient in parameter(s) {bad}")
        grads = {}
        for s in self.layers.values():
            G = s.adapter.grad_matrix(s.module)
            if G is not None:
                grads[s.name] = G
        missing = [n for n in grads if self.layers[n].curvature is None]
        if missing:
            raise RuntimeError(
                f"no curvature for layer(s) {missing} yet: run a forward and backward inside"
                " `with precond.collect():` before the first step (a layer that is never"
                " called through its module's forward cannot be preconditioned)"
            )
        due = self.steps % self.inv_update_freq == 0
        t1 = time.perf_counter()
        for n in grads:
            s = self.layers[n]
            if s.inverse is None or due or s.inverse_damping != self.damping:
                self._refresh_inverse(s)
        t2 = time.perf_counter()
        self.timings["inverse"] += t2 - t1
        out = self._precondition({self.layers[n]: G for n, G in grads.items()})
        bad = nonfinite_names([(s.name, X) for s, X in out.items()])
        if bad:
            return self._reject(f"preconditioning produced non-finite values in {bad}")
        nu = self._kl_scale(out, grads)
        self._written.clear()
        for s, X in out.items():
            s.adapter.set_grad_matrix(s.module, X * nu if nu != 1.0 else X)
            for p in s.adapter.params(s.module):
                self._written.record(p)
        self.timings["precondition"] += time.perf_counter() - t2
        self.steps += 1
        return True

    def _check_fresh_grads(self) -> None:
        """Raise if a registered parameter's .grad is the unchanged tensor the last step wrote."""
        if not self._written:
            return
        stale = [s.name for s in self.layers.values()
                 if any(self._written.unchanged(p) for p in s.adapter.params(s.module))]
        if stale:
            raise RuntimeError(
                f"step() called again on gradients it already preconditioned (layer(s) {stale}"
                " have the .grad the previous step() wrote, unchanged): run a new backward"
                " (after optimizer.zero_grad()) before each step(); preconditioning them"
                " twice would apply the curvature twice"
            )

    def _reject(self, msg: str) -> bool:
        if self.nonfinite == "raise":
            raise NonFiniteError(msg)
        warnings.warn(f"{msg}: step skipped, all gradients cleared", RuntimeWarning,
                      stacklevel=4)  # past the no_grad wrapper
        for p in self.model.parameters():
            p.grad = None
        self._written.clear()
        self.skipped_steps += 1
        self.steps += 1
        return False

    def _fold_in_captures(self) -> None:
        batch = {}
        for s in self.layers.values():
            caps, s.captures = [c for c in s.captures if c.g is not None], []
            if not caps:
                continue
            if len({c.spatial for c in caps}) > 1:
                raise ValueError(f"layer {s.name!r}: captures with different output sizes")
            a = torch.cat([c.a for c in caps])
            g = torch.cat([c.g for c in caps if c.g is not None])  # all: caps is filtered
            if not (_all_finite(a) and _all_finite(g)):
                self._curvature_rejected(s.name, "non-finite curvature statistics")
                continue
            batch[s] = (a, g, caps[0].spatial)
        if not batch:
            return
        before = {s: (s.curvature, s.updates) for s in batch}
        self._update_curvature(batch)
        overflowed = [s for s, (old, _) in before.items()
                      if s.curvature is not old and not curvature_finite(s.curvature)]
        for s in overflowed:  # restore every layer before reporting: "raise" stops at the first
            s.curvature, s.updates = before[s]  # the running average stays as it was
        for s in overflowed:
            self._curvature_rejected(
                s.name, "the curvature built from its statistics is not finite (the"
                " statistics are finite but the factors overflow their dtype)")

    def _curvature_rejected(self, name: str, why: str, stacklevel: int = 5) -> None:
        """Drop one layer's curvature update: raise (``nonfinite="raise"``) or warn.

        ``stacklevel`` 5 points the warning at the caller of step(), past its no_grad
        wrapper.
        """
        if self.nonfinite == "raise":
            raise NonFiniteError(f"layer {name!r}: {why}; curvature update not applied")
        warnings.warn(
            f"layer {name!r}: {why}: curvature update skipped for this layer (the running"
            " average keeps its previous value)",
            RuntimeWarning,
            stacklevel=stacklevel,
        )

    def _decay(self, state: LayerState) -> float:
        """The decay min(1 − 1/k, ρ) of this curvature batch (0: keep only the new batch).

        k is the layer's count of curvature batches including this one, or with
        ``ema_counter="steps"`` the optimizer steps taken before it.
        """
        k = state.updates + 1 if self.ema_counter == "updates" else self.steps
        if k < 1:
            return 0.0
        return min(1.0 - 1.0 / k, self.ema_decay)

    def _kl_scale(self, out: dict, grads: dict) -> float:
        if self.kl_clip is None:
            return 1.0
        dots = [(X * grads[s.name]).sum() for s, X in out.items()]
        return kl_clip_factor(dots, self.kl_clip, self.kl_clip_mode, self.lr)

    # ---------------------------------------------------- subclass operations
    def _update_curvature(self, batch: dict[LayerState, tuple[Tensor, Tensor, tuple]]) -> None:
        raise NotImplementedError

    def _refresh_inverse(self, state: LayerState) -> None:
        raise NotImplementedError

    def _precondition(self, grads: dict[LayerState, Tensor]) -> dict[LayerState, Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ access
    def _state_of(self, module: nn.Module) -> LayerState:
        s = self._by_module.get(id(module))
        if s is None:
            raise KeyError(
                f"{type(module).__name__} module is not registered with this preconditioner"
            )
        return s

    def _registered(self, name: str) -> LayerState:
        s = self.layers.get(name)
        if s is None:
            raise KeyError(f"{name!r} is not a registered layer (registered:"
                           f" {sorted(self.layers)})")
        return s

    def curvature(self, module: nn.Module):
        """The layer's current curvature (after the running average)."""
        return self._state_of(module).curvature

    def curvature_product(self, mats: dict[str, Tensor]) -> dict[str, Tensor]:
        """M vec(V) for each layer, M the damped curvature the current factorisation inverts.

        So that the preconditioned gradient :meth:`step` writes is Δ = M⁻¹ ∇ (before any
        KL clipping); ``kronfisher.optim`` uses it for the quadratic model of its damping
        rule.

        Args:
            mats: layer name (a key of :attr:`layers`) → V of the layer's gradient-matrix
                shape (d_g, d_a) (weight reshaped to (d_g, ·), bias last column).

        Returns:
            layer name → M vec(V) in the same matrix form and dtype.

        Raises:
            KeyError: a name that is not a registered layer.
            RuntimeError: a layer without a factorisation yet (before the first
                :meth:`step`).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement curvature_product")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(self.layers)}, skipped={len(self.skipped)},"
            f" damping={self.damping}, steps={self.steps})"
        )

