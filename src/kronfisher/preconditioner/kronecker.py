"""Kronecker-factored preconditioners: one class that asks each layer's curvature block.

The preconditioner knows no method and no curvature type: each registered layer gets a
:class:`~kronfisher.curvature.CurvatureBlock` chosen by (layer kind, method) from
:data:`~kronfisher.curvature.DEFAULT_BLOCKS` (or the ``blocks=`` overrides), and every
curvature operation — estimate, average, finite check, factorise, solve, product, pack,
unpack — is that block's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature import WEIGHT_SHARING, BlockOptions, CurvatureBlock, KroneckerEstimator
from ..curvature.kronecker_block import KroneckerBlock
from ..curvature.registry import block_class, check_overrides
from ..curvature.scale_shift import check_scale_shift_mode
from ..layers import LayerAdapter, LayerStatistics
from ..linalg import SCHEMES
from .base import LayerState, Preconditioner
from .casting import curvature_dtype
from .state import state_kind
from .warning_log import WarningLog

__all__ = ["KroneckerPreconditioner", "KFAC", "KPSVD", "Deflation", "KFACCorrected", "Lanczos"]


class KroneckerPreconditioner(Preconditioner):
    """Natural-gradient preconditioner with a Kronecker-structured curvature per layer.

    Each layer's gradient matrix V (d_g × d_a, bias last column) is replaced by the
    solve of its curvature block (for dense and conv layers ``curvature.solve(V, damping,
    damping_scheme)``, see :class:`KroneckerSum`).

    Args (besides :class:`Preconditioner`'s):
        method: "kfac", "kpsvd", "deflation", "kfac_corrected" or "lanczos".
        solver: "auto", "power", "lanczos" or "gram" (SVD-based methods).
        rank: number of Kronecker terms (KPSVD only; default 1).
        conv_radius: Conv2d location pairs kept by the SVD-based methods: 0 (spatial
            independence, the default), an integer r (Chebyshev distance ≤ r on the
            output grid) or "all" (the exact conv block). KFAC always uses KFC.
        damping_scheme: "tikhonov" (exact A⊗G + λI for one-term methods; two-term methods
            damp the first term as "factored"), "factored" ((A + π√λ I)⊗(G + √λ/π I),
            trace-based π), "factored_pi1" ((A + √λ I)⊗(G + √λ I)) or "authors" (the
            paper's code: "factored_pi1" for one term; (A₁ + λI)⊗(G₁ + λI) and
            1 + |s_g||s_a| for two terms). See :class:`~kronfisher.KroneckerSum`.
        kl_clip_mode: "lr2" or "authors" (see :class:`Preconditioner`).
        ema_counter: "updates" or "steps" (see :class:`Preconditioner`).
        process_group: data-parallel training (see :class:`Preconditioner`).
        tol, max_iter: solver tolerance (relative) and iteration cap.
        weight_sharing: how the positions of a Linear layer on inputs (B, …, d_in) (or the
            calls of one Linear module in one forward) enter its Fisher block: "expand"
            (default; positions as tokens, normalised by the examples), "reduce" (inputs
            averaged and output gradients summed over positions) or "exact" (the exact
            block, all pairs of positions of an example; KFAC then uses "expand"'s
            factors). See :class:`~kronfisher.curvature.DenseKroneckerBlock`. A 2-D
            input has one position: every mode is the same there.
        scale_shift: the block of scale-and-shift layers (LayerNorm, BatchNorm1d/2d,
            GroupNorm; the same for every method): "full" (the exact 2×2 Fisher block of
            (γ_j, β_j) per feature) or "diagonal" (its diagonal). Their damped matrix is
            F_j + λI under every ``damping_scheme``.
        blocks: overrides of the curvature block per layer name or layer kind (a name
            wins over a kind; the default map is
            :data:`~kronfisher.curvature.DEFAULT_BLOCKS`).
        adapters: module type → adapter class for this preconditioner only (see
            :class:`Preconditioner`).

    Raises:
        ValueError: bad options, or a layer kind without a block for this method.
        TypeError: ``blocks`` is not a mapping to :class:`CurvatureBlock` subclasses.

    Repeated conditions warn once per layer and kind and are counted in
    :attr:`warning_counts` (see :mod:`~kronfisher.preconditioner.warning_log`): a two-term
    damped matrix clamped where it is not positive definite, a singular damped factor
    retried with more damping, a solver's LAPACK failure (another solver is used; if all
    fail the layer keeps its previous curvature, or with none yet KFAC's factors).
    """

    method: str = ""

    def __init__(
        self,
        model: nn.Module,
        *,
        method: str | None = None,
        damping: float | Callable[[int], float] = 1e-3,
        ema_decay: float = 0.95,
        cov_update_freq: int = 1,
        inv_update_freq: int = 1,
        kl_clip: float | None = None,
        lr: float | Callable[[int], float] | torch.optim.Optimizer | None = None,
        solver: str = "auto",
        rank: int | None = None,
        conv_radius: int | str = 0,
        damping_scheme: str = "tikhonov",
        tol: float | None = None,
        max_iter: int | None = None,
        nonfinite: str = "skip",
        kl_clip_mode: str = "lr2",
        ema_counter: str = "updates",
        skip_layers: Iterable[str | type[nn.Module]] | None = None,
        process_group: object = None,
        weight_sharing: str = "expand",
        blocks: Mapping[str, type[CurvatureBlock]] | None = None,
        adapters: Mapping[type[nn.Module], type[LayerAdapter]] | None = None,
        scale_shift: str = "full",
    ):
        method = method or self.method
        self.scale_shift = check_scale_shift_mode(scale_shift)
        if damping_scheme not in SCHEMES:
            raise ValueError(f"damping_scheme must be one of {SCHEMES}, got {damping_scheme!r}")
        self.estimator = KroneckerEstimator(
            method, solver=solver, rank=rank, conv_radius=conv_radius, tol=tol,
            max_iter=max_iter,
        )
        overrides = check_overrides(blocks)
        if weight_sharing not in WEIGHT_SHARING:
            raise ValueError(f"weight_sharing must be one of {WEIGHT_SHARING}, got"
                             f" {weight_sharing!r}")
        self.weight_sharing = weight_sharing
        self.method = method
        self.damping_scheme = damping_scheme
        self.warning_log = WarningLog()
        super().__init__(
            model, damping=damping, ema_decay=ema_decay, cov_update_freq=cov_update_freq,
            inv_update_freq=inv_update_freq, kl_clip=kl_clip, lr=lr, nonfinite=nonfinite,
            kl_clip_mode=kl_clip_mode, ema_counter=ema_counter, skip_layers=skip_layers,
            process_group=process_group, adapters=adapters,
        )
        options = BlockOptions(self.estimator, self.warning_log, weight_sharing,
                               scale_shift=self.scale_shift, sync=self.sync)
        for s in self.layers.values():
            cls = block_class(s.name, s.adapter.kind, method, overrides)
            s.block = cls(s.name, s.adapter, options)

    @property
    def warning_counts(self) -> dict[tuple[str, str], int]:
        """Occurrences of each summarised warning so far, by (layer name, kind)."""
        return dict(self.warning_log.counts)

    @staticmethod
    def _block(state: LayerState) -> CurvatureBlock:
        if state.block is None:  # set for every layer at construction
            raise RuntimeError(f"layer {state.name!r} has no curvature block")
        return state.block

    def _update_curvature(self, batch: dict[LayerState, LayerStatistics]) -> None:
        for s, stats in batch.items():
            block = self._block(s)
            new = block.estimate(stats, s.curvature)
            if new is None:  # the block keeps the previous curvature
                continue
            if type(self)._adjust_estimate is not KroneckerPreconditioner._adjust_estimate:
                # data parallel: applied to the inputs of the whole batch (sync)
                new = self.sync.adjust(s.name, self._adjust_estimate, new, stats.a)
            s.curvature = block.average(s.curvature, new, self._decay(s))
            s.updates += 1

    def _adjust_estimate(self, new: Any, a: Tensor) -> Any:
        """Hook applied to each new estimate before the running average (identity here)."""
        return new

    def _gathers_statistics(self, state: LayerState) -> bool:
        """Data parallel: only blocks other than Kronecker ones get every rank's statistics.

        A Kronecker block's estimate is reduced across the ranks instead (through
        ``sync``, given in its ``BlockOptions``).
        """
        return not isinstance(state.block, KroneckerBlock)

    def _finite(self, state: LayerState, curvature) -> bool:
        return self._block(state).finite(curvature)

    def _refresh_inverse(self, state: LayerState) -> None:
        if state.curvature is None:  # step() checks this before refreshing
            raise RuntimeError(f"layer {state.name!r} has no curvature to factorise yet")
        self._factorize(state, state.curvature, self.damping)

    def _factorize(self, state: LayerState, source, damping: float,
                   scheme: str | None = None) -> None:
        """Factorise ``source`` with ``damping`` into ``state.inverse`` (the block's way).

        ``scheme``: the damping scheme (default: this one's).
        """
        fac = self._block(state).factorize(source, damping, scheme or self.damping_scheme)
        state.inverse_source, state.inverse_damping = source, damping
        state.inverse = fac

    def _precondition(self, grads: dict[LayerState, Tensor]) -> dict[LayerState, Tensor]:
        return {s: self._block(s).precondition(s.inverse, G) for s, G in grads.items()}

    def curvature_product(self, mats: dict[str, Tensor]) -> dict[str, Tensor]:
        """M vec(V) per layer with M the damped matrix each layer's solve inverts.

        See :meth:`Preconditioner.curvature_product`; M is the current factorisation's
        (e.g. :meth:`~kronfisher.linalg.KroneckerFactorization.apply`), with the damping
        it was built with.
        """
        out = {}
        for name, V in mats.items():
            s = self._registered(name)
            if s.inverse is None:
                raise RuntimeError(f"layer {name!r} has no factorisation yet: call step() first")
            shape = s.adapter.layout.shape
            if tuple(V.shape) != shape:
                raise ValueError(f"layer {name!r}: V has shape {tuple(V.shape)}, the layer's"
                                 f" gradient matrix is {shape}")
            out[name] = self._block(s).curvature_product(s.inverse, V)
        return out

    def _pack(self, state: LayerState, curvature):
        return self._block(state).pack(curvature)

    def _extra_state(self) -> dict:
        return {"kind": "kronecker", "method": self.method, "damping_scheme": self.damping_scheme,
                "solver": self.estimator.solver, "rank": self.estimator.rank,
                "conv_radius": self.estimator.conv_radius, "weight_sharing": self.weight_sharing,
                "scale_shift": self.scale_shift}

    def _check_extra_state(self, extra: dict) -> dict:
        kind = state_kind(extra)
        if kind != "kronecker":
            source = "ExactNG" if kind == "exact" else "an unknown kind of preconditioner"
            raise ValueError(
                f"state_dict is from {source}, this is {type(self).__name__} (the Kronecker"
                f" method {self.method!r}): load it into the kind of preconditioner that saved it")
        if extra.get("method") != self.method:
            raise ValueError(
                f"state_dict is from method {extra.get('method')!r}, this is {self.method!r}:"
                " load it into a preconditioner of that method (the curvature of one method"
                " is not the curvature of another)")
        for key, mine in (("rank", self.estimator.rank),
                          ("conv_radius", self.estimator.conv_radius),
                          ("weight_sharing", self.weight_sharing),
                          ("scale_shift", self.scale_shift)):
            if key in extra and extra[key] != mine:
                raise ValueError(f"state_dict was made with {key}={extra[key]!r}, this"
                                 f" {type(self).__name__} has {key}={mine!r}")
        scheme = extra.get("damping_scheme", self.damping_scheme)
        if scheme not in SCHEMES:
            raise ValueError(f"state_dict damping_scheme must be one of {SCHEMES}, got {scheme!r}")
        return {"damping_scheme": scheme}

    def _check_packed(self, state: LayerState, key: str, packed):
        dtype, device = curvature_dtype(state)
        return self._block(state).unpack(
            packed, f"state_dict layer {state.name!r}: the saved {key}", dtype, device)

    def _factorize_loaded(self, state: LayerState, source, damping: float, extra: dict) -> None:
        self._factorize(state, source, damping, extra["damping_scheme"])

    def _load_extra_state(self, extra: dict) -> None:
        self.damping_scheme = extra["damping_scheme"]


class KFAC(KroneckerPreconditioner):
    """K-FAC (Martens & Grosse 2015; KFC for Conv2d): A_K ⊗ G_K per layer."""

    method = "kfac"


class KPSVD(KroneckerPreconditioner):
    """Best rank-1 (``rank=k``: rank-k) Kronecker approximation of each Fisher block."""

    method = "kpsvd"


class Deflation(KroneckerPreconditioner):
    """Best rank-2 Kronecker approximation.

    ``solver="power"`` runs the paper's algorithm (power iteration, then deflation); the
    default solver gives the same matrix.
    """

    method = "deflation"


class KFACCorrected(KroneckerPreconditioner):
    """KFAC plus the best rank-1 Kronecker correction of its residual."""

    method = "kfac_corrected"


class Lanczos(KroneckerPreconditioner):
    """Best rank-2 Kronecker approximation (Golub–Kahan–Lanczos bidiagonalisation)."""

    method = "lanczos"
