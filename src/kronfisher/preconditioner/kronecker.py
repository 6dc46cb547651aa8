"""Kronecker-factored preconditioners: one class, parameterised by a curvature estimator."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ..curvature import KroneckerEstimator
from ..curvature.estimator import CurvatureSolveError, SolverFallback
from ..curvature.methods import method_rank
from ..linalg import SCHEMES, KroneckerFactorization, KroneckerSum, SingularFactorError
from ._checks import grad_matrix_shape, typed_curvature
from .base import LayerState, Preconditioner
from .casting import curvature_dtype
from .mixed_precision import GradScalerLike
from .state import state_kind
from .warning_log import WarningLog

__all__ = ["KroneckerPreconditioner", "KFAC", "KPSVD", "Deflation", "KFACCorrected", "Lanczos"]

SINGULAR_RETRIES = 3
"""Retries with 10× the damping after a SingularFactorError (λ, 10λ, 100λ, 1000λ)."""
RETRY_MIN_DAMPING = 1e-8
"""Damping of the first retry when the damping was 0."""


def _kronecker_curvature(state: LayerState) -> KroneckerSum | None:
    """The layer's curvature, which every Kronecker method keeps as a KroneckerSum."""
    return typed_curvature(state, KroneckerSum, "a Kronecker preconditioner's", "KroneckerSum")


