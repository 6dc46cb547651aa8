"""Data-parallel answers to the preconditioner's questions (see :mod:`.sync`).

Exactness: with W ranks holding shards x_w, every rank's ``step()`` gives the
preconditioned gradients one process computes on the concatenated batch (ranks in order):

- KFAC: the factor sums Σ a aᵀ, Σ g gᵀ are all-reduced (d_a² + d_g² numbers per layer);
- SVD methods, "gather": the layer's (a, g) go to its owner (or, replicated, to every
  rank), which runs the single-process estimator on the concatenated tokens and
  broadcasts the new terms; "krylov": :mod:`.krylov`; "auto": :mod:`.cost` per layer;
- ExactNG: (a, g) are all-gathered (d·m numbers; its dense Fisher has d² entries);
- the running averages then run identically on every rank; with ``assignment="owner"``
  each layer is factorised and preconditioned on its owner only, which broadcasts Δ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..curvature.estimator import CurvatureSolveError
from ..curvature.methods import method_rank
from ..layers import LayerStatistics
from ..linalg import KroneckerSum
from .agreement import ERROR, OK, SKIP, Agreement, CollectiveSkip, agree
from .comm import Communicator
from .config import DistributedConfig
from .cost import LayerShape, assign_owners, choose_strategy
from .krylov import krylov_estimate
from .sync import RemoteFactorization, warn_dropped

__all__ = ["DataParallelSync", "layer_dims"]


def layer_dims(state) -> tuple[int, int]:
    """(d_g, d_a) of a registered layer's gradient matrix (its adapter's layout)."""
    d_g, d_a = state.adapter.layout.shape
    return int(d_g), int(d_a)


class _Guard:
    """Makes a step collective: a rank that raises or returns early still meets the others."""

    def __init__(self, sync: DataParallelSync, skip: Callable[..., bool]):
        self.sync, self.skip, self.skipped = sync, skip, False

    def __enter__(self) -> _Guard:
        self.sync.agreement = None
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        sync = self.sync
        if kind is CollectiveSkip:
            self.skip(str(exc), stacklevel=5)
            self.skipped = True
            return True
        if sync.agreement is not None:  # the agreement took place: the ranks are in step
            return False
        status, text = (SKIP, "it skipped the step") if kind is None else (
            ERROR, f"it raised {kind.__name__}: {exc}")
        try:
            sync.agree(status, text, False, {})
        except CollectiveSkip as e:  # always: this rank's own status is not OK
            if kind is not None:  # the raising rank counts the step like the others
                self.skip(str(e), stacklevel=5)
        return False


class DataParallelSync:
    """Collective curvature for one preconditioner on one process group.

    Args:
        config: the resolved options.
        layers: the preconditioner's registered layers (name → LayerState), the same
            names and shapes on every rank (checked by :meth:`check_model`).
        per_layer: whether layers can be preconditioned independently (False for the
            full-Fisher ExactNG: then every rank preconditions every layer).
    """

    active = True

    def __init__(self, config: DistributedConfig, layers: dict, per_layer: bool):
        self.config = config
        self.comm = Communicator(config.group, config.timeout)
        self.rank, self.world = self.comm.rank, self.comm.world
        self.names = list(layers)
        self.dims = {n: layer_dims(s) for n, s in layers.items()}
        self.owners: dict[str, int] | None = None
        if config.assignment == "owner" and per_layer:
            # factorisation (eigh of both factors) and the two solve products
            cost = {n: float(da) ** 3 + float(dg) ** 3 + dg * da * (da + dg)
                    for n, (dg, da) in self.dims.items()}
            self.owners = assign_owners(cost, self.world)
        self.agreement: Agreement | None = None
        self.strategies: dict[str, str] = {}  # the strategy each layer used last

    # ---------------------------------------------------------------- construction
    def check_model(self, kind: str) -> None:
        """Every rank registered the same layers with the same shapes, for the same method.

        Raises:
            ValueError: on every rank, naming the ranks whose model differs from rank 0's.
        """
        text = repr([kind] + [(n, self.dims[n]) for n in self.names])
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
        got = [int(t) for t in self.comm.all_gather(
            torch.tensor([digest], dtype=torch.int64), "model_check")]
        differ = [r for r in range(self.world) if got[r] != got[0]]
        if differ:
            raise ValueError(
                f"the preconditioner's model differs across ranks: rank(s) {differ} registered"
                " other layers, shapes or method than rank 0 (this rank's layers and (d_g,"
                f" d_a): {[(n, self.dims[n]) for n in self.names]}); build the same model and"
                " preconditioner on every rank")

    # ---------------------------------------------------------------------- steps
    def step_guard(self, skip: Callable[..., bool]) -> _Guard:
        """The context every ``step()`` runs in (see :class:`_Guard`)."""
        return _Guard(self, skip)

    def agree(self, status: int, text: str, nonfinite: bool,
              batch: dict[str, LayerStatistics]) -> Agreement:
        """The step's agreement (:func:`.agreement.agree`), remembered for the step."""
        self.agreement = Agreement()  # set first: a CollectiveSkip still marks it taken
        self.agreement = agree(self.comm, status, text, nonfinite, self.names, batch)
        return self.agreement

    def reduce_batch(self, batch: dict, nonfinite: Callable[[], list[str]],
                     gather: Callable[[Any], bool]) -> dict:
        """Agree on the step; the batch (layer → LayerStatistics) every rank folds in.

        For the layers ``gather`` is true of, the statistics' a and g become their
        concatenation over the ranks (the curvature is then computed alike everywhere).
        """
        by_name = {s.name: stats for s, stats in batch.items()}
        ag = self.agree(OK, "", bool(nonfinite()), by_name)
        warn_dropped(ag.dropped)
        out = {}
        for s, stats in batch.items():
            info = ag.layers.get(s.name)
            if info is None:
                continue
            if gather(s):
                a = torch.cat(self.comm.all_gather_rows(stats.a, info.counts, "gather_stats"))
                g = torch.cat(self.comm.all_gather_rows(stats.g, info.counts, "gather_stats"))
                stats = LayerStatistics(a, g, stats.pairing)
            out[s] = stats
        return out

    def agreed_reason(self, reason: str | None) -> str | None:
        """Why every rank skips this step for non-finite gradients (None: no rank saw one)."""
        ranks = self.agreement.nonfinite_ranks if self.agreement is not None else []
        if not ranks:
            return reason
        return f"non-finite gradient on rank(s) {ranks}" + (f" ({reason})" if reason else "")

    # ------------------------------------------------------------------ curvature
    def _shape(self, name: str, a: Tensor, mask: Tensor | None, estimator) -> LayerShape:
        info = self.agreement.layers[name] if self.agreement is not None else None
        dg, da = self.dims[name]
        T = a.shape[1] if a.ndim == 3 else 1
        # None keeps every location pair; a diagonal mask keeps only (t, t)
        flat = T == 1 or (mask is not None
                          and bool(torch.equal(mask, torch.diag(mask.diagonal()))))
        m = info.m if info else a.shape[0]
        return LayerShape(da, dg, m * T, T, flat,
                          method_rank(estimator.method, estimator.rank), a.element_size())

    def strategy(self, name: str, a: Tensor, mask: Tensor | None, estimator) -> str:
        """The strategy for this layer and batch: "allreduce" (KFAC), "gather" or "krylov"."""
        if estimator.method == "kfac":
            return "allreduce"
        if self.config.strategy != "auto":
            return self.config.strategy
        return choose_strategy(self._shape(name, a, mask, estimator), self.world, self.config.cost,
                               self.owners is not None)

    def estimate(self, name: str, estimator, a: Tensor, g: Tensor, mask: Tensor | None,
                 previous: KroneckerSum | None) -> KroneckerSum:
        """This layer's estimate of the concatenated batch, the same on every rank.

        ``mask``: the (T × T) position pairs kept (None: all pairs, or T = 1).

        Raises:
            CurvatureSolveError: the solve failed (on every rank alike).
        """
        info = self.agreement.layers[name] if self.agreement is not None else None
        if info is None:
            raise RuntimeError(f"layer {name!r}: estimate() outside an agreed step")
        how = self.strategy(name, a, mask, estimator)
        self.strategies[name] = how
        if how == "allreduce":
            return self._kfac(estimator, a, g, info.m)
        if how == "krylov":
            return krylov_estimate(self.comm, estimator, a, g, mask, previous, info.m,
                                   info.scales)
        owner = self.owners[name] if self.owners is not None else None
        if owner is None:
            a_all = torch.cat(self.comm.all_gather_rows(a, info.counts, "gather_stats"))
            g_all = torch.cat(self.comm.all_gather_rows(g, info.counts, "gather_stats"))
            return estimator.estimate_masked(a_all, g_all, mask, previous)
        parts_a = self.comm.gather_rows(a, info.counts, owner, "gather_stats")
        parts_g = self.comm.gather_rows(g, info.counts, owner, "gather_stats")
        result, failure = None, ""
        if parts_a is not None and parts_g is not None:
            try:
                result = estimator.estimate_masked(torch.cat(parts_a), torch.cat(parts_g),
                                                   mask, previous)
            except CurvatureSolveError as e:
                failure = str(e)
        return self._broadcast_terms(name, owner, result, failure, estimator, a)

    def _broadcast_terms(self, name: str, owner: int, result: KroneckerSum | None,
                         failure: str, estimator, like: Tensor) -> KroneckerSum:
        """The owner's new terms on every rank (a leading flag says whether it failed)."""
        dg, da = self.dims[name]
        k = method_rank(estimator.method, estimator.rank)
        dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
        buf = torch.zeros(1 + k * (da * da + dg * dg), dtype=dtype, device=like.device)
        if result is not None:
            buf[1:] = torch.cat([t.reshape(-1) for A, G in result.terms for t in (A, G)])
        else:
            buf[0] = 1.0
        buf = self.comm.broadcast(buf, owner, "broadcast_terms")
        if float(buf[0]) != 0.0:
            raise CurvatureSolveError(f"every solver failed on the owner rank {owner}"
                                      + (f": {failure}" if failure else ""))
        terms, off = [], 1
        for _ in range(k):
            A = buf[off:off + da * da].view(da, da)
            G = buf[off + da * da:off + da * da + dg * dg].view(dg, dg)
            terms.append((A, G))
            off += da * da + dg * dg
        out = KroneckerSum(terms)
        out.info = dict(result.info) if result is not None else {"method": estimator.method}
        return out

    def _kfac(self, estimator, a: Tensor, g: Tensor, m: int) -> KroneckerSum:
        """KFAC's A_K, G_K of the concatenated batch from one all-reduce of the factor sums."""
        if a.dtype in (torch.float16, torch.bfloat16):
            a, g = a.float(), g.float()
        ta, tg = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        T = a.shape[1] if a.ndim == 3 else 1
        sums = torch.cat([(ta.mT @ ta).reshape(-1), (tg.mT @ tg).reshape(-1)])
        both = self.comm.all_reduce(sums, "kfac_factors")
        da, dg = ta.shape[1], tg.shape[1]
        A = both[:da * da].view(da, da) / m
        G = both[da * da:].view(dg, dg) / (m * T)
        out = KroneckerSum([(0.5 * (A + A.mT), 0.5 * (G + G.mT))])
        out.info = {"method": "kfac"}
        return out

    def adjust(self, name: str, hook: Callable[[KroneckerSum, Tensor], KroneckerSum],
               new: KroneckerSum, a: Tensor) -> KroneckerSum:
        """``hook(new, a_all)`` on every rank, a_all the inputs of the whole batch.

        A subclass's per-estimate adjustment (e.g. the benchmark's KFAC-trace split) may
        read the inputs; given one rank's shard it would make the replicas diverge. Costs
        an all-gather of the layer's inputs (m·T·d_a numbers).
        """
        info = self.agreement.layers[name] if self.agreement is not None else None
        if info is None:
            raise RuntimeError(f"layer {name!r}: adjust() outside an agreed step")
        return hook(new, torch.cat(self.comm.all_gather_rows(a, info.counts, "gather_inputs")))

    def kfac_fallback(self, name: str, estimator, a: Tensor, g: Tensor) -> KroneckerSum:
        """KFAC's factors of the concatenated batch padded with zero terms (every rank alike)."""
        info = self.agreement.layers[name] if self.agreement is not None else None
        A, G = self._kfac(estimator, a, g, info.m if info else a.shape[0]).terms[0]
        pad = [(torch.zeros_like(A), torch.zeros_like(G))] * (
            method_rank(estimator.method, estimator.rank) - 1)
        out = KroneckerSum([(A, G), *pad])
        out.info = {"method": "kfac", "fallback_for": estimator.method}
        return out

    def mean_over_ranks(self, values: Tensor, purpose: str) -> Tensor:
        """The mean of ``values`` over the ranks (one all-reduce), the same on every rank.

        For the quantities of a loss averaged over a rank's shard (e.g. ``AdaptiveNG``'s
        quadratic model): with equal shards their mean is the concatenated batch's.
        """
        return self.comm.all_reduce(values, purpose) / self.world

    # -------------------------------------------------------------- precondition
    def owns(self, name: str) -> bool:
        """Whether this rank factorises and preconditions layer ``name``."""
        return self.owners is None or self.owners[name] == self.rank

    def mark_remote(self, state, damping: float) -> None:
        """Record, on a non-owner, that the owner refactorised ``state`` now (for state_dict)."""
        owners = self.owners or {}
        state.inverse = RemoteFactorization(owners.get(state.name, 0), damping)
        state.inverse_source, state.inverse_damping = state.curvature, damping

    def share(self, out: dict, grads: dict[str, Tensor], layers: dict) -> dict:
        """Every rank's preconditioned gradients: each owner broadcasts its layers' Δ at once."""
        if self.owners is None:
            return out
        full = dict(out)
        for r in range(self.world):
            names = [n for n in self.names if n in grads and self.owners[n] == r]
            if not names:
                continue
            like = grads[names[0]]
            if r == self.rank:
                buf = torch.cat([out[layers[n]].reshape(-1).to(like.dtype) for n in names])
            else:
                buf = like.new_zeros(sum(grads[n].numel() for n in names))
            buf = self.comm.broadcast(buf, r, "broadcast_preconditioned")
            off = 0
            for n in names:
                k = grads[n].numel()
                full[layers[n]] = buf[off:off + k].view_as(grads[n])
                off += k
        return full

