"""The curvature batch: ``collect()``, the forward and gradient hooks, and the fold-in.

:class:`CollectMixin` gives :class:`~kronfisher.preconditioner.Preconditioner` its
:meth:`~CollectMixin.collect` context. The global forward hook (:mod:`.hooks`) calls
:meth:`CollectMixin._forward_hook` for every module; it records the registered ones while a
``collect()`` is active and attaches a gradient hook to their outputs. ``step()`` calls
:meth:`CollectMixin._fold_in_captures`, which hands the batch to the subclass's
``_update_curvature`` and undoes the update of any layer whose curvature overflowed.

An adapter that cannot take a module's input or output gradient (e.g. a Conv2d called on
an unbatched 3-D input), or a module that cannot be called twice in one forward, does not
raise inside the hook: the first such error stops the recording, and when the
``collect()`` block ends everything it recorded is dropped for every layer and the error
is raised, naming the layer (:class:`~.hook_error.HookError`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..distributed import DataParallelSync, LocalSync
from ..layers import LayerStatistics, UnsupportedLayerError
from ..linalg import all_finite
from ._checks import as_int
from .batch import take_batch
from .hook_error import HookError
from .hooks import inside_backward
from .layer_state import Capture, LayerState


def backward_id() -> int:
    """An id of the autograd backward pass running now (-1 if it cannot be told)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if task is None else int(task())


class NonFiniteError(FloatingPointError):
    """A gradient or statistic contained NaN or Inf (raised when ``nonfinite="raise"``)."""

__all__ = ["CollectMixin", "HookError"]


