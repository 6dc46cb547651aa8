"""The curvature block of a scale-and-shift layer: an exact 2×2 Fisher block per feature.

For feature j with per-example gradients dγ_bj, dβ_bj (:mod:`kronfisher.layers.scale_shift`)

    F_j = (1/m) Σ_b [dγ_bj; dβ_bj] [dγ_bj; dβ_bj]ᵀ,

the diagonal blocks of the layer's Fisher in the (γ_j, β_j) pairs; ``mode="diagonal"``
keeps only diag(F_j), and a module without a shift has the 1×1 block E[dγ²]. These
blocks are not an approximation made for speed: every Kronecker method uses them as they
are. The preconditioned gradient is (F_j + λI)⁻¹ (∇γ_j, ∇β_j), a closed-form 2×2 inverse
batched over the features (no LAPACK call).

Gradients use the layer's gradient-matrix form V = [∇γ ∇β] of shape (C, k), k = 2 (or 1
without a shift), features flattened in ``weight.reshape(-1)`` order; its column-stacking
vec is [∇γ; ∇β], the order of :meth:`ScaleShiftCurvature.to_dense`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..linalg import SingularFactorError, all_finite
from .estimator import pow2_scale

__all__ = ["SCALE_SHIFT_MODES", "ScaleShiftCurvature", "ScaleShiftInverse",
           "estimate_scale_shift", "check_scale_shift_mode", "checked_scale_shift_blocks"]

SCALE_SHIFT_MODES = ("full", "diagonal")
"""``scale_shift=`` options: the full 2×2 block per feature, or its diagonal."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_scale_shift_mode(mode: object) -> str:
    """``mode`` if it is one of :data:`SCALE_SHIFT_MODES`.

    Raises:
        ValueError: any other value.
    """
    if not isinstance(mode, str) or mode not in SCALE_SHIFT_MODES:
        raise ValueError(f"scale_shift must be one of {SCALE_SHIFT_MODES}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class ScaleShiftInverse:
    """The damped per-feature blocks M_j = F_j + λI and their closed-form inverses.

    Attributes:
        damped: M_j as (C, k, k).
        inverse: M_j⁻¹ as (C, k, k).
        damping: the λ it was built with.
    """

    damped: Tensor
    inverse: Tensor
    damping: float

    @property
    def shape(self) -> tuple[int, int]:
        """(C, k): the shape of the gradient matrix it solves with."""
        return int(self.damped.shape[0]), int(self.damped.shape[1])

    def _check(self, V: Tensor) -> None:
        if tuple(V.shape) != self.shape:
            raise ValueError(f"the gradient matrix must be {self.shape} ([∇γ ∇β] per feature),"
                             f" got {tuple(V.shape)}")

    def solve(self, V: Tensor) -> Tensor:
        """M_j⁻¹ (∇γ_j, ∇β_j) for every feature: V (C, k) → (C, k), V's dtype.

        Raises:
            ValueError: ``V`` is not (C, k).
        """
        self._check(V)
        x = torch.einsum("cpq,cq->cp", self.inverse, V.to(self.inverse.dtype))
        return x.to(V.dtype)

    def apply(self, V: Tensor) -> Tensor:
        """M_j (v_γj, v_βj) for every feature (what :meth:`solve` inverts), V's dtype.

        Raises:
            ValueError: ``V`` is not (C, k).
        """
        self._check(V)
        x = torch.einsum("cpq,cq->cp", self.damped, V.to(self.damped.dtype))
        return x.to(V.dtype)

    def to_dense(self) -> Tensor:
        """The damped matrix :meth:`solve` inverts, dense (C·k, C·k) in [γ; β] order."""
        return _dense(self.damped)


def _dense(blocks: Tensor) -> Tensor:
    """(C, k, k) per-feature blocks as the (C·k, C·k) matrix on vec([γ β]) = [γ; β]."""
    c, k, _ = blocks.shape
    out = blocks.new_zeros(k, c, k, c)
    idx = torch.arange(c, device=blocks.device)
    out[:, idx, :, idx] = blocks  # out[p, j, q, j] = F_j[p, q]
    return out.reshape(k * c, k * c)


@dataclass(frozen=True)
class ScaleShiftCurvature:
    """The per-feature Fisher blocks of one scale-and-shift layer.

    Attributes:
        blocks: F_j as (C, k, k), k = 2 ([γ, β]) or 1 (no shift); exactly symmetric, and
            diagonal when ``diagonal``.
        diagonal: whether the off-diagonal entries E[dγ dβ] were dropped.
    """

    blocks: Tensor
    diagonal: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(C, k): the shape of the layer's gradient matrix [∇γ ∇β]."""
        return int(self.blocks.shape[0]), int(self.blocks.shape[1])

    def to_dense(self, damping: float = 0.0) -> Tensor:
        """Σ_j F_j (+ λI), dense (C·k, C·k) in [γ; β] order (for tests and small checks)."""
        d = _dense(self.blocks)
        return d + damping * torch.eye(d.shape[0], dtype=d.dtype, device=d.device)

    def finite(self) -> bool:
        """Whether every entry is finite."""
        return all_finite(self.blocks)

    def to(self, dtype: torch.dtype, device: torch.device) -> ScaleShiftCurvature:
        """The blocks cast to ``dtype`` on ``device`` (itself if they already are)."""
        b = self.blocks
        if b.dtype == dtype and b.device == device:
            return self
        return ScaleShiftCurvature(b.to(device, dtype), self.diagonal)

    @staticmethod
    def average(old: ScaleShiftCurvature | None, new: ScaleShiftCurvature,
                decay: float) -> ScaleShiftCurvature:
        """The running average decay·old + (1 − decay)·new (``new`` if no old or decay 0)."""
        if old is None or decay == 0.0:
            return new
        return ScaleShiftCurvature(torch.lerp(old.blocks, new.blocks, 1.0 - decay),
                                   new.diagonal)

    def factorize(self, damping: float) -> ScaleShiftInverse:
        """M_j = F_j + λI and its inverse in closed form, batched over the features.

        2×2: M⁻¹ = [[M₂₂, −M₁₂], [−M₁₂, M₁₁]] / det M. A block is refused as singular when
        det M ≤ 4·eps·M₁₁M₂₂ (its two directions are parallel to working precision; at
        λ > 0 this needs F_j itself to exceed λ by ~1/eps) or a diagonal entry is ≤ 0.

        Raises:
            SingularFactorError: some M_j is singular to working precision (only possible
                with a tiny or zero damping), naming how many features and the first one.
        """
        F = self.blocks
        eye = torch.eye(F.shape[1], dtype=F.dtype, device=F.device)
        M = F + damping * eye
        eps = torch.finfo(F.dtype).eps
        if F.shape[1] == 1:
            d = M[:, 0, 0]
            bad = ~(d > 0)
            inverse = (1.0 / d)[:, None, None]
        else:
            a, b, c = M[:, 0, 0], M[:, 0, 1], M[:, 1, 1]
            det = a * c - b * b
            bad = ~((a > 0) & (c > 0) & (det > 4 * eps * a * c))
            inverse = torch.stack([torch.stack([c, -b], -1), torch.stack([-b, a], -1)], -2)
            inverse = inverse / det[:, None, None]
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise SingularFactorError(
                f"{int(bad.sum())} of {F.shape[0]} scale-and-shift blocks F_j + λI are singular"
                f" at damping {damping:g} (first: feature {first}, F_j ="
                f" {F[first].tolist()}); use a larger damping")
        return ScaleShiftInverse(M, inverse, float(damping))


def estimate_scale_shift(J: Tensor, mode: str = "full") -> ScaleShiftCurvature:
    """F_j = (1/m) Σ_b [dγ_bj; dβ_bj][dγ_bj; dβ_bj]ᵀ for every feature j.

    Scale-safe like the Kronecker estimators: float16/bfloat16 gradients are promoted to
    float32, and divided by a power of two near their largest magnitude before the
    squares are formed (exact), which is multiplied back after. A result that is not
    representable comes back with Inf entries (the preconditioner drops such an update).

    Args:
        J: the per-example gradients as (m, C, k): [dγ_bj, dβ_bj] (k = 2) or [dγ_bj]
            (k = 1) for example b and feature j
            (``kronfisher.layers.scale_shift.ScaleShiftGrads.stacked()``).
        mode: "full" or "diagonal" (E[dγ dβ] set to 0).

    Raises:
        ValueError: unknown ``mode``, ``J`` not (m, C, 1 or 2), or no examples.
    """
    check_scale_shift_mode(mode)
    if J.ndim != 3 or J.shape[2] not in (1, 2):
        raise ValueError(f"per-example gradients must be (m, C, 1 or 2), got {tuple(J.shape)}")
    if J.shape[0] == 0:
        raise ValueError("cannot estimate a Fisher block from 0 examples")
    if J.dtype in _LOW_PRECISION:
        J = J.float()
    s = pow2_scale(J)
    if s != 1.0:
        J = J / s
    if mode == "diagonal":
        blocks = torch.diag_embed(J.square().mean(0))
    else:
        blocks = torch.einsum("mcp,mcq->cpq", J, J) / J.shape[0]
        blocks = 0.5 * (blocks + blocks.mT)  # exactly symmetric
    if s != 1.0:
        blocks = blocks * (s * s)
    return ScaleShiftCurvature(blocks, mode == "diagonal")


def checked_scale_shift_blocks(where: str, packed: object, shape: tuple[int, int],
                               mode: str) -> ScaleShiftCurvature:
    """A saved (C, k, k) block tensor checked against a layer of gradient shape (C, k).

    Args:
        where: what is loaded, for the messages (e.g. "state_dict layer 'ln': curvature").
        packed: the saved value.
        shape: (C, k) of the layer's gradient matrix [∇γ ∇β].
        mode: this preconditioner's ``scale_shift`` mode.

    Raises:
        ValueError: not a floating tensor, another shape, NaN/Inf, not symmetric, or
            off-diagonal entries in "diagonal" mode — naming ``where`` and the problem.
    """
    if not (isinstance(packed, Tensor) and packed.dtype.is_floating_point):
        raise ValueError(f"{where} is not a floating-point tensor of per-feature blocks (got"
                         f" {type(packed).__name__}; a state of a Kronecker layer?)")
    c, k = shape
    if tuple(packed.shape) != (c, k, k):
        raise ValueError(f"{where} is {tuple(packed.shape)}, this layer needs ({c}, {k}, {k})"
                         " (same layer names but other widths, or a shift added/removed?)")
    if not all_finite(packed):
        raise ValueError(f"{where} has NaN or Inf entries (saved from a diverged run?)")
    if not torch.equal(packed, packed.mT):
        raise ValueError(f"{where}: the 2×2 blocks are not symmetric")
    if mode == "diagonal" and k == 2 and bool((packed[:, 0, 1] != 0).any()):
        raise ValueError(f"{where} has E[dγ dβ] entries but this preconditioner has"
                         " scale_shift='diagonal' (saved with 'full')")
    return ScaleShiftCurvature(packed, mode == "diagonal")
