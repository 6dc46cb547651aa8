"""The preconditioner: hooks, ``collect()`` and ``step()`` with schedules and damping.

It knows no specific curvature method: a subclass supplies three operations
(:meth:`Preconditioner._update_curvature`, :meth:`~Preconditioner._refresh_inverse`,
:meth:`~Preconditioner._precondition`); :class:`KroneckerPreconditioner` implements them
by asking each layer's :class:`~kronfisher.curvature.CurvatureBlock`.

Training-loop contract::

    with KPSVD(model, cov_update_freq=10) as precond:  # close() removes the hooks at the end
        for x, y in loader:
            if precond.collect_due:          # run the curvature pass only when it records
                with precond.collect():      # this forward/backward is the curvature batch
                    sampled_nll(model(x), "categorical").backward()
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()  # a mean over examples
            precond.step()                   # .grad of each registered layer ← preconditioned
            optimizer.step()

Guarantees (docs/reliability.md): :meth:`Preconditioner.step` checks the ``.grad`` of every
model parameter (registered or skipped) for NaN/Inf in one pass (one sum each) before it writes
anything; a curvature update whose statistics or resulting factors are not finite is
dropped for that layer (warning naming the layer) and the running average keeps its
previous value; calling ``step()`` again on gradients it already preconditioned, or using
the preconditioner after :meth:`~Preconditioner.remove_hooks`, raises ``RuntimeError``; a
layer whose ``.grad`` no new backward produced is left as it is (not preconditioned again,
not in the KL clip; see :mod:`.written`). The hooks hold the preconditioner weakly and
add nothing to the modules (:mod:`.hooks`): ``torch.save(model)`` and
``copy.deepcopy(model)`` see a model without a preconditioner.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..distributed import make_sync, unwrap_model
from ..layers import LayerAdapter, UnsupportedLayerError, check_adapters
from ._checks import KL_CLIP_MODES, checked_options, nonfinite_names
from .access import LayerAccessMixin
from .casting import follow_module
from .collecting import CollectMixin, HookError, NonFiniteError
from .copying import UncopyableMixin
from .freshness import GradFreshness, classify_grads
from .frozen import frozen_changed
from .hooks import ModelHooks
from .hyper import HyperMixin
from .layer_state import LayerState
from .lifecycle import LifecycleMixin
from .registration import SkipLayers, register_layers
from .schedule import scheduled_damping, scheduled_lr
from .state import StateDictMixin
from .written import WrittenGrads

__all__ = ["Preconditioner", "LayerState", "NonFiniteError", "KL_CLIP_MODES"]


class Preconditioner(UncopyableMixin, LifecycleMixin, HyperMixin, CollectMixin, StateDictMixin,
                     LayerAccessMixin):
    """Base class of all natural-gradient preconditioners (see module docstring).

    Args:
        model: the network; every module with an adapter (``nn.Linear``, ``nn.Conv2d``,
            ``nn.Embedding``, affine ``nn.LayerNorm``, ``nn.BatchNorm1d/2d``,
            ``nn.GroupNorm`` and whatever :func:`kronfisher.register_adapter` added;
            subclasses that keep the parent's ``forward``) in a supported configuration
            is registered, all other trainable parameters are left untouched
            and listed in :attr:`skipped` with the reason in :attr:`skip_reasons` (decided
            here, never inside a hook): ``skip_layers``; a weight computed from other
            parameters (old-API ``weight_norm`` / ``spectral_norm``); a frozen weight with
            a trainable bias. A layer with a frozen bias is preconditioned with its
            weight-only block (:mod:`.frozen`); no ``.grad`` is ever written to a parameter
            with ``requires_grad=False``.
        damping: λ added to the curvature (see the method's damping scheme), or a
            callable of :attr:`steps` giving it (checked at the step that calls it; a new
            value refactorises, so prefer piecewise-constant schedules).
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
        lr: the optimizer's learning rate, needed by ``kl_clip`` in mode "lr2" only: a
            number, a callable of :attr:`steps`, or the ``torch.optim.Optimizer`` itself:
            then every step reads each parameter's lr from its param group and
            ν = min(1, sqrt(kl_clip / Σ_params lr_p² ⟨Δ_p, ∇_p⟩)) (one group: the formula
            above; a parameter in no group of that optimizer is not moved by it and
            counts 0).
        nonfinite: "skip" (default): a NaN/Inf gradient of any model parameter (also the
            skipped ones) makes :meth:`step` warn, set every model parameter's ``.grad`` to
            None (so ``optimizer.step()`` changes nothing) and return False; NaN/Inf
            statistics, or curvature factors that overflow, skip that layer's curvature
            update with a warning naming it. "raise": raise :class:`NonFiniteError` instead
            (parameters and curvature untouched either way).
        skip_layers: module names (covering the modules below them) or ``nn.Module``
            classes (instances of them) to leave out: their trainable parameters are listed
            in :attr:`skipped` with the reason "skipped by skip_layers". An unknown name
            raises ``ValueError``.
        process_group: data-parallel training (:mod:`kronfisher.distributed`): None
            (default) uses the default group when ``torch.distributed`` is initialised
            (single-process otherwise), "local" stays single-process, or a ProcessGroup or
            ``DistributedConfig``. A ``DistributedDataParallel`` model is unwrapped (its
            module's layers are registered, under the module's own names).
        adapters: module type → adapter class for this preconditioner only (wins over the
            global registry; see :func:`kronfisher.register_adapter`).

    Use as a context manager (``with KPSVD(model) as precond:``) or call :meth:`close` to
    remove the hooks.
    """

    _per_layer_precondition = True  # layers may be preconditioned on different ranks

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: float | Callable[[int], float] = 1e-3,
        ema_decay: float = 0.95,
        cov_update_freq: int = 1,
        inv_update_freq: int = 1,
        kl_clip: float | None = None,
        lr: float | Callable[[int], float] | torch.optim.Optimizer | None = None,
        nonfinite: str = "skip",
        kl_clip_mode: str = "lr2",
        ema_counter: str = "updates",
        skip_layers: Iterable[str | type[nn.Module]] | None = None,
        process_group: object = None,
        adapters: Mapping[type[nn.Module], type[LayerAdapter]] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError("model must be a torch.nn.Module")
        model, ddp_group = unwrap_model(model)
        self.steps = 0
        self._damping = scheduled_damping(damping)
        self._lr = scheduled_lr(lr)
        opts = checked_options(ema_decay=ema_decay, cov_update_freq=cov_update_freq,
                               inv_update_freq=inv_update_freq, kl_clip=kl_clip,
                               kl_clip_mode=kl_clip_mode, lr=self._lr_for_checks(),
                               nonfinite=nonfinite, ema_counter=ema_counter)
        self.model = model
        self.ema_decay: float = opts["ema_decay"]
        self.ema_counter: str = opts["ema_counter"]
        self.cov_update_freq: int = opts["cov_update_freq"]
        self.inv_update_freq: int = opts["inv_update_freq"]
        self.kl_clip: float | None = opts["kl_clip"]
        self.kl_clip_mode: str = opts["kl_clip_mode"]
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        # wall-clock seconds spent in each phase of step(), accumulated (for benchmarks)
        self.timings = {"curvature": 0.0, "inverse": 0.0, "precondition": 0.0}
        reg = register_layers(model, SkipLayers.checked(model, skip_layers),
                              check_adapters(adapters))
        self.layers: dict[str, LayerState] = reg.layers
        self.skipped: list[str] = reg.skipped
        self.skip_reasons: dict[str, str] = reg.skip_reasons
        if not self.layers:
            raise UnsupportedLayerError(
                "the model has no supported layer (nn.Linear, nn.Conv2d, nn.Embedding,"
                " nn.LayerNorm, nn.BatchNorm1d/2d, nn.GroupNorm or a registered adapter's"
                f" type) to precondition (skipped: {self.skip_reasons})")
        self._by_module = {id(s.module): s for s in self.layers.values()}
        self._collecting = False
        self._reduction = "mean"
        self._batch_size: int | None = None
        self._hook_error: HookError | None = None
        self._hooks_removed = False
        # the .grad tensors the last step() left, and what backwards did to them since
        self._written = WrittenGrads()
        self._warned_not_fresh: set[str] = set()
        self._hooks = ModelHooks(self, self._forward_hook, self._written.accumulated,
                                 [p for s in self.layers.values()
                                  for p in s.adapter.params()],
                                 forward_pre=self._forward_pre_hook)
        # the seam to kronfisher.distributed (a no-op LocalSync on one process)
        self.sync = make_sync(process_group, ddp_group, self.layers,
                              self._per_layer_precondition,
                              f"{type(self).__name__}:{getattr(self, 'method', '')}")

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> bool:
        """Update curvature/inverses as scheduled and precondition the layers' gradients.

        Only layers whose ``.grad`` a backward produced since the previous step are
        preconditioned. A layer whose ``.grad`` is still the one the previous step left,
        or got a backward added onto it without ``zero_grad`` (a parameter outside the
        optimizer), is left as it is and kept out of the KL clip, with a warning once per
        layer. A layer whose module changed dtype or device (``model.double()``) gets its
        curvature cast along.

        Returns:
            True if the gradients were preconditioned; False if the step was skipped
            because of a non-finite gradient (see ``nonfinite``) or because no registered
            layer has a gradient from a new backward (a warning says which layers and why);
            a skipped step clears every gradient, so ``optimizer.step()`` changes nothing.

        Raises:
            RuntimeError: no registered layer has a new gradient and some still have the
                ``.grad`` the previous ``step()`` wrote (no backward in between:
                preconditioning it again would apply the curvature twice); no curvature
                yet; called after :meth:`remove_hooks`; a registered layer's weight or bias
                was frozen or unfrozen after construction.
            ValueError: a ``damping`` or ``lr`` callable returned a bad value, or an
                optimizer given as ``lr`` has a param group whose lr is not >= 0.
            ValueError: the curvature batch recorded inside ``collect()`` has no examples
                or outputs of different spatial sizes in one layer (it is dropped).
            NonFiniteError: with ``nonfinite="raise"``, a NaN/Inf gradient or statistic.
        """
        self._check_hooks("step()")
        changed = [n for s in self.layers.values() for n in frozen_changed(s)]
        if changed:
            raise RuntimeError(
                f"parameter(s) {changed} were frozen or unfrozen (requires_grad) after the"
                " preconditioner was built: its curvature is of the parameters trainable"
                " then; build a new preconditioner (frozen parameters are handled at"
                " construction)")
        with self.sync.step_guard(self._skip):  # data parallel: the step is collective
            sorted_grads = self._check_fresh_grads()
            fresh = sorted_grads.fresh
            damping = self.damping  # a schedule is called (and checked) once, here
            lrs = self._current_lrs()
            if not fresh:
                bad = self._nonfinite_grads()
                if bad:
                    return self._reject(f"non-finite gradient in parameter(s) {bad}")
                return self._skip(sorted_grads.nothing_fresh())
            t0 = time.perf_counter()
            casted = [s for s in self.layers.values() if follow_module(s)]
            if casted:
                self._after_cast(casted)
            self._fold_in_captures()
            t1 = time.perf_counter()
            self.timings["curvature"] += t1 - t0
            bad = self._nonfinite_grads()
            reason = self.sync.agreed_reason(
                f"non-finite gradient in parameter(s) {bad}" if bad else None)
            if reason:
                return self._reject(reason)
            grads = {}
            for s in fresh:
                G = s.adapter.grad_matrix()
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
                if s.inverse is None or due or s.inverse_damping != damping:
                    if self.sync.owns(n):
                        self._refresh_inverse(s)
                    else:  # its owner rank factorises it and sends its Δ (share below)
                        self.sync.mark_remote(s, damping)
            t2 = time.perf_counter()
            self.timings["inverse"] += t2 - t1
            out = self._precondition({self.layers[n]: G for n, G in grads.items()
                                      if self.sync.owns(n)})
            out = self.sync.share(out, grads, self.layers)
            bad = nonfinite_names([(s.name, X) for s, X in out.items()])
            if bad:
                return self._reject(f"preconditioning produced non-finite values in {bad}")
            nu = self._kl_scale(out, grads, lrs)
            for s, X in out.items():
                s.adapter.set_grad_matrix(X * nu if nu != 1.0 else X)
            self._written.new_interval(self._tracked_params())
            self.timings["precondition"] += time.perf_counter() - t2
            self.steps += 1
            return True
        return False  # another rank skipped or raised: this step was skipped everywhere

    def _gathers_statistics(self, state: LayerState) -> bool:
        """Data parallel: whether the layer's curvature batch is all-gathered (here: all)."""
        return True

    def _nonfinite_grads(self) -> list[str]:
        return nonfinite_names(
            [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None])

    def _tracked_params(self) -> list[Tensor]:
        return [p for s in self.layers.values() for p in s.adapter.params()]

    def _check_fresh_grads(self) -> GradFreshness:
        """The layers sorted by whether a backward produced their .grad since the last step.

        Warns once per layer about the layers left out while others are fresh. With no
        fresh layer, raises if a layer still has the .grad the last step wrote (a second
        step() without a backward); otherwise step() skips the step.
        """
        f = classify_grads(list(self.layers.values()), self._written)
        if not f.fresh and f.stale:
            raise RuntimeError(
                f"step() called again on gradients it already preconditioned: layer(s)"
                f"{f.why_left()}; run a new backward (after optimizer.zero_grad()) before each"
                " step(); preconditioning them twice would apply the curvature twice"
            )
        if not f.fresh:
            return f
        new = [n for n in f.stale + f.mixed if n not in self._warned_not_fresh]
        if new:
            self._warned_not_fresh.update(new)
            warnings.warn(
                f"layer(s){f.why_left()}: left as they are, not preconditioned again and left"
                " out of the KL clip (warned once per layer)", RuntimeWarning, stacklevel=4)
        return f

    def _reject(self, msg: str) -> bool:
        if self.nonfinite == "raise":
            raise NonFiniteError(msg)
        return self._skip(msg, stacklevel=5)

    def _skip(self, msg: str, stacklevel: int = 4) -> bool:
        """Warn, clear every gradient (``optimizer.step()`` is then a no-op), count it.

        ``stacklevel`` 4 points the warning at step()'s caller (past the no_grad wrapper).
        """
        warnings.warn(f"{msg}: step skipped, all gradients cleared", RuntimeWarning,
                      stacklevel=stacklevel)
        for p in self.model.parameters():
            p.grad = None
        self._written.clear()
        self.skipped_steps += 1
        self.steps += 1
        return False

    def _decay(self, state: LayerState) -> float:
        """The decay min(1 − 1/k, ρ) of this curvature batch (0: keep only the new batch).

        k is the layer's count of curvature batches including this one, or with
        ``ema_counter="steps"`` the optimizer steps taken before it.
        """
        k = state.updates + 1 if self.ema_counter == "updates" else self.steps
        if k < 1:
            return 0.0
        return min(1.0 - 1.0 / k, self.ema_decay)

    # ---------------------------------------------------- subclass operations
    def _after_cast(self, layers: list[LayerState]) -> None:
        """Called after ``layers``' curvature was cast to their modules' dtype/device."""

    def _refresh_inverse(self, state: LayerState) -> None:
        raise NotImplementedError

    def _precondition(self, grads: dict[LayerState, Tensor]) -> dict[LayerState, Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(self.layers)}, skipped={len(self.skipped)},"
            f" damping={self.damping}, steps={self.steps})"
        )