class CollectMixin:
    """``collect()`` over the attributes declared below (set by the Preconditioner)."""

    layers: dict[str, LayerState]
    steps: int
    cov_update_freq: int
    _by_module: dict[int, LayerState]
    _collecting: bool
    _reduction: str
    _batch_size: int | None
    _hook_error: HookError | None
    nonfinite: str
    sync: LocalSync | DataParallelSync
    model: nn.Module
    _forward_id: int | None = None  # the model forward running inside collect(), if any
    _forwards: int = 0

    def _nonfinite_grads(self) -> list[str]:
        raise NotImplementedError

    def _gathers_statistics(self, state: LayerState) -> bool:
        raise NotImplementedError

    def _check_hooks(self, what: str) -> None:
        raise NotImplementedError

    def _update_curvature(self, batch: dict[LayerState, LayerStatistics]) -> None:
        """Fold one batch of statistics per layer into the layers' curvature."""
        raise NotImplementedError

    def _finite(self, state: LayerState, curvature) -> bool:
        """Whether ``curvature`` (of ``state``'s kind) is finite; TypeError for another kind."""
        raise NotImplementedError

    @contextlib.contextmanager
    def collect(self, reduction: str = "mean", *, force: bool = False,
                batch_size: int | None = None) -> Iterator[bool]:
        """Record the curvature batch from the forward and backward passes run inside.

        Every backward that reaches a registered layer's output contributes one (a, g)
        pair per example of the forward it goes through, and the curvature is the average
        over all pairs recorded. So several micro-batches (one forward and backward each,
        gradient accumulation) give the curvature of their concatenation, and several
        backward calls through one forward (``retain_graph=True``) count that forward's
        examples once per backward, as if the batch had been repeated with each backward's
        targets (e.g. several sampled targets per example average their Fishers).

        Args:
            reduction: how each backward's loss combines per-example losses: "mean"
                (captured output gradients are multiplied by the batch size) or "sum"
                (taken as they are).
            force: record even off the ``cov_update_freq`` schedule.
            batch_size: with "mean", the examples N of the whole accumulated batch: each
                backward's loss is Σ_its examples ℓᵢ / N (e.g. ``micro_batch_mean / k``
                over k equal micro-batches), so the gradients are multiplied by N. Default:
                each forward's own batch size (each backward's loss is the mean over its
                forward's examples).

        Yields:
            Whether this step records (see ``cov_update_freq``).

        Raises:
            ValueError: unknown ``reduction``, ``batch_size`` not an integer >= 1, or
                ``batch_size`` with ``reduction="sum"`` (a summed loss needs no scale).
            RuntimeError: nested ``collect()``, or after :meth:`remove_hooks`.
            UnsupportedLayerError: at the end of the block, when a registered layer's
                adapter refused its input or output gradient (e.g. a Conv2d on an unbatched
                3-D input), or a layer that does not share its weight across calls was
                called twice in one forward, naming the layer; everything this block
                recorded is dropped (another adapter error: RuntimeError, likewise).
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if batch_size is not None:
            if reduction == "sum":
                raise ValueError("batch_size applies to reduction='mean' only: with a summed"
                                 " loss the captured gradients need no scale")
            batch_size = as_int("batch_size", batch_size)
        self._check_hooks("collect()")
        active = force or self.collect_due
        if self._collecting:
            raise RuntimeError("collect() contexts cannot be nested")
        self._collecting, self._reduction, self._batch_size = active, reduction, batch_size
        self._forward_id = None
        self._hook_error = None
        before = {s: len(s.captures) for s in self.layers.values()}
        try:
            yield active
        finally:
            self._collecting = False
            self._forward_id = None
            error, self._hook_error = self._hook_error, None
            if error is not None:  # drop this block's records, for every layer
                for s, n in before.items():
                    del s.captures[n:]
            for s in self.layers.values():
                # a recomputation inside a backward (activation checkpointing) that got no
                # gradient was never part of the batch: drop it without a word
                s.captures = [c for c in s.captures if c.g is not None or not c.during_backward]
                missing = [c for c in s.captures if c.g is None]
                if missing:
                    warnings.warn(
                        f"layer {s.name!r}: {len(missing)} forward pass(es) inside collect()"
                        " had no backward inside it; they are dropped from the curvature batch",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    s.captures = [c for c in s.captures if c.g is not None]
        if error is not None:  # only when the block itself raised nothing
            error.raise_it()

    @property
    def collecting(self) -> bool:
        """True inside :meth:`collect` while statistics are recorded."""
        return self._collecting

    @property
    def collect_due(self) -> bool:
        """Whether the next :meth:`collect` records (``steps`` a multiple of ``cov_update_freq``).

        Run the curvature pass only then (``if precond.collect_due: with
        precond.collect(): ...``); ``collect(force=True)`` records regardless.
        """
        return self.steps % self.cov_update_freq == 0

    def _forward_pre_hook(self, module: nn.Module, inputs) -> None:
        """Called before every module's forward (a global hook): numbers the model's forwards.

        The calls of a registered module inside one forward of the model are positions of
        the same examples (weight sharing), not more examples.
        """
        if module is self.model and self._collecting:
            self._forwards += 1
            self._forward_id = self._forwards

    def _forward_hook(self, module: nn.Module, inputs, output) -> None:
        """Called for every module's forward (a global hook): records registered ones."""
        try:
            self._record(module, inputs, output)
        finally:
            if module is self.model:
                self._forward_id = None  # the model's forward ends (after its own record)

    def _record(self, module: nn.Module, inputs, output) -> None:
        if not self._collecting or self._hook_error is not None or not torch.is_grad_enabled():
            return
        state = self._by_module.get(id(module))
        if state is None or not isinstance(output, Tensor) or not output.requires_grad:
            return
        forward, call = self._forward_id, 0
        if forward is not None:
            call = sum(1 for c in state.captures if c.forward == forward and c.backward == -1)
            if call and not state.adapter.shares_calls:  # the whole block is refused
                self._hook_error = HookError(state.name, "forward", UnsupportedLayerError(
                    f"layer {state.name!r} ({type(module).__name__}) is called more than once"
                    " in one forward of the model; its calls are not separate examples, and"
                    " weight sharing across calls is handled for nn.Linear only"))
                return
        try:
            a = state.adapter.inputs(inputs[0])
        except Exception as e:  # raised when collect() ends, not inside the model's forward
            self._hook_error = HookError(state.name, "forward", e)
            return
        cap = Capture(a=a, during_backward=inside_backward(), forward=forward, call=call)
        state.captures.append(cap)
        n = self._batch_size or inputs[0].shape[0]
        scale = float(n) if self._reduction == "mean" else 1.0

        passes = [0]  # backwards through this call so far (if the pass has no id)

        def grad_hook(grad: Tensor) -> None:
            if not self._collecting or self._hook_error is not None:
                return
            try:
                g = state.adapter.output_grads(grad) * scale
                pairing = state.adapter.pairing(grad)
            except Exception as e:  # raised when collect() ends, not inside the backward
                self._hook_error = HookError(state.name, "backward", e)
                return
            bid = backward_id()
            bid, passes[0] = (bid if bid >= 0 else passes[0]), passes[0] + 1
            if cap.g is None:
                cap.g, cap.pairing, cap.backward = g, pairing, bid
            else:  # another backward through the same forward: another pass over it
                state.captures.append(Capture(a=cap.a, pairing=pairing, g=g,
                                              forward=cap.forward, call=cap.call,
                                              backward=bid))

        output.register_hook(grad_hook)

    def _fold_in_captures(self) -> None:
        batch = {}
        for s, b in take_batch(list(self.layers.values())).items():
            if not (all_finite(b.a) and all_finite(b.g)):
                self._curvature_rejected(s.name, "non-finite curvature statistics")
                continue
            batch[s] = b
        # data parallel: the ranks agree on the step (and gather the batch if asked to)
        batch = self.sync.reduce_batch(batch, self._nonfinite_grads, self._gathers_statistics)
        if not batch:
            return
        before = {s: (s.curvature, s.updates) for s in batch}
        self._update_curvature(batch)
        overflowed = [s for s, (old, _) in before.items()
                      if s.curvature is not old and not self._finite(s, s.curvature)]
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
