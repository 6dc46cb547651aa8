"""Exact natural gradient for small networks: dense Fisher blocks or the full Fisher."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..curvature.estimator import pow2_scale
from ..layers import LayerAdapter, LayerStatistics, per_example_gradients
from ..linalg import SingularFactorError
from ..linalg.numerics import all_finite, eigh
from ._checks import as_int, check_damping, grad_matrix_shape, typed_curvature
from .base import LayerState, Preconditioner
from .casting import cast_curvature, curvature_dtype
from .state import state_kind

__all__ = ["ExactNG", "per_example_gradients", "DenseEigh", "FullFisherInverse"]


@dataclass
class DenseEigh:
    """F = U diag(e) Uᵀ of one dense Fisher block; solves (F + λI) x = vec(G)."""

    e: Tensor
    U: Tensor
    damping: float

    def solve(self, G: Tensor) -> Tensor:
        """(F + λI)⁻¹ vec(G) as a matrix of G's shape (d_g, d_a) and dtype."""
        v = G.mT.reshape(-1).to(self.e.dtype)
        x = self.U @ ((self.U.mT @ v) / (self.e.clamp_min(0) + self.damping))
        return x.reshape(G.shape[1], G.shape[0]).mT.to(G.dtype)

    def apply(self, G: Tensor) -> Tensor:
        """(F + λI) vec(G) as a matrix of G's shape and dtype (what :meth:`solve` inverts)."""
        v = G.mT.reshape(-1).to(self.e.dtype)
        x = self.U @ ((self.U.mT @ v) * (self.e.clamp_min(0) + self.damping))
        return x.reshape(G.shape[1], G.shape[0]).mT.to(G.dtype)


@dataclass
class FullFisherInverse:
    """The eigendecomposition of the full Fisher ``source`` shared by all layers.

    Kept with the damping and the step it was computed at.
    """

    e: Tensor
    U: Tensor
    source: Tensor
    damping: float
    step: int


def _scaled_jacobian(state: LayerState, stats: LayerStatistics) -> tuple[Tensor, float]:
    """(J/c, c): the layer's per-example gradients divided by a power of two c (exact).

    J comes from the layer's adapter (vec(Σ_t g aᵀ) for dense and conv layers, an
    embedding's from its token ids, [dγ; dβ] for scale-and-shift layers). float16 and
    bfloat16 statistics are promoted to float32 (LAPACK has no half-precision eigh); the
    scaling keeps JᵀJ from overflowing before it is scaled back by c². ``a`` is rescaled
    only where J is linear in it; integer inputs (an embedding's token ids) are indices,
    never scaled.
    """
    a, g = stats.a, stats.g
    low = (torch.float16, torch.bfloat16)
    if g.dtype in low:
        g = g.float()
    if a.dtype in low:
        a = a.float()
    sa = pow2_scale(a) if a.is_floating_point() and state.adapter.inputs_rescalable else 1.0
    sg = pow2_scale(g)
    return state.adapter.per_example_gradients(a / sa if sa != 1.0 else a, g / sg), sa * sg


def _fisher(Js: list[tuple[Tensor, float]]) -> Tensor:
    """(1/m) JᵀJ of the concatenated per-example gradients, in the original scale."""
    c = max(s for _, s in Js)
    J = torch.cat([J * (s / c) for J, s in Js], 1) if len(Js) > 1 else Js[0][0]
    return (J.mT @ J / J.shape[0]) * (c * c)


def _dense_curvature(state: LayerState) -> Tensor | None:
    """The layer's curvature, which ExactNG keeps as a dense Fisher block."""
    return typed_curvature(state, Tensor, "ExactNG's", "dense Tensor")


def _dense_curvature_value(state: LayerState, c) -> Tensor | None:
    """``c`` (a curvature of ``state``), checked to be a dense Tensor or None."""
    if c is not None and not isinstance(c, Tensor):
        raise TypeError(f"layer {state.name!r}: ExactNG's curvature must be a dense Tensor,"
                        f" got {type(c).__name__}")
    return c