class KroneckerPreconditioner(Preconditioner):
    """Natural-gradient preconditioner with a Kronecker-structured curvature per layer.

    Each layer's gradient matrix V (d_g × d_a, bias last column) is replaced by
    ``curvature.solve(V, damping, damping_scheme)`` (see :class:`KroneckerSum`).

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
        tol, max_iter: solver tolerance (relative) and iteration cap.

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
        factor_dtype: torch.dtype | None = None,
        grad_scaler: GradScalerLike | None = None,
    ):
        method = method or self.method
        if damping_scheme not in SCHEMES:
            raise ValueError(f"damping_scheme must be one of {SCHEMES}, got {damping_scheme!r}")
        self.estimator = KroneckerEstimator(
            method, solver=solver, rank=rank, conv_radius=conv_radius, tol=tol,
            max_iter=max_iter,
        )
        self.method = method
        self.damping_scheme = damping_scheme
        self.warning_log = WarningLog()
        super().__init__(
            model, damping=damping, ema_decay=ema_decay, cov_update_freq=cov_update_freq,
            inv_update_freq=inv_update_freq, kl_clip=kl_clip, lr=lr, nonfinite=nonfinite,
            kl_clip_mode=kl_clip_mode, ema_counter=ema_counter, skip_layers=skip_layers,
            factor_dtype=factor_dtype, grad_scaler=grad_scaler,
        )

    @property
    def warning_counts(self) -> dict[tuple[str, str], int]:
        """Occurrences of each summarised warning so far, by (layer name, kind)."""
        return dict(self.warning_log.counts)

    def _update_curvature(self, batch: dict[LayerState, tuple[Tensor, Tensor, tuple]]) -> None:
        for s, (a, g, spatial) in batch.items():
            new = self._estimate(s, a, g, spatial)
            if new is None:  # every solver failed: the previous curvature stays
                continue
            new = self._adjust_estimate(new, a)
            s.curvature = self.estimator.average(_kronecker_curvature(s), new, self._decay(s))
            s.updates += 1

    def _adjust_estimate(self, new: KroneckerSum, a: Tensor) -> KroneckerSum:
        """Hook applied to each new estimate before the running average (identity here)."""
        return new

    def _estimate(self, s: LayerState, a: Tensor, g: Tensor, spatial: tuple
                  ) -> KroneckerSum | None:
        """This batch's estimate, or None to keep the previous curvature.

        A LAPACK failure of the solver never escapes: the estimator tries the other
        solvers; if all fail the layer keeps its previous curvature, or, with none yet,
        gets KFAC's factors (padded with zero terms). Each case is summarised in
        :attr:`warning_log`.
        """
        old = _kronecker_curvature(s)
        try:
            new = self.estimator.estimate(a, g, spatial, old)
        except CurvatureSolveError as e:
            if old is not None:
                self.warning_log.report(
                    s.name, "curvature_kept", f"layer {s.name!r}: {e}; this curvature batch is"
                    " dropped and the layer keeps its previous curvature", stacklevel=6)
                return None
            self.warning_log.report(
                s.name, "curvature_kept", f"layer {s.name!r}: {e}; no previous curvature, so"
                " the layer uses KFAC's factors for this batch", stacklevel=6)
            return self.estimator.kfac_fallback(a, g)
        fallback = new.info.get("fallback")
        if isinstance(fallback, SolverFallback):
            self.warning_log.report(
                s.name, "solver_fallback", f"layer {s.name!r}: the {self.method} solver failed"
                f" ({'; '.join(fallback.failed)}); used the {fallback.used!r} solver instead",
                stacklevel=6)
        return new

    def _refresh_inverse(self, state: LayerState) -> None:
        curvature = _kronecker_curvature(state)
        if curvature is None:  # step() checks this before refreshing
            raise RuntimeError(f"layer {state.name!r} has no curvature to factorise yet")
        self._factorize(state, curvature, self.damping)

    def _factorize(self, state: LayerState, source: KroneckerSum, damping: float,
                   scheme: str | None = None) -> None:
        """Factorise ``source`` with ``damping`` into ``state.inverse``.

        A singular damped matrix is retried with 10× the damping (at least 1e-8), up to
        three times; the factorisation records the damping it was actually built with.
        Retries and clamped two-term eigenvalues are summarised in :attr:`warning_log`
        (one warning per layer and kind, every occurrence counted). ``scheme``: the damping
        scheme (default: this one's).
        """
        lam = damping
        fac: KroneckerFactorization | None = None
        for attempt in range(SINGULAR_RETRIES + 1):
            try:
                fac = source.factorize(lam, scheme or self.damping_scheme, warn=False)
                break
            except SingularFactorError as e:
                if attempt == SINGULAR_RETRIES:
                    raise SingularFactorError(
                        f"layer {state.name!r}: cannot factorise the damped curvature even with"
                        f" damping {lam:g}: {e}"
                    ) from e
                lam = max(lam * 10.0, RETRY_MIN_DAMPING)
                self.warning_log.report(
                    state.name, "singular_retry",
                    f"layer {state.name!r}: {e}; retrying with damping {lam:g}", stacklevel=5)
        if fac is not None and fac.clamped:
            self.warning_log.report(
                state.name, "clamped", f"layer {state.name!r}: the two-term Kronecker"
                f" approximation is not positive definite in {fac.clamped} direction(s) at"
                f" damping {fac.damping:g}: 1 + s_g s_a raised to the floor there",
                stacklevel=5)
        state.inverse_source, state.inverse_damping = source, damping
        state.inverse = fac

    def _precondition(self, grads: dict[LayerState, Tensor]) -> dict[LayerState, Tensor]:
        out = {}
        for s, G in grads.items():
            if not isinstance(s.inverse, KroneckerFactorization):  # step() refreshed it
                raise RuntimeError(f"layer {s.name!r} has no Kronecker factorisation")
            out[s] = s.inverse.solve(G).to(G.dtype)
        return out

    def curvature_product(self, mats: dict[str, Tensor]) -> dict[str, Tensor]:
        """M vec(V) per layer with M the damped Kronecker matrix each layer's solve inverts.

        See :meth:`Preconditioner.curvature_product`; M is the current factorisation's
        (:meth:`~kronfisher.linalg.KroneckerFactorization.apply`), with the damping it was
        built with.
        """
        out = {}
        for name, V in mats.items():
            fac = self._registered(name).inverse
            if not isinstance(fac, KroneckerFactorization):
                raise RuntimeError(f"layer {name!r} has no factorisation yet: call step() first")
            if tuple(V.shape) != fac.shape:
                raise ValueError(f"layer {name!r}: V has shape {tuple(V.shape)}, the layer's"
                                 f" gradient matrix is {fac.shape}")
            out[name] = fac.apply(V).to(V.dtype)
        return out

    def _pack(self, curvature):
        if curvature is None:
            return None
        return [(A.clone(), G.clone()) for A, G in curvature.terms]

    def _unpack(self, packed):
        return None if packed is None else KroneckerSum([tuple(t) for t in packed])

    def _extra_state(self) -> dict:
        extra = {"kind": "kronecker", "method": self.method,
                 "damping_scheme": self.damping_scheme, "solver": self.estimator.solver,
                 "rank": self.estimator.rank, "conv_radius": self.estimator.conv_radius}
        if hasattr(self, "weight_sharing"):  # the method configuration, once it exists
            extra["weight_sharing"] = self.weight_sharing
        return extra

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
                          ("weight_sharing", getattr(self, "weight_sharing", None))):
            if key in extra and extra[key] != mine:
                raise ValueError(f"state_dict was made with {key}={extra[key]!r}, this"
                                 f" {type(self).__name__} has {key}={mine!r}")
        scheme = extra.get("damping_scheme", self.damping_scheme)
        if scheme not in SCHEMES:
            raise ValueError(f"state_dict damping_scheme must be one of {SCHEMES}, got {scheme!r}")
        return {"damping_scheme": scheme}

    def _check_packed(self, state: LayerState, key: str, packed) -> KroneckerSum:
        where = f"state_dict layer {state.name!r}: the saved {key}"
        pairs = isinstance(packed, list | tuple) and all(
            isinstance(t, list | tuple) and len(t) == 2
            and all(isinstance(x, Tensor) and x.dtype.is_floating_point and x.ndim == 2
                    for x in t) for t in packed)
        if not pairs or not packed:
            raise ValueError(f"{where} is not a list of (A, G) floating-point matrix pairs"
                             f" (got {type(packed).__name__}; a state of ExactNG?)")
        n_terms = method_rank(self.method, self.estimator.rank)
        if len(packed) != n_terms:
            rank = f" (rank={self.estimator.rank})" if self.estimator.rank is not None else ""
            raise ValueError(f"{where} has {len(packed)} Kronecker term(s), this"
                             f" {type(self).__name__}{rank} keeps {n_terms}")
        d_g, d_a = grad_matrix_shape(state)
        for A, G in packed:
            if tuple(A.shape) != (d_a, d_a) or tuple(G.shape) != (d_g, d_g):
                raise ValueError(
                    f"{where} has factors A {tuple(A.shape)}, G {tuple(G.shape)}; this model's"
                    f" layer needs A ({d_a}, {d_a}), G ({d_g}, {d_g}) (same layer names but"
                    " other widths?)")
        dtype, device = curvature_dtype(state, self.factor_dtype)
        return KroneckerSum([(A.to(device, dtype), G.to(device, dtype)) for A, G in packed])

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