class ExactNG(Preconditioner):
    """Natural gradient with the exact Fisher, solved densely — the reference baseline.

    With ``block_diagonal=True`` each layer uses its exact block
    F_l = (1/m) Σᵢ vec(∇_l ℓᵢ) vec(∇_l ℓᵢ)ᵀ; with ``False`` all registered layers share
    the full Fisher, cross-layer blocks included. Per-example gradients come from the
    same captured (a, g) as the Kronecker methods, by each adapter's
    ``per_example_gradients`` (exact for Linear and Conv2d; for an embedding all its
    positions are summed per example, so its block is the exact one, not "expand"; for a
    scale-and-shift layer [dγ; dβ], so its block is the whole (2C × 2C) Fisher of its
    parameters, not only the per-feature 2×2 blocks the Kronecker preconditioners use). The
    update is (F + λI)⁻¹ ∇, via an eigendecomposition refreshed every
    ``inv_update_freq`` steps. Refuses models whose registered layers have more than
    ``max_params`` parameters (the dense Fisher has that size squared). float16/bfloat16
    models keep their curvature in float32. With ``damping=0`` a singular block raises
    :class:`~kronfisher.linalg.SingularFactorError` naming the layer. The other arguments
    are :class:`Preconditioner`'s (callable ``damping``/``lr``, ``lr=optimizer``,
    ``skip_layers``).
    """

    @property
    def _per_layer_precondition(self) -> bool:  # type: ignore[override]
        """The full Fisher couples every layer: data parallel, every rank solves it."""
        return self.block_diagonal

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: float | Callable[[int], float] = 1e-3,
        block_diagonal: bool = True,
        ema_decay: float = 0.95,
        cov_update_freq: int = 1,
        inv_update_freq: int = 1,
        kl_clip: float | None = None,
        lr: float | Callable[[int], float] | torch.optim.Optimizer | None = None,
        max_params: int = 10_000,
        nonfinite: str = "skip",
        kl_clip_mode: str = "lr2",
        skip_layers: Iterable[str | type[nn.Module]] | None = None,
        process_group: object = None,
        adapters: Mapping[type[nn.Module], type[LayerAdapter]] | None = None,
    ):
        if block_diagonal not in (True, False):
            raise ValueError(f"block_diagonal must be True or False, got {block_diagonal!r}")
        self.block_diagonal = bool(block_diagonal)
        max_params = as_int("max_params", max_params)
        super().__init__(
            model, damping=damping, ema_decay=ema_decay, cov_update_freq=cov_update_freq,
            inv_update_freq=inv_update_freq, kl_clip=kl_clip, lr=lr, nonfinite=nonfinite,
            kl_clip_mode=kl_clip_mode, skip_layers=skip_layers,
            process_group=process_group, adapters=adapters,
        )
        sizes = {n: s.adapter.layout.n_params for n, s in self.layers.items()}
        total = sum(sizes.values())
        largest = total if not block_diagonal else max(sizes.values())
        if largest > max_params:
            raise ValueError(
                f"ExactNG would form a dense {largest} × {largest} Fisher"
                f" ({'full' if not block_diagonal else 'largest block'}); the limit is"
                f" max_params={max_params}. Use a Kronecker method or raise max_params."
            )
        # each layer's vec(Θ) (column stacking of its [W b] layout) in the full Fisher
        self._offsets, off = {}, 0
        for n, k in sizes.items():
            self._offsets[n] = (off, off + k)
            off += k
        self._full: Tensor | None = None  # full Fisher when not block-diagonal
        self._full_updates = 0
        self._full_inverse: FullFisherInverse | None = None

    # -------------------------------------------------------------- curvature
    def _update_curvature(self, batch: dict[LayerState, LayerStatistics]) -> None:
        if self.block_diagonal:
            for s, stats in batch.items():
                F = _fisher([_scaled_jacobian(s, stats)])
                rho = self._decay(s)
                old = _dense_curvature(s)
                s.curvature = F if old is None or rho == 0 else rho * old + (1 - rho) * F
                s.updates += 1
            return
        if len(batch) != len(self.layers):
            missing = sorted(set(self.layers) - {s.name for s in batch})
            raise RuntimeError(
                f"full-Fisher ExactNG needs statistics of every layer; missing {missing}"
            )
        ms = {stats.m for stats in batch.values()}
        if len(ms) != 1:
            raise RuntimeError("all layers must see the same examples for the full Fisher")
        F = _fisher([_scaled_jacobian(s, stats) for s, stats in
                     sorted(batch.items(), key=lambda kv: self._offsets[kv[0].name][0])])
        if not all_finite(F):
            bad = [n for n, (lo, hi) in self._offsets.items()
                   if not all_finite(F[lo:hi, lo:hi])] or sorted(self.layers)
            self._curvature_rejected(bad[0], f"the exact Fisher blocks of {bad} overflow"
                                     " their dtype (the full-Fisher update is skipped for"
                                     " every layer)", stacklevel=6)
            return
        rho = min(1.0 - 1.0 / (self._full_updates + 1), self.ema_decay)
        self._full = F if self._full is None or rho == 0 else rho * self._full + (1 - rho) * F
        self._full_updates += 1
        for s in self.layers.values():
            lo, hi = self._offsets[s.name]
            s.curvature = self._full[lo:hi, lo:hi]
            s.updates = self._full_updates

    def _refresh_inverse(self, state: LayerState) -> None:
        if self.block_diagonal:
            curvature = _dense_curvature(state)
            if curvature is None:  # step() checks this before refreshing
                raise RuntimeError(f"layer {state.name!r} has no curvature to factorise yet")
            self._factorize(state, curvature, self.damping)
            return
        inv = self._full_inverse
        if inv is None or inv.damping != self.damping or (
                self.steps % self.inv_update_freq == 0 and inv.step != self.steps):
            if self._full is None:  # set together with every layer's curvature
                raise RuntimeError("no full Fisher to factorise yet")
            e, U = eigh(self._full)
            self._check_invertible("the full Fisher", e, self.damping)
            inv = self._full_inverse = FullFisherInverse(e, U, self._full, self.damping,
                                                         self.steps)
        state.inverse, state.inverse_source = inv, inv.source
        state.inverse_damping = self.damping

    def _factorize(self, state: LayerState, source: Tensor, damping: float) -> None:
        if not self.block_diagonal:
            return  # the shared full-Fisher inverse is restored by _load_extra_state
        e, U = eigh(source)
        self._check_invertible(f"layer {state.name!r}", e, damping)
        state.inverse = DenseEigh(e, U, damping)
        state.inverse_source, state.inverse_damping = source, damping

    @staticmethod
    def _check_invertible(what: str, e: Tensor, damping: float) -> None:
        """Raise SingularFactorError if F + λI is numerically singular (only when λ = 0)."""
        if damping > 0:
            return
        top = float(e.abs().max()) if e.numel() else 0.0
        low = float(e.min()) if e.numel() else 0.0
        if low <= e.shape[0] * torch.finfo(e.dtype).eps * top:
            raise SingularFactorError(
                f"{what}: the exact Fisher is singular (smallest eigenvalue {low:.3g}, largest"
                f" {top:.3g}) and damping is 0, so (F + λI)⁻¹ does not exist; use damping > 0"
                " (a batch smaller than the layer's parameter count always gives a singular"
                " Fisher)"
            )

    def _precondition(self, grads: dict[LayerState, Tensor]) -> dict[LayerState, Tensor]:
        if self.block_diagonal:
            out = {}
            for s, G in grads.items():
                if not isinstance(s.inverse, DenseEigh):  # step() refreshed it
                    raise RuntimeError(f"layer {s.name!r} has no dense Fisher inverse")
                out[s] = s.inverse.solve(G)
            return out
        if self._full_inverse is None:  # step() refreshed it
            raise RuntimeError("no full-Fisher inverse yet")
        e, U = self._full_inverse.e, self._full_inverse.U
        v = torch.zeros(e.shape[0], dtype=e.dtype, device=e.device)
        for s, G in grads.items():
            lo, hi = self._offsets[s.name]
            v[lo:hi] = G.mT.reshape(-1).to(e.dtype)
        x = U @ ((U.mT @ v) / (e.clamp_min(0) + self.damping))
        out = {}
        for s, G in grads.items():
            lo, hi = self._offsets[s.name]
            out[s] = x[lo:hi].reshape(G.shape[1], G.shape[0]).mT.to(G.dtype)
        return out

    def curvature_product(self, mats: dict[str, Tensor]) -> dict[str, Tensor]:
        """(F + λI) vec(V) with the eigendecomposition the solves use (clamped at 0).

        Block-diagonal: each layer's dense block. Full Fisher: the cross-layer blocks
        couple the layers; a registered layer missing from ``mats`` counts as V = 0 (and
        gets no entry in the result). See :meth:`Preconditioner.curvature_product`.
        """
        for name, V in mats.items():
            s = self._registered(name)
            if s.inverse is None:
                raise RuntimeError(f"layer {name!r} has no factorisation yet: call step() first")
            if tuple(V.shape) != grad_matrix_shape(s):
                raise ValueError(f"layer {name!r}: V has shape {tuple(V.shape)}, the layer's"
                                 f" gradient matrix is {grad_matrix_shape(s)}")
        if self.block_diagonal:
            out = {}
            for name, V in mats.items():
                inv = self.layers[name].inverse
                if not isinstance(inv, DenseEigh):
                    raise RuntimeError(f"layer {name!r} has no dense Fisher inverse")
                out[name] = inv.apply(V)
            return out
        full = self._full_inverse
        if full is None:
            raise RuntimeError("no full-Fisher factorisation yet: call step() first")
        v = torch.zeros(full.e.shape[0], dtype=full.e.dtype, device=full.e.device)
        for name, V in mats.items():
            lo, hi = self._offsets[name]
            v[lo:hi] = V.mT.reshape(-1).to(v.dtype)
        x = full.U @ ((full.U.mT @ v) * (full.e.clamp_min(0) + full.damping))
        out = {}
        for name, V in mats.items():
            lo, hi = self._offsets[name]
            out[name] = x[lo:hi].reshape(V.shape[1], V.shape[0]).mT.to(V.dtype)
        return out

    # -------------------------------------------------------------- state
    def _pack(self, state: LayerState, curvature):
        c = _dense_curvature_value(state, curvature)
        return None if c is None else c.clone()

    def _finite(self, state: LayerState, curvature) -> bool:
        c = _dense_curvature_value(state, curvature)
        return c is None or all_finite(c)

    def _after_cast(self, layers: list[LayerState]) -> None:
        if self.block_diagonal or self._full is None:
            return
        dtype, device = curvature_dtype(layers[0])
        self._full = cast_curvature(self._full, dtype, device)
        self._full_inverse = None  # refactorised at the next step
        for s in self.layers.values():
            lo, hi = self._offsets[s.name]
            s.curvature = self._full[lo:hi, lo:hi]
            s.inverse, s.inverse_source, s.inverse_damping = None, None, None

    def _n_params(self) -> int:
        return max(hi for _, hi in self._offsets.values())

    def _dense(self, where: str, packed, n: int, like: LayerState) -> Tensor:
        """A saved dense Fisher checked to be an (n, n) floating tensor, cast like ``like``."""
        if not (isinstance(packed, Tensor) and packed.dtype.is_floating_point):
            raise ValueError(f"{where} is not a dense floating-point tensor (got"
                             f" {type(packed).__name__}; a state of a Kronecker method?)")
        if tuple(packed.shape) != (n, n):
            raise ValueError(f"{where} is {tuple(packed.shape)}, this model needs ({n}, {n})"
                             " (same layer names but other widths?)")
        if not all_finite(packed):
            raise ValueError(f"{where} has NaN or Inf entries (saved from a diverged run?)")
        dtype, device = curvature_dtype(like)
        return packed.to(device, dtype)

    def _check_packed(self, state: LayerState, key: str, packed) -> Tensor:
        d_g, d_a = grad_matrix_shape(state)
        n = self._n_params() if (key == "inverse_source" and not self.block_diagonal) else d_g * d_a
        return self._dense(f"state_dict layer {state.name!r}: the saved {key}", packed, n, state)

    def _extra_state(self) -> dict:
        inv = self._full_inverse
        return {
            "kind": "exact",
            "block_diagonal": self.block_diagonal,
            "full": self._full,
            "full_updates": self._full_updates,
            "full_inverse": None if inv is None else (inv.source, inv.damping, inv.step),
        }

    def _check_extra_state(self, extra: dict) -> dict:
        kind = state_kind(extra)
        if kind != "exact":
            source = (f"the Kronecker method {extra.get('method')!r}" if kind
                      else "an unknown kind of preconditioner")
            raise ValueError(f"state_dict is from {source}, this is ExactNG: load it into the"
                             " kind of preconditioner that saved it")
        if extra.get("block_diagonal") != self.block_diagonal:
            raise ValueError(
                f"state_dict is from ExactNG(block_diagonal={extra.get('block_diagonal')!r}),"
                f" this ExactNG has block_diagonal={self.block_diagonal} (a block-diagonal and a"
                " full Fisher are different curvatures)")
        if self.block_diagonal:
            return {}
        like = next(iter(self.layers.values()))
        n = self._n_params()
        full = extra.get("full")
        out: dict = {"full": None if full is None else self._dense(
            "state_dict full Fisher", full, n, like), "full_inverse": None,
            "full_updates": as_int("state_dict full_updates", extra.get("full_updates"), 0)}
        inv = extra.get("full_inverse")
        if inv is not None:
            if not (isinstance(inv, list | tuple) and len(inv) == 3):
                raise ValueError("state_dict full_inverse must be (source, damping, step)")
            src = self._dense("state_dict full_inverse source", inv[0], n, like)
            damping = check_damping(inv[1])
            e, U = eigh(src)
            out["full_inverse"] = FullFisherInverse(
                e, U, src, damping, as_int("state_dict full_inverse step", inv[2], 0))
        return out

    def _load_extra_state(self, extra: dict) -> None:
        if self.block_diagonal:
            return
        self._full, self._full_updates = extra["full"], extra["full_updates"]
        self._full_inverse = inv = extra["full_inverse"]
        if inv is not None:
            for s in self.layers.values():
                s.inverse, s.inverse_source, s.inverse_damping = inv, inv.source, inv.damping
